"""Stage ``synthesize``: UltraChat-style self-chat, the dSFT data.

From seed prompts, the teacher answers; a user simulator (the teacher by default, or another model) reads the
dialogue and writes the next user turn; the teacher answers again; for ``num_turns`` assistant turns. Each turn is one
``ray.data.llm`` pass over the whole dataset, so engines batch across dialogues. Then the filters the Zephyr paper
needed: empty turns, truncated turns (no EOS), dialogues over or under the length bounds, and duplicates are dropped,
each counted by reason in the rejects. With ``dataset`` instead of ``seeds``, an existing dialogue set is validated
and used as it is (e.g. ``HuggingFaceH4/ultrachat_200k``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa

from .config import Recipe
from .data import (
    DialogueRow,
    PromptRow,
    contamination_reason,
    count_values,
    is_complete,
    read_contract,
    screened,
    split_by_reason,
    text_problem,
    validated_once,
    write_parquet_atomic,
    written_rows,
)
from .evaluate.sets import training_screen
from .feedback.complete import stable_seed
from .generate import generate
from .stage import StageResult, Timer, already_done, log_rate, stage_section

logger = logging.getLogger(__name__)

USER_SIMULATOR_SYSTEM = ("You play a curious human user who is chatting with an AI assistant. You write only the "
                         "user's next message.")
USER_SIMULATOR_PROMPT = """Here is a conversation between a user and an AI assistant:

{transcript}

Write the user's next message: a natural follow-up question or request that builds on the conversation. Reply with
the message only."""

SYNTH_REJECT_SCHEMA = pa.schema([("prompt", pa.string()), ("prompt_id", pa.string()), ("reason", pa.string()),
                                 ("messages", DialogueRow.arrow_schema().field("messages").type)])


def transcript(messages: list[dict[str, str]]) -> str:
    return "\n\n".join(f"{m['role'].upper()}: {m['content']}" for m in messages)


def _sampling(cfg: Any, prompt_id: str, turn: int, role: str) -> dict[str, Any]:
    params = cfg.sampling.model_dump()
    params["seed"] = stable_seed(params["seed"] or 0, prompt_id, turn, role)
    return params


def _start(row: dict[str, Any], cfg: Any) -> dict[str, Any]:
    return {"prompt": row["prompt"], "prompt_id": row["prompt_id"],
            "dialogue": [{"role": "user", "content": row["prompt"]}], "problem": None,
            "messages": [{"role": "user", "content": row["prompt"]}],
            "sampling_params": _sampling(cfg, row["prompt_id"], 1, "assistant")}


def _after_assistant(row: dict[str, Any], cfg: Any, turn: int, last: bool) -> dict[str, Any]:
    dialogue = list(row["dialogue"]) + [{"role": "assistant", "content": row["generated_text"] or ""}]
    problem = row["problem"] or _turn_problem(row, f"assistant turn {turn}")
    out = {"prompt": row["prompt"], "prompt_id": row["prompt_id"], "dialogue": dialogue, "problem": problem}
    if not last:  # ask the user simulator for the next user turn
        out["messages"] = [{"role": "system", "content": USER_SIMULATOR_SYSTEM},
                           {"role": "user", "content": USER_SIMULATOR_PROMPT.format(transcript=transcript(dialogue))}]
        out["sampling_params"] = _sampling(cfg, row["prompt_id"], turn + 1, "user")
    return out


def _after_user(row: dict[str, Any], cfg: Any, turn: int) -> dict[str, Any]:
    dialogue = list(row["dialogue"]) + [{"role": "user", "content": (row["generated_text"] or "").strip()}]
    problem = row["problem"] or _turn_problem(row, f"user turn {turn}")
    return {"prompt": row["prompt"], "prompt_id": row["prompt_id"], "dialogue": dialogue, "problem": problem,
            "messages": dialogue, "sampling_params": _sampling(cfg, row["prompt_id"], turn, "assistant")}


def _turn_problem(row: dict[str, Any], what: str) -> str | None:
    if row["generation_error"]:
        return f"generation failed ({what})"
    problem = text_problem(row["generated_text"] or "", what)
    if problem:
        return problem
    if row["finish_reason"] == "length":
        return f"truncated {what} (no EOS within max_tokens)"
    return None


def _finish(row: dict[str, Any], cfg: Any, screen: Any = None) -> dict[str, Any]:
    dialogue = list(row["dialogue"])
    chars = sum(len(m["content"]) for m in dialogue)
    problem = row["problem"]
    # the seeds were screened; the user simulator's turns are new text: screened as well, dropped where the recipe
    # drops contaminated rows
    if problem is None and screen is not None and screen.drop and (
            found := screened(screen, {"prompt": row["prompt"], "messages": dialogue})) is not None:
        problem = f"{contamination_reason(found[1])} ({found[0]})"
    if problem is None and chars < cfg.min_chars:
        problem = f"shorter than min_chars ({cfg.min_chars})"
    if problem is None and chars > cfg.max_chars:
        problem = f"longer than max_chars ({cfg.max_chars})"
    key = hashlib.sha256(json.dumps(dialogue, sort_keys=True).encode("utf-8", "surrogatepass")).hexdigest()
    return {"prompt": row["prompt"], "prompt_id": row["prompt_id"], "messages": dialogue, "reason": problem,
            "dialogue_key": key}


def _first_of_duplicates(group: pa.Table) -> pa.Table:
    """Keep the first dialogue of a group of identical ones; the others become duplicate rejects."""
    rows = sorted(group.to_pylist(), key=lambda r: r["prompt_id"])
    for row in rows[1:]:
        row["reason"] = row["reason"] or "duplicate dialogue"
    return pa.Table.from_pylist(rows, schema=group.schema)


def run_synthesize(recipe: Recipe, run_dir: Path) -> StageResult:
    """Write ``synthesize/dialogues`` (ultrachat_200k columns) and ``synthesize/rejects``."""
    cfg = stage_section(recipe, "synthesize")
    stage_dir = run_dir / "synthesize"
    out, rejects_dir = stage_dir / "dialogues", stage_dir / "rejects"
    if done := already_done("synthesize", run_dir, {"dialogues": out, "rejects": rejects_dir}):
        return done
    timer = Timer()
    result = StageResult("synthesize", outputs={"dialogues": str(out), "rejects": str(rejects_dir)})
    if cfg.dataset is not None:  # an existing dialogue set, validated as it is
        result.counts = validated_once(cfg.dataset, DialogueRow, out, rejects_dir,
                                       screen=training_screen(recipe, run_dir))
        result.seconds = timer.seconds
        result.save(run_dir)
        return result

    result.counts["seeds"] = validated_once(cfg.seeds, PromptRow, stage_dir / "seeds", stage_dir / "seed_rejects",
                                            screen=training_screen(recipe, run_dir))
    # One engine at a time: each pass (teacher turn or user-simulator turn) is written to disk before the next
    # starts, so a small machine never holds two engines, and a re-run resumes at the first unfinished pass.
    passes = []
    for turn in range(1, cfg.num_turns + 1):
        last = turn == cfg.num_turns
        passes.append((f"turn{turn}-assistant", cfg.teacher, _after_assistant,
                       {"cfg": cfg, "turn": turn, "last": last}))
        if not last:
            passes.append((f"turn{turn + 1}-user", cfg.user_simulator or cfg.teacher, _after_user,
                           {"cfg": cfg, "turn": turn + 1}))
    ds, previous = read_contract(stage_dir / "seeds").map(_start, fn_kwargs={"cfg": cfg}), stage_dir / "seeds"
    for name, engine, after, kwargs in passes:
        pass_dir = stage_dir / "passes" / name
        if not is_complete(pass_dir):
            pass_timer = Timer()
            rows = write_parquet_atomic(generate(ds, engine, recipe.hardware).map(after, fn_kwargs=kwargs), pass_dir,
                                        expected_rows=written_rows(previous))
            log_rate(f"synthesize[{name}]", rows, pass_timer.seconds)
        ds, previous = read_contract(pass_dir), pass_dir
    finished = ds.map(_finish, fn_kwargs={"cfg": cfg, "screen": training_screen(recipe, run_dir)})
    checked = finished.groupby("dialogue_key").map_groups(_first_of_duplicates, batch_format="pyarrow").materialize()
    accepted, rejected = split_by_reason(checked, DialogueRow.arrow_schema().names, SYNTH_REJECT_SCHEMA.names)
    kept = write_parquet_atomic(accepted, out, schema=DialogueRow.arrow_schema())
    dropped = write_parquet_atomic(rejected, rejects_dir, schema=SYNTH_REJECT_SCHEMA)
    reasons = dict(count_values(read_contract(rejects_dir), "reason"))
    result.counts.update(dialogues=kept, rejected=dropped, reasons=reasons)
    result.seconds = timer.seconds
    log_rate("synthesize", kept + dropped, timer.seconds)
    result.save(run_dir)
    return result
