"""Shared fixtures: the tiny models (built once, kept between runs), a local Ray, one vLLM engine per module.

`make test TEST_WORKERS=N` runs the suite in N processes (pytest-xdist, ``--dist loadfile``; the default is two):
each test file is run whole by one process (its module fixtures start once), the slowest files first so the
processes finish together, and each process has a Ray of its own on free ports, with its own Ray temp dir. The tests
that start Ray or Serve on their default ports, as a user does (a bare `zephyr-ray demo`, `serve run` and `zephyr-ray
serve` on port 8000), are all in test_first_hour.py, so they never run beside each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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
DEMO_RUN = REPO / "runs" / "tiny-cpu"  # where `make demo` leaves the whole tiny recipe's run
# What the fault and hostile-input tests tried and saw: scripts/reliability_table.py turns it into docs/reliability.md.
# Each test run starts the file afresh: a header line (run id, time, commit), then, for every test marked
# `reliability`, its outcome (from pytest) and, once its checks passed, its record (record_reliability).
RELIABILITY_LOG = Path(os.environ.get("ZEPHYR_RAY_RELIABILITY_LOG", REPO / "runs" / "reliability.jsonl"))
RELIABILITY_RUN: dict = {}  # this run's header, once the run log is started
# Test files by their time in CI (`--durations`), slowest first; the rest follow in collection order.
SLOWEST_FILES = ("test_serve", "test_feedback_pipeline", "test_first_hour", "test_rounds", "test_train", "test_run",
                 "test_evaluate", "test_prompt_tokens", "test_train_options", "test_judge_answers")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _log_reliability(entry: dict) -> None:
    import json

    if not RELIABILITY_RUN:
        return  # not a test run that keeps a log (e.g. --collect-only)
    with RELIABILITY_LOG.open("a", encoding="utf-8") as log:  # one line per write: the two processes append
        log.write(json.dumps({**entry, "run": RELIABILITY_RUN["run"]}) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # an xdist test process: the controller's run log, a Ray temp dir of its own
        RELIABILITY_RUN.update(config.workerinput.get("reliability_run", {}))
        temp_dir = Path(f"/tmp/zr-{config.workerinput['workerid']}")  # short: Ray's socket paths stay < 108 bytes
        temp_dir.mkdir(exist_ok=True)
        os.environ["RAY_TMPDIR"] = str(temp_dir)
        return
    if config.option.collectonly:
        return
    import json
    from datetime import datetime, timezone

    started = datetime.now(timezone.utc)
    RELIABILITY_RUN.update(type="run", run=started.strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(4),
                           started=started.isoformat(timespec="seconds"), commit=_git("rev-parse", "HEAD"),
                           local_changes=bool(_git("status", "--porcelain", "--untracked-files=no")),
                           args=list(config.invocation_params.args))
    RELIABILITY_LOG.parent.mkdir(parents=True, exist_ok=True)
    RELIABILITY_LOG.write_text(json.dumps(RELIABILITY_RUN) + "\n", encoding="utf-8")  # a fresh log for this run


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """xdist: each test process appends its reliability records to this run's log."""
    node.workerinput["reliability_run"] = dict(RELIABILITY_RUN)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if config.getoption("markexpr", "") == "not engine" and not demo_run_is_finished():
        terminalreporter.write_line(f"{DEMO_RUN.relative_to(REPO)} holds no finished demo run: the tests that read it "
                                    "were left out as engine tests (`make demo` once brings them in)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that needs the session's Ray cluster is an `engine` test (the marker's meaning), so `make test-fast`
    (-m "not engine") starts no cluster; so is a test that reads the demo's run while there is none (``tiny_run``
    would make it: Ray and vLLM engines, minutes). A test process of `make test` is handed the slowest files first."""
    demo_run_missing = not demo_run_is_finished()
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "ray_local" in fixtures or (demo_run_missing and "tiny_run" in fixtures):
            item.add_marker(pytest.mark.engine)
    if hasattr(config, "workerinput"):
        rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
        items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a file keeps its order


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Each reliability test's outcome, phase by phase, so a case that failed shows it (and a case whose test did
    not run shows nothing, which the table reports as not run)."""
    report = yield
    marker = item.get_closest_marker("reliability")
    if marker is not None and (report.when == "call" or not report.passed):
        message = ""
        if report.failed and call.excinfo is not None:
            message = f"{call.excinfo.typename}: {call.excinfo.value}"
        elif report.skipped and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2])
        _log_reliability({"type": "outcome", "test": item.nodeid, "when": report.when, "outcome": report.outcome,
                          "message": (message.strip().splitlines() or [""])[0][:300]})
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from datetime import datetime, timezone

    if hasattr(session.config, "workerinput"):
        return  # the controller ends the log
    _log_reliability({"type": "end", "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "exitstatus": int(exitstatus)})


def record_reliability(kind: str, case: str, happened: str, lost: str) -> None:
    """What a `reliability` test tried and saw, one row of the table; called by the test after its checks passed."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    _log_reliability({"type": "record", "kind": kind, "case": case, "happened": happened, "lost": lost,
                      "test": test})


@contextlib.contextmanager
def one_process_at_a_time(name: str):
    """A lock the test processes of one machine share, for work that two must not do at once into one place."""
    import fcntl

    with open(Path(tempfile.gettempdir()) / f"zephyr-ray-tests-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """name -> directory of every tiny model; built on first use (about three minutes), reused afterwards."""
    from zephyr_ray.tiny import build_tiny_models

    with one_process_at_a_time("tiny-models"):
        return build_tiny_models(TINY_DIR)


def demo_run_is_finished() -> bool:
    from zephyr_ray.data import is_complete

    return is_complete(DEMO_RUN / "train_dpo" / "model") and (DEMO_RUN / "evaluate" / "results.json").is_file()


@pytest.fixture(scope="session")
def tiny_run(tiny_models) -> Path:
    """The finished run of the whole tiny recipe (jobs/configs/tiny-cpu.yaml, with its own recipe.yaml) that
    `make demo` leaves in runs/tiny-cpu: CI runs the demo before the tests, so the tests that only read a finished
    run assert on that one run instead of making their own. Without it (a developer who has not run the demo), it is
    made here once, as the demo makes it (about 7 minutes). Tests copy it (``copy_of_tiny_run``) before changing
    anything in it."""
    with one_process_at_a_time("tiny-run"):
        if not demo_run_is_finished():
            assert not os.environ.get("CI"), "runs/tiny-cpu holds no finished demo run: .ci/run runs `make demo` first"
            subprocess.run([sys.executable, "-m", "zephyr_ray.cli", "demo", "--run-dir", str(DEMO_RUN)], cwd=REPO,
                           check=True, capture_output=True, timeout=3600)
    return DEMO_RUN


def copy_of_tiny_run(tiny_run: Path, into: Path, stages: tuple[str, ...] | None = None) -> Path:
    """A copy of the finished tiny run (only ``stages``' directories, when given), its recipe and manifest."""
    import shutil

    copy = into / "tiny-cpu"
    keep = None if stages is None else {*stages, "recipe.yaml", "manifest.json"}
    # a file being written atomically (``.name.tmp-*``, by a README test re-running the demo's recipe) is not copied
    shutil.copytree(tiny_run, copy, ignore=lambda folder, names: [
        n for n in names if n in ("logs", "report.html") or ".tmp" in n
        or (keep is not None and Path(folder) == tiny_run and n not in keep)])
    return copy


def few_prompts_of_tiny_run(tiny_run: Path, into: Path, stages: tuple[str, ...], prompts: int = 16) -> Path:
    """A copy of the finished tiny run (``stages`` of it) cut to its first ``prompts`` preference prompts: the
    recipe's prompt file holds only those, and every copied output with a ``prompt_id`` only their rows. For the tests
    that run a stage of the data half again (a killed engine, a killed job, other judges, a lost node): what they
    prove holds on 16 prompts as on the recipe's 144, at a ninth of the engine time. A stage run again on the cut
    writes the rows the whole run wrote for those prompts: every row's seed is its own."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from zephyr_ray.data import SUCCESS_MARKER, prompt_id_of

    copy = copy_of_tiny_run(tiny_run, into, stages=stages)
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    source = Path(recipe["complete"]["prompts"]["path"])
    lines = (source if source.is_absolute() else REPO / source).read_text().splitlines()[:prompts]
    (copy / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    recipe["complete"]["prompts"]["path"] = str(copy / "prompts.jsonl")
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    kept = {prompt_id_of(json.loads(line)["prompt"]) for line in lines}
    for marker in copy.rglob(SUCCESS_MARKER):
        parts = sorted(marker.parent.glob("*.parquet"))
        table = pq.read_table([str(part) for part in parts]) if parts else None
        if table is None or "prompt_id" not in table.column_names:
            continue
        # typed: an empty output (binarize's rejects when nothing was rejected) gives an empty mask, which pyarrow
        # would read as nulls, not booleans
        mask = pa.array([value in kept for value in table.column("prompt_id").to_pylist()], type=pa.bool_())
        for part in parts:
            part.unlink()
        pq.write_table(table.filter(mask), marker.parent / "part-0.parquet")
    return copy


def tiny_recipe_data(tiny_models: dict) -> dict:
    """tiny-cpu.yaml as a dict, its relative model and data paths pointing at the test's tiny models and the
    checkout's data (a test runs from anywhere)."""
    import yaml

    text = (REPO / "jobs" / "configs" / "tiny-cpu.yaml").read_text()
    text = text.replace("./artifacts/tiny-models", str(tiny_models["teacher"].parent))
    return yaml.safe_load(text.replace("./jobs/data", str(REPO / "jobs" / "data")))


def tiny_recipe(tmp: Path, tiny_models: dict, **changes) -> Path:
    """tiny-cpu.yaml on the test's tiny models (``tiny_recipe_data``), ``changes`` applied per section."""
    import yaml

    data = tiny_recipe_data(tiny_models)
    for section, values in changes.items():
        data[section].update(values)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def completions(run_dir: Path) -> list[dict]:
    """Every pool model's completions of a run."""
    import pyarrow.parquet as pq

    return [row for model in sorted((run_dir / "complete" / "models").iterdir()) if model.is_dir()
            for row in pq.read_table(model).to_pylist()]


def rejudge(run_dir: Path, recipe, other: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """Judge ``run_dir``'s completions again in ``other`` with ``recipe``'s judge: (all, judgeable, scored) rows."""
    import pyarrow.parquet as pq

    from zephyr_ray.stages import run_stage

    shutil.copytree(run_dir / "complete", other / "complete")
    result = run_stage("judge", recipe, other)
    judgments = pq.read_table(other / "judge" / "judgments").to_pylist()
    assert result.counts["judgments"] == len(judgments)
    judgeable = [r for r in judgments if not (r["judge_error"] or "").startswith("not judged")]
    return judgments, judgeable, [r for r in judgeable if r["judge_error"] is None]


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, and not one this process has handed out before: the kernel can give a freed
    port again at once, and a `ray start` given the same port twice refuses to start (CI run 91)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def agent_port_flags() -> list[str]:
    """`ray start` flags giving a head's agents free ports of their own: another Ray of the test run may hold the
    defaults (the job agent's 52365, the metrics exporter's ...)."""
    return [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                    "metrics-export-port", "runtime-env-agent-port")]


def stop_process_group(process: subprocess.Popen, sig: int = signal.SIGTERM, grace_s: float = 16) -> None:
    """Stop a process started in a session of its own, with everything in its group: ``sig`` (SIGTERM as `ray stop`
    sends, whose grace period is the default here; SIGINT as Ctrl-C), then after ``grace_s`` SIGKILL to whatever of
    the group is left. A group already gone (the process ended and took its children with it) is no error."""
    try:
        os.killpg(process.pid, sig)
        process.wait(timeout=grace_s)
    except ProcessLookupError:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray for Ray Data tests (one head node, started as Ray's own tests start one), with its dashboard (job
    submission) and Prometheus endpoint. More logical CPUs than cores, as engines and readers share the machine.
    Every port is a free one: with Ray's default agent port, a job sent to one test process's Ray could reach the
    other's agent."""
    import ray
    from ray._common.utils import get_default_ray_temp_dir, reset_ray_address
    from ray._private.utils import write_ray_address
    from ray.cluster_utils import Cluster

    # An API key in the environment Ray's processes inherit (the Serve tests' secured app reads it there)
    os.environ.setdefault(TEST_API_KEY_ENV, "zr-test-" + secrets.token_hex(12))
    if ray.is_initialized():  # a test before this one started a Ray of its own in this process
        ray.shutdown()
    metrics_port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="zrs", dir="/tmp")  # short: Ray's socket paths stay < 108 bytes
    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)  # the Cluster writes "the current cluster" there first
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "temp_dir": temp_dir, "num_cpus": 4, "object_store_memory": 2 * 2**30, "include_dashboard": True,
        "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port(),
        "runtime_env_agent_port": free_port(), "metrics_agent_port": free_port(), "metrics_export_port": metrics_port})
    reset_ray_address()  # not "the current cluster": a bare ray.init() in a subprocess starts a Ray of its own
    # ...but this head's own temp dir names it: its job supervisor reads the address from there for a job's driver
    # (without the file, Ray guesses from the GCS processes running on the machine, and may pick another Ray's)
    write_ray_address(cluster.address, temp_dir)
    context = ray.init(address=cluster.address, log_to_driver=False,
                       runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield SimpleNamespace(metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
                          dashboard_url=f"http://{context.dashboard_url}", address=cluster.address,
                          session_dir=Path(cluster.head_node.get_session_dir_path()))
    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


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


@pytest.fixture(scope="session")
def judge_server(tiny_models, tmp_path_factory):
    """The tiny judge behind vLLM's OpenAI-compatible server, on a free port, with an API key: one server for the
    session (the feedback and the evaluation judges both call it; each test's run directory is its own). Its tests
    are in one file (test_evaluate.py), so that one test process starts it."""
    port, key = free_port(), "zr-test-" + secrets.token_hex(12)
    log_path = tmp_path_factory.mktemp("judge-server") / "vllm-server.log"
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
        stop_process_group(server, grace_s=60)
