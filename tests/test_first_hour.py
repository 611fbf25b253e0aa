"""The first hour as a new user lives it, after `make demo`: every next step the demo and the README print is run as
printed (no flags added) in a shell holding only what a user has (PATH, HOME, LANG) plus what the README tells them
to set; a successful command shows no traceback and no warning, and the libraries' logs land in a log file.

These tests read the run `make demo` left in runs/tiny-cpu (the ``tiny_run`` fixture) and work on a copy of it, so
nothing here trains or synthesizes again. Their commands start Ray and Serve as a user's do, on the default ports
(a bare `zephyr-ray demo`, `serve run` and `zephyr-ray serve` on 8000): `make test` runs this file in one process,
so none of them runs beside another (tests/conftest.py).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import DEMO_RUN, REPO, agent_port_flags, copy_of_tiny_run, free_port, stop_process_group

from zephyr_ray.console import NOISE

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1200)]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def demo_run(tiny_run, tmp_path_factory) -> Path:
    """A copy of the finished demo run (`make demo`), with the demo's own recipe file."""
    return copy_of_tiny_run(tiny_run, tmp_path_factory.mktemp("first-hour"))


@pytest.fixture(scope="module")
def user_env(tmp_path_factory) -> dict[str, str]:
    """A user's shell: the venv on PATH (as after `source .venv/bin/activate`), a home of its own, nothing else."""
    home = tmp_path_factory.mktemp("home")
    return {"PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}


def run(command: str, env: dict[str, str], stdin: str = "", timeout: float = 600) -> str:
    """``command`` through bash as typed; returns what the terminal shows (stdout and stderr), checked for noise."""
    done = subprocess.run(["bash", "-c", command], env=env, cwd=REPO, input=stdin, capture_output=True, text=True,
                          timeout=timeout, check=False)
    shown = done.stdout + done.stderr
    assert done.returncode == 0, f"`{command}` failed ({done.returncode}):\n{shown[-4000:]}"
    assert not NOISE.search(shown), f"`{command}` printed noise:\n{shown[-4000:]}"
    return shown


def test_the_demo_again_is_quiet_and_every_next_step_it_prints_works(demo_run, user_env):
    """The demo run again (every stage skipped), then its printed next steps: chat and serve on the aligned model
    with no flags (max_model_len from the model itself), the curl line serve prints, and the report."""
    shown = run(f"zephyr-ray demo --run-dir {demo_run}", user_env)
    assert "library logs: " + str(demo_run / "logs" / "demo.log") in shown
    skipped = re.findall(r"^(\w+) +skipped +\(done before, in [\d.]+s\)$", shown, re.M)  # the stage table
    assert skipped == ["synthesize", "train_sft", "complete", "judge", "binarize", "train_dpo", "evaluate"], shown
    log = (demo_run / "logs" / "demo.log").read_text()
    assert "vllm" in log.lower() and "ray" in log.lower(), "the libraries' logs went to the log file"
    next_line = next(line for line in shown.splitlines() if line.startswith("next: "))
    serve_command, chat_command = re.findall(r"zephyr-ray (?:serve|chat) \S+", next_line)
    aligned = demo_run / "train_dpo" / "model"
    assert serve_command == f"zephyr-ray serve {aligned}" and chat_command == f"zephyr-ray chat {aligned}"

    # serve in one terminal; chat and the report in another while it comes up
    log_path = demo_run / "serve-terminal.txt"
    with open(log_path, "w") as terminal:
        server = subprocess.Popen(["bash", "-c", serve_command], env=user_env, cwd=REPO, stdout=terminal,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        chatted = run(chat_command, user_env, stdin="How do bees make honey?\n/exit\n")
        reply = next(line for line in chatted.splitlines() if line.startswith("assistant> "))
        assert len(reply) > len("assistant> "), chatted

        assert run(f"zephyr-ray report {demo_run}", user_env).strip() == f"report: {demo_run / 'report.html'}"
        assert (demo_run / "report.html").stat().st_size > 10_000

        deadline = time.time() + 600
        while "Ctrl-C stops it." not in log_path.read_text():
            assert server.poll() is None, log_path.read_text()[-4000:]
            assert time.time() < deadline, "serve did not come up in 600 s: " + log_path.read_text()[-4000:]
            time.sleep(2)
        printed = log_path.read_text()
        assert "serving 'model' at http://127.0.0.1:8000/v1" in printed, printed
        curl_line = next(line.strip() for line in printed.splitlines() if line.strip().startswith("curl "))
        replied = subprocess.run(["bash", "-c", curl_line], env=user_env, capture_output=True, text=True,
                                 timeout=120, check=True)
        answer = json.loads(replied.stdout)
        # a chat completion the engine generated: the tiny model's answer to "Hello!" may be its stop token alone
        # (an empty reply, seen on an AVX-512 machine); `zephyr-ray chat` above got words from the same model
        (choice,) = answer["choices"]
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str), answer
        assert choice["finish_reason"] in ("stop", "length") and answer["usage"]["completion_tokens"] >= 1, answer
    finally:
        stop_process_group(server, signal.SIGINT, grace_s=90)  # Ctrl-C
    printed = log_path.read_text()
    assert not NOISE.search(printed), printed[-4000:]
    served_log = Path(user_env["HOME"]) / ".cache" / "zephyr-ray" / "logs" / "serve.log"
    assert "max_model_len" in served_log.read_text() or served_log.stat().st_size > 0


def test_a_stage_shows_progress_and_one_summary_and_no_traceback(demo_run, user_env):
    """`zephyr-ray stage judge` redone on the demo's completions: a progress line with rows, rate and ETA from Ray
    Data, the stage's summary line, its result, no noise; the judgments are all there."""
    judged = json.loads((demo_run / "judge" / "result.json").read_text())["counts"]
    shutil.rmtree(demo_run / "judge")
    shown = run(f"zephyr-ray stage judge {demo_run / 'recipe.yaml'} --run-dir {demo_run}", user_env)
    assert re.search(r"^  \.\.\. \d+/\d+ rows", shown, re.M), shown  # the total: from what the stage reads
    assert re.search(r"^judge: \d+ rows in [\d.]+s \([\d.]+ rows/s", shown, re.M), shown
    result = json.loads(shown[shown.index("{"):])
    assert result["stage"] == "judge" and result["counts"]["judgments"] == judged["judgments"] > 0
    assert (demo_run / "logs" / "stage-judge.log").stat().st_size > 0


def readme_block(marker: str) -> list[str]:
    """The command lines of the README's code block that follows ``<!-- next-steps: marker``."""
    text = (REPO / "README.md").read_text()
    block = text[text.index(f"<!-- next-steps: {marker}"):]
    block = block[block.index("```bash\n") + len("```bash\n"):]
    block = block[:block.index("```")]
    return [re.split(r"\s#\s", line)[0].strip() for line in block.splitlines() if line.strip()]


def test_the_readmes_ray_job_lines_work_after_ray_start_head(demo_run, user_env, tmp_path):
    """README's lines as written, in a user's shell: the `export` (token auth), `ray start --head`, then the `ray job
    submit` lines. Two changes only, both for sharing the machine with the test session's own Ray: the head takes free
    ports (other Rays of the test run may hold the defaults), so RAY_ADDRESS names its dashboard; and the test stops
    that head itself where the README says `ray stop` (which would stop every Ray on the machine)."""
    lines = readme_block("ray-job")
    auth, start, submits = lines[:2], lines[2], lines[3:-1]
    assert auth == ["export RAY_AUTH_MODE=token", "ray get-auth-token --generate > /dev/null"], lines
    assert start == "ray start --head" and lines[-1] == "ray stop", lines
    assert submits and all(line.startswith("ray job submit ") for line in submits), lines
    try:
        for attempt in (1, 2):  # a user whose `ray start` timed out runs it again (README says so); so does the test
            dashboard = free_port()
            temp_dir = Path(tempfile.mkdtemp(prefix="zrf", dir="/tmp"))  # Ray's socket paths must stay short
            ports = [f"--port={free_port()}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
                     f"--temp-dir={temp_dir}", "--disable-usage-stats", "--num-cpus=4", *agent_port_flags()]
            env = {**user_env, "RAY_ADDRESS": f"http://127.0.0.1:{dashboard}"}
            head_log_path = tmp_path / f"head-{attempt}.log"
            head_log = open(head_log_path, "w")  # noqa: SIM115 - closed below
            head = subprocess.Popen(["bash", "-c", f"{' && '.join(auth)} && exec {start} --block {' '.join(ports)}"],
                                    env=user_env, cwd=REPO, stdout=head_log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            # Started means a job goes through: the dashboard can answer `ray job list` while the raylet still fails
            # to register (Ray gives it 30 s, ray/_private/node.py; on a saturated machine that can run out, CI run
            # 48), and the head's job agent can take longer than the 10 s the head waits for one ("No available agent
            # to submit job, please try again later"). A start that timed out is run again, as a user would.
            timed_out = "timed out during startup"
            deadline = time.time() + 180
            while subprocess.run(["bash", "-c", f"{lines[0]} && ray job submit -- true"], env=env,
                                 capture_output=True, check=False).returncode != 0:
                if head.poll() is not None or timed_out in head_log_path.read_text():
                    break
                assert time.time() < deadline, head_log_path.read_text()[-3000:]
                time.sleep(3)
            shown = head_log_path.read_text()
            if head.poll() is None and timed_out not in shown:
                break
            stop_process_group(head)
            head_log.close()
            shutil.rmtree(temp_dir, ignore_errors=True)
            assert attempt == 1 and timed_out in shown, shown[-3000:]
        assert (Path(user_env["HOME"]) / ".ray" / "auth_token").is_file(), "no token: token auth is off"
        assert "Token authentication is disabled" not in head_log_path.read_text()
        token = (Path(user_env["HOME"]) / ".ray" / "auth_token").read_text().strip()
        without_token = subprocess.run(["ray", "job", "list"], env=env, capture_output=True, text=True, check=False)
        assert without_token.returncode != 0, "the head took a job command from a shell without RAY_AUTH_MODE=token"
        script = "set -e\n" + "\n".join([auth[0], *submits])
        shown = subprocess.run(["bash", "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                               timeout=900, check=False)
        out = shown.stdout + shown.stderr
        assert shown.returncode == 0, out[-4000:]
        assert out.count("succeeded") >= len(submits), out[-4000:]
        assert "Traceback" not in out and token not in out, out[-4000:]
        manifest = json.loads((DEMO_RUN / "manifest.json").read_text())
        assert all(record["status"] == "skipped" for record in manifest["stages"].values()), manifest["stages"]  # nothing redone
    finally:
        stop_process_group(head)
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_verbose_shows_the_libraries_logs_on_a_stage_that_joins_the_cluster_ray_start_left(demo_run, user_env):
    """`--verbose`: what went to the log file is on the terminal (Ray Data's own lines), and no log file is made.
    The stage is given no address after a plain `ray start --head` (no `RAY_ADDRESS` exported): it joins that
    cluster, as `ray.init()` does and its `--address` help says, instead of failing ("When connecting to an existing
    cluster, num_cpus and num_gpus must not be provided", for the local Ray's size it asked for before).
    The head is started in another directory, as a user may: the workers of a driver that joins it start in the
    driver's directory, where the recipe's relative paths hold (they started in the head's, and an engine looked
    for ./artifacts/tiny-models/... there)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="zrv", dir="/tmp"))  # short: Ray's socket paths
    # RAY_TMPDIR moves Ray's default /tmp/ray, where `ray start` records its cluster and `ray.init()` looks for one,
    # off the test session's; free ports, as other Rays of the test run may hold the defaults
    env, head_log = {**user_env, "RAY_TMPDIR": str(temp_dir)}, demo_run / "head.log"
    try:
        for attempt in (1, 2):  # a start that timed out (Ray's 30 s wait for its raylet) is run again, as a user would
            port = free_port()
            ports = [f"--port={port}", f"--dashboard-port={free_port()}", *agent_port_flags()]
            with open(head_log, "w") as log_file:
                head = subprocess.Popen(["bash", "-c", f"exec ray start --head --block --disable-usage-stats "
                                         f"{' '.join(ports)}"], env=env, cwd=temp_dir, stdout=log_file,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            recorded, deadline = temp_dir / "ray" / "ray_current_cluster", time.time() + 180
            while not recorded.exists():  # written once the head is up
                if head.poll() is not None or "timed out during startup" in head_log.read_text():
                    break
                assert time.time() < deadline, "`ray start --head` did not come up: " + head_log.read_text()[-3000:]
                time.sleep(1)
            if recorded.exists() and head.poll() is None:
                break
            stop_process_group(head)
            assert attempt == 1, "`ray start --head` failed twice: " + head_log.read_text()[-3000:]
        shutil.rmtree(demo_run / "binarize")
        log = demo_run / "logs" / "stage-binarize.log"
        done = subprocess.run(["bash", "-c", f"zephyr-ray stage binarize {demo_run / 'recipe.yaml'} --run-dir "
                                             f"{demo_run} --verbose"], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=600, check=False)
        # where a joining driver's workers run, as init_ray joins for every stage (binarize reads absolute paths)
        probe = ("import os, ray\nfrom zephyr_ray.config import Hardware\nfrom zephyr_ray.stages import init_ray\n"
                 "init_ray(Hardware(accelerator='cpu', num_workers=1))\n"
                 "print(ray.get(ray.remote(lambda: [os.getcwd(), os.path.isdir('artifacts/tiny-models')]).remote()))")
        workers = subprocess.run([str(VENV_BIN / "python"), "-c", probe], env=env, cwd=REPO, capture_output=True,
                                 text=True, timeout=300, check=False)
    finally:
        stop_process_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert workers.stdout.strip().splitlines()[-1:] == [str([str(REPO), True])], workers.stdout + workers.stderr
    shown = done.stdout + done.stderr
    assert done.returncode == 0, shown[-4000:]
    assert "Execution plan of Dataset" in shown and "zephyr_ray.stage: binarize:" in shown, shown[-4000:]
    assert not log.exists()
    assert re.search(rf"joining the Ray cluster that `ray start` left running at \S+:{port} ", shown), shown[-4000:]
    result = done.stdout[done.stdout.rindex("\n{\n") + 1:] if "\n{\n" in done.stdout else done.stdout
    assert json.loads(result)["stage"] == "binarize"


def test_a_stage_starts_its_own_ray_when_the_cluster_ray_start_recorded_is_gone(demo_run, user_env):
    """A head killed without `ray stop` leaves its record (`ray_current_cluster`) behind, and `ray.init()` waits on
    it for minutes (seen here: over 200 s). A stage given no address says the cluster does not answer and starts a
    local Ray instead, as when none is recorded."""
    temp_dir = Path(tempfile.mkdtemp(prefix="zrw", dir="/tmp"))  # short: Ray's socket paths
    try:
        (temp_dir / "ray").mkdir()
        (temp_dir / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")  # nothing listens there
        shutil.rmtree(demo_run / "binarize")
        shown = run(f"zephyr-ray stage binarize {demo_run / 'recipe.yaml'} --run-dir {demo_run}",
                    {**user_env, "RAY_TMPDIR": str(temp_dir)}, timeout=300)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert re.search(r"the Ray cluster that `ray start` recorded at \S+ does not answer", shown), shown
    assert re.search(r"^binarize: \d+ rows in", shown, re.MULTILINE) and "joining" not in shown, shown


def test_serve_run_of_the_tiny_config_from_another_directory_answers(tiny_models, tmp_path):
    """`serve run serve/tiny-cpu.yaml` as a user types it, from a directory that is not the checkout: its relative
    recipe and model paths are found (inside the project), the app comes up, and the OpenAI client gets a reply."""
    from openai import OpenAI

    config = yaml.safe_load((REPO / "serve" / "tiny-cpu.yaml").read_text())
    (application,) = config["applications"]
    assert not Path(application["args"]["recipe"]).is_absolute() and (REPO / application["args"]["model"]).is_dir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ZEPHYR_RAY_API_KEY")}
    log_path = tmp_path / "serve-run.log"
    with open(log_path, "w") as log:
        run = subprocess.Popen([str(VENV_BIN / "serve"), "run", str(REPO / "serve" / "tiny-cpu.yaml")],
                               cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused", max_retries=0, timeout=30)
        deadline = time.time() + 600
        while True:
            assert run.poll() is None, log_path.read_text()[-4000:]
            assert time.time() < deadline, "serve run did not come up in 600 s: " + log_path.read_text()[-4000:]
            log_text = log_path.read_text()
            assert "Deploying app 'zephyr' failed" not in log_text, log_text[-4000:]  # serve run keeps waiting
            try:
                question = [{"role": "user", "content": "How do bees make honey?"}]
                reply = client.chat.completions.create(model="zephyr-tiny", messages=question, max_tokens=8)
                break
            except Exception:  # not up yet: connection refused, or 404/503 while the app deploys
                time.sleep(2)
        assert reply.choices[0].message.content
    finally:
        stop_process_group(run, signal.SIGINT, grace_s=60)  # Ctrl-C
