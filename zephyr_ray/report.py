"""``zephyr-ray report RUN_DIR``: one self-contained HTML page (plots inlined as PNG) of what a run did.

It reads what the stages leave behind: ``manifest.json`` (from ``zephyr-ray run``) or each stage's
``result.json``, ``binarize/stats.json`` and the plot binarize drew from it (judge scores per pool model, wins,
chosen vs rejected length), the trainers' ``log_history.json`` (loss curves, DPO reward margins and accuracies) and
the first preference pairs. A stage that has not run yet gets a line saying so, not an empty plot.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from .data import is_complete, read_rows, write_text_atomic
from .metrics import flat_counts
from .plots import png_base64, pyplot
from .run import MANIFEST, RECIPE_STAGES

REPORT = "report.html"


def stage_records(run_dir: Path) -> dict[str, dict[str, Any]]:
    """stage -> its record (status, counts, seconds), from the manifest, else from each stage's result.json."""
    manifest = run_dir / MANIFEST
    if manifest.is_file():
        return json.loads(manifest.read_text()).get("stages", {})
    records = {}
    for stage in RECIPE_STAGES:
        result = run_dir / stage / "result.json"
        if result.is_file():
            records[stage] = {"status": "done", **json.loads(result.read_text())}
    return records


def funnel_plot(records: dict[str, dict[str, Any]]) -> str | None:
    """Each stage's counts (rows in, kept, rejected by reason, per model), one panel a stage."""
    stages = [(stage, flat_counts(record.get("counts", {}))) for stage, record in records.items()]
    stages = [(stage, {k: v for k, v in counts.items() if not k.startswith("mean_overall") and k != "global_step"})
              for stage, counts in stages]
    stages = [(stage, counts) for stage, counts in stages if counts]
    if not stages:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(stages), 1, figsize=(10, 1.2 + 0.32 * sum(len(c) for _, c in stages)),
                             squeeze=False, gridspec_kw={"height_ratios": [max(len(c), 1) for _, c in stages]})
    for ax, (stage, counts) in zip(axes[:, 0], stages, strict=True):
        keys = list(counts)
        colors = ["#c0392b" if any(w in k for w in ("reject", "reason", "error", "contaminated", "failure")) else "#2e5bff"
                  for k in keys]
        ax.barh(keys, [counts[k] for k in keys], color=colors)
        ax.invert_yaxis()
        ax.set_title(stage, loc="left", fontsize=10)
        for i, key in enumerate(keys):
            ax.text(counts[key], i, f" {counts[key]:g}", va="center", fontsize=8)
        ax.tick_params(labelsize=8)
    return png_base64(fig)


def training_plot(histories: dict[str, list[dict[str, Any]]]) -> str | None:
    """Loss per step of each training stage; DPO's reward margins and accuracies."""
    curves = {stage: [row for row in rows if "loss" in row and "step" in row] for stage, rows in histories.items()}
    curves = {stage: rows for stage, rows in curves.items() if rows}
    if not curves:
        return None
    dpo = [row for row in histories.get("train_dpo", []) if "rewards/margins" in row]
    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if dpo else 1, figsize=(12 if dpo else 6, 3.8), squeeze=False)
    for stage, rows in curves.items():
        axes[0, 0].plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".", label=stage)
    axes[0, 0].set_title("training loss")
    axes[0, 0].set_xlabel("optimizer step")
    axes[0, 0].legend(fontsize=8)
    if dpo:
        ax = axes[0, 1]
        ax.plot([r["step"] for r in dpo], [r["rewards/margins"] for r in dpo], marker=".", label="reward margin")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("chosen - rejected reward")
        twin = ax.twinx()
        twin.plot([r["step"] for r in dpo], [r.get("rewards/accuracies", 0) for r in dpo], color="#2e7d32",
                  marker=".", label="reward accuracy")
        twin.set_ylim(0, 1.05)
        twin.set_ylabel("accuracy")
        ax.set_title("DPO: reward margin and accuracy")
        ax.legend(loc="upper left", fontsize=8)
        twin.legend(loc="lower right", fontsize=8)
    return png_base64(fig)


def timings_plot(records: dict[str, dict[str, Any]]) -> str | None:
    timed = {stage: record["seconds"] for stage, record in records.items() if record.get("seconds")}
    if not timed:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.4 * len(timed)))
    ax.barh(list(timed), list(timed.values()), color="#667085")
    ax.invert_yaxis()
    ax.set_xlabel("seconds (the stage's last run that did work)")
    for i, seconds in enumerate(timed.values()):
        ax.text(seconds, i, f" {seconds:.0f}s", va="center", fontsize=8)
    return png_base64(fig)


def example_pairs(run_dir: Path, limit: int = 3) -> list[dict[str, Any]]:
    """The ``limit`` preference pairs of the smallest prompt ids (none before binarize has run): the same pairs on
    every run of a recipe, as Ray Data writes rows in no fixed order. Only the id column is read whole."""
    import pyarrow.dataset as pads

    out = run_dir / "binarize" / "preferences"
    if not is_complete(out):
        return []
    pairs = pads.dataset(str(out), format="parquet")
    first_ids = sorted(pairs.to_table(columns=["prompt_id"]).column("prompt_id").to_pylist())[:limit]
    rows = pairs.to_table(filter=pads.field("prompt_id").isin(first_ids)).to_pylist()
    return sorted(rows, key=lambda row: row["prompt_id"])


def _clip(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[:limit] + " ..."


def examples_html(pairs: list[dict[str, Any]]) -> str:
    """Preference pairs as a table: the prompt, then chosen and rejected replies with their model and score."""
    rows = "".join(
        f"<tr><td>{html.escape(_clip(pair['prompt']))}</td>"
        f"<td>{html.escape(_clip(pair['chosen'][-1]['content']))}<p class=\"meta\">"
        f"{html.escape(str(pair.get('chosen_model') or ''))} {pair['score_chosen']:g}</p></td>"
        f"<td>{html.escape(_clip(pair['rejected'][-1]['content']))}<p class=\"meta\">"
        f"{html.escape(str(pair.get('rejected_model') or ''))} {pair['score_rejected']:g}</p></td></tr>"
        for pair in pairs)
    return (f'<section><h2>Example preference pairs</h2><table class="examples"><tr><th>prompt</th><th>chosen</th>'
            f"<th>rejected</th></tr>{rows}</table></section>") if pairs else ""


def did_it_work_html(run_dir: Path, examples: int = 4) -> str:
    """The report's opening: exact match per model (the base model first) with intervals, the evaluated model's
    paired gains, the win rate, the feedback judge's agreement with the truth, and a few exact-match questions with
    each model's reply side by side. Empty before an evaluation with exact match has run."""
    from .evaluate.results import agreement_line

    results_path = run_dir / "evaluate" / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    exact = results.get("exact_match") or {}
    if not exact:
        return ""

    def interval(r: dict[str, Any], signed: str = "") -> str:
        return f"[{r['interval'][0]:{signed}.1%}, {r['interval'][1]:{signed}.1%}]" if r.get("interval") else ""

    models = list(reversed(exact))  # the extra models (the base model), the baseline, then the evaluated model
    lines = [f"<tr><td>{html.escape(m)}</td><td>{exact[m]['accuracy']:.1%} {interval(exact[m])}</td>"
             f"<td>{exact[m]['n']}</td><td>{exact[m]['unparsed']}</td></tr>"
             for m in models if exact[m]["accuracy"] is not None]
    notes = [f"{html.escape(d['model'])} &minus; {html.escape(d['over'])}: {d['difference']:+.1%} "
             f"{interval(d, '+')} (paired bootstrap over {d['n']} questions)"
             for d in results.get("exact_match_paired") or [] if d["difference"] is not None]
    pairwise = results.get("pairwise") or {}
    if pairwise.get("win_rate") is not None:
        notes.append(f"win rate {html.escape(pairwise['model'])} vs {html.escape(pairwise['opponent'])} (evaluation "
                     f"judge): {pairwise['win_rate']:.1%} {interval(pairwise)}; position consistency "
                     f"{pairwise['position_consistency'] or 0:.0%}")
    if line := agreement_line(results.get("judge_agreement")):
        notes.append(line)
    replies: dict[str, dict[str, str]] = {}
    for row in read_rows(run_dir / "evaluate" / "exact_match") if is_complete(run_dir / "evaluate" / "exact_match") \
            else []:
        replies.setdefault(row["question"], {"reference": row["reference"]})[row["model"]] = row["reply"] or ""
    shown = "".join(
        f"<tr><td>{html.escape(question)}<p class=\"meta\">{html.escape(by['reference'])}</p></td>"
        + "".join(f"<td>{html.escape(_clip(by.get(m, '-'), 120))}</td>" for m in models) + "</tr>"
        for question, by in list(replies.items())[:examples])
    return (f"<section><h2>Did it work?</h2><table><tr><th>model</th><th>exact match [interval]</th><th>questions</th>"
            f"<th>no answer found</th></tr>{''.join(lines)}</table>"
            + "".join(f'<p class="caption">{note}</p>' for note in notes)
            + ('<table class="examples"><tr><th>question (reference)</th>'
               + "".join(f"<th>{html.escape(m)}</th>" for m in models) + f"</tr>{shown}</table>" if shown else "")
            + "</section>")


def contamination_counts(records: dict[str, dict[str, Any]]) -> list[tuple[str, int, int]]:
    """(stage input, prompts checked, contaminated) for every training input screened against the evaluation."""
    found = []
    for stage, record in records.items():
        counts = record.get("counts", {})
        for name, value in [(stage, counts), *((f"{stage} {k}", v) for k, v in counts.items())]:
            if isinstance(value, dict) and "contaminated" in value:
                found.append((name, value.get("total", 0), value["contaminated"]))
    return found


def evaluation_caption(run_dir: Path) -> str:
    """The evaluation's numbers in words: MT-Bench per model, the win rate and its interval."""
    results_path = run_dir / "evaluate" / "results.json"
    if not results_path.is_file():
        return ""
    from .evaluate import evaluation_summary

    return evaluation_summary(json.loads(results_path.read_text())).replace("\n  ", ": ").replace("\n", ". ")


def decontamination_note(records: dict[str, dict[str, Any]]) -> str:
    screened = contamination_counts(records)
    return ("Decontamination: " + ", ".join(f"{name}: {bad} of {total} prompts overlap the evaluation"
                                            for name, total, bad in screened)) if screened else ""


def rounds_html(run_dir: Path) -> str:
    """Iterative rounds (``rounds/summary.json``): the plot of exact match and win rate per round, and a table."""
    path = run_dir / "rounds" / "summary.json"
    if not path.is_file():
        return ""
    summary = json.loads(path.read_text())
    png = run_dir / "rounds" / "rounds.png"

    def percent(value: dict | None, key: str = "accuracy") -> str:
        if not value or value.get(key) is None:
            return "-"
        low, high = value.get("interval") or (None, None)
        return f"{value[key]:.1%}" + (f" [{low:.1%}, {high:.1%}]" if low is not None else "")

    def agreement(row: dict) -> str:
        """Right above wrong over the round's replies, its rank correlation and replies, then the policy's own."""
        found = row.get("judge_agreement") or {}
        if not found.get("n"):
            return "-" if not found else "- (no reply scored)"
        rho = found.get("rank_correlation")
        if found.get("right_above_wrong") is None:
            if found.get("policy") is None:  # an evaluation from before the share was kept: its correlation alone
                return f"&rho; {rho:.2f} ({found['n']} replies)" if rho is not None else "-"
            return f"- (all {found['n']} replies right, or all wrong)"
        text = f"{found['right_above_wrong']:.0%}" + (f", &rho; {rho:.2f}" if rho is not None else "") + \
            f" ({found['n']} replies)"
        own = found.get("policy") or {}
        if own.get("n"):
            text += "; the round's own: " + (f"{own['right_above_wrong']:.0%}" if own.get("right_above_wrong")
                                             is not None else "-") + f" ({own['n'] - own['right']} wrong of {own['n']})"
        return text

    rows = "".join(f"<tr><td>{row['round']}</td><td>{row.get('prompts') or '-'}</td><td>{row.get('pairs') or '-'}"
                   f"</td><td>{percent(row.get('exact_match'))}</td>"
                   f"<td>{percent(row.get('win_rate_vs_sft'), 'win_rate')}</td><td>{agreement(row)}</td></tr>"
                   for row in summary["rounds"])
    table = ("<table><tr><th>round</th><th>prompts</th><th>pairs</th><th>exact match [interval]</th><th>win rate vs "
             "dSFT [interval]</th><th>feedback judge: right reply above wrong (share of pairs; replies)</th></tr>"
             f"<tr><td>dSFT</td><td></td><td></td><td>{percent(summary.get('sft_exact_match'))}</td><td></td><td></td></tr>{rows}"
             "</table>")
    table += ('<p class="caption">The feedback judge\'s scores of the round\'s exact-match replies (its model\'s and '
              "dSFT's): the share of (right, wrong) pairs in which the right reply scores higher, ties half, with the "
              "rank correlation; then the same on the round's model's replies alone. A judge that orders the new "
              "policy's replies worse than before is one to check before another round trains on its preferences."
              "</p>")
    image = (f'<img alt="Rounds" src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}">'
             if png.is_file() else "")
    return f"<section><h2>Rounds</h2>{image}{table}</section>"


def section(title: str, png: str | None, missing: str, caption: str = "", note: str = "") -> str:
    """A titled plot with its caption, or the line saying why there is none; ``note`` shows either way."""
    body = (f'<img alt="{html.escape(title)}" src="data:image/png;base64,{png}">'
            f'<p class="caption">{html.escape(caption)}</p>') if png else f'<p class="missing">{html.escape(missing)}</p>'
    if note:
        body += f'<p class="caption">{html.escape(note)}</p>'
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report (atomically) and return its path, ``<run_dir>/report.html`` by default."""
    records = stage_records(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir}: no {MANIFEST} and no stage results: nothing has run here")
    manifest = json.loads((run_dir / MANIFEST).read_text()) if (run_dir / MANIFEST).is_file() else {}
    stats_path, stats_png = run_dir / "binarize" / "stats.json", run_dir / "binarize" / "stats.png"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else None
    # binarize already plots its statistics (scores per pool model, wins, chosen vs rejected length): inline that
    judge_png = base64.b64encode(stats_png.read_bytes()).decode() if stats and stats_png.is_file() else None
    eval_png = run_dir / "evaluate" / "evaluate.png"
    evaluation_png = base64.b64encode(eval_png.read_bytes()).decode() if eval_png.is_file() else None
    histories = {stage: json.loads((run_dir / stage / "log_history.json").read_text())
                 for stage in ("train_sft", "train_dpo") if (run_dir / stage / "log_history.json").is_file()}
    status_rows = "".join(
        f"<tr><td>{html.escape(stage)}</td><td>{html.escape(str(record.get('status', '')))}</td>"
        f"<td>{record.get('seconds', 0) or 0:.1f}</td><td>{html.escape(str(record.get('error') or ''))}</td></tr>"
        for stage, record in records.items())
    versions = ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items())
    title = f"zephyr-ray run: {manifest.get('recipe', run_dir.name)}"
    parts = [
        section("Data funnel", funnel_plot({k: v for k, v in records.items() if "/" not in k}),
                "no stage has recorded counts yet",
                "rows in, kept and rejected (red) per stage; reasons and per-model counts as recorded"),
        section("Judge scores and preference pairs", judge_png,
                "binarize has not run yet",
                f"{stats['pairs']} pairs; chosen/rejected wins per model: {stats['wins']} / {stats['losses']}"
                if stats else ""),
        section("Training", training_plot(histories), "no training log history (train_sft/log_history.json, "
                "train_dpo/log_history.json) in this run yet",
                "loss per optimizer step (train_sft, train_dpo); DPO's implicit reward margin and accuracy"),
        section("Evaluation", evaluation_png, "no evaluation has run yet (the evaluate stage)",
                evaluation_caption(run_dir), decontamination_note(records)),
        rounds_html(run_dir),
        section("Timings", timings_plot(records), "no timings recorded yet"),
        examples_html(example_pairs(run_dir)),
    ]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font: 14px/1.5 system-ui, sans-serif; color: #1d2433; max-width: 1100px; margin: 24px auto; padding: 0 16px; }}
h1 {{ font-size: 22px; }} h2 {{ font-size: 17px; border-bottom: 1px solid #d0d5dd; padding-bottom: 4px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #d0d5dd; padding: 3px 8px; text-align: left; }}
img {{ max-width: 100%; }} .examples td {{ vertical-align: top; white-space: pre-wrap; width: 33%; }} .missing {{ color: #667085; font-style: italic; }} .caption, .meta {{ color: #667085; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="meta">run directory {html.escape(str(run_dir))}; recipe sha256 {html.escape(manifest.get('recipe_sha256', '?')[:16])};
started {html.escape(str(manifest.get('started_at', '?')))}, finished {html.escape(str(manifest.get('finished_at') or '-'))}</p>
<p class="meta">{html.escape(versions)}</p>
{did_it_work_html(run_dir)}
<table><tr><th>stage</th><th>status</th><th>seconds</th><th>error</th></tr>{status_rows}</table>
{''.join(parts)}
</body></html>
"""
    return write_text_atomic(out or run_dir / REPORT, page)
