"""CI's check of what `make demo` left behind: every stage of the tiny recipe done, its outputs complete, and a
report with all its plots, the evaluation's numbers among them.

    python scripts/check_demo.py [RUN_DIR] [TERMINAL_TEXT]      (default: runs/tiny-cpu)

TERMINAL_TEXT, when given, is what the demo printed (stdout and stderr): a successful demo shows no traceback and no
warning there (the libraries' output goes to RUN_DIR/logs/demo.log).
"""

import json
import re
import sys
from pathlib import Path

from zephyr_ray.console import NOISE
from zephyr_ray.run import RECIPE_STAGES


def noise(terminal_text: str) -> list[str]:
    """Lines of a successful run's terminal output that a user would read as failures."""
    return [f"the demo printed: {line.strip()[:200]}" for line in terminal_text.splitlines() if NOISE.search(line)]


def problems(run_dir: Path) -> list[str]:
    found = []
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for stage in RECIPE_STAGES:
        status = manifest["stages"].get(stage, {}).get("status")
        if status not in ("done", "skipped"):
            found.append(f"stage {stage}: {status or 'never ran'}")
    for output in ("synthesize/dialogues", "binarize/preferences", "train_sft/model", "train_dpo/model"):
        if not any((run_dir / output).iterdir()):
            found.append(f"{output}: empty")
    page = (run_dir / "report.html").read_text()
    plots = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page)
    for title in ("Data funnel", "Judge scores and preference pairs", "Training", "Evaluation", "Timings"):
        if title not in plots:
            found.append(f"report.html: no {title!r} plot")
    missing = re.findall(r'<h2>([^<]+)</h2><p class="missing">', page)
    found += [f"report.html: section {title!r} is empty" for title in missing]
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    for model, graded in results["mt_bench"].items():
        if graded["rated"] + graded["unanswered"] + graded["judge_failures"] != graded["graded"]:
            found.append(f"evaluate: turns of {model} unaccounted for: {graded}")
    if results["pairwise"]["win_rate"] is None:
        found.append("evaluate: no pairwise comparison came out")
    if "Example preference pairs" not in page:
        found.append("report.html: no example preference pairs")
    return found + alignment_problems(results)


# What the tiny world must show (issue 20; docs/tiny-world.md): never loosen these to make a run pass, find out why.
# (The judge's rank correlation >= 0.6 with the truth on held-out answers is checked on the built models,
# tests/test_tiny_models.py; the demo's judge_agreement is reported, not checked: its replies include the base
# model's text, whose last colour may be right by chance while the judge rightly rates the text low.)


def alignment_problems(results: dict) -> list[str]:
    """Did it work? Exact match rises from the base student to dSFT to dDPO, dDPO's gain over dSFT has a paired
    interval above 0, and the pairwise judge (consistent in both orders) prefers dDPO: its win rate's interval is
    above 50%."""
    found = []
    accuracy = {model: r["accuracy"] for model, r in (results.get("exact_match") or {}).items()}
    base, sft, dpo = (accuracy.get(name) for name in ("base", "sft", "dpo"))
    if None in (base, sft, dpo):
        return [f"evaluate: exact match of base, sft and dpo expected, got {accuracy}"]
    if not base < sft < dpo:
        found.append(f"exact match not base < dSFT < dDPO: base {base:.3f}, sft {sft:.3f}, dpo {dpo:.3f}")
    paired = next((d for d in results.get("exact_match_paired") or [] if d["over"] == "sft"), None)
    if paired is None or paired["interval"] is None or paired["interval"][0] <= 0:
        found.append(f"exact match: dDPO over dSFT not above 0 (paired interval {paired and paired['interval']})")
    pairwise = results.get("pairwise") or {}
    if (pairwise.get("position_consistency") or 0) < 0.8:
        found.append(f"pairwise judge: position consistency {pairwise.get('position_consistency')} < 0.8")
    if not pairwise.get("interval") or pairwise["interval"][0] <= 0.5:
        found.append(f"win rate dDPO vs dSFT: interval {pairwise.get('interval')} not above 50%")
    if (results.get("judge_agreement") or {}).get("rank_correlation") is None:
        found.append("evaluate: no judge_agreement (the feedback judge against the exact-match truth)")
    return found


if __name__ == "__main__":
    run_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-cpu")
    found = problems(run_dir)
    if len(sys.argv) > 2:
        found += noise(Path(sys.argv[2]).read_text(encoding="utf-8", errors="replace"))
    if found:
        sys.exit("demo check failed:\n  " + "\n  ".join(found))
    print(f"demo check: {run_dir}: all {len(RECIPE_STAGES)} stages done, report with all plots"
          + (", no traceback or warning printed" if len(sys.argv) > 2 else ""))
