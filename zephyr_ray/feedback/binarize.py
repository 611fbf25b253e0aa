"""Stage ``binarize``: judged completions -> preference pairs (prompt, chosen, rejected), UltraFeedback-style.

Rules, per prompt (all randomness seeded by ``binarize.seed`` and the prompt_id, so re-runs agree):
- the score is the judge's ``overall`` or the mean of the four aspects (``binarize.score``);
- chosen = the highest score; among tied best, a seeded random one;
- rejected = a seeded random one of those scoring *strictly lower* (Zephyr), or the lowest (``rejected: lowest``);
- a prompt with fewer than ``min_completions`` scored completions, or whose scores all tie, goes to the rejects with
  that reason (a tie carries no preference).
So ``score_chosen > score_rejected`` on every pair.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..config import BinarizeConfig, Recipe
from ..data import PreferenceRow, count_values, read_contract, split_by_reason, validated_once, write_parquet_atomic
from ..evaluate.sets import training_screen
from ..stage import StageResult, Timer, already_done, log_rate, stage_section
from .complete import stable_seed
from .judge import ASPECTS

logger = logging.getLogger(__name__)

BINARIZE_REJECT_SCHEMA = pa.schema([("prompt", pa.string()), ("prompt_id", pa.string()), ("reason", pa.string()),
                                    ("num_completions", pa.int64()), ("num_scored", pa.int64())])


def score_of(row: dict[str, Any], score: str) -> float | None:
    if row.get("judge_error") is not None:
        return None
    if score == "overall":
        return row.get("overall")
    aspects = [row.get(a) for a in ASPECTS]
    return None if any(a is None for a in aspects) else sum(aspects) / len(aspects)


def binarize_prompt(rows: list[dict[str, Any]], cfg: BinarizeConfig) -> tuple[dict | None, dict | None]:
    """One prompt's judged completions -> (preference row, None) or (None, reject row)."""
    first = rows[0]
    scored = [(s, r) for r in rows if (s := score_of(r, cfg.score)) is not None]
    reject = {"prompt": first["prompt"], "prompt_id": first["prompt_id"], "num_completions": len(rows),
              "num_scored": len(scored)}
    if len(scored) < cfg.min_completions:
        return None, {**reject, "reason": f"fewer than {cfg.min_completions} scored completions"}
    scored.sort(key=lambda pair: (pair[1]["model"], pair[1]["completion"]))  # order-independent draws
    rng = random.Random(stable_seed(cfg.seed, first["prompt_id"]))
    best = max(s for s, _ in scored)
    score_chosen, chosen = rng.choice([(s, r) for s, r in scored if s == best])
    lower = [(s, r) for s, r in scored if s < best]
    if not lower:
        return None, {**reject, "reason": "all scored completions tie"}
    # the same text scored twice (two models, or samples, writing it; a judge that is not deterministic scoring it
    # differently) is no preference: never its own rejected
    lower = [(s, r) for s, r in lower if r["completion"].strip() != chosen["completion"].strip()]
    if not lower:
        return None, {**reject, "reason": "every lower-scored completion repeats the chosen text"}
    if cfg.rejected == "lowest":
        worst = min(s for s, _ in lower)
        lower = [(s, r) for s, r in lower if s == worst]
    score_rejected, rejected = rng.choice(lower)
    prompt = [{"role": "user", "content": first["prompt"]}]
    pair = {
        "prompt": first["prompt"], "prompt_id": first["prompt_id"],
        "chosen": prompt + [{"role": "assistant", "content": chosen["completion"]}],
        "rejected": prompt + [{"role": "assistant", "content": rejected["completion"]}],
        "score_chosen": float(score_chosen), "score_rejected": float(score_rejected),
        "chosen_model": chosen["model"], "rejected_model": rejected["model"], "judge": chosen["judge"],
        "num_scored": len(scored),
    }
    pair["messages"] = pair["chosen"]
    return pair, None


# one row per prompt, either a pair (reason null) or a reject (reason set), split after the groupby
_GROUP_SCHEMA = pa.schema(list(PreferenceRow.arrow_schema()) + [
    field for field in BINARIZE_REJECT_SCHEMA if field.name not in PreferenceRow.arrow_schema().names])


def _binarize_group(group: pa.Table, cfg: BinarizeConfig) -> pa.Table:
    pair, reject = binarize_prompt(group.to_pylist(), cfg)
    return pa.Table.from_pylist([dict.fromkeys(_GROUP_SCHEMA.names) | (pair or reject)], schema=_GROUP_SCHEMA)


def run_binarize(recipe: Recipe, run_dir: Path) -> StageResult:
    """``judge/judgments`` -> ``binarize/preferences`` + ``binarize/rejects`` + ``binarize/stats.json``."""
    cfg = stage_section(recipe, "binarize")
    out, rejects_dir = run_dir / "binarize" / "preferences", run_dir / "binarize" / "rejects"
    if done := already_done("binarize", run_dir, {"preferences": out, "rejects": rejects_dir}):
        return done
    timer = Timer()
    if cfg.dataset is not None:  # an existing preference set, validated as it is
        counts = validated_once(cfg.dataset, PreferenceRow, out, rejects_dir, screen=training_screen(recipe, run_dir))
        result = StageResult("binarize", counts=counts,
                             seconds=timer.seconds, outputs={"preferences": str(out), "rejects": str(rejects_dir)})
        result.save(run_dir)
        return result
    judgments = read_contract(run_dir / "judge" / "judgments")
    grouped = judgments.groupby("prompt_id").map_groups(_binarize_group, fn_kwargs={"cfg": cfg},
                                                         batch_format="pyarrow").materialize()
    pairs, rejected = split_by_reason(grouped, PreferenceRow.arrow_schema().names, BINARIZE_REJECT_SCHEMA.names)
    n_pairs = write_parquet_atomic(pairs, out, schema=PreferenceRow.arrow_schema())
    n_rejects = write_parquet_atomic(rejected, rejects_dir, schema=BINARIZE_REJECT_SCHEMA)
    stats = preference_stats(judgments, read_contract(out), read_contract(rejects_dir), cfg.score)
    (run_dir / "binarize" / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    plot_stats(stats, run_dir / "binarize" / "stats.png")
    log_rate("binarize", n_pairs + n_rejects, timer.seconds)
    result = StageResult("binarize", counts={"prompts": n_pairs + n_rejects, "pairs": n_pairs, "rejected": n_rejects,
                                             "reasons": stats["reject_reasons"]},
                         seconds=timer.seconds, outputs={"preferences": str(out), "rejects": str(rejects_dir)})
    result.save(run_dir)
    return result


def score_bin(value: float | None) -> str:
    """A score's histogram bin: whole numbers as they are, others by the lower edge of their 0.5-wide bin
    (logprob and reward-model scores are continuous; one bar per distinct value would say nothing)."""
    return "unscored" if value is None else f"{math.floor(value * 2) / 2:g}"


def bin_order(label: str) -> tuple[bool, float]:
    return label == "unscored", 0.0 if label == "unscored" else float(label)


def preference_stats(judgments: Any, pairs: Any, rejects: Any, score: str) -> dict[str, Any]:
    """What people check after binarizing: score histograms per model, chosen vs rejected length, wins per model.

    Streams over the datasets in batches; only counters live on the driver.
    """
    histograms: dict[str, Counter] = defaultdict(Counter)
    for batch in judgments.iter_batches(batch_format="pyarrow", batch_size=4096):
        for row in batch.to_pylist():
            value = score_of(row, score)
            histograms[row["model"]][score_bin(value)] += 1
    wins, losses = Counter(), Counter()
    lengths = {"chosen": 0, "rejected": 0, "longer_chosen": 0, "pairs": 0}
    for batch in pairs.iter_batches(batch_format="pyarrow", batch_size=4096):
        for row in batch.to_pylist():
            wins[row["chosen_model"]] += 1
            losses[row["rejected_model"]] += 1
            chosen, rejected = len(row["chosen"][-1]["content"]), len(row["rejected"][-1]["content"])
            lengths["chosen"] += chosen
            lengths["rejected"] += rejected
            lengths["longer_chosen"] += int(chosen > rejected)
            lengths["pairs"] += 1
    reasons = count_values(rejects, "reason")
    n = max(lengths["pairs"], 1)
    return {
        "score": score,
        "score_histograms": {m: dict(sorted(h.items(), key=lambda kv: bin_order(kv[0])))
                             for m, h in sorted(histograms.items())},
        "wins": dict(wins.most_common()), "losses": dict(losses.most_common()),
        "mean_chars_chosen": lengths["chosen"] / n, "mean_chars_rejected": lengths["rejected"] / n,
        "fraction_chosen_longer": lengths["longer_chosen"] / n,  # the judge's verbosity bias
        "pairs": lengths["pairs"], "reject_reasons": dict(reasons),
    }


def plot_stats(stats: dict[str, Any], path: Path) -> None:
    """Score histograms per pool model, wins per model, chosen-vs-rejected length, in one PNG."""
    from ..plots import pyplot, save_png

    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4))
    models = list(stats["score_histograms"])
    bins = sorted({b for h in stats["score_histograms"].values() for b in h}, key=bin_order)
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        counts = [stats["score_histograms"][model].get(b, 0) for b in bins]
        axes[0].bar([x + i * width for x in range(len(bins))], counts, width=width, label=model)
    axes[0].set_xticks([x + 0.4 - width / 2 for x in range(len(bins))], bins, rotation=45)
    axes[0].set_title(f"judge scores per model ({stats['score']})")
    axes[0].legend(fontsize=8)
    axes[1].bar(models, [stats["wins"].get(m, 0) for m in models], label="chosen")
    axes[1].bar(models, [-stats["losses"].get(m, 0) for m in models], label="rejected")
    axes[1].set_title("times chosen (up) / rejected (down)")
    axes[1].tick_params(axis="x", rotation=30)
    axes[1].legend(fontsize=8)
    axes[2].bar(["chosen", "rejected"], [stats["mean_chars_chosen"], stats["mean_chars_rejected"]])
    axes[2].set_title(f"mean length (chars); chosen longer in {stats['fraction_chosen_longer']:.0%} of pairs")
    save_png(fig, path)
