"""Stage ``complete``: every prompt gets one completion from each model of the pool (UltraFeedback's model pool).

Each model runs as its own ``ray.data.llm`` processor with its own sampling parameters; models whose engines fit
on the cluster together run side by side (``engines.side_by_side``), the others in later waves. Each writes its own
output directory: a re-run skips the models that are done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

from ..config import PoolModel, Recipe
from ..data import (
    CompletionRow,
    PromptRow,
    column_sum,
    is_complete,
    read_contract,
    validated_once,
    write_parquet_atomic_many,
    written_rows,
)
from ..engines import cluster_capacity, side_by_side
from ..evaluate.sets import training_screen
from ..generate import generate
from ..stage import StageResult, Timer, already_done, log_rate, stage_section

logger = logging.getLogger(__name__)

# UltraFeedback draws one of these principles per completion as a system prompt; the wording here is our own.
PRINCIPLES: dict[str, str] = {
    "helpfulness": "You are a helpful assistant. Give accurate, relevant and complete answers that serve the "
                   "user's real need.",
    "honesty": "You are an honest assistant. Say plainly when you do not know something or are unsure, and never "
               "pretend to abilities you do not have.",
    "truthfulness": "You are a truthful assistant. State only what is factually correct, and do not invent facts, "
                    "sources or details.",
    "verbalized_calibration": "You are a careful assistant. After your answer, state how confident you are in it "
                              "as a percentage.",
}


def stable_seed(*parts: Any) -> int:
    """A 31-bit seed from any values: the same inputs give the same seed on every machine and in every order."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "big") & 0x7FFFFFFF


def completion_requests(row: dict[str, Any], model: PoolModel, use_principles: bool, seed: int,
                        principle_role: str = "system", mix: dict[str, float] | str = "uniform") -> dict[str, Any]:
    """One prompt row -> the chat and sampling parameters for ``model``; the principle drawn is seeded per row.

    ``principle_role`` "user": the principle opens the user turn instead of a system message (templates that refuse
    a system role). The row keeps the conversation with the principle as a system message either way, so judges and
    pairs see the same instruction for every pool model."""
    principle = None
    messages = [{"role": "user", "content": row["prompt"]}]
    if use_principles:
        rng, names = random.Random(stable_seed(seed, row["prompt_id"], model.name)), sorted(PRINCIPLES)
        principle = rng.choice(names) if mix == "uniform" else rng.choices(
            names, weights=[mix.get(name, 0.0) for name in names])[0]
        messages.insert(0, {"role": "system", "content": PRINCIPLES[principle]})
    sampling = model.sampling.model_dump()
    if sampling["seed"] is None:
        sampling["seed"] = stable_seed(seed, row["prompt_id"], model.name, "sample")
    rendered = messages
    if principle and principle_role == "user":
        rendered = [{"role": "user", "content": f"{PRINCIPLES[principle]}\n\n{row['prompt']}"}]
    return {"prompt": row["prompt"], "prompt_id": row["prompt_id"], "messages": rendered, "conversation": messages,
            "sampling_params": sampling, "principle": principle}


def sampled_requests(row: dict[str, Any], model: PoolModel, use_principles: bool, seed: int,
                     principle_role: str = "system", mix: dict[str, float] | str = "uniform") -> list[dict[str, Any]]:
    """``model.samples`` requests for one prompt row: the same conversation and principle (so the judge compares the
    samples on the same instruction), a seed of its own per sample, each named by ``PoolModel.sample_names``."""
    requests = []
    for index, name in enumerate(model.sample_names(), start=1):
        request = completion_requests(row, model, use_principles, seed, principle_role, mix)
        request["sampling_params"]["seed"] = stable_seed(request["sampling_params"]["seed"], index)
        requests.append({**request, "sample_name": name})
    return requests


def principle_role(model: PoolModel, principles_as: str) -> str:
    """Where ``model``'s principle goes: the recipe's choice, or (auto) a system message unless its template
    refuses one."""
    from ..chat import accepts_system_role

    if principles_as != "auto":
        return principles_as
    engine = model.engine
    if accepts_system_role(engine.model, engine.chat_template, engine.trust_remote_code):
        return "system"
    logger.info("complete: %s's chat template refuses a system message: its principle opens the user turn",
                model.name)
    return "user"


def to_completion(row: dict[str, Any], model_name: str) -> dict[str, Any]:
    return {
        "prompt": row["prompt"], "prompt_id": row["prompt_id"], "model": row.get("sample_name") or model_name,
        "messages": list(row["conversation"]), "completion": row["generated_text"] or "",
        "sampling_params": json.dumps(row["sampling_params"], sort_keys=True), "principle": row["principle"],
        "num_prompt_tokens": int(row["num_input_tokens"] or 0),
        "num_generated_tokens": int(row["num_generated_tokens"] or 0),
        "finish_reason": row["finish_reason"], "generation_error": row["generation_error"],
    }


def model_dir(run_dir: Path, name: str) -> Path:
    return run_dir / "complete" / "models" / name


def run_complete(recipe: Recipe, run_dir: Path) -> StageResult:
    """Write ``complete/models/<model>/`` for every pool model, plus ``complete/rejects`` for unusable prompts."""
    cfg = stage_section(recipe, "complete")
    if cfg.prompts is None:
        raise ValueError("complete: no `prompts` dataset in the recipe")
    prompts_dir = run_dir / "complete" / "prompts"
    outputs = {model.name: model_dir(run_dir, model.name) for model in cfg.models}
    if done := already_done("complete", run_dir, {"prompts": prompts_dir, **outputs}):
        return done  # every pool model's completions are there: the stage is skipped, as the others are
    timer = Timer()
    result = StageResult("complete")
    result.counts["prompts"] = validated_once(cfg.prompts, PromptRow, prompts_dir, run_dir / "complete" / "rejects",
                                              screen=training_screen(recipe, run_dir))
    accepted = read_contract(prompts_dir)
    todo = []
    for model in cfg.models:
        if is_complete(model_dir(run_dir, model.name)):
            logger.info("complete: %s already done, skipping", model.name)
            result.counts[model.name] = written_rows(model_dir(run_dir, model.name))
        else:
            todo.append(model)
    # pool models whose engines fit on the cluster together run side by side, in one Ray Data execution
    for wave in side_by_side([m.engine for m in todo], recipe.hardware, cluster_capacity(recipe.hardware)):
        models = [todo[i] for i in wave]
        wave_timer = Timer()
        parts = []
        for model in models:
            role = principle_role(model, cfg.principles_as) if cfg.principles else "system"
            if role == "user":  # models whose template refuses a system message (named in the log)
                result.counts["principles_in_user_turn"] = result.counts.get("principles_in_user_turn", 0) + 1
            options = {"model": model, "use_principles": cfg.principles, "seed": cfg.seed, "principle_role": role,
                       "mix": cfg.principle_mix}
            requests = (accepted.flat_map(sampled_requests, fn_kwargs=options) if model.samples > 1
                        else accepted.map(completion_requests, fn_kwargs=options))
            rows = generate(requests, model.engine, recipe.hardware, sharing=len(models))
            parts.append((rows.map(to_completion, fn_kwargs={"model_name": model.name}),
                          model_dir(run_dir, model.name)))
        counts = write_parquet_atomic_many(parts, schema=CompletionRow.arrow_schema(),
                                           expected_rows=written_rows(prompts_dir) * sum(m.samples for m in models))
        for model, written in zip(models, counts):
            out = model_dir(run_dir, model.name)
            tokens = column_sum(out, "num_generated_tokens")
            log_rate(f"complete[{model.name}]", written, wave_timer.seconds, tokens)
            result.tokens_per_second[model.name] = tokens / max(wave_timer.seconds, 1e-9)
            result.counts[model.name] = written
            result.outputs[model.name] = str(out)
    result.seconds = timer.seconds
    result.save(run_dir)
    return result
