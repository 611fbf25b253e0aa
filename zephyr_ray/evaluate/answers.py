"""Every answering model's answers to the evaluation's items, turn by turn on ``ray.data.llm`` vLLM engines (models
with the same engine settings share an engine; engines that fit together run side by side), written to
``answers/<model>/``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..config import RUN_MODELS, Engine, EvalModel, EvaluateConfig, Recipe
from ..data import is_complete, read_rows, write_rows_atomic
from ..stage import Timer, log_rate
from .sets import EvaluationSets

ANSWER_SCHEMA = pa.schema([
    ("model", pa.string()), ("model_path", pa.string()), ("set", pa.string()), ("question_id", pa.string()),
    ("category", pa.string()), ("turns", pa.list_(pa.string())), ("answers", pa.list_(pa.string())),
    ("errors", pa.list_(pa.string())), ("finish_reasons", pa.list_(pa.string())),
    ("generated_tokens", pa.list_(pa.int64())), ("temperature", pa.float64()),
])



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
    from ..feedback.complete import stable_seed

    messages = []
    for i in range(turn):
        messages.append({"role": "user", "content": item["turns"][i]})
        if i < turn - 1:
            messages.append({"role": "assistant", "content": answers[i]})
    return {"key": json.dumps([model.name, item["set"], item["question_id"]]), "messages": messages,
            "sampling_params": {"temperature": item["temperature"], "top_p": top_p, "max_tokens": item["max_tokens"],
                                "seed": stable_seed(model.name, item["set"], item["question_id"], turn)}}



def answer_side_by_side(groups: list[tuple[list[EvalModel], Engine, list[dict[str, Any]]]], recipe: Recipe,
                        run_dir: Path) -> None:
    """Every item of each group answered by each of its models (which share the group's engine), one Ray Data
    execution per turn for all the groups: their engines run side by side, as the pool models' do in ``complete``.
    A turn is asked only when the turns before it were answered. Writes ``answers/<model>/`` for each model."""
    from ..generate import generate, rows_dataset, take_side_by_side

    state: dict[tuple[str, str, str], dict[str, Any]] = {}
    by_name: dict[str, EvalModel] = {}
    for models, _, items in groups:
        for model in models:
            by_name[model.name] = model
            state.update({(model.name, item["set"], item["question_id"]): {
                "item": item, "answers": [], "errors": [], "finish": [], "tokens": []} for item in items})
    group_of = {model.name: index for index, (models, _, _) in enumerate(groups) for model in models}
    turns = max((len(s["item"]["turns"]) for s in state.values()), default=0)
    for turn in range(1, turns + 1):
        requests: list[list[dict[str, Any]]] = [[] for _ in groups]
        for (name, _, _), s in state.items():
            item = s["item"]
            if turn <= len(item["turns"]):
                if len(s["answers"]) == turn - 1 and all(a is not None for a in s["answers"]):
                    requests[group_of[name]].append(_turn_request(item, by_name[name], s["answers"], turn, top_p=1.0))
                else:
                    s["answers"].append(None)
                    s["errors"].append(f"not asked: turn {turn - 1} has no answer")
                    s["finish"].append("error")
                    s["tokens"].append(0)
        asked = [(index, batch) for index, batch in enumerate(requests) if batch]
        if not asked:
            continue
        timer = Timer()
        passes = [generate(rows_dataset(batch, groups[index][1].batch_size), groups[index][1], recipe.hardware,
                           sharing=len(asked))
                  for index, batch in asked]
        rows = [row for pass_rows in take_side_by_side(passes) for row in pass_rows]
        returned = {row["key"] for row in rows}
        rows += [{"key": r["key"], "generated_text": None, "generation_error": "the engine returned no row",
                  "finish_reason": "error", "num_generated_tokens": 0}
                 for _, batch in asked for r in batch if r["key"] not in returned]
        for row in rows:
            s = state[tuple(json.loads(row["key"]))]
            # an empty reply is the model's answer, judged as FastChat judges it (the judge rates it, usually
            # low); only a failed generation is no answer (left out of the scores, counted)
            failed = row["generation_error"]
            s["answers"].append(None if failed else row["generated_text"] or "")
            s["errors"].append(failed)
            s["finish"].append(row["finish_reason"])
            s["tokens"].append(int(row["num_generated_tokens"] or 0))
        names = "+".join(m.name for index, _ in asked for m in groups[index][0])
        log_rate(f"evaluate[answers {names} turn {turn}]", len(rows), timer.seconds,
                 sum(int(r["num_generated_tokens"] or 0) for r in rows))
    for models, engine, _ in groups:
        for model in models:
            out = [{"model": model.name, "model_path": engine.model, "set": s["item"]["set"],
                    "question_id": s["item"]["question_id"], "category": s["item"]["category"],
                    "turns": s["item"]["turns"], "answers": s["answers"], "errors": s["errors"],
                    "finish_reasons": s["finish"], "generated_tokens": s["tokens"],
                    "temperature": s["item"]["temperature"]}
                   for (name, _, _), s in state.items() if name == model.name]
            write_rows_atomic(out, answers_dir(run_dir, model.name), schema=ANSWER_SCHEMA)


def answer_all(asked: list[tuple[EvalModel, list[dict[str, Any]]]], recipe: Recipe,
               run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Each (model, its items)'s answers, generated where ``answers/<model>/`` is not complete yet. Models with the
    same engine settings, weights and items share an engine; engines that fit on the cluster together answer side by
    side (``engines.side_by_side``), each turn in one Ray Data execution."""
    from ..engines import cluster_capacity, side_by_side

    groups: dict[str, tuple[list[EvalModel], Engine, list[dict[str, Any]]]] = {}
    for model, items in asked:
        if is_complete(answers_dir(run_dir, model.name)):
            continue
        settings = model.model_dump(exclude={"name"}) | {"model": model_path(model, run_dir)}
        key = json.dumps([settings, [(i["set"], i["question_id"]) for i in items]], sort_keys=True)
        if key not in groups:
            groups[key] = ([], Engine.model_validate(settings), items)
        groups[key][0].append(model)
    todo = list(groups.values())
    for wave in side_by_side([engine for _, engine, _ in todo], recipe.hardware, cluster_capacity(recipe.hardware)):
        answer_side_by_side([todo[i] for i in wave], recipe, run_dir)
    return {model.name: read_rows(answers_dir(run_dir, model.name)) for model, _ in asked}
