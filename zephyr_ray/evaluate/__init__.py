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
``results.json``, ``metrics.json`` (the headline numbers, for the manifest) and ``evaluate.png``; with exact-match
questions, ``exact_match/`` (each scored reply) and ``judge_agreement/`` (the feedback judge's scores of them).

The package, one module a concern: ``sets`` (the validated sets), ``answers``, ``prompts`` (the project's judge
prompts and the parsers) and ``fastchat_prompts``, ``grading`` (judgments, MT-Bench scores), ``pairwise`` (win rate
statistics), ``exact_match``, ``results`` (summary, plot, metrics) and ``official_formats`` (export). The stage is
``run_evaluate``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

from ..config import EvaluateConfig, Recipe
from ..data import is_complete, read_rows, write_rows_atomic, write_text_atomic
from ..generate import take_side_by_side
from ..stage import StageResult, Timer, log_rate, stage_section
from .answers import answer_all, answer_items, exact_match_items
from .grading import (
    JUDGMENT_SCHEMA,
    grading_requests,
    grading_results,
    judge_label,
    judge_pass,
    pairwise_requests,
    to_judgment,
)
from .pairwise import pairwise_results
from .results import (
    AGREEMENT_DIR,
    agreement_pass,
    evaluation_summary,
    exact_match_results,
    headline_metrics,
    judge_agreement,
    plot_results,
    save_agreement,
)
from .sets import evaluation_sets

__all__ = ["evaluation_summary", "run_evaluate"]

logger = logging.getLogger(__name__)


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
    cfg.check_judge_prompts()  # before any engine pass: the recipe may have been loaded where the file is not
    sets = evaluation_sets(cfg, run_dir)
    models = [cfg.model] + ([cfg.pairwise.baseline] if cfg.pairwise and cfg.pairwise.baseline else [])
    asked = [(model, answer_items(sets, cfg)) for model in models]
    if cfg.exact_match is not None:  # its own models are scored on the exact-match questions only
        asked += [(model, exact_match_items(sets, cfg)) for model in cfg.exact_match.models]
    answers = answer_all(asked, recipe, run_dir)
    exact_match = exact_match_results(cfg, sets, answers, stage_dir) if cfg.exact_match is not None else None
    if not is_complete(judgments_dir):
        shutil.rmtree(stage_dir / AGREEMENT_DIR, ignore_errors=True)  # made again with the judgments
        judge = judge_label(cfg.judge)
        requests, settled = grading_requests(cfg, sets, answers, judge) if cfg.mt_bench else ([], [])
        if cfg.pairwise:
            more_requests, more_settled = pairwise_requests(cfg, sets, answers, judge)
            requests, settled = requests + more_requests, settled + more_settled
        judge_timer = Timer()
        # the feedback judge scores the exact-match replies in the same execution when both engines fit
        beside = (exact_match is not None and recipe.judge is not None and bool(requests)
                  and _judges_fit_together(cfg, recipe))
        scoring = agreement_pass(recipe, stage_dir, sharing=2) if beside else None
        sharing = 1 if scoring is None else 2
        passes = [judge_pass(requests, cfg.judge, recipe, sharing=sharing)] if requests else []
        rows = take_side_by_side(passes + ([scoring] if scoring is not None else [])) if passes else [[]]
        by_key = {r["key"]: r for r in requests}
        judged = [to_judgment(by_key[a["key"]], a) for a in rows[0]]
        log_rate("evaluate[judge]", sum(len(r) for r in rows), judge_timer.seconds)
        if scoring is not None:  # before the judgments: once they are complete, so is what ran beside them
            save_agreement(rows[1], stage_dir)
        write_rows_atomic(judged + settled, judgments_dir, schema=JUDGMENT_SCHEMA)
    judgments = read_rows(judgments_dir)
    results = {"judge": judge_label(cfg.judge), "mt_bench": grading_results(judgments),
               "pairwise": (pairwise_results(judgments, cfg.pairwise.bootstrap_samples, cfg.pairwise.confidence)
                            if cfg.pairwise else None)}
    if exact_match is not None:
        results["exact_match"], results["exact_match_paired"] = exact_match
        results["judge_agreement"] = judge_agreement(recipe, stage_dir)
    plot_results(results, stage_dir / "evaluate.png")
    write_text_atomic(stage_dir / "metrics.json", json.dumps(headline_metrics(results), indent=2) + "\n")
    write_text_atomic(results_path, json.dumps(results, indent=2) + "\n")
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


def _judges_fit_together(cfg: EvaluateConfig, recipe: Recipe) -> bool:
    """Whether the evaluation's judge and the recipe's feedback judge can run in one execution: engine pools that fit
    on the cluster side by side (``engines.side_by_side``), or an endpoint on either side (no engine to wait for)."""
    from ..engines import cluster_capacity, side_by_side

    engines = [e for e in (cfg.judge.engine, recipe.judge.engine if recipe.judge else None) if e is not None]
    if len(engines) < 2:
        return True
    return len(side_by_side(engines, recipe.hardware, cluster_capacity(recipe.hardware))) == 1
