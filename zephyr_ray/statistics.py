"""Statistics the evaluation reports: intervals by bootstrap over questions."""

from __future__ import annotations


def bootstrap_interval(scores: list[float], samples: int, confidence: float, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``scores`` (resampled questions). For two models answering the
    same questions, the scores may be per-question differences: the paired interval of the difference."""
    import numpy as np

    values = np.asarray(scores, dtype=float)
    means = values[np.random.default_rng(seed).integers(0, len(values), (samples, len(values)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))
