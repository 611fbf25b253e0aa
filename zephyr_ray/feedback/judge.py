"""Stage ``judge``: score every completion. Scorers are chosen in the recipe (``judge.kind``).

- ``rubric``: UltraFeedback's four aspects rated 1-5 plus an overall 1-10 and a rationale, in JSON that vLLM's
  structured outputs force the judge to produce (so it parses); the raw text is kept beside the scores.
- ``logprob``: the judge emits one rating token 1-5; the score is the probability-weighted mean over the allowed
  ratings, read from the token's log-probabilities (cheap, and calibrated rather than argmax).

A judgment that cannot be parsed or scored keeps its row, with ``judge_error`` saying why; it is counted, never fatal.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from ..config import Recipe
from ..data import JudgmentRow, is_complete, read_contract, text_problem, write_parquet_atomic
from ..generate import generate
from ..stage import StageResult, Timer, log_rate, stage_section
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


def judge_messages(row: dict[str, Any], template: str) -> list[dict[str, str]]:
    instruction = "\n\n".join(m["content"] for m in row["messages"] if m["role"] != "system")
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": template.format(instruction=instruction, response=row["completion"])}]


def parse_rubric(text: str) -> tuple[dict[str, Any], str | None]:
    """Scores from the judge's JSON; a truncated answer still yields the ratings written before the cut."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = {k: int(v) for k, v in re.findall(r'"(\w+)"\s*:\s*(\d+)', text)}
        found = re.search(r'"rationale"\s*:\s*"((?:[^"\\]|\\.)*)', text)
        data["rationale"] = found.group(1) if found else None
    if not isinstance(data, dict):
        return {}, f"judge answered {type(data).__name__}, not a JSON object"
    scores: dict[str, Any] = {}
    for key, top in [(a, 5) for a in ASPECTS] + [("overall", 10)]:
        value = data.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top:
            return {}, f"no valid `{key}` rating (1-{top}) in the judge's answer"
        scores[key] = float(value)
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


def judge_requests(row: dict[str, Any], kind: str, sampling: dict[str, Any]) -> dict[str, Any]:
    """The judge's chat for one completion; the completion row rides along whole, untouched by the engine."""
    if kind == "rubric":
        params = {**sampling, "structured_outputs": {"regex": RUBRIC_REGEX}}
        messages = judge_messages(row, RUBRIC_PROMPT)
    else:
        params = {**sampling, "max_tokens": 1, "temperature": 0.0, "logprobs": 20,
                  "structured_outputs": {"choice": list(LOGPROB_RATINGS)}}
        messages = judge_messages(row, LOGPROB_PROMPT)
    return {"completion_row": row, "messages": messages, "sampling_params": params}


def unscored(row: dict[str, Any], judge: str, error: str | None, raw: str | None = None) -> dict[str, Any]:
    return {**{k: row[k] for k in row if k in JudgmentRow.model_fields}, "judge": judge,
            **{a: None for a in ASPECTS}, "overall": None, "rationale": None, "raw_judgment": raw,
            "judge_error": error}


def to_judgment(row: dict[str, Any], kind: str, judge: str) -> dict[str, Any]:
    raw = row["generated_text"]
    out = unscored(row["completion_row"], judge, None, raw)
    if row["generation_error"]:
        out["judge_error"] = f"judge engine failed: {row['generation_error']}"
    elif kind == "rubric":
        scores, out["judge_error"] = parse_rubric(raw or "")
        out.update(scores)
    else:
        out["overall"], out["judge_error"] = logprob_score(row.get("generated_logprobs"))
    return out


def completion_problem(row: dict[str, Any]) -> str | None:
    """Why a completion cannot be judged (and so never reaches a preference pair), or None."""
    if row["generation_error"]:
        return f"generation failed: {row['generation_error']}"
    return text_problem(row["completion"], "completion")


def run_judge(recipe: Recipe, run_dir: Path) -> StageResult:
    """Score ``complete/models/*`` into ``judge/judgments``; completions that failed get a judge_error row too."""
    cfg = stage_section(recipe, "judge")
    out = run_dir / "judge" / "judgments"
    if is_complete(out):
        logger.info("judge: already done, skipping")
        return StageResult("judge", skipped=True, outputs={"judgments": str(out)})
    if cfg.kind not in ("rubric", "logprob"):
        raise NotImplementedError(f"judge kind '{cfg.kind}' is not available yet")
    timer = Timer()
    models = stage_section(recipe, "complete").models
    completions = read_contract(*[model_dir(run_dir, m.name) for m in models])
    judge = f"{cfg.engine.model} ({cfg.kind}, {RUBRIC_VERSION})"
    judgeable = completions.filter(lambda r: completion_problem(r) is None)
    unjudgeable = completions.filter(lambda r: completion_problem(r) is not None).map(
        lambda r: unscored(r, judge, f"not judged: {completion_problem(r)}"))
    requests = judgeable.map(judge_requests, fn_kwargs={"kind": cfg.kind, "sampling": cfg.sampling.model_dump()})
    judged = generate(requests, cfg.engine, recipe.hardware, keep_logprobs=cfg.kind == "logprob")
    judged = judged.map(to_judgment, fn_kwargs={"kind": cfg.kind, "judge": judge})
    written = write_parquet_atomic(judged.union(unjudgeable), out, schema=JudgmentRow.arrow_schema())
    log_rate("judge", written, timer.seconds)
    table = read_contract(out)
    failures = table.filter(lambda r: r["judge_error"] is not None).count()
    result = StageResult("judge", counts={"judgments": written, "judge_errors": failures}, seconds=timer.seconds,
                         outputs={"judgments": str(out)})
    result.save(run_dir)
    return result
