"""What every stage shares: the record of what it did (counts, seconds, outputs), its recipe section, timing."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import Recipe

logger = logging.getLogger(__name__)


@dataclass
class StageResult:
    """Counts and timings of one stage run; written as ``<run_dir>/<stage>/result.json`` for re-runs and reports."""

    stage: str
    skipped: bool = False
    counts: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)
    tokens_per_second: dict[str, float] = field(default_factory=dict)

    def save(self, run_dir: Path) -> None:
        """Record the result beside the stage's outputs and publish its numbers as Ray metrics."""
        from .metrics import record_stage

        if repaired := text_repaired(run_dir / self.stage, run_dir):
            self.counts["text_repaired"] = repaired
        record_stage(self.stage, self.counts, self.seconds, self.tokens_per_second)
        from .data import write_text_atomic

        write_text_atomic(run_dir / self.stage / "result.json", json.dumps(asdict(self), indent=2, default=str) + "\n")


def text_repaired(stage_dir: Path, run_dir: Path) -> dict[str, int]:
    """Rows per output of a stage whose text had to be repaired before it was written (``data.text_repairs``)."""
    from .data import SUCCESS_MARKER, text_repairs

    found = {}
    for marker in sorted(stage_dir.rglob(SUCCESS_MARKER)) if stage_dir.is_dir() else []:
        if repaired := text_repairs(marker.parent):
            found[str(marker.parent.relative_to(run_dir))] = repaired["rows"]
    return found


def already_done(stage: str, run_dir: Path, outputs: dict[str, Path]) -> StageResult | None:
    """The skipped result of a stage whose outputs are all complete (with the counts and rates its finished run
    recorded, also published as Ray metrics again), or None when there is work to do."""
    from .data import is_complete

    if not all(is_complete(path) for path in outputs.values()):
        return None
    from .metrics import record_stage

    logger.info("%s: already done, skipping", stage)
    recorded_path = run_dir / stage / "result.json"
    recorded = json.loads(recorded_path.read_text()) if recorded_path.is_file() else {}
    result = StageResult(stage, skipped=True, counts=recorded.get("counts", {}),
                         outputs={k: str(v) for k, v in outputs.items()},
                         tokens_per_second=recorded.get("tokens_per_second", {}))
    # the dashboard shows the numbers of the run that made these outputs, as it would have then
    record_stage(stage, result.counts, recorded.get("seconds", 0.0), result.tokens_per_second)
    return result


def stage_section(recipe: Recipe, stage: str) -> Any:
    section = getattr(recipe, stage)
    if section is None:
        raise ValueError(f"recipe '{recipe.name}' has no `{stage}` section")
    return section


class Timer:
    def __init__(self) -> None:
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.started, 2)


def log_rate(stage: str, rows: int, seconds: float, tokens: int | None = None) -> None:
    rate = f", {tokens / seconds:.1f} tokens/s" if tokens and seconds else ""
    logger.info("%s: %d rows in %.1fs (%.2f rows/s%s)", stage, rows, seconds, rows / max(seconds, 1e-9), rate)
