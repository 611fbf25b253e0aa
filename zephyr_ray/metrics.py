"""Stage metrics as Ray metrics, so the dashboard's Metrics view (and Prometheus) shows every stage's numbers.

Exported by Ray with its ``ray_`` prefix: ``ray_zephyr_stage_count{stage,key}`` (rows, drops by reason, judge
errors, ...), ``ray_zephyr_stage_seconds{stage}`` and ``ray_zephyr_tokens_per_second{stage,model}``.
"""

from __future__ import annotations

from functools import cache
from typing import Any


@cache
def _gauges() -> dict[str, Any]:
    from ray.util.metrics import Gauge

    return {
        "count": Gauge("zephyr_stage_count", "rows and drops per stage and key", tag_keys=("stage", "key")),
        "seconds": Gauge("zephyr_stage_seconds", "wall time of the stage's last run", tag_keys=("stage",)),
        "tokens_per_second": Gauge("zephyr_tokens_per_second", "generated tokens per second",
                                   tag_keys=("stage", "model")),
    }


def flat_counts(counts: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"input": {"accepted": 3}}`` -> ``{"input.accepted": 3.0}``: every number in a stage's counts."""
    flat: dict[str, float] = {}
    for key, value in counts.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_counts(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def record_stage(stage: str, counts: dict[str, Any], seconds: float,
                 tokens_per_second: dict[str, float] | None = None) -> None:
    gauges = _gauges()
    for key, value in flat_counts(counts).items():
        gauges["count"].set(value, tags={"stage": stage, "key": key})
    gauges["seconds"].set(seconds, tags={"stage": stage})
    for model, rate in (tokens_per_second or {}).items():
        gauges["tokens_per_second"].set(rate, tags={"stage": stage, "model": model})
