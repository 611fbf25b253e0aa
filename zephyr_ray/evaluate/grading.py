"""Judgments: the judge's requests for every graded turn and every pairwise comparison (both orders), sent to a vLLM
engine or an OpenAI-compatible endpoint, read back into rows; MT-Bench scores from them as FastChat computes them."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa

from ..config import EvalJudgeConfig, EvaluateConfig, Recipe
from ..statistics import mean
from .fastchat_prompts import grading_prompt, pairwise_prompt, prompts_version
from .prompts import (
    JUDGE_SYSTEM,
    PAIRWISE_PROMPT,
    PROMPT_VERSION,
    grade_prompt,
    output_regex,
    output_schema,
    parse_rating,
    parse_verdict,
    turn_references,
)
from .sets import EvaluationSets

NOT_JUDGED = "not judged"  # a judgment settled without the judge: an answer is missing (a failed generation)


def unanswered(judgment: dict[str, Any]) -> bool:
    """Whether ``judgment`` is missing because an answer is, not because the judge's answer had no rating."""
    return (judgment["judge_error"] or "").startswith(NOT_JUDGED)

JUDGMENT_SCHEMA = pa.schema([
    ("set", pa.string()), ("question_id", pa.string()), ("category", pa.string()), ("turn", pa.int64()),
    ("model", pa.string()), ("opponent", pa.string()), ("order", pa.string()), ("judge", pa.string()),
    ("reference_used", pa.bool_()), ("judge_prompt", pa.string()), ("raw_judgment", pa.string()),
    ("rating", pa.float64()), ("verdict", pa.string()), ("judge_error", pa.string()),
    ("model_chars", pa.int64()), ("opponent_chars", pa.int64()),
])



def judge_label(judge: EvalJudgeConfig) -> str:
    version = prompts_version(judge.prompts.path) if judge.prompts is not None else PROMPT_VERSION
    if judge.endpoint is not None:
        return f"{judge.endpoint.model} @ {judge.endpoint.base_url} ({version})"
    return f"{judge.engine.model} ({version})"



def judge_pass(requests: list[dict[str, Any]], judge: EvalJudgeConfig, recipe: Recipe, sharing: int = 1) -> Any:
    """The judge's raw answer to every request (rows keep their ``key``), by vLLM engine or endpoint, lazily (a Ray
    Dataset): ``take_all`` it, or run it beside another engine's pass (``sharing``, ``generate.take_side_by_side``)."""
    from ..endpoint import chat_via_endpoint, rows_per_call, sampling_fields
    from ..generate import generate, rows_dataset

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
            if judge.structured_output in (True, request["kind"]):
                params["structured_outputs"] = {"regex": output_regex(request["kind"], sampling["max_tokens"])}
            row["sampling_params"] = params
        rows.append(row)
    ds = rows_dataset(rows, rows_per_call(judge))
    if judge.endpoint is not None:
        return chat_via_endpoint(ds, judge.endpoint)
    return generate(ds, judge.engine, recipe.hardware, sharing=sharing)



def _judgment(**fields: Any) -> dict[str, Any]:
    return dict.fromkeys(JUDGMENT_SCHEMA.names) | fields



def grading_requests(cfg: EvaluateConfig, sets: EvaluationSets, answers: dict[str, list[dict[str, Any]]],
                     judge: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(judge requests, judgments already settled): one per (model, question, turn); a turn without an answer is
    settled at once as a counted failure."""
    questions = {q["question_id"]: q for q in sets.questions}
    fastchat = cfg.judge.prompts.prompts if cfg.judge.prompts is not None else None
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
                    settled.append({**base, "judge_error": f"{NOT_JUDGED}: no answer ({row['errors'][turn - 1]})"})
                    continue
                request = {"key": json.dumps(["grade", model, row["question_id"], turn]), "kind": "grade"}
                if fastchat is not None:  # FastChat's prompts, where FastChat uses each
                    request["prompt_name"], request["system"], prompt = grading_prompt(
                        fastchat, question, row["answers"], turn,
                        turn_references(question, turn) if use_reference else None)
                    # a file with no math prompt grades with the general one, which shows no reference
                    base["reference_used"] = use_reference and request["prompt_name"].startswith("single-math")
                else:
                    prompt = grade_prompt(question, row["answers"], turn, use_reference)
                requests.append({**request, "prompt": prompt, "judgment": {**base, "judge_prompt": prompt}})
    return requests, settled



def pairwise_requests(cfg: EvaluateConfig, sets: EvaluationSets, answers: dict[str, list[dict[str, Any]]],
                      judge: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(judge requests, settled judgments): each instruction twice, the model's answer first and then second."""
    model = cfg.model.name
    baseline = cfg.pairwise.baseline.name if cfg.pairwise.baseline else None
    fastchat = cfg.judge.prompts.prompts if cfg.judge.prompts is not None else None

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
                settled.append({**base, "judge_error": f"{NOT_JUDGED}: no answer from {missing}"})
                continue
            a, b = (mine, other) if order == "model_first" else (other, mine)
            request = {"key": json.dumps(["pair", key, order]), "kind": "pair"}
            if fastchat is not None:
                request["prompt_name"], request["system"], prompt = pairwise_prompt(
                    fastchat, row["instruction"], a, b)
            else:
                prompt = PAIRWISE_PROMPT.format(question=row["instruction"], answer_a=a, answer_b=b)
            requests.append({**request, "prompt": prompt, "judgment": {**base, "judge_prompt": prompt}})
    return requests, settled



def to_judgment(request: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    out = {**request["judgment"], "raw_judgment": answer.get("generated_text")}
    fastchat = "prompt_name" in request  # asked with FastChat's prompts: read as FastChat reads their answers
    if answer.get("generation_error"):
        out["judge_error"] = f"judge failed: {answer['generation_error']}"
    elif request["kind"] == "grade":
        out["rating"], out["judge_error"] = parse_rating(out["raw_judgment"] or "", as_fastchat=fastchat)
    else:
        verdict, out["judge_error"] = parse_verdict(out["raw_judgment"] or "", as_fastchat=fastchat)
        if verdict is not None:  # who won, from the model's side of the table
            model_position = "first" if out["order"] == "model_first" else "second"
            out["verdict"] = "tie" if verdict == "tie" else ("model" if verdict == model_position else "opponent")
    return out



def grading_results(judgments: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model: overall score (mean over every rated turn, as MT-Bench), per turn, per category, and failures."""
    results: dict[str, Any] = {}
    for model in sorted({j["model"] for j in judgments if j["set"] == "mt_bench"}):
        rows = [j for j in judgments if j["set"] == "mt_bench" and j["model"] == model]
        rated = [j for j in rows if j["rating"] is not None]
        failures = Counter("no answer" if unanswered(j) else "judge"
                           for j in rows if j["rating"] is None)
        results[model] = {
            "score": mean([j["rating"] for j in rated]),
            "turns": {str(t): mean([j["rating"] for j in rated if j["turn"] == t])
                      for t in sorted({j["turn"] for j in rows})},
            "categories": {c: mean([j["rating"] for j in rated if j["category"] == c])
                           for c in sorted({j["category"] for j in rows})},
            "graded": len(rows), "rated": len(rated), "unanswered": failures["no answer"],
            "judge_failures": failures["judge"],
        }
    return results
