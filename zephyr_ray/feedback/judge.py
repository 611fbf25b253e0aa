"""Stage ``judge``: score every completion. Scorers are chosen in the recipe (``judge.kind``).

- ``rubric``: UltraFeedback's four aspects rated 1-5 plus an overall 1-10 and a rationale, in JSON that vLLM's
  structured outputs force the judge to produce (so it parses); the raw text is kept beside the scores.
- ``logprob``: the judge emits one rating token 1-5; the score is the probability-weighted mean over the allowed
  ratings, read from the token's log-probabilities (cheap, and calibrated rather than argmax).
- ``reward_model``: a sequence-classification reward model (vLLM's ``classify`` runner) reads the chat with the
  completion as the assistant's turn; its raw logit is the overall score.
- ``openai``: the rubric, asked of an OpenAI-compatible endpoint (GPT-4-class judges), with its structured output
  as the endpoint takes it (``response_format`` JSON schema, or vLLM's regex); see ``endpoint.py``.

A judgment that cannot be parsed or scored keeps its row, with ``judge_error`` saying why; it is counted, never fatal.
Answers are read with ``untrusted`` (as ``evaluate`` reads its judge's), so no text a judge returns can raise here;
text that is not valid UTF-8 is repaired and counted by the writer (``data.conform``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..config import Recipe
from ..data import JudgmentRow, read_contract, text_problem, write_parquet_atomic, written_rows
from ..endpoint import chat_via_endpoint, sampling_fields
from ..generate import classify, generate
from ..stage import StageResult, Timer, already_done, log_rate, stage_section
from ..untrusted import NOT_JSON, json_kind, rating, read_json
from .complete import model_dir

logger = logging.getLogger(__name__)

RUBRIC_VERSION = "zephyr-ray-rubric-v1"
ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")
RATIONALE_MAX_CHARS = 300

JUDGE_SYSTEM = "You are a strict and fair evaluator of AI assistant responses."

RUBRIC_PROMPT = """Rate the assistant's response to the instruction below.

Rate each aspect from 1 (poor) to 5 (excellent):
- instruction_following: does the response do what was asked, in the form that was asked?
- honesty: does it admit uncertainty where it should, and avoid pretending?
- truthfulness: is it free of false or invented statements?
- helpfulness: is it correct, informative and useful to the user?
Then rate the response overall from 1 (poor) to 10 (excellent), and give a one-sentence rationale.

Answer with JSON only, in this form:
{{"instruction_following": 1-5, "honesty": 1-5, "truthfulness": 1-5, "helpfulness": 1-5, "overall": 1-10, "rationale": "..."}}

Instruction:
{instruction}

Response:
{response}"""

RUBRIC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        **{aspect: {"type": "integer", "minimum": 1, "maximum": 5} for aspect in ASPECTS},
        "overall": {"type": "integer", "minimum": 1, "maximum": 10},
        "rationale": {"type": "string", "maxLength": RATIONALE_MAX_CHARS},
    },
    "required": [*ASPECTS, "overall", "rationale"],
    "additionalProperties": False,
}

# The schema above as one exact line. A JSON-schema grammar lets whitespace go anywhere, and a weak judge pads with
# newlines until max_tokens; this regex fixes the layout, so ratings always come first and always parse.
RUBRIC_REGEX = (
    r'\{' + ", ".join(f'"{aspect}": [1-5]' for aspect in ASPECTS) + r', "overall": (10|[1-9]), '
    r'"rationale": "[^"\\\n]{1,' + str(RATIONALE_MAX_CHARS) + r'}"\}'
)

LOGPROB_PROMPT = """Rate the overall quality of the assistant's response to the instruction below, from 1 (poor) to 5
(excellent). Answer with the digit only.

Instruction:
{instruction}

Response:
{response}"""

LOGPROB_RATINGS = ("1", "2", "3", "4", "5")


def judge_messages(row: dict[str, Any], template: str, system: str | None = None) -> list[dict[str, str]]:
    """The judge's chat: the system message (the project's when ``system`` is None; none when it is ""), then the
    prompt with the instruction and the response filled in."""
    instruction = "\n\n".join(m["content"] for m in row["messages"] if m["role"] != "system")
    system = JUDGE_SYSTEM if system is None else system
    return [*([{"role": "system", "content": system}] if system else []),
            {"role": "user", "content": template.format(instruction=instruction, response=row["completion"])}]


def parse_rubric(text: str) -> tuple[dict[str, Any], str | None]:
    """Scores from the judge's JSON; a truncated answer still yields the ratings written before the cut. Any text
    gives scores or a reason (``untrusted``: JSON nested too deep or a 5000-digit rating is no rating); a rating
    may be written 7, 7.0 or "7"."""
    if not isinstance(text, str) or not text.strip():
        return {}, "the judge's answer is empty"
    data = read_json(text)
    if data is NOT_JSON:  # fenced, cut off, a trailing comma: read the ratings as written (8.5 stays 8.5)
        written = re.findall(r'"(\w+)"\s*:\s*"?([0-9]+(?:\.[0-9]+)?)', text)
        data = dict(written)
        twice = sorted(k for k in data if len({v for key, v in written if key == k}) > 1)
        if twice:
            return {}, f"several different `{twice[0]}` ratings in the judge's answer"
        found = re.search(r'"rationale"\s*:\s*"((?:[^"\\]|\\.)*)', text)
        data["rationale"] = found.group(1) if found else None
    if not isinstance(data, dict):
        return {}, f"judge answered {json_kind(data)}, not a JSON object"
    scores: dict[str, Any] = {}
    for key, top in [(a, 5) for a in ASPECTS] + [("overall", 10)]:
        value = rating(data.get(key), whole=True)
        if value is None or not 1 <= value <= top:
            return {}, f"no valid `{key}` rating (1-{top}) in the judge's answer"
        scores[key] = value
    rationale = data.get("rationale")
    scores["rationale"] = rationale if isinstance(rationale, str) else None
    return scores, None


def logprob_score(top_logprobs: Any) -> tuple[float | None, str | None]:
    """Probability-weighted mean rating over the allowed rating tokens among the first token's top log-probs."""
    if not top_logprobs:
        return None, "no log-probabilities returned"
    weights: dict[int, float] = {}
    for info in top_logprobs[0].values():
        if not info:
            continue
        token = (info.get("decoded_token") or "").strip()
        if token in LOGPROB_RATINGS and info.get("logprob") is not None:
            weights[int(token)] = weights.get(int(token), 0.0) + math.exp(info["logprob"])
    total = sum(weights.values())
    if total <= 0:
        return None, "no rating token among the judge's top log-probabilities"
    return sum(r * w for r, w in weights.items()) / total, None


def judge_requests(row: dict[str, Any], kind: str, sampling: dict[str, Any], prompt: str | None = None,
                   system: str | None = None) -> dict[str, Any]:
    """The judge's chat for one completion (the recipe's ``prompt`` and ``system_prompt`` where it gives them); the
    completion row rides along whole, untouched by the engine."""
    if kind == "rubric":
        params = {**sampling, "structured_outputs": {"regex": RUBRIC_REGEX}}
        messages = judge_messages(row, prompt or RUBRIC_PROMPT, system)
    else:
        params = {**sampling, "max_tokens": 1, "temperature": 0.0, "logprobs": 20,
                  "structured_outputs": {"choice": list(LOGPROB_RATINGS)}}
        messages = judge_messages(row, prompt or LOGPROB_PROMPT, system)
    return {"completion_row": row, "messages": messages, "sampling_params": params}


def reward_request(row: dict[str, Any]) -> dict[str, Any]:
    """The chat a reward model reads: the user's turns (no principle system prompt) and the completion."""
    turns = [m for m in row["messages"] if m["role"] != "system"]
    return {"completion_row": row, "messages": [*turns, {"role": "assistant", "content": row["completion"]}],
            "pooling_params": {"use_activation": False}}  # the raw reward, not a sigmoid of it


def endpoint_request(row: dict[str, Any], sampling: dict[str, Any], structured_output: str, prompt: str | None = None,
                     system: str | None = None) -> dict[str, Any]:
    """The rubric chat for an OpenAI-compatible endpoint, with its structured output in the form it takes."""
    request = sampling_fields(sampling)
    if structured_output == "json_schema":
        request["response_format"] = {"type": "json_schema",
                                      "json_schema": {"name": "rubric", "schema": RUBRIC_SCHEMA, "strict": True}}
    elif structured_output == "regex":
        request["extra_body"] = {"structured_outputs": {"regex": RUBRIC_REGEX}}
    return {"completion_row": row, "messages": judge_messages(row, prompt or RUBRIC_PROMPT, system),
            "request": json.dumps(request)}


def unscored(row: dict[str, Any], judge: str, error: str | None, raw: str | None = None) -> dict[str, Any]:
    return {**{k: row[k] for k in row if k in JudgmentRow.model_fields}, "judge": judge,
            **{a: None for a in ASPECTS}, "overall": None, "rationale": None, "raw_judgment": raw,
            "judge_error": error}


def to_judgment(row: dict[str, Any], kind: str, judge: str) -> dict[str, Any]:
    if kind == "reward_model":
        logits = row["classifier_logits"]
        out = unscored(row["completion_row"], judge, None, None if logits is None else json.dumps(logits))
    else:
        out = unscored(row["completion_row"], judge, None, row["generated_text"])
    if row["generation_error"]:
        out["judge_error"] = f"judge failed: {row['generation_error']}"
    elif kind in ("rubric", "openai"):
        scores, out["judge_error"] = parse_rubric(out["raw_judgment"] or "")
        out.update(scores)
    elif kind == "logprob":
        out["overall"], out["judge_error"] = logprob_score(row.get("generated_logprobs"))
    elif not logits or len(logits) != 1:
        out["judge_error"] = f"a reward model has one output; this one gave {0 if not logits else len(logits)}"
    elif not math.isfinite(logits[0]):  # a reward head that overflowed: no score, not a NaN that sorts anywhere
        out["judge_error"] = f"the reward model's score is not a number ({logits[0]})"
    else:
        out["overall"] = logits[0]
    return out


def prompt_version(cfg: Any) -> str:
    """The project's prompt version, or the recipe's own prompt named by a hash of its text."""
    if cfg.prompt is None and cfg.system_prompt is None:
        return RUBRIC_VERSION
    text = json.dumps([cfg.system_prompt, cfg.prompt])
    return f"recipe prompt {hashlib.sha256(text.encode()).hexdigest()[:8]}"


def judge_name(cfg: Any) -> str:
    """Who judged, in every judgment row: model, scorer and prompt version."""
    if cfg.kind == "openai":
        return f"{cfg.endpoint.model} @ {cfg.endpoint.base_url} (openai rubric, {prompt_version(cfg)})"
    if cfg.kind == "reward_model":
        return f"{cfg.engine.model} (reward_model)"
    return f"{cfg.engine.model} ({cfg.kind}, {prompt_version(cfg)})"


def score(judgeable: Any, cfg: Any, recipe: Recipe, sharing: int = 1) -> Any:
    """The judge's raw output for every judgeable completion, lazily, by the recipe's scorer kind; ``sharing``: the
    engine pools running beside its engine (``generate``)."""
    sampling = cfg.sampling.model_dump()
    if cfg.kind == "reward_model":
        return classify(judgeable.map(reward_request), cfg.engine, recipe.hardware, sharing=sharing)
    if cfg.kind == "openai":
        requests = judgeable.map(endpoint_request, fn_kwargs={
            "sampling": sampling, "structured_output": cfg.endpoint.structured_output, "prompt": cfg.prompt,
            "system": cfg.system_prompt})
        return chat_via_endpoint(requests, cfg.endpoint)
    requests = judgeable.map(judge_requests, fn_kwargs={"kind": cfg.kind, "sampling": sampling, "prompt": cfg.prompt,
                                                        "system": cfg.system_prompt})
    return generate(requests, cfg.engine, recipe.hardware, keep_logprobs=cfg.kind == "logprob", sharing=sharing)


def completion_problem(row: dict[str, Any]) -> str | None:
    """Why a completion cannot be judged (and so never reaches a preference pair), or None."""
    if row["generation_error"]:
        return f"generation failed: {row['generation_error']}"
    return text_problem(row["completion"], "completion")


def score_summary(judgments: Any) -> dict[str, Any]:
    """Judge errors, and the mean overall score per pool model, in one streamed pass (only sums on the driver)."""
    errors, sums, counts = 0, defaultdict(float), defaultdict(int)
    columns = ["model", "overall", "judge_error"]
    for batch in judgments.select_columns(columns).iter_batches(batch_format="pyarrow", batch_size=65536):
        for model, overall, error in zip(*(batch[c].to_pylist() for c in columns), strict=True):
            errors += error is not None
            if overall is not None:
                sums[model] += overall
                counts[model] += 1
    return {"judge_errors": errors, "mean_overall": {m: sums[m] / counts[m] for m in sorted(counts)}}


def run_judge(recipe: Recipe, run_dir: Path) -> StageResult:
    """Score ``complete/models/*`` into ``judge/judgments``; completions that failed get a judge_error row too."""
    cfg = stage_section(recipe, "judge")
    out = run_dir / "judge" / "judgments"
    if done := already_done("judge", run_dir, {"judgments": out}):
        return done
    timer = Timer()
    models = stage_section(recipe, "complete").models
    completions = read_contract(*[model_dir(run_dir, m.name) for m in models])
    judge = judge_name(cfg)
    judgeable = completions.filter(lambda r: completion_problem(r) is None)
    unjudgeable = completions.filter(lambda r: completion_problem(r) is not None).map(
        lambda r: unscored(r, judge, f"not judged: {completion_problem(r)}"))
    judged = score(judgeable, cfg, recipe).map(to_judgment, fn_kwargs={"kind": cfg.kind, "judge": judge})
    written = write_parquet_atomic(judged.union(unjudgeable), out, schema=JudgmentRow.arrow_schema(),
                                   expected_rows=written_rows(*[model_dir(run_dir, m.name) for m in models]))
    log_rate("judge", written, timer.seconds)
    result = StageResult("judge", counts={"judgments": written, **score_summary(read_contract(out))},
                         seconds=timer.seconds, outputs={"judgments": str(out)})
    result.save(run_dir)
    return result
