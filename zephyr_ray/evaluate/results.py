"""What an evaluation's numbers become: exact-match accuracy per model (and the evaluated model's paired gain), the
feedback judge's agreement with the truth, the headline metrics for the manifest, the summary text and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from ..config import EvaluateConfig, Recipe
from ..data import CompletionRow, JudgmentRow, is_complete, read_rows, write_rows_atomic
from .sets import EvaluationSets

EXACT_MATCH_SCHEMA = pa.schema([
    ("model", pa.string()), ("question_id", pa.string()), ("question", pa.string()), ("reference", pa.string()),
    ("reply", pa.string()), ("error", pa.string()), ("extracted", pa.string()), ("correct", pa.bool_()),
])
# the feedback judge's judgments of the exact-match replies: kept, so that a re-run reads them instead of scoring
# again, and so that one can see which replies the judge got wrong
AGREEMENT_DIR = "judge_agreement"



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
                   for r in sorted(rows, key=lambda r: r["question_id"])  # intervals: the same whatever wrote them
                   if r["set"] == "exact_match" and r["question_id"] in references]
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
    scores every exact-match reply (as it scored completions, by ``binarize.score``): ``right_above_wrong``, the
    share of (right, wrong) reply pairs it scores in the right order (ties half), and the Spearman rank correlation of
    its scores with correctness say how much of the truth its preferences carried; ``by_model`` gives the share on
    each model's replies alone (a trained model's, apart from a garbled base model's). None when the
    recipe has no judge (a preference dataset instead). Its judgments are read from ``judge_agreement/`` when a
    run wrote them (``save_agreement``), else scored here and written there."""
    if recipe.judge is None:
        return None
    saved = stage_dir / AGREEMENT_DIR
    if not is_complete(saved):
        scoring = agreement_pass(recipe, stage_dir)
        save_agreement(scoring.take_all() if scoring else [], stage_dir)
    return agreement_of(read_rows(saved), recipe, stage_dir)


def save_agreement(judged: list[dict[str, Any]], stage_dir: Path) -> None:
    """Which reply (model, question, the reply) and the judgment's own columns, as the feedback stage writes them."""
    judgment = JudgmentRow.arrow_schema()
    own = [name for name in JudgmentRow.model_fields if name not in CompletionRow.model_fields]
    schema = pa.schema([judgment.field(name) for name in ("model", "prompt_id", "completion", *own)])
    write_rows_atomic(judged, stage_dir / AGREEMENT_DIR, schema=schema)


def agreement_pass(recipe: Recipe, stage_dir: Path, sharing: int = 1) -> Any:
    """The feedback judge's judgments of the exact-match replies, lazily (a Ray Dataset; None when there is no
    judge or no reply), to run beside another engine's (``sharing``)."""
    if recipe.judge is None:
        return None
    from ..endpoint import rows_per_call
    from ..feedback.judge import judge_name, score, to_judgment
    from ..generate import rows_dataset

    cfg = recipe.judge
    rows = [{"prompt_id": r["question_id"], "model": r["model"], "completion": r["reply"],
             "messages": [{"role": "user", "content": r["question"]}]}
            for r in read_rows(stage_dir / "exact_match") if r["reply"]]
    if not rows:
        return None
    return score(rows_dataset(rows, rows_per_call(cfg)), cfg, recipe, sharing=sharing).map(
        to_judgment, fn_kwargs={"kind": cfg.kind, "judge": judge_name(cfg)})


def agreement_of(judged: list[dict[str, Any]], recipe: Recipe, stage_dir: Path) -> dict[str, Any]:
    """``judge_agreement``'s numbers from the feedback judge's judgments of the exact-match replies."""
    from ..feedback.binarize import score_of
    from ..feedback.judge import judge_name
    from ..statistics import rank_correlation, right_above_wrong

    cfg = recipe.judge
    correct = {(r["model"], r["question_id"]): r["correct"] for r in read_rows(stage_dir / "exact_match")
               if r["reply"]}
    way = recipe.binarize.score if recipe.binarize and cfg.kind in ("rubric", "openai") else "overall"
    scored = [(j["model"], value, bool(correct[(j["model"], j["prompt_id"])])) for j in judged
              if (value := score_of(j, way)) is not None]

    def ordering(rows: list[tuple[str, float, bool]]) -> float | None:
        return right_above_wrong([v for _, v, _ in rows], [r for _, _, r in rows])

    by_model = {}
    for model in sorted({m for m, _, _ in scored}):  # a round's model's own replies, apart from the baseline's
        rows = [x for x in scored if x[0] == model]
        by_model[model] = {"n": len(rows), "right": sum(r for _, _, r in rows), "right_above_wrong": ordering(rows)}
    return {"judge": judge_name(cfg), "score": way, "n": len(scored), "judge_failures": len(judged) - len(scored),
            "rank_correlation": (rank_correlation([v for _, v, _ in scored], [float(r) for _, _, r in scored])
                                 if scored else None),
            "right_above_wrong": ordering(scored), "by_model": by_model}


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
                     + f"judge position consistency {pairwise['position_consistency'] or 0:.0%}"
                     + (f"; judgments left out: {pairwise.get('unanswered', 0)} with an answer missing, "
                        f"{pairwise['judge_failures']} judge failures"
                        if pairwise.get("unanswered") or pairwise["judge_failures"] else ""))
    elif pairwise:
        lines.append(f"win rate: no instruction compared ({pairwise.get('unanswered', 0)} judgments with an answer "
                     f"missing, {pairwise['judge_failures']} judge failures)")
    for model, r in (results.get("exact_match") or {}).items():
        shown = "-" if r["accuracy"] is None else \
            f"{r['accuracy']:.1%} [{r['interval'][0]:.1%}, {r['interval'][1]:.1%}]"
        lines.append(f"exact match {model}: {shown} of {r['n']} questions ({r['unparsed']} with no answer found)")
    for d in results.get("exact_match_paired") or []:
        if d["difference"] is not None:
            lines.append(f"  {d['model']} - {d['over']}: {d['difference']:+.1%} "
                         f"[{d['interval'][0]:+.1%}, {d['interval'][1]:+.1%}] (paired, {d['n']} questions)")
    if line := agreement_line(results.get("judge_agreement")):
        lines.append(line)
    return "\n".join(lines)


def agreement_line(agreement: dict[str, Any] | None) -> str | None:
    """``judge_agreement`` in one line (the terminal's summary, the report's "Did it work?"); None when no reply was
    scored."""
    if not agreement or not agreement["n"]:
        return None
    rho, ordered = agreement["rank_correlation"], agreement.get("right_above_wrong")
    return (f"feedback judge vs the truth over {agreement['n']} exact-match replies ({agreement['judge_failures']} "
            f"not scored): rank correlation {'-' if rho is None else f'{rho:.2f}'}"
            + (f", a right reply above a wrong one in {ordered:.0%} of pairs" if ordered is not None else ""))



def plot_results(results: dict[str, Any], path: Path) -> None:
    """MT-Bench score per category per model, the win rate with its interval (overall and per length bin), and
    exact-match accuracy per model with its interval, side by side in one PNG."""
    from ..plots import pyplot, save_png

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
    save_png(fig, path)
