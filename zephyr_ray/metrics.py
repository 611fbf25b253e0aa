"""Stage metrics as Ray metrics, so the dashboard's Metrics view (and Prometheus) shows every stage's numbers.

Exported by Ray with its ``ray_`` prefix: ``ray_zephyr_stage_count{stage,key}`` (rows, drops by reason, judge
errors, ...), ``ray_zephyr_stage_seconds{stage}``, ``ray_zephyr_tokens_per_second{stage,model}`` and, while a
training stage runs and after, ``ray_zephyr_train_metric{stage,name}`` (loss, learning rate, grad norm, DPO's
rewards/margins and rewards/accuracies, ... as the trainer logs them).

Why an actor holds them: Ray exports a gauge for a short while after it is set (about half a minute), and a stage's
driver exits when the stage ends, taking its gauges with it. A detached actor with no CPU keeps each stage's last
numbers and sets them again every few seconds, so a scrape at any later time still finds them.
"""

from __future__ import annotations

import threading
import time
from typing import Any

ACTOR_NAME = "zephyr_ray_stage_metrics"
NAMESPACE = "zephyr_ray"
REPUBLISH_SECONDS = 5.0
GAUGES = {  # kind -> (name, description, tag keys); Prometheus sees each name with Ray's "ray_" prefix
    "count": ("zephyr_stage_count", "rows and drops per stage and key", ("stage", "key")),
    "seconds": ("zephyr_stage_seconds", "wall time of the stage's last run", ("stage",)),
    "tokens_per_second": ("zephyr_tokens_per_second", "generated tokens per second", ("stage", "model")),
    "train": ("zephyr_train_metric", "the trainer's last logged value of each metric", ("stage", "name")),
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


class StageMetrics:
    """The gauges and the last value of each (gauge, tags); runs as a detached Ray actor (see the module doc)."""

    def __init__(self) -> None:
        from ray.util.metrics import Gauge

        self.gauges = {kind: Gauge(name, description, tag_keys=tags)
                       for kind, (name, description, tags) in GAUGES.items()}
        self.values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.lock = threading.Lock()
        threading.Thread(target=self._republish, daemon=True).start()

    def record(self, values: list[tuple[str, float, dict[str, str]]]) -> int:
        with self.lock:
            for gauge, value, tags in values:
                self.values[(gauge, tuple(sorted(tags.items())))] = value
                self.gauges[gauge].set(value, tags=tags)
        return len(values)

    def snapshot(self) -> dict[str, float]:
        with self.lock:
            return {f"{gauge}{dict(tags)}": value for (gauge, tags), value in self.values.items()}

    def _republish(self) -> None:
        while True:
            time.sleep(REPUBLISH_SECONDS)
            with self.lock:
                for (gauge, tags), value in self.values.items():
                    self.gauges[gauge].set(value, tags=dict(tags))


def stage_metrics_actor() -> Any:
    """The cluster's one metrics actor (created on first use; later drivers find it by name), on the head node: a
    detached actor on a worker node would keep that node from ever scaling down."""
    import ray

    return ray.remote(StageMetrics).options(name=ACTOR_NAME, namespace=NAMESPACE, lifetime="detached",
                                            get_if_exists=True, num_cpus=0,
                                            resources={"node:__internal_head__": 0.001}).remote()


def record_stage(stage: str, counts: dict[str, Any], seconds: float,
                 tokens_per_second: dict[str, float] | None = None) -> None:
    import ray

    values = [("count", value, {"stage": stage, "key": key}) for key, value in flat_counts(counts).items()]
    values.append(("seconds", seconds, {"stage": stage}))
    values += [("tokens_per_second", rate, {"stage": stage, "model": model})
               for model, rate in (tokens_per_second or {}).items()]
    ray.get(stage_metrics_actor().record.remote(values))


def record_training(stage: str, logs: dict[str, Any]) -> None:
    """A trainer's latest logged numbers (fire and forget: training does not wait on the metrics actor)."""
    values = [("train", float(value), {"stage": stage, "name": name}) for name, value in logs.items()
              if isinstance(value, (int, float)) and not isinstance(value, bool)]
    if values:
        stage_metrics_actor().record.remote(values)
