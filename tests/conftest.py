"""Shared fixtures: the tiny models (built once, kept between runs), a local Ray, one vLLM engine per module."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
# Tests never reach a model or dataset hub: everything they load is built here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
TEST_API_KEY_ENV = "ZEPHYR_RAY_TEST_API_KEY"
TINY_DIR = Path(os.environ.get("ZEPHYR_RAY_TINY_MODELS", REPO / "artifacts" / "tiny-models"))
# What the fault and hostile-input tests tried and saw, one JSON line each: scripts/reliability_table.py turns it into
# the table of docs/reliability.md.
RELIABILITY_LOG = Path(os.environ.get("ZEPHYR_RAY_RELIABILITY_LOG", REPO / "runs" / "reliability.jsonl"))


def record_reliability(kind: str, case: str, happened: str, lost: str) -> None:
    """One row of the reliability table, written by the test that tried the case (after its checks passed)."""
    import json

    RELIABILITY_LOG.parent.mkdir(parents=True, exist_ok=True)
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    with RELIABILITY_LOG.open("a", encoding="utf-8") as log:
        log.write(json.dumps({"kind": kind, "case": case, "happened": happened, "lost": lost, "test": test}) + "\n")


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """name -> directory of every tiny model; built on first use (about a minute), reused afterwards."""
    from zephyr_ray.tiny import build_tiny_models

    return build_tiny_models(TINY_DIR)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray for Ray Data tests, with its dashboard (job submission) and Prometheus endpoint. More logical
    CPUs than cores, as engines and readers share the machine."""
    import ray

    # An API key in the environment Ray's processes inherit (the Serve tests' secured app reads it there)
    os.environ.setdefault(TEST_API_KEY_ENV, "zr-test-" + secrets.token_hex(12))
    metrics_port = free_port()
    context = ray.init(num_cpus=4, include_dashboard=True, dashboard_port=free_port(), log_to_driver=False,
                       _metrics_export_port=metrics_port, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield SimpleNamespace(metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
                          dashboard_url=f"http://{context.dashboard_url}", address=context.address_info["address"])
    ray.shutdown()


def render_page(url: str, screenshot: Path, **context: object) -> list[tuple[str, int]]:
    """Open ``url`` in headless Chromium (Debian's, through Playwright), save a full-page screenshot, and return
    each image's (alt, rendered natural width): 0 means it did not load."""
    import shutil

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is not installed (.ci/run installs it)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_context(viewport={"width": 1100, "height": 900}, **context).new_page()
        page.goto(url)
        page.wait_for_load_state("load")
        images = [tuple(i) for i in page.evaluate("[...document.images].map(i => [i.alt, i.naturalWidth])")]
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return images


@pytest.fixture
def judge_server(tiny_models, tmp_path):
    """The tiny judge behind vLLM's OpenAI-compatible server, on a free port, with an API key."""
    port, key = free_port(), "zr-test-" + secrets.token_hex(12)
    log_path = tmp_path / "vllm-server.log"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_models["judge"]),
               "--served-model-name", "tiny-judge", "--host", "127.0.0.1", "--port", str(port), "--api-key", key,
               "--max-model-len", "1536", "--dtype", "float32", "--enforce-eager", "--load-format", "safetensors",
               "--kv-cache-memory-bytes", str(2**29)]
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, f"vLLM server exited: {log_path.read_text()[-3000:]}"
            assert time.time() < deadline, f"vLLM server not up in 300 s: {log_path.read_text()[-3000:]}"
            try:
                request = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {key}"})
                if urllib.request.urlopen(request, timeout=5).status == 200:
                    break
            except OSError:
                time.sleep(2)
        yield url, key
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
