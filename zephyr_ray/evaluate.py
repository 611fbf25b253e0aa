"""Stage ``evaluate``: MT-Bench-style single-answer grading and an AlpacaEval-style pairwise win rate.

- **Grading.** The evaluated model (and the pairwise baseline, when it is a model) answers every question of an
  MT-Bench-format set turn by turn, turn 2 seeing its own turn-1 answer, with MT-Bench's temperature per category
  and its answer length. The judge rates each turn 1-10 as ``[[n]]``; for math, reasoning and coding it sees the
  reference answer. Results per model: per category, per turn and overall, with every failure counted (an answer
  that failed, a judgment without a rating), never silently dropped.
- **Win rate.** The judge sees the model's and the baseline's answers to each instruction twice, in both orders, and
  answers ``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie). Per instruction the model scores 1 (win), 0.5 (tie) or 0 (loss),
  averaged over the two orders, so a judge that always prefers the first answer yields ties, not wins. The win rate
  is the mean with a bootstrap interval; because judges favour long answers, it is also given per length-difference
  bin and length-controlled (AlpacaEval 2's idea: a logistic fit of the outcome on the length difference, read at
  zero difference).

Answers and judgments run on the same machinery as the data stages (``ray.data.llm`` vLLM engines, or an
OpenAI-compatible endpoint for the judge). Answerers that share one engine configuration share one engine pass per
turn. Outputs in ``<run_dir>/evaluate/``: the validated sets, ``answers/<model>/``, ``judgments/``,
``results.json``, ``metrics.json`` (the headline numbers, for the manifest) and ``evaluate.png``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from .config import RUN_MODELS, Engine, EvalJudgeConfig, EvalModel, EvaluateConfig, Recipe
from .data import (
    InstructionRow,
    QuestionRow,
    ReferenceAnswerRow,
    ReferenceQuestionRow,
    is_complete,
    validated_once,
    write_rows_atomic,
)
from .judge_prompts import grading_prompt, pairwise_prompt, prompts_version
from .stage import StageResult, Timer, log_rate, stage_section
from .statistics import bootstrap_interval
from .untrusted import json_field, rating

logger = logging.getLogger(__name__)

PROMPT_VERSION = "zephyr-ray-eval-v1"
JUDGE_SYSTEM = "You are an impartial expert who judges the answers of AI assistants."

GRADE_PROMPT = """Judge how good the AI assistant's answer to the user's question below is. Weigh helpfulness,
relevance, accuracy, depth and detail; be objective.{reference_note} First explain your judgment in a few sentences,
then rate the answer on a scale of 1 to 10, written exactly like this: "Rating: [[5]]".
{reference}
[Question]
{question}

[The assistant's answer]
{answer}"""

GRADE_LATER_TURN_PROMPT = """Below is a conversation between a user and an AI assistant. Judge how good the
assistant's answer to the user's LAST question is, given the conversation before it. Weigh helpfulness, relevance,
accuracy, depth and detail; be objective.{reference_note} First explain your judgment in a few sentences, then rate
that last answer on a scale of 1 to 10, written exactly like this: "Rating: [[5]]".
{reference}
{conversation}"""

REFERENCE_NOTE = " A reference answer is given: compare the assistant's answer with it and count every mistake."

PAIRWISE_PROMPT = """Two AI assistants answered the user's question below. Decide which answer is better, weighing
helpfulness, relevance, accuracy, depth and detail. Do not let the order of the answers or their length sway you.
First compare the two answers in a few sentences, then give your verdict written exactly like this: "[[A]]" if
assistant A's answer is better, "[[B]]" if assistant B's answer is better, "[[C]]" for a tie.

[Question]
{question}

[Assistant A's answer]
{answer_a}

[Assistant B's answer]
{answer_b}"""

RATING = re.compile(r"\[\[\s*([0-9]+(?:\.[0-9]+)?)\s*\]\]")
RATING_BACKUP = re.compile(r"\[\s*([0-9]+(?:\.[0-9]+)?)\s*\]")  # FastChat accepts a single bracket too
VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
VERDICT_WINNER = {"A": "first", "B": "second", "C": "tie"}
# Tokens the constrained judge keeps for its rating line ("\n\nRating: [[10]]" and the stop) after the explanation.
RATING_LINE_TOKENS = 16

ANSWER_SCHEMA = pa.schema([
    ("model", pa.string()), ("model_path", pa.string()), ("set", pa.string()), ("question_id", pa.string()),
    ("category", pa.string()), ("turns", pa.list_(pa.string())), ("answers", pa.list_(pa.string())),
    ("errors", pa.list_(pa.string())), ("finish_reasons", pa.list_(pa.string())),
    ("generated_tokens", pa.list_(pa.int64())), ("temperature", pa.float64()),
])
EXACT_MATCH_SCHEMA = pa.schema([
    ("model", pa.string()), ("question_id", pa.string()), ("question", pa.string()), ("reference", pa.string()),
    ("reply", pa.string()), ("error", pa.string()), ("extracted", pa.string()), ("correct", pa.bool_()),
])
JUDGMENT_SCHEMA = pa.schema([
    ("set", pa.string()), ("question_id", pa.string()), ("category", pa.string()), ("turn", pa.int64()),
    ("model", pa.string()), ("opponent", pa.string()), ("order", pa.string()), ("judge", pa.string()),
    ("reference_used", pa.bool_()), ("judge_prompt", pa.string()), ("raw_judgment", pa.string()),
    ("rating", pa.float64()), ("verdict", pa.string()), ("judge_error", pa.string()),
    ("model_chars", pa.int64()), ("opponent_chars", pa.int64()),
])


# ---------------------------------------------------------------------------------------------------------------
# The evaluation sets
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class EvaluationSets:
    questions: list[dict[str, Any]]  # QuestionRow, ``reference`` filled in from the reference answers
    instructions: list[dict[str, Any]]  # InstructionRow; from the questions' first turns when pairwise has no prompts
    counts: dict[str, Any]
    checkable: list[dict[str, Any]] = field(default_factory=list)  # ReferenceQuestionRow (exact match)


def _natural(value: str) -> tuple:
    return (0, int(value), "") if value.isdigit() else (1, 0, value)


def read_rows(out_dir: Path) -> list[dict[str, Any]]:
    """A small stage output, on the driver (evaluation sets are hundreds of rows, not millions)."""
    import pyarrow.dataset as pads

    return pads.dataset(str(out_dir), format="parquet").to_table().to_pylist()


def evaluation_sets(cfg: EvaluateConfig, run_dir: Path) -> EvaluationSets:
    """Validate the evaluation's question and instruction sets into ``evaluate/`` (once; rejects beside them)."""
    stage_dir = run_dir / "evaluate"
    counts: dict[str, Any] = {}
    questions: list[dict[str, Any]] = []
    if cfg.mt_bench is not None:
        counts["questions"] = validated_once(cfg.mt_bench.questions, QuestionRow, stage_dir / "questions",
                                             stage_dir / "question_rejects")
        questions = sorted(read_rows(stage_dir / "questions"), key=lambda q: _natural(q["question_id"]))
        if cfg.mt_bench.reference_answers is not None:
            counts["reference_answers"] = validated_once(
                cfg.mt_bench.reference_answers, ReferenceAnswerRow, stage_dir / "reference_answers",
                stage_dir / "reference_rejects")
            references = {r["question_id"]: r["turns"] for r in read_rows(stage_dir / "reference_answers")}
            for question in questions:  # a turn the question file gives no reference for takes the answers' one
                given, answered = question["reference"] or [], references.get(question["question_id"]) or []
                merged = [(given[i] if i < len(given) else None) or (answered[i] if i < len(answered) else None)
                          for i in range(max(len(given), len(answered)))]
                question["reference"] = merged if any(merged) else None
    instructions: list[dict[str, Any]] = []
    if cfg.pairwise is not None and cfg.pairwise.prompts is not None:
        counts["instructions"] = validated_once(cfg.pairwise.prompts, InstructionRow, stage_dir / "instructions",
                                                stage_dir / "instruction_rejects")
        instructions = sorted(read_rows(stage_dir / "instructions"), key=lambda r: r["instruction_id"])
    elif cfg.pairwise is not None:
        instructions = [{"instruction": q["turns"][0], "instruction_id": f"mt_bench:{q['question_id']}",
                         "output": None, "generator": None, "dataset": "mt_bench"} for q in questions]
    checkable: list[dict[str, Any]] = []
    if cfg.exact_match is not None:
        counts["exact_match_questions"] = validated_once(cfg.exact_match.questions, ReferenceQuestionRow,
                                                         stage_dir / "exact_match_questions",
                                                         stage_dir / "exact_match_rejects")
        checkable = read_rows(stage_dir / "exact_match_questions")
    return EvaluationSets(questions, instructions, counts, checkable)


# ---------------------------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------------------------


def model_path(model: EvalModel, run_dir: Path) -> str:
    """Where an answering model's weights are: this run's stage model, a directory, or a hub id."""
    if model.model in RUN_MODELS:
        path = run_dir / model.model / "model"
        if not is_complete(path):
            raise FileNotFoundError(f"evaluate: model '{model.name}' is this run's {model.model} model, and {path} "
                                    f"is not finished; run {model.model} first")
        return str(path)
    return model.model


def answers_dir(run_dir: Path, name: str) -> Path:
    return run_dir / "evaluate" / "answers" / name


def answer_items(sets: EvaluationSets, cfg: EvaluateConfig) -> list[dict[str, Any]]:
    """What every answering model answers: the MT-Bench questions, then instructions not taken from them."""
    items = []
    if cfg.mt_bench is not None:
        mt = cfg.mt_bench
        items += [{"set": "mt_bench", "question_id": q["question_id"], "category": q["category"], "turns": q["turns"],
                   "temperature": mt.temperatures.get(q["category"], mt.default_temperature),
                   "max_tokens": mt.max_tokens} for q in sets.questions]
    if cfg.pairwise is not None and cfg.pairwise.prompts is not None:
        sampling = cfg.pairwise.sampling
        items += [{"set": "pairwise", "question_id": r["instruction_id"], "category": r["dataset"] or "pairwise",
                   "turns": [r["instruction"]], "temperature": sampling.temperature,
                   "max_tokens": sampling.max_tokens} for r in sets.instructions]
    return items + exact_match_items(sets, cfg)


def exact_match_items(sets: EvaluationSets, cfg: EvaluateConfig) -> list[dict[str, Any]]:
    """The exact-match questions, asked as they are, one turn each."""
    if cfg.exact_match is None:
        return []
    sampling = cfg.exact_match.sampling
    return [{"set": "exact_match", "question_id": q["question_id"], "category": "exact_match",
             "turns": [q["question"]], "temperature": sampling.temperature, "max_tokens": sampling.max_tokens}
            for q in sets.checkable]


def _turn_request(item: dict[str, Any], model: EvalModel, answers: list[str | None], turn: int,
                  top_p: float) -> dict[str, Any]:
    from .feedback.complete import stable_seed

    messages = []
    for i in range(turn):
        messages.append({"role": "user", "content": item["turns"][i]})
        if i < turn - 1:
            messages.append({"role": "assistant", "content": answers[i]})
    return {"key": json.dumps([model.name, item["set"], item["question_id"]]), "messages": messages,
            "sampling_params": {"temperature": item["temperature"], "top_p": top_p, "max_tokens": item["max_tokens"],
                                "seed": stable_seed(model.name, item["set"], item["question_id"], turn)}}


def answer_with_engine(models: list[EvalModel], engine: Engine, items: list[dict[str, Any]], recipe: Recipe,
                       run_dir: Path, path: str) -> None:
    """Every item answered by each of ``models`` (which share ``engine``), one engine pass per turn; a turn is asked
    only when the turns before it were answered. Writes ``answers/<model>/`` for each."""
    import ray.data

    from .generate import generate

    state = {(m.name, item["set"], item["question_id"]): {"item": item, "answers": [], "errors": [], "finish": [],
                                                          "tokens": []}
             for m in models for item in items}
    by_name = {m.name: m for m in models}
    for turn in range(1, max((len(i["turns"]) for i in items), default=0) + 1):
        requests = []
        for (name, _, _), s in state.items():
            item = s["item"]
            if turn <= len(item["turns"]):
                if len(s["answers"]) == turn - 1 and all(a is not None for a in s["answers"]):
                    requests.append(_turn_request(item, by_name[name], s["answers"], turn, top_p=1.0))
                else:
                    s["answers"].append(None)
                    s["errors"].append(f"not asked: turn {turn - 1} has no answer")
                    s["finish"].append("error")
                    s["tokens"].append(0)
        if not requests:
            continue
        timer = Timer()
        rows = generate(ray.data.from_items(requests), engine, recipe.hardware).take_all()
        returned = {row["key"] for row in rows}
        rows += [{"key": r["key"], "generated_text": None, "generation_error": "the engine returned no row",
                  "finish_reason": "error", "num_generated_tokens": 0}
                 for r in requests if r["key"] not in returned]
        for row in rows:
            s = state[tuple(json.loads(row["key"]))]
            failed = row["generation_error"] or (None if (row["generated_text"] or "").strip() else "empty answer")
            s["answers"].append(None if failed else row["generated_text"])
            s["errors"].append(failed)
            s["finish"].append(row["finish_reason"])
            s["tokens"].append(int(row["num_generated_tokens"] or 0))
        log_rate(f"evaluate[answers {'+'.join(by_name)} turn {turn}]", len(rows), timer.seconds,
                 sum(int(r["num_generated_tokens"] or 0) for r in rows))
    for model in models:
        out = [{"model": model.name, "model_path": path, "set": s["item"]["set"],
                "question_id": s["item"]["question_id"], "category": s["item"]["category"],
                "turns": s["item"]["turns"], "answers": s["answers"], "errors": s["errors"],
                "finish_reasons": s["finish"], "generated_tokens": s["tokens"],
                "temperature": s["item"]["temperature"]}
               for (name, _, _), s in state.items() if name == model.name]
        write_rows_atomic(out, answers_dir(run_dir, model.name), schema=ANSWER_SCHEMA)


def answer_all(models: list[EvalModel], items: list[dict[str, Any]], recipe: Recipe,
               run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Each model's answers, generated where ``answers/<model>/`` is not complete yet; models with the same engine
    settings and weights share the engine's passes."""
    groups: dict[str, list[EvalModel]] = defaultdict(list)
    paths = {m.name: model_path(m, run_dir) for m in models}
    for model in models:
        settings = model.model_dump(exclude={"name"}) | {"model": paths[model.name]}
        groups[json.dumps(settings, sort_keys=True)].append(model)
    for settings, group in groups.items():
        todo = [m for m in group if not is_complete(answers_dir(run_dir, m.name))]
        if todo:
            engine = Engine.model_validate(json.loads(settings))
            answer_with_engine(todo, engine, items, recipe, run_dir, engine.model)
    return {m.name: read_rows(answers_dir(run_dir, m.name)) for m in models}


# ---------------------------------------------------------------------------------------------------------------
# Judge prompts and parsing
# ---------------------------------------------------------------------------------------------------------------


def turn_references(question: dict[str, Any], turn: int) -> list[str] | None:
    """The reference answers of turns 1..``turn`` when the question has every one of them, else None."""
    reference = question.get("reference") or []
    return list(reference[:turn]) if len(reference) >= turn and all(reference[:turn]) else None


def grade_prompt(question: dict[str, Any], answers: list[str], turn: int, use_reference: bool) -> str:
    """The judge's prompt for one turn: the question (or the conversation up to ``turn``) and the answer, with the
    reference answers up to that turn when ``use_reference`` and the question has them all."""
    reference = turn_references(question, turn) if use_reference else None
    if turn == 1:
        block = f"\n[Reference answer]\n{reference[0]}\n" if reference else ""
        return GRADE_PROMPT.format(reference_note=REFERENCE_NOTE if reference else "", reference=block,
                                   question=question["turns"][0], answer=answers[0])
    lines = []
    for i in range(turn):
        lines += [f"[User, turn {i + 1}]\n{question['turns'][i]}", f"[Assistant, turn {i + 1}]\n{answers[i]}"]
    block = ""
    if reference:
        block = "\n" + "\n".join(f"[Reference answer, turn {i + 1}]\n{reference[i]}" for i in range(turn)) + "\n"
    return GRADE_LATER_TURN_PROMPT.format(reference_note=REFERENCE_NOTE if block else "", reference=block,
                                          conversation="\n\n".join(lines))


def _ratings(pattern: re.Pattern, text: str) -> set[float]:
    return {value for found in pattern.findall(text) if (value := rating(found)) is not None}


def parse_rating(text: str) -> tuple[float | None, str | None]:
    """The judge's ``[[n]]`` rating (1-10): (rating, None) or (None, why not). Any text gives one or the other
    (``untrusted``: a number of more digits than any rating, or JSON nested too deep, is no rating)."""
    found = _ratings(RATING, text) or _ratings(RATING_BACKUP, text)
    if not found:
        value = rating(json_field(text, "rating"))
        found = set() if value is None else {value}
    if not found:
        return None, "no [[rating]] in the judge's answer"
    if len(found) > 1:
        return None, f"several different ratings in the judge's answer: {sorted(found)}"
    value = found.pop()
    if not 1 <= value <= 10:
        return None, f"rating {value:g} is outside 1-10"
    return value, None


def parse_verdict(text: str) -> tuple[str | None, str | None]:
    """'first', 'second' or 'tie' from ``[[A]]``, ``[[B]]``, ``[[C]]``: (verdict, None) or (None, why not)."""
    found = set(VERDICT.findall(text))
    if not found:
        value = json_field(text, "verdict")
        found = {value} if isinstance(value, str) and value in VERDICT_WINNER else set()
    if not found:
        return None, "no [[A]], [[B]] or [[C]] verdict in the judge's answer"
    if len(found) > 1:
        return None, f"several different verdicts in the judge's answer: {sorted(found)}"
    return VERDICT_WINNER[found.pop()], None


def explanation_chars(max_tokens: int) -> int:
    """How long the constrained judge's explanation may be so that its rating line still fits in ``max_tokens``:
    a token is at least one character, and a character may take two tokens in a byte-level vocabulary."""
    return max(8, (max_tokens - RATING_LINE_TOKENS) // 2)


def output_regex(kind: str, max_tokens: int) -> str:
    """vLLM structured output for a judge: an explanation (no brackets, no newline), then the rating/verdict."""
    tail = r"Rating: \[\[(10|[1-9])\]\]" if kind == "grade" else r"Verdict: \[\[[ABC]\]\]"
    return r"[^\[\]\n]{1," + str(explanation_chars(max_tokens)) + r"}\n\n" + tail


def output_schema(kind: str) -> dict[str, Any]:
    """The same for endpoints that take a JSON schema (``response_format``)."""
    value = ({"type": "integer", "minimum": 1, "maximum": 10} if kind == "grade"
             else {"type": "string", "enum": list(VERDICT_WINNER)})
    field = "rating" if kind == "grade" else "verdict"
    return {"type": "object", "properties": {"explanation": {"type": "string"}, field: value},
            "required": ["explanation", field], "additionalProperties": False}


def judge_label(judge: EvalJudgeConfig) -> str:
    version = prompts_version(judge.prompts.path) if judge.prompts is not None else PROMPT_VERSION
    if judge.endpoint is not None:
        return f"{judge.endpoint.model} @ {judge.endpoint.base_url} ({version})"
    return f"{judge.engine.model} ({version})"


def judge_all(requests: list[dict[str, Any]], judge: EvalJudgeConfig, recipe: Recipe) -> list[dict[str, Any]]:
    """The judge's raw answer to every request (rows keep their ``key``), by vLLM engine or endpoint."""
    import ray.data

    from .endpoint import chat_via_endpoint, sampling_fields
    from .generate import generate

    if not requests:
        return []
    sampling = judge.sampling.model_dump()
    rows = []
    for request in requests:
        system = request.get("system", JUDGE_SYSTEM)
        row = {"key": request["key"], "messages": [*([{"role": "system", "content": system}] if system else []),
                                                   {"role": "user", "content": request["prompt"]}]}
        if judge.endpoint is not None:
            fields = sampling_fields(sampling)
            if judge.endpoint.structured_output == "regex":
                fields["extra_body"] = {"structured_outputs": {"regex": output_regex(request["kind"],
                                                                                     sampling["max_tokens"])}}
            elif judge.endpoint.structured_output == "json_schema":
                fields["response_format"] = {"type": "json_schema", "json_schema": {
                    "name": request["kind"], "schema": output_schema(request["kind"]), "strict": True}}
            row["request"] = json.dumps(fields)
        else:
            params = dict(sampling)
            if judge.structured_output:
                params["structured_outputs"] = {"regex": output_regex(request["kind"], sampling["max_tokens"])}
            row["sampling_params"] = params
        rows.append(row)
    ds = ray.data.from_items(rows)
    if judge.endpoint is not None:
        return chat_via_endpoint(ds, judge.endpoint).take_all()
    return generate(ds, judge.engine, recipe.hardware).take_all()


# ---------------------------------------------------------------------------------------------------------------
# Judgments
# ---------------------------------------------------------------------------------------------------------------


def _judgment(**fields: Any) -> dict[str, Any]:
    return dict.fromkeys(JUDGMENT_SCHEMA.names) | fields


def grading_requests(cfg: EvaluateConfig, sets: EvaluationSets, answers: dict[str, list[dict[str, Any]]],
                     judge: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(judge requests, judgments already settled): one per (model, question, turn); a turn without an answer is
    settled at once as a counted failure."""
    questions = {q["question_id"]: q for q in sets.questions}
    requests, settled = [], []
    for model, rows in answers.items():
        for row in rows:
            if row["set"] != "mt_bench" or row["question_id"] not in questions:
                continue
            question = questions[row["question_id"]]
            by_category = question["category"] in cfg.mt_bench.reference_categories
            for turn in range(1, len(row["turns"]) + 1):
                use_reference = by_category and turn_references(question, turn) is not None
                base = _judgment(set="mt_bench", question_id=row["question_id"], category=row["category"],
                                 turn=turn, model=model, judge=judge, reference_used=use_reference,
                                 model_chars=len(row["answers"][turn - 1] or ""))
                if row["answers"][turn - 1] is None:
                    settled.append({**base, "judge_error": f"not judged: no answer ({row['errors'][turn - 1]})"})
                    continue
                request = {"key": json.dumps(["grade", model, row["question_id"], turn]), "kind": "grade"}
                if cfg.judge.prompts is not None:  # FastChat's prompts, where FastChat uses each
                    _, request["system"], prompt = grading_prompt(
                        cfg.judge.prompts.prompts, question, row["answers"], turn,
                        turn_references(question, turn) if use_reference else None)
                else:
                    prompt = grade_prompt(question, row["answers"], turn, use_reference)
                requests.append({**request, "prompt": prompt, "judgment": {**base, "judge_prompt": prompt}})
    return requests, settled


def pairwise_requests(cfg: EvaluateConfig, sets: EvaluationSets, answers: dict[str, list[dict[str, Any]]],
                      judge: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(judge requests, settled judgments): each instruction twice, the model's answer first and then second."""
    model = cfg.model.name
    baseline = cfg.pairwise.baseline.name if cfg.pairwise.baseline else None

    def first_answers(name: str) -> dict[str, str | None]:
        found = {}
        for row in answers[name]:
            if row["set"] == "exact_match":
                continue
            key = f"mt_bench:{row['question_id']}" if row["set"] == "mt_bench" else row["question_id"]
            found[key] = row["answers"][0]
        return found

    ours = first_answers(model)
    theirs = first_answers(baseline) if baseline else {r["instruction_id"]: r["output"] for r in sets.instructions}
    opponent = baseline or "reference outputs"
    requests, settled = [], []
    for row in sets.instructions:
        key = row["instruction_id"]
        mine, other = ours.get(key), theirs.get(key)
        for order in ("model_first", "baseline_first"):
            base = _judgment(set="pairwise", question_id=key, category=row["dataset"] or "pairwise", turn=1,
                             model=model, opponent=opponent if baseline else (row["generator"] or opponent),
                             order=order, judge=judge, reference_used=False, model_chars=len(mine or ""),
                             opponent_chars=len(other or ""))
            if mine is None or other is None:
                missing = "the model" if mine is None else f"{opponent}"
                settled.append({**base, "judge_error": f"not judged: no answer from {missing}"})
                continue
            a, b = (mine, other) if order == "model_first" else (other, mine)
            request = {"key": json.dumps(["pair", key, order]), "kind": "pair"}
            if cfg.judge.prompts is not None:
                _, request["system"], prompt = pairwise_prompt(cfg.judge.prompts.prompts, row["instruction"], a, b)
            else:
                prompt = PAIRWISE_PROMPT.format(question=row["instruction"], answer_a=a, answer_b=b)
            requests.append({**request, "prompt": prompt, "judgment": {**base, "judge_prompt": prompt}})
    return requests, settled


def to_judgment(request: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    out = {**request["judgment"], "raw_judgment": answer.get("generated_text")}
    if answer.get("generation_error"):
        out["judge_error"] = f"judge failed: {answer['generation_error']}"
    elif request["kind"] == "grade":
        out["rating"], out["judge_error"] = parse_rating(out["raw_judgment"] or "")
    else:
        verdict, out["judge_error"] = parse_verdict(out["raw_judgment"] or "")
        if verdict is not None:  # who won, from the model's side of the table
            model_position = "first" if out["order"] == "model_first" else "second"
            out["verdict"] = "tie" if verdict == "tie" else ("model" if verdict == model_position else "opponent")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def grading_results(judgments: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model: overall score (mean over every rated turn, as MT-Bench), per turn, per category, and failures."""
    results: dict[str, Any] = {}
    for model in sorted({j["model"] for j in judgments if j["set"] == "mt_bench"}):
        rows = [j for j in judgments if j["set"] == "mt_bench" and j["model"] == model]
        rated = [j for j in rows if j["rating"] is not None]
        failures = Counter("no answer" if (j["judge_error"] or "").startswith("not judged") else "judge"
                           for j in rows if j["rating"] is None)
        results[model] = {
            "score": _mean([j["rating"] for j in rated]),
            "turns": {str(t): _mean([j["rating"] for j in rated if j["turn"] == t])
                      for t in sorted({j["turn"] for j in rows})},
            "categories": {c: _mean([j["rating"] for j in rated if j["category"] == c])
                           for c in sorted({j["category"] for j in rows})},
            "graded": len(rows), "rated": len(rated), "unanswered": failures["no answer"],
            "judge_failures": failures["judge"],
        }
    return results


def length_controlled(scores: list[float], length_differences: list[float], ridge: float = 1e-3) -> float:
    """The win rate at zero length difference: logistic fit of the score on tanh(length difference / its std)
    (AlpacaEval 2's length term; its instruction-difficulty term needs many models and is left out)."""
    import numpy as np

    y = np.asarray(scores, dtype=float)
    d = np.asarray(length_differences, dtype=float)
    x = np.tanh(d / (d.std() or 1.0))
    features = np.stack([np.ones_like(x), x], axis=1)
    weights = np.zeros(2)
    for _ in range(50):  # Newton's method on the ridge-penalised cross-entropy (soft labels: ties are 0.5)
        p = 1 / (1 + np.exp(-features @ weights))
        gradient = features.T @ (p - y) + ridge * weights
        hessian = features.T @ (features * (p * (1 - p))[:, None]) + ridge * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if np.abs(step).max() < 1e-9:
            break
    return float(1 / (1 + math.exp(-weights[0])))


def length_controlled_interval(scores: list[float], length_differences: list[float], samples: int,
                               confidence: float, seed: int = 0) -> list[float]:
    """Percentile bootstrap over instructions of the length-controlled win rate (the fit redone on each resample)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(scores), (min(samples, 1000), len(scores)))
    fits = [length_controlled([scores[i] for i in pick], [length_differences[i] for i in pick]) for pick in picks]
    tail = (1 - confidence) / 2 * 100
    return [float(np.percentile(fits, tail)), float(np.percentile(fits, 100 - tail))]


LENGTH_BINS = (("model shorter by >10%", -math.inf, -0.1), ("within 10%", -0.1, 0.1),
               ("model longer by >10%", 0.1, math.inf))


def pairwise_results(judgments: list[dict[str, Any]], samples: int, confidence: float) -> dict[str, Any] | None:
    """Win rate over instructions (both orders averaged), its interval, the length view and the judge's bias."""
    rows = [j for j in judgments if j["set"] == "pairwise"]
    if not rows:
        return None
    by_instruction: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_instruction[row["question_id"]].append(row)
    points = {"model": 1.0, "tie": 0.5, "opponent": 0.0}
    scores, differences, consistent, judged_both, first_preferred, decided = [], [], 0, 0, 0, 0
    for pair in by_instruction.values():
        verdicts = [j for j in pair if j["verdict"] is not None]
        if not verdicts:
            continue
        scores.append(sum(points[j["verdict"]] for j in verdicts) / len(verdicts))
        differences.append((pair[0]["model_chars"] - pair[0]["opponent_chars"]) / max(pair[0]["opponent_chars"], 1))
        if len(verdicts) == 2:
            judged_both += 1
            consistent += verdicts[0]["verdict"] == verdicts[1]["verdict"]
        for j in verdicts:
            if j["verdict"] != "tie":
                decided += 1
                first_preferred += (j["verdict"] == "model") == (j["order"] == "model_first")
    result: dict[str, Any] = {
        "model": rows[0]["model"], "opponent": rows[0]["opponent"], "instructions": len(by_instruction),
        "compared": len(scores), "judgments": len(rows),
        "judge_failures": sum(1 for j in rows if j["verdict"] is None),
        "wins": sum(s > 0.5 for s in scores), "ties": sum(s == 0.5 for s in scores),
        "losses": sum(s < 0.5 for s in scores),
        "position_consistency": consistent / judged_both if judged_both else None,
        "first_position_preference": first_preferred / decided if decided else None,
        "confidence": confidence,
    }
    if not scores:
        return result | {"win_rate": None, "interval": None, "length_controlled_win_rate": None, "length_bins": []}
    result["win_rate"] = sum(scores) / len(scores)
    result["interval"] = list(bootstrap_interval(scores, samples, confidence))
    result["length_controlled_win_rate"] = length_controlled(scores, differences)
    result["length_controlled_interval"] = length_controlled_interval(scores, differences, samples, confidence)
    result["length_bins"] = [
        {"bin": name, "instructions": len(chosen), "win_rate": _mean(chosen)}
        for name, low, high in LENGTH_BINS
        for chosen in [[s for s, d in zip(scores, differences, strict=True) if low <= d < high]]]
    return result


def plot_results(results: dict[str, Any], path: Path) -> None:
    """MT-Bench score per category per model, the win rate with its interval (overall and per length bin), and
    exact-match accuracy per model with its interval, side by side in one PNG."""
    from .report import pyplot

    plt = pyplot()
    grading, pairwise = results.get("mt_bench") or {}, results.get("pairwise")
    exact = {m: r for m, r in (results.get("exact_match") or {}).items() if r["accuracy"] is not None}
    panels = int(bool(grading)) + int(bool(pairwise and pairwise.get("win_rate") is not None)) + int(bool(exact))
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4), squeeze=False)
    ax_index = 0
    if grading:
        ax = axes[0, ax_index]
        ax_index += 1
        categories = sorted({c for r in grading.values() for c in r["categories"]})
        width = 0.8 / max(len(grading), 1)
        for i, (model, r) in enumerate(grading.items()):
            values = [r["categories"].get(c) or 0 for c in categories]
            ax.bar([x + i * width for x in range(len(categories))], values, width=width,
                   label=f"{model}: {r['score']:.2f}" if r["score"] is not None else f"{model}: -")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(categories))], categories, rotation=30)
        ax.set_ylim(0, 10.5)
        ax.set_ylabel("judge rating (1-10)")
        ax.set_title("MT-Bench-style grading per category (legend: overall)")
        ax.legend(fontsize=8)
    if pairwise and pairwise.get("win_rate") is not None:
        ax = axes[0, ax_index]
        ax_index += 1
        labels = ["overall", "length-controlled"] + [b["bin"] for b in pairwise["length_bins"]]
        values = [pairwise["win_rate"], pairwise["length_controlled_win_rate"]] + [
            b["win_rate"] if b["win_rate"] is not None else 0 for b in pairwise["length_bins"]]
        bars = ax.bar(labels, values, color=["#2e5bff", "#7a5af8"] + ["#98a2b3"] * len(pairwise["length_bins"]))
        low, high = pairwise["interval"]
        ax.errorbar([0], [pairwise["win_rate"]], yerr=[[pairwise["win_rate"] - low], [high - pairwise["win_rate"]]],
                    color="black", capsize=6)
        for bar, b in zip(bars[2:], pairwise["length_bins"], strict=True):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"n={b['instructions']}", ha="center",
                    va="bottom", fontsize=8)
        ax.axhline(0.5, color="#c0392b", linestyle="--", linewidth=1)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("win rate (ties count half)")
        ax.set_title(f"{pairwise['model']} vs {pairwise['opponent']}: win rate, "
                     f"{pairwise['confidence']:.0%} interval")
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    if exact:
        ax = axes[0, ax_index]
        names = list(exact)
        values = [exact[m]["accuracy"] for m in names]
        ax.bar(names, values, color="#12b76a")
        ax.errorbar(range(len(names)), values, fmt="none", color="black", capsize=6,
                    yerr=[[v - exact[m]["interval"][0] for m, v in zip(names, values, strict=True)],
                          [exact[m]["interval"][1] - v for m, v in zip(names, values, strict=True)]])
        for x, m in enumerate(names):
            ax.text(x, 0.02, f"n={exact[m]['n']}, {exact[m]['unparsed']} unparsed", ha="center", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("exact-match accuracy")
        ax.set_title("Exact match per model, bootstrap interval")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def evaluation_summary(results: dict[str, Any]) -> str:
    """MT-Bench scores per model and category, and the win rate with its interval, as plain text."""
    lines = []
    for model, r in (results.get("mt_bench") or {}).items():
        score = "-" if r["score"] is None else f"{r['score']:.2f}"
        lines.append(f"MT-Bench {model}: {score} over {r['rated']} of {r['graded']} turns rated "
                     f"({r['unanswered']} unanswered, {r['judge_failures']} judge failures)")
        lines.append("  " + ", ".join(f"{c} {v:.1f}" if v is not None else f"{c} -"
                                      for c, v in r["categories"].items()))
    pairwise = results.get("pairwise")
    if pairwise and pairwise.get("win_rate") is not None:
        low, high = pairwise["interval"]
        lines.append(f"win rate {pairwise['model']} vs {pairwise['opponent']}: {pairwise['win_rate']:.1%} "
                     f"[{low:.1%}, {high:.1%}] ({pairwise['wins']} wins, {pairwise['ties']} ties, "
                     f"{pairwise['losses']} losses); length-controlled {pairwise['length_controlled_win_rate']:.1%}"
                     + (" [{:.1%}, {:.1%}]; ".format(*pairwise["length_controlled_interval"])
                        if pairwise.get("length_controlled_interval") else "; ")
                     + f"judge position consistency {pairwise['position_consistency'] or 0:.0%}")
    elif pairwise:
        lines.append(f"win rate: no instruction compared ({pairwise['judge_failures']} judge failures)")
    for model, r in (results.get("exact_match") or {}).items():
        shown = "-" if r["accuracy"] is None else \
            f"{r['accuracy']:.1%} [{r['interval'][0]:.1%}, {r['interval'][1]:.1%}]"
        lines.append(f"exact match {model}: {shown} of {r['n']} questions ({r['unparsed']} with no answer found)")
    for d in results.get("exact_match_paired") or []:
        if d["difference"] is not None:
            lines.append(f"  {d['model']} - {d['over']}: {d['difference']:+.1%} "
                         f"[{d['interval'][0]:+.1%}, {d['interval'][1]:+.1%}] (paired, {d['n']} questions)")
    agreement = results.get("judge_agreement")
    if agreement and agreement["rank_correlation"] is not None:
        lines.append(f"feedback judge vs the truth: rank correlation {agreement['rank_correlation']:.2f} over "
                     f"{agreement['n']} exact-match replies ({agreement['judge_failures']} not scored)")
    return "\n".join(lines)


def exact_match_results(cfg: EvaluateConfig, sets: EvaluationSets, answers: dict[str, list[dict[str, Any]]],
                        stage_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Each model's exact-match accuracy (``{"accuracy", "interval", "n", "unparsed"}``), and the evaluated
    model's paired difference over every other scored model; the scored replies go to ``exact_match/``."""
    from .exact_match import accuracy, paired_difference, score

    em = cfg.exact_match
    references = {q["question_id"]: q["answer"] for q in sets.checkable}
    scored = {}
    for model, rows in answers.items():
        replies = [{"model": model, "question_id": r["question_id"], "question": r["turns"][0],
                    "reference": references[r["question_id"]], "reply": r["answers"][0],
                    "error": r["errors"][0]}
                   for r in rows if r["set"] == "exact_match" and r["question_id"] in references]
        if replies:
            scored[model] = score(replies, em.answer_pattern)
    write_rows_atomic([row for rows in scored.values() for row in rows], stage_dir / "exact_match",
                      schema=EXACT_MATCH_SCHEMA)
    per_model = {model: accuracy(rows, em.bootstrap_samples, em.confidence) for model, rows in scored.items()}
    paired = [{"model": cfg.model.name, "over": other,
               **paired_difference(scored[cfg.model.name], scored[other], em.bootstrap_samples, em.confidence)}
              for other in scored if other != cfg.model.name and cfg.model.name in scored]
    return per_model, paired


def judge_agreement(recipe: Recipe, stage_dir: Path) -> dict[str, Any] | None:
    """Does the judge whose scores made the preference pairs know the right answer? The recipe's feedback judge
    scores every exact-match reply (as it scored completions, by ``binarize.score``), and the Spearman rank
    correlation of its scores with correctness says how much of the truth its preferences carried. None when the
    recipe has no judge (a preference dataset instead)."""
    if recipe.judge is None:
        return None
    import ray

    from .feedback.binarize import score_of
    from .feedback.judge import judge_name, score, to_judgment
    from .statistics import rank_correlation

    cfg = recipe.judge
    replies = [r for r in read_rows(stage_dir / "exact_match") if r["reply"]]
    correct = {(r["model"], r["question_id"]): r["correct"] for r in replies}
    rows = [{"prompt_id": r["question_id"], "model": r["model"], "messages": [{"role": "user", "content": r["question"]}],
             "completion": r["reply"]} for r in replies]
    judged = score(ray.data.from_items(rows), cfg, recipe).map(
        to_judgment, fn_kwargs={"kind": cfg.kind, "judge": judge_name(cfg)}).take_all() if rows else []
    way = recipe.binarize.score if recipe.binarize and cfg.kind in ("rubric", "openai") else "overall"
    pairs = [(value, float(correct[(j["model"], j["prompt_id"])])) for j in judged
             if (value := score_of(j, way)) is not None]
    return {"judge": judge_name(cfg), "score": way, "n": len(pairs), "judge_failures": len(judged) - len(pairs),
            "rank_correlation": rank_correlation([v for v, _ in pairs], [c for _, c in pairs]) if pairs else None}


def headline_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The numbers the run manifest keeps: each model's MT-Bench score and the win rates."""
    metrics = {f"mt_bench/{model}": r["score"] for model, r in (results.get("mt_bench") or {}).items()
               if r["score"] is not None}
    pairwise = results.get("pairwise") or {}
    for key in ("win_rate", "length_controlled_win_rate"):
        if pairwise.get(key) is not None:
            metrics[key] = pairwise[key]
    if pairwise.get("interval"):
        metrics["win_rate_low"], metrics["win_rate_high"] = pairwise["interval"]
    for model, r in (results.get("exact_match") or {}).items():
        if r["accuracy"] is not None:
            metrics[f"exact_match/{model}"] = r["accuracy"]
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------


def run_evaluate(recipe: Recipe, run_dir: Path) -> StageResult:
    """Answers, judgments and results into ``evaluate/``; a re-run skips what is complete (answers per model,
    judgments), so an interrupted evaluation does not redo its engine passes."""
    cfg = stage_section(recipe, "evaluate")
    stage_dir = run_dir / "evaluate"
    judgments_dir, results_path = stage_dir / "judgments", stage_dir / "results.json"
    outputs = {"judgments": str(judgments_dir), "results": str(results_path)}
    if is_complete(judgments_dir) and results_path.is_file() and (stage_dir / "result.json").is_file():
        logger.info("evaluate: already done, skipping")
        counts = json.loads((stage_dir / "result.json").read_text()).get("counts", {})
        return StageResult("evaluate", skipped=True, counts=counts, outputs=outputs)
    timer = Timer()
    sets = evaluation_sets(cfg, run_dir)
    models = [cfg.model] + ([cfg.pairwise.baseline] if cfg.pairwise and cfg.pairwise.baseline else [])
    answers = answer_all(models, answer_items(sets, cfg), recipe, run_dir)
    if cfg.exact_match is not None and cfg.exact_match.models:  # scored on the exact-match questions only
        answers.update(answer_all(cfg.exact_match.models, exact_match_items(sets, cfg), recipe, run_dir))
    if not is_complete(judgments_dir):
        judge = judge_label(cfg.judge)
        requests, settled = grading_requests(cfg, sets, answers, judge) if cfg.mt_bench else ([], [])
        if cfg.pairwise:
            more_requests, more_settled = pairwise_requests(cfg, sets, answers, judge)
            requests, settled = requests + more_requests, settled + more_settled
        judge_timer = Timer()
        by_key = {r["key"]: r for r in requests}
        judged = [to_judgment(by_key[a["key"]], a) for a in judge_all(requests, cfg.judge, recipe)]
        log_rate("evaluate[judge]", len(judged), judge_timer.seconds)
        write_rows_atomic(judged + settled, judgments_dir, schema=JUDGMENT_SCHEMA)
    judgments = read_rows(judgments_dir)
    results = {"judge": judge_label(cfg.judge), "mt_bench": grading_results(judgments),
               "pairwise": (pairwise_results(judgments, cfg.pairwise.bootstrap_samples, cfg.pairwise.confidence)
                            if cfg.pairwise else None)}
    if cfg.exact_match is not None:
        results["exact_match"], results["exact_match_paired"] = exact_match_results(cfg, sets, answers, stage_dir)
        results["judge_agreement"] = judge_agreement(recipe, stage_dir)
    plot_results(results, stage_dir / "evaluate.png")
    (stage_dir / "metrics.json").write_text(json.dumps(headline_metrics(results), indent=2) + "\n")
    tmp = results_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(results_path)
    failures = Counter((j["judge_error"] or "").split(":")[0] for j in judgments if j["judge_error"])
    result = StageResult("evaluate", counts={
        **sets.counts,
        "answers": sum(len(rows) for rows in answers.values()),
        "judgments": len(judgments),
        "rated": sum(1 for j in judgments if j["rating"] is not None or j["verdict"] is not None),
        "failures": dict(failures),
    }, seconds=timer.seconds, outputs=outputs)
    result.save(run_dir)
    return result
