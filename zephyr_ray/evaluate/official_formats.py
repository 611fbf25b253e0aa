"""An evaluation's answers and judgments in the official tools' formats, to cross-check our numbers with their
scorers (``zephyr-ray evaluate RECIPE --export DIR``):

- ``model_answer/<model>.jsonl``: FastChat's MT-Bench answer format (``question_id``, ``answer_id``, ``model_id``,
  ``choices: [{"index": 0, "turns": [...]}]``, ``tstamp``), a turn with no answer written ``$ERROR$`` as FastChat
  writes an API error; ``gen_judgment.py --model-list`` and ``show_result.py`` read it from
  ``data/mt_bench/model_answer/``.
- ``alpaca_eval/<model>/model_outputs.json``: AlpacaEval's outputs (a JSON list of ``instruction``, ``output``,
  ``generator``, ``dataset``) for the pairwise instructions the recipe gave (``pairwise.prompts``), for
  ``alpaca_eval --model_outputs``.
- ``model_judgment/<judge>_single.jsonl`` and ``<judge>_pair.jsonl``: FastChat's judgment format (``score`` -1 where
  the judge gave no rating, as FastChat writes it; pairwise games ``g1`` = the model first, ``g2`` = swapped, the
  winners as ``model_1`` / ``model_2`` / ``tie`` / ``error``), which ``show_result.py`` reads. The ``judge`` field
  names the prompt slot with a ``zephyr-ray-`` prefix: the wording is this project's unless the recipe gave its own.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..data import is_complete, read_rows, write_text_atomic
from .answers import answers_dir

ERROR = "$ERROR$"  # FastChat's text for a turn that got no answer
WINNERS = {"model": "model_1", "opponent": "model_2", "tie": "tie"}


def _question_id(value: str) -> int | str:
    """FastChat's ids are numbers: give them back as numbers so its scripts join answers and judgments."""
    return int(value) if value.isdigit() else value


def _file_name(label: str) -> str:
    """A judge's name as a file name (FastChat names judgment files after the judge model)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "judge"


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    return write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def fastchat_answers(rows: list[dict[str, Any]], model: str, tstamp: float) -> list[dict[str, Any]]:
    return [{"question_id": _question_id(r["question_id"]),
             "answer_id": hashlib.sha256(f"{model}:{r['question_id']}".encode()).hexdigest()[:22],
             "model_id": model, "choices": [{"index": 0, "turns": [a if a is not None else ERROR
                                                                  for a in r["answers"]]}],
             "tstamp": tstamp} for r in rows if r["set"] == "mt_bench"]


def alpaca_outputs(rows: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    return [{"instruction": r["turns"][0], "output": r["answers"][0] if r["answers"][0] is not None else "",
             "generator": model, "dataset": r["category"]} for r in rows if r["set"] == "pairwise"]


def single_judgments(judgments: list[dict[str, Any]], judge: str, tstamp: float) -> list[dict[str, Any]]:
    out = []
    for j in judgments:
        if j["set"] != "mt_bench":
            continue
        slot = ("single-math-v1" if j["reference_used"] else "single-v1") + ("-multi-turn" if j["turn"] > 1 else "")
        out.append({"question_id": _question_id(j["question_id"]), "model": j["model"],
                    "judge": [judge, f"zephyr-ray-{slot}"], "user_prompt": j["judge_prompt"] or "",
                    "judgment": j["raw_judgment"] or j["judge_error"] or "",
                    "score": j["rating"] if j["rating"] is not None else -1, "turn": j["turn"], "tstamp": tstamp})
    return out


def pair_judgments(judgments: list[dict[str, Any]], judge: str, tstamp: float) -> list[dict[str, Any]]:
    games: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for j in judgments:
        if j["set"] == "pairwise":
            games[(j["question_id"], j["model"], j["opponent"])][j["order"]] = j
    out = []
    for (question_id, model, opponent), orders in games.items():
        row: dict[str, Any] = {"question_id": _question_id(question_id), "model_1": model, "model_2": opponent}
        for game, order in (("g1", "model_first"), ("g2", "baseline_first")):
            j = orders.get(order) or {}
            row[f"{game}_winner"] = WINNERS.get(j.get("verdict") or "", "error")
            row[f"{game}_user_prompt"] = j.get("judge_prompt") or ""
            row[f"{game}_judgment"] = j.get("raw_judgment") or j.get("judge_error") or ""
        row.update(judge=[judge, "zephyr-ray-pair-v2"], turn=1, tstamp=tstamp)
        out.append(row)
    return out


def export_evaluation(run_dir: Path, out: Path, judge_model: str) -> list[Path]:
    """Write a finished evaluation's answers and judgments under ``out`` (see the module's docstring); returns the
    files written. ``judge_model`` names the judgment files, as FastChat names them after ``--judge-model``."""
    stage = run_dir / "evaluate"
    if not is_complete(stage / "judgments"):
        raise FileNotFoundError(f"{stage}: no finished evaluation to export (run `zephyr-ray evaluate` first)")
    tstamp = time.time()
    written = []
    for model_dir in sorted(p for p in (stage / "answers").iterdir() if p.is_dir()):
        rows = read_rows(answers_dir(run_dir, model_dir.name))
        if answers := fastchat_answers(rows, model_dir.name, tstamp):
            written.append(_jsonl(out / "model_answer" / f"{model_dir.name}.jsonl", answers))
        if outputs := alpaca_outputs(rows, model_dir.name):
            written.append(write_text_atomic(out / "alpaca_eval" / model_dir.name / "model_outputs.json",
                                  json.dumps(outputs, ensure_ascii=False, indent=2) + "\n"))
    judgments = read_rows(stage / "judgments")
    name = _file_name(judge_model)
    if single := single_judgments(judgments, judge_model, tstamp):
        written.append(_jsonl(out / "model_judgment" / f"{name}_single.jsonl", single))
    if pairs := pair_judgments(judgments, judge_model, tstamp):
        written.append(_jsonl(out / "model_judgment" / f"{name}_pair.jsonl", pairs))
    return written
