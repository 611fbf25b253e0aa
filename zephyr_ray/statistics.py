"""Statistics the evaluation reports: intervals by bootstrap over questions."""

from __future__ import annotations


def mean(values: list[float]) -> float | None:
    """The mean, or None for no values (a model with no rated turn has no score, not 0)."""
    return sum(values) / len(values) if values else None


def bootstrap_interval(scores: list[float], samples: int, confidence: float, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``scores`` (resampled questions). For two models answering the
    same questions, the scores may be per-question differences: the paired interval of the difference."""
    import numpy as np

    values = np.asarray(scores, dtype=float)
    means = values[np.random.default_rng(seed).integers(0, len(values), (samples, len(values)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties given the mean of the ranks they span."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def rank_correlation(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rho (Pearson's correlation of the ranks); None when either side is constant or there are <2."""
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} values against {len(ys)}")
    if len(xs) < 2:
        return None
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx and vy else None


def right_above_wrong(scores: list[float], right: list[bool]) -> float | None:
    """The share of (right, wrong) reply pairs in which the right reply has the higher score, a tie counting half
    (the area under the ROC curve): 1.0 when every right reply outscores every wrong one, 0.5 for a coin. Unlike a
    rank correlation with a right/wrong truth, it does not move with the share of right replies or with how a judge
    spreads its scores within each side. None without both a right and a wrong reply."""
    if len(scores) != len(right):
        raise ValueError(f"{len(scores)} scores against {len(right)} truths")
    good = sum(1 for r in right if r)
    bad = len(right) - good
    if not good or not bad:
        return None
    # Mann-Whitney: the right replies' rank sum (ties averaged) less the least it can be, over the pairs
    rank_sum = sum(rank for rank, r in zip(ranks(scores), right, strict=True) if r)
    return (rank_sum - good * (good + 1) / 2) / (good * bad)
