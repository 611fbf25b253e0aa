"""Iterative RLAIF: rounds in which the current policy writes the completions the judge scores and DPO learns from
(the recipe's ``rounds:`` section; OpenRLHF's iterative DPO, RLHFlow's online RLHF, Self-Rewarding LMs).

Round r runs the recipe's own stages into ``rounds/<r>/``: ``complete`` asks the policy (the dSFT model in round 1,
round r-1's dDPO model after) for ``samples`` completions of each of the round's prompts (and with ``pool: join`` the
pool models answer too), ``judge`` scores them with the recipe's judge, ``binarize`` pairs the best with the lowest
(or a random other), ``train_dpo`` trains from the policy (its reference: the policy, or the dSFT model), and
``evaluate`` scores the round's model by exact match and against the dSFT model. Each round's recipe is the recipe
with those sections changed (``round_recipe``), so every stage is the one a single run uses, resumable on its own;
the engine of round r loads round r-1's exported model. ``rounds/summary.json`` and ``rounds/rounds.png`` hold the
metrics per round.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import yaml

from .config import DatasetSource, Engine, EvalModel, PairwiseConfig, PoolModel, Recipe
from .data import PromptRow, is_complete, read_rows, validated_once, write_rows_atomic, write_text_atomic
from .stage import StageResult, Timer

logger = logging.getLogger(__name__)

ROUND_STAGES = ("complete", "judge", "binarize", "train_dpo", "evaluate")
POLICY = "policy"  # the pool model name of the policy's samples (rows: policy-1, policy-2, ...)


def round_dir(run_dir: Path, round_number: int) -> Path:
    return run_dir / "rounds" / str(round_number)


def sft_model(run_dir: Path) -> Path:
    return run_dir / "train_sft" / "model"


def policy_of(run_dir: Path, round_number: int) -> Path:
    """The policy that samples in round r: the dSFT model, then the previous round's dDPO model."""
    return sft_model(run_dir) if round_number == 1 else round_dir(run_dir, round_number - 1) / "train_dpo" / "model"


def round_stages(recipe: Recipe) -> list[tuple[int, str]]:
    """(round, stage) in run order."""
    cfg = recipe.rounds
    if cfg is None:
        return []
    stages = [s for s in ROUND_STAGES if s != "evaluate" or cfg.evaluate]
    return [(r, stage) for r in range(1, cfg.count + 1) for stage in stages]


def split_for_rounds(rows: list[dict[str, Any]], seed: int, count: int) -> list[list[dict[str, Any]]]:
    """``rounds.prompts: split``: each prompt in one round, by a seeded hash of its id (so a prompt's round does not
    depend on the others). Checked whole when round 1 draws its part: a round left with no prompt is an error
    before any round trains, not when that round starts."""
    from .feedback.complete import stable_seed

    parts: list[list[dict[str, Any]]] = [[] for _ in range(count)]
    for row in rows:
        parts[stable_seed(seed, row["prompt_id"]) % count].append(row)
    empty = [r for r, part in enumerate(parts, start=1) if not part]
    if empty:
        raise ValueError(f"rounds: round(s) {empty} would have no prompts ({len(rows)} prompts split {count} ways by "
                         "a hash of their ids): give more prompts, fewer rounds, or prompts: resample")
    return parts


def round_prompts(recipe: Recipe, run_dir: Path, round_number: int) -> Path:
    """The round's prompts, ``rounds/<r>/prompts.jsonl`` (written once): of the ``complete`` prompts (validated and
    screened as ``complete`` does, into ``rounds/prompts``), a disjoint part per round (``split``, by a seeded hash
    of each prompt id) or ``prompts_per_round`` drawn again each round (``resample``)."""
    from .evaluate.sets import training_screen
    from .feedback.complete import stable_seed

    out = round_dir(run_dir, round_number) / "prompts.jsonl"
    if out.is_file():
        return out
    cfg = recipe.rounds
    validated_once(recipe.complete.prompts, PromptRow, run_dir / "rounds" / "prompts",
                   run_dir / "rounds" / "prompt_rejects", screen=training_screen(recipe, run_dir))
    rows = sorted(read_rows(run_dir / "rounds" / "prompts"), key=lambda row: row["prompt_id"])
    if cfg.prompts == "split":
        chosen = split_for_rounds(rows, cfg.seed, cfg.count)[round_number - 1]
    else:
        drawn = random.Random(stable_seed(cfg.seed, round_number)).sample(rows, cfg.prompts_a_round(len(rows)))
        chosen = sorted(drawn,
                        key=lambda row: row["prompt_id"])
    if not chosen:
        raise ValueError(f"rounds: round {round_number} has no prompts ({len(rows)} prompts split {cfg.count} ways)")
    write_text_atomic(out, "".join(json.dumps({"prompt": row["prompt"], "prompt_id": row["prompt_id"]}) + "\n"
                                   for row in chosen))
    logger.info("rounds: round %d: %d of %d prompts (%s)", round_number, len(chosen), len(rows), cfg.prompts)
    return out


def round_recipe(recipe: Recipe, run_dir: Path, round_number: int) -> Recipe:
    """The recipe round r runs its stages with (``recipe_for_round``) in ``run_dir``: its prompts drawn, its policy
    the dSFT model or round r-1's, its model ``rounds/<r>/train_dpo/model``. Paths are absolute: the stages run in
    the round's directory."""
    run_dir = run_dir.resolve()
    prompts = DatasetSource(path=str(round_prompts(recipe, run_dir, round_number)))
    return recipe_for_round(recipe, round_number, prompts, policy=str(policy_of(run_dir, round_number)),
                            sft=str(sft_model(run_dir)),
                            trained=str(round_dir(run_dir, round_number) / "train_dpo" / "model"))


def recipe_for_round(recipe: Recipe, round_number: int, prompts: DatasetSource, policy: str, sft: str,
                     trained: str) -> Recipe:
    """Round r's recipe from its prompts and models (``zephyr-ray plan`` prices a round from the same): the
    policy's samples in ``complete`` (beside the pool's with ``pool: join``), the round's pairing in ``binarize``,
    DPO from the policy (its reference, epochs, learning rate) in ``train_dpo``, and an evaluation of the round's
    model against the dSFT model."""
    cfg = recipe.rounds
    engine = Engine.model_validate({**cfg.engine.model_dump(), "model": policy})
    policy_model = PoolModel(name=POLICY, engine=engine, sampling=cfg.sampling, samples=cfg.samples)
    pool = list(recipe.complete.models) if cfg.pool == "join" else []
    complete = recipe.complete.model_copy(update={"prompts": prompts, "models": [*pool, policy_model]})
    binarize = recipe.binarize.model_copy(update={"rejected": cfg.rejected, "dataset": None})
    dpo_changes: dict[str, Any] = {"model": policy,
                                   "reference": sft if cfg.reference == "sft" and round_number > 1 else None}
    for field in ("num_epochs", "learning_rate"):
        if (value := cfg.dpo.for_round(field, round_number)) is not None:
            dpo_changes[field] = value
    train_dpo = recipe.train_dpo.model_copy(update=dpo_changes)
    changes: dict[str, Any] = {"synthesize": None, "train_sft": None, "complete": complete, "judge": recipe.judge,
                               "binarize": binarize, "train_dpo": train_dpo, "rounds": None}
    changes["evaluate"] = round_evaluation(recipe, round_number, trained, sft) if cfg.evaluate else None
    return recipe.model_copy(update=changes)


def round_evaluation(recipe: Recipe, round_number: int, trained: str, sft: str) -> Any:
    """The recipe's evaluation with round r's dDPO model (``trained``) as the evaluated model and the dSFT model as
    the pairwise baseline: exact match (of those two) and the win rate against dSFT; MT-Bench grading only where the
    pairwise instructions are the MT-Bench questions; no decontamination (the round's prompts were screened when
    drawn)."""
    evaluate = recipe.evaluate
    settings = evaluate.model.model_dump(exclude={"name", "model"})
    model = EvalModel(name=f"round-{round_number}", model=trained, **settings)
    pairwise = evaluate.pairwise or PairwiseConfig()
    baseline_settings = (pairwise.baseline or evaluate.model).model_dump(exclude={"name", "model"})
    pairwise = pairwise.model_copy(update={"baseline": EvalModel(name="sft", model=sft, **baseline_settings)})
    exact_match = evaluate.exact_match.model_copy(update={"models": []}) if evaluate.exact_match else None
    return evaluate.model_copy(update={"model": model, "pairwise": pairwise, "exact_match": exact_match,
                                       "mt_bench": evaluate.mt_bench if pairwise.prompts is None else None,
                                       "decontaminate": None})


def run_round_stage(recipe: Recipe, run_dir: Path, round_number: int, stage: str,
                    address: str | None = None) -> StageResult:
    """One stage of round r, in ``rounds/<r>/``; skipped when its outputs are complete, like any stage."""
    from .stages import run_stage

    if not is_complete(policy_of(run_dir, round_number)):
        before = "train_sft" if round_number == 1 else f"round {round_number - 1}"
        raise FileNotFoundError(f"rounds: round {round_number} needs {before}'s model at "
                                f"{policy_of(run_dir, round_number)}; run it first")
    recipe_of_round = round_recipe(recipe, run_dir, round_number)
    # what the round ran with, beside its outputs (the policy it sampled, its prompts, its DPO settings)
    write_text_atomic(round_dir(run_dir, round_number) / "recipe.yaml",
                      yaml.safe_dump(recipe_of_round.model_dump(mode="json", exclude_none=True), sort_keys=False))
    if stage == "evaluate" and recipe_of_round.evaluate is not None:
        reuse_sft_answers(recipe, recipe_of_round, run_dir, round_number)
    return run_stage(stage, recipe_of_round, round_dir(run_dir, round_number), address=address)


def reuse_sft_answers(recipe: Recipe, recipe_of_round: Recipe, run_dir: Path, round_number: int) -> int:
    """Round r's evaluation takes the dSFT model's answers from an earlier evaluation of the run (the recipe's own,
    then each earlier round's) when that one asked the dSFT model, with the same engine settings and name (so the
    same seeds), every item the round asks in the same form: the answers would come out the same, and one engine
    pass a round is saved. How many answers were taken (0: none)."""
    from .config import EvaluateConfig
    from .evaluate.answers import ANSWER_SCHEMA, answer_items, answers_dir, model_path
    from .evaluate.sets import evaluation_sets

    here, cfg = round_dir(run_dir, round_number), recipe_of_round.evaluate
    baseline = cfg.pairwise.baseline if cfg is not None and cfg.pairwise is not None else None
    if baseline is None or is_complete(answers_dir(here, baseline.name)):
        return 0
    wanted = answer_items(evaluation_sets(cfg, here), cfg)
    earlier = [(run_dir, recipe.evaluate)]
    for r in range(1, round_number):
        saved = yaml.safe_load((round_dir(run_dir, r) / "recipe.yaml").read_text()).get("evaluate")
        earlier.append((round_dir(run_dir, r), EvaluateConfig.model_validate(saved) if saved else None))
    for source_run, source_cfg in earlier:
        source = answers_dir(source_run, baseline.name)
        then = source_cfg.pairwise.baseline if source_cfg and source_cfg.pairwise else None
        # the same name (the answers' seeds come from it), engine settings and weights
        if then is None or then.model_dump(exclude={"model"}) != baseline.model_dump(exclude={"model"}) \
                or not is_complete(source) \
                or Path(model_path(then, source_run)).resolve() != Path(baseline.model).resolve():
            continue
        asked = {(item["set"], item["question_id"]): item for item in answer_items(
            evaluation_sets(source_cfg, source_run), source_cfg)}
        if any(asked.get((item["set"], item["question_id"])) != item for item in wanted):
            continue
        keys = {(item["set"], item["question_id"]) for item in wanted}
        rows = [row for row in read_rows(source) if (row["set"], row["question_id"]) in keys]
        if len(rows) != len(keys):
            continue
        write_rows_atomic(rows, answers_dir(here, baseline.name), schema=ANSWER_SCHEMA)
        logger.info("rounds: round %d: the dSFT model's %d answers are those of %s (same questions, seeds and "
                    "engine)", round_number, len(rows), source.relative_to(run_dir))
        return len(rows)
    return 0


def run_rounds(recipe: Recipe, run_dir: Path) -> StageResult:
    """Every stage of every round in order (``zephyr-ray stage rounds``; ``zephyr-ray run`` records each in the
    manifest), then the summary."""
    timer = Timer()
    for round_number, stage in round_stages(recipe):
        run_round_stage(recipe, run_dir, round_number, stage)
    summary = write_rounds_summary(recipe, run_dir)
    return StageResult("rounds", counts={"rounds": len(summary["rounds"])}, seconds=timer.seconds,
                       outputs={"summary": str(run_dir / "rounds" / "summary.json")})


def round_metrics(run_dir: Path, round_number: int) -> dict[str, Any]:
    """What round r made and how its model scored (from its stages' results)."""
    folder = round_dir(run_dir, round_number)

    def result(stage: str) -> dict[str, Any]:
        path = folder / stage / "result.json"
        return json.loads(path.read_text()).get("counts", {}) if path.is_file() else {}

    metrics: dict[str, Any] = {"round": round_number, "policy": str(policy_of(run_dir, round_number)),
                               "prompts": result("complete").get("prompts", {}).get("accepted"),
                               "completions": result("judge").get("judgments"),
                               "pairs": result("binarize").get("pairs")}
    results_path = folder / "evaluate" / "results.json"
    if results_path.is_file():
        results = json.loads(results_path.read_text())
        name = f"round-{round_number}"
        exact = results.get("exact_match") or {}
        metrics["exact_match"] = exact.get(name)
        metrics["exact_match_sft"] = exact.get("sft")
        metrics["exact_match_vs_sft"] = next((p for p in results.get("exact_match_paired") or []
                                              if p["model"] == name and p["over"] == "sft"), None)
        pairwise = results.get("pairwise") or {}
        metrics["win_rate_vs_sft"] = ({key: pairwise.get(key) for key in
                                       ("win_rate", "interval", "wins", "ties", "losses", "position_consistency")}
                                      if pairwise else None)
        # the feedback judge against the truth on this round's exact-match replies (the round's model's and the
        # dSFT model's), and on the round's model's own: DPO repeated on one judge's preferences can teach what the
        # judge likes rather than what is right, and a judge that orders the new policy's right and wrong replies
        # worse than before is one to look at before another round trains on its preferences
        agreement = results.get("judge_agreement") or {}
        metrics["judge_agreement"] = ({**{key: agreement.get(key) for key in
                                          ("right_above_wrong", "rank_correlation", "n", "judge_failures")},
                                       "policy": (agreement.get("by_model") or {}).get(name)} if agreement else None)
    return metrics


def write_rounds_summary(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    """``rounds/summary.json`` (the metrics per round, round 0 the dSFT model) and ``rounds/rounds.png``."""
    rounds = [round_metrics(run_dir, r) for r in range(1, recipe.rounds.count + 1)
              if (round_dir(run_dir, r) / "train_dpo" / "model").exists()]
    summary = {"rounds": rounds, "settings": recipe.rounds.model_dump(mode="json")}
    if rounds and rounds[0].get("exact_match_sft"):
        summary["sft_exact_match"] = rounds[0]["exact_match_sft"]
    write_text_atomic(run_dir / "rounds" / "summary.json", json.dumps(summary, indent=2) + "\n")
    plot_rounds(summary, run_dir / "rounds" / "rounds.png")
    for row in rounds:
        exact, win = row.get("exact_match") or {}, row.get("win_rate_vs_sft") or {}
        agreement = row.get("judge_agreement") or {}
        logger.info("round %d: exact match %s, win rate vs dSFT %s (%s pairs), the feedback judge puts a right reply "
                    "above a wrong one in %s of pairs", row["round"],
                    f"{exact['accuracy']:.1%}" if exact.get("accuracy") is not None else "-",
                    f"{win['win_rate']:.1%}" if win.get("win_rate") is not None else "-", row.get("pairs"),
                    f"{agreement['right_above_wrong']:.0%}" if agreement.get("right_above_wrong") is not None else "-")
    return summary


def plot_rounds(summary: dict[str, Any], path: Path) -> None:
    """Exact match (round 0: the dSFT model) and the win rate against dSFT per round, with their intervals."""
    from .plots import pyplot, save_png

    plt = pyplot()
    rounds = summary["rounds"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    points = ([(0, summary["sft_exact_match"])] if summary.get("sft_exact_match") else []) + [
        (row["round"], row["exact_match"]) for row in rounds if row.get("exact_match")]
    if points:
        xs = [x for x, _ in points]
        ys = [p["accuracy"] for _, p in points]
        low = [p["accuracy"] - p["interval"][0] for _, p in points]
        high = [p["interval"][1] - p["accuracy"] for _, p in points]
        left.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=4)
        left.set_xticks(xs, ["dSFT" if x == 0 else f"round {x}" for x in xs])
    left.set_ylim(0, 1)
    left.set_title("exact match (95% interval)")
    wins = [(row["round"], row["win_rate_vs_sft"]) for row in rounds if (row.get("win_rate_vs_sft") or {}).get(
        "win_rate") is not None]
    if wins:
        xs = [x for x, _ in wins]
        ys = [w["win_rate"] for _, w in wins]
        right.errorbar(xs, ys, yerr=[[y - w["interval"][0] for y, (_, w) in zip(ys, wins)],
                                     [w["interval"][1] - y for y, (_, w) in zip(ys, wins)]], marker="o", capsize=4)
        right.set_xticks(xs, [f"round {x}" for x in xs])
    right.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    right.set_ylim(0, 1)
    right.set_title("win rate against dSFT (95% interval)")
    save_png(figure, path)
