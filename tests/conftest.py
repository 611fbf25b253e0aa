"""Shared fixtures: the tiny models (built once, kept between runs), a local Ray, one vLLM engine per module."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Tests never reach a model or dataset hub: everything they load is built here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
TINY_DIR = Path(os.environ.get("ZEPHYR_RAY_TINY_MODELS", REPO / "artifacts" / "tiny-models"))


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """name -> directory of every tiny model; built on first use (about a minute), reused afterwards."""
    from zephyr_ray.tiny import build_tiny_models

    return build_tiny_models(TINY_DIR)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray for Ray Data tests. More logical CPUs than cores, as engines and readers share the machine."""
    import ray

    with socket.socket() as probe:  # a free port for Ray's Prometheus endpoint
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    yield ray
    ray.shutdown()
