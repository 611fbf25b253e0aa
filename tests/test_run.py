"""`zephyr-ray run` (here through `ray job submit` to a real head): a recipe's stages in order into one run
directory, with its manifest; run again, it skips what is finished. The recipe has two stages, synthesize and
train_sft, to keep the suite's time (the README's demo runs all of them); and a stage can take an existing dataset."""

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import agent_port_flags, free_port, record_reliability, stop_process_group, tiny_recipe_data

from zephyr_ray.tiny import load_corpus

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.engine, pytest.mark.timeout(1200)]


@pytest.fixture
def ray_head(tmp_path):
    """A real local head (`ray start --head`) with Ray's token auth on, in a temp dir of its own (so no other
    `ray.init()` of the test session finds it), stopped at the end."""
    token = "zr-head-" + secrets.token_hex(16)
    temp_dir = Path(tempfile.mkdtemp(prefix="zrh", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    dashboard = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PYTHONPATH": str(REPO)}
    log = open(tmp_path / "head.log", "w")  # noqa: SIM115 - closed below
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={free_port()}",
         f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--num-cpus=4", f"--temp-dir={temp_dir}",
         "--disable-usage-stats", *agent_port_flags()], env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 180
    while ray_cli(["job", "list", "--address", url], token).returncode != 0:
        assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
        assert time.time() < deadline, "the head's job server never answered"
        time.sleep(2)
    yield SimpleNamespace(url=url, token=token)
    stop_process_group(head)
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


def ray_cli(args: list[str], token: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The `ray` command as a user runs it, with the token in its environment."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(Path(sys.executable).parent / "ray"), *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, check=False)


def submit_job(head, job_id: str, args: list[str]) -> None:
    """`ray job submit`, again while the head's job agent is still starting ("No available agent ... try again"), or
    when the busy head's dashboard dropped the connection unanswered (seen once in CI, 2026-12-04), as a user would."""
    deadline = time.time() + 180
    while (done := ray_cli(["job", "submit", "--address", head.url, "--submission-id", job_id, *args],
                           head.token)).returncode != 0:
        shown = done.stdout + done.stderr
        retry = "No available agent" in shown or "RemoteDisconnected" in shown
        assert retry and time.time() < deadline, shown[-3000:]
        time.sleep(3)


def job_status(head, job_id: str) -> str:
    done = ray_cli(["job", "status", job_id, "--address", head.url], head.token)
    out = done.stdout + done.stderr  # the CLI's wording (ray/dashboard/modules/job/cli.py, _log_job_status)
    for phrase, status in ((f"Job '{job_id}' succeeded", "SUCCEEDED"), (f"Job '{job_id}' was stopped", "STOPPED"),
                           (f"Job '{job_id}' failed", "FAILED")):
        if phrase in out:
            return status
    found = re.search(rf"Status for job '{job_id}': (\w+)", out)
    return found.group(1).split(".")[-1] if found else "UNKNOWN"


def wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, what
        time.sleep(2)


@pytest.mark.fault
@pytest.mark.reliability("fault", "`ray job stop` during train_sft, then the same job submitted again (token auth on)")
def test_the_recipe_as_a_ray_job_with_token_auth_survives_a_stop_during_training(tiny_models, ray_head, tmp_path):
    """`ray job submit` of `jobs/run.py` to a real head with token auth: a wrong token is refused; the job is
    stopped while train_sft trains (after its first checkpoint), submitted again, and finishes: synthesize is not
    redone, training resumes from the checkpoint, the manifest and the job's logs say so."""
    data = tiny_recipe_data(tiny_models)
    recipe = {key: data[key] for key in ("name", "hardware", "train_sft")}
    # an existing dialogue set instead of synthesis (as with ultrachat_200k): no engine to start, CI minutes saved
    dialogues = tmp_path / "dialogues.jsonl"
    chats = [[m for m in row["messages"] if m["role"] != "system"] for row in load_corpus()]
    dialogues.write_text("".join(json.dumps({"prompt": chat[0]["content"], "messages": chat}) + "\n"
                                 for chat in chats))
    recipe["synthesize"] = {"dataset": {"path": str(dialogues)}}
    recipe["train_sft"].update(num_epochs=8, save_steps=8)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run_dir = tmp_path / "run"
    command = ["--working-dir", ".", "--no-wait", "--", sys.executable, "jobs/run.py", str(tmp_path / "recipe.yaml"),
               "--run-dir", str(run_dir)]

    refused = ray_cli(["job", "list", "--address", ray_head.url], "zr-wrong-token")
    assert refused.returncode != 0, "a wrong token was accepted"
    submit_job(ray_head, "zr-run-1", command)

    snapshot = run_dir / "train_sft" / "ray" / "train_sft" / "checkpoint_manager_snapshot.json"

    def training_checkpointed() -> bool:
        assert job_status(ray_head, "zr-run-1") in ("PENDING", "RUNNING"), \
            ray_cli(["job", "logs", "zr-run-1", "--address", ray_head.url], ray_head.token).stdout[-3000:]
        try:
            return bool(json.loads(snapshot.read_text())["checkpoint_results"])
        except (OSError, ValueError, KeyError):
            return False

    wait_for(training_checkpointed, 600, "train_sft never reported a checkpoint")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["synthesize"]["status"] == "done"
    assert manifest["stages"]["train_sft"]["status"] == "running"
    synthesized = (run_dir / "synthesize" / "dialogues" / "_SUCCESS").stat().st_mtime
    assert ray_cli(["job", "stop", "zr-run-1", "--address", ray_head.url], ray_head.token).returncode == 0
    wait_for(lambda: job_status(ray_head, "zr-run-1") in ("STOPPED", "FAILED"), 120, "the job did not stop")

    submit_job(ray_head, "zr-run-2", command)
    wait_for(lambda: job_status(ray_head, "zr-run-2") not in ("PENDING", "RUNNING"), 900, "the job never ended")
    logs = ray_cli(["job", "logs", "zr-run-2", "--address", ray_head.url], ray_head.token).stdout
    assert job_status(ray_head, "zr-run-2") == "SUCCEEDED", logs[-3000:]
    assert f"run manifest: {run_dir / 'manifest.json'}" in logs

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {s: r["status"] for s, r in manifest["stages"].items()} == {"synthesize": "skipped", "train_sft": "done"}
    assert manifest["recipe"] == "tiny-cpu" and len(manifest["recipe_sha256"]) == 64 and manifest["finished_at"]
    assert manifest["versions"]["ray"].startswith("2.60") and "trl" in manifest["versions"]
    assert manifest["stages"]["synthesize"]["counts"]["accepted"] > 0, "the first run's counts are kept"
    assert manifest["stages"]["train_sft"]["metrics"]["step"] > 0
    assert (run_dir / "synthesize" / "dialogues" / "_SUCCESS").stat().st_mtime == synthesized
    starts = [json.loads(line)["global_step_at_start"]
              for line in (run_dir / "train_sft" / "attempts" / "rank0.jsonl").read_text().splitlines()]
    assert starts[0] == 0 and starts[-1] > 0 and starts[-1] % 8 == 0, starts
    assert ray_head.token not in (run_dir / "manifest.json").read_text() + logs
    record_reliability("fault", "`ray job stop` during train_sft, then the same job submitted again (token auth on)",
                       f"synthesize skipped (kept from the first job); training resumed at step {starts[-1]} from its "
                       "checkpoint; the manifest records both runs' stages", "nothing: no finished stage redone")


def test_binarize_can_take_an_existing_preference_set_instead_of_judging(ray_local, tmp_path):
    """As users mix and match: an ultrafeedback_binarized-shaped file replaces complete/judge/binarize; bad rows go
    to the rejects with their reason, and every row is accounted for."""
    from zephyr_ray.config import load_recipe
    from zephyr_ray.stages import run_stage

    def pair(prompt: str, good: str, bad: str) -> dict:
        user = {"role": "user", "content": prompt}
        return {"prompt": prompt, "chosen": [user, {"role": "assistant", "content": good}],
                "rejected": [user, {"role": "assistant", "content": bad}], "score_chosen": 8, "score_rejected": 3}

    rows = [pair(f"question {i}", f"a good answer {i}", f"bad {i}") for i in range(5)]
    rows.append({**pair("no rejected", "x", "y"), "rejected": None})
    rows.append({**pair("robot", "x", "y"), "chosen": [{"role": "robot", "content": "robot"}]})
    source = tmp_path / "prefs.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({
        "name": "mix", "hardware": {"accelerator": "cpu", "num_workers": 1},
        "binarize": {"dataset": {"path": str(source)}}}))
    result = run_stage("binarize", load_recipe(tmp_path / "recipe.yaml"), tmp_path / "run")
    assert (result.counts["accepted"], result.counts["rejected"], result.counts["total"]) == (5, 2, 7)
    import pyarrow.parquet as pq

    kept = pq.read_table(tmp_path / "run" / "binarize" / "preferences").to_pylist()
    rejects = pq.read_table(tmp_path / "run" / "binarize" / "rejects").to_pylist()
    assert sorted(r["prompt"] for r in kept) == [f"question {i}" for i in range(5)]
    assert all(r["messages"] == r["chosen"] and r["prompt_id"] for r in kept)
    assert len(rejects) == 2 and all(r["reason"] for r in rejects)
