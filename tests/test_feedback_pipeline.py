"""The data half of the recipe on the tiny models with real vLLM engines on Ray Data:
synthesize -> complete (4 models) -> judge (rubric with structured outputs, and logprob) -> binarize -> one DPO step."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import (
    completions,
    copy_of_tiny_run,
    few_prompts_of_tiny_run,
    free_port,
    record_reliability,
    rejudge,
    tiny_recipe,
)

from zephyr_ray.config import load_recipe
from zephyr_ray.data import PreferenceRow, prompt_id_of
from zephyr_ray.feedback.complete import PRINCIPLES
from zephyr_ray.feedback.judge import ASPECTS
from zephyr_ray.stages import run_stage

REPO = Path(__file__).resolve().parents[1]
# the tests that judge again (kill an engine, other judge kinds, a killed job) take minutes each
pytestmark = [pytest.mark.engine, pytest.mark.timeout(2400)]


def rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


# the tiny recipe's judge has its own short prompt (for the rubric kind it learnt); other kinds take the project's
PROJECT_PROMPTS = {"prompt": None, "system_prompt": None}


@pytest.fixture(scope="module")
def pipeline(tiny_run, ray_local, tmp_path_factory):
    """The data half of the tiny recipe as the demo ran it (``tiny_run``, copied): each stage run again here finds
    its outputs complete and returns what its run recorded (counts, token rates), as a resumed run does."""
    run_dir = copy_of_tiny_run(tiny_run, tmp_path_factory.mktemp("feedback"),
                               stages=("synthesize", "complete", "judge", "binarize"))
    recipe = load_recipe(run_dir / "recipe.yaml")
    results = {name: run_stage(name, recipe, run_dir) for name in ("synthesize", "complete", "judge", "binarize")}
    assert all(result.skipped for result in results.values()), "the demo's run is finished: nothing is redone"
    return recipe, run_dir, results


@pytest.fixture(scope="module")
def few(tiny_run, tmp_path_factory):
    """(recipe, run dir) of the demo's data half cut to its first 16 preference prompts (``few_prompts_of_tiny_run``):
    the tests that run a stage again (other judges, a killed engine or job, a lost node) run it on these."""
    run_dir = few_prompts_of_tiny_run(tiny_run, tmp_path_factory.mktemp("few"), ("complete", "judge", "binarize"))
    return load_recipe(run_dir / "recipe.yaml"), run_dir


def prompts_answered(run_dir: Path) -> int:
    return len({row["prompt_id"] for row in completions(run_dir)})


def test_synthesize_writes_ultrachat_dialogues_and_counts_drops(pipeline):
    recipe, run_dir, results = pipeline
    seeds = results["synthesize"].counts["seeds"]
    dialogues = rows(run_dir / "synthesize" / "dialogues")
    rejects = rows(run_dir / "synthesize" / "rejects")
    seed_file = Path(recipe.synthesize.seeds.path)
    assert len(dialogues) + len(rejects) == seeds["accepted"] == len(seed_file.read_text().splitlines())
    assert len(dialogues) > 0
    assert sum(results["synthesize"].counts["reasons"].values()) == len(rejects)
    for row in dialogues:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"] * recipe.synthesize.num_turns
        assert row["prompt"] == row["messages"][0]["content"] and row["prompt_id"] == prompt_id_of(row["prompt"])
        assert all(m["content"].strip() for m in row["messages"])
    assert all(r["reason"] for r in rejects)


def test_every_prompt_gets_one_completion_per_pool_model(pipeline):
    recipe, run_dir, results = pipeline
    prompts = results["complete"].counts["prompts"]["accepted"]
    by_prompt: dict[str, list[str]] = {}
    for model in recipe.complete.models:
        for row in rows(run_dir / "complete" / "models" / model.name):
            by_prompt.setdefault(row["prompt_id"], []).append(row["model"])
            assert row["principle"] in PRINCIPLES and row["messages"][0]["content"] == PRINCIPLES[row["principle"]]
            params = json.loads(row["sampling_params"])
            assert params["max_tokens"] == model.sampling.max_tokens and params["seed"] is not None
            assert row["finish_reason"] in ("stop", "length") and row["num_prompt_tokens"] > 0
    assert len(by_prompt) == prompts
    # generator-1's template refuses a system message (its principle opened the user turn), generator-2 ships no
    # template (the recipe names Zephyr's): both answered every prompt above, without a generation error
    assert results["complete"].counts["principles_in_user_turn"] == 1
    assert set(results["complete"].tokens_per_second) == {m.name for m in recipe.complete.models}
    assert all(rate > 0 for rate in results["complete"].tokens_per_second.values())
    assert all(sorted(models) == sorted(m.name for m in recipe.complete.models) for models in by_prompt.values())


def test_rubric_judge_scores_or_explains_every_completion(pipeline):
    recipe, run_dir, results = pipeline
    judgments = rows(run_dir / "judge" / "judgments")
    assert len(judgments) == sum(results["complete"].counts[m.name] for m in recipe.complete.models)
    errors = 0
    for row in judgments:
        assert row["raw_judgment"] is not None or row["judge_error"].startswith("not judged")
        if row["judge_error"] is None:
            assert all(1 <= row[a] <= 5 for a in ASPECTS) and 1 <= row["overall"] <= 10
        else:
            errors += 1
    assert errors == results["judge"].counts["judge_errors"]
    means = results["judge"].counts["mean_overall"]
    assert set(means) == {m.name for m in recipe.complete.models} and all(1 <= v <= 10 for v in means.values())
    assert errors < len(judgments) / 2, "structured outputs should make most judgments parse"


def check_preferences(run_dir: Path, n_prompts: int) -> list[dict]:
    pairs = rows(run_dir / "binarize" / "preferences")
    rejects = rows(run_dir / "binarize" / "rejects")
    assert len(pairs) + len(rejects) == n_prompts
    assert len(pairs) > 0
    for pair in pairs:
        PreferenceRow.model_validate(pair)
        assert pair["score_chosen"] > pair["score_rejected"]
        assert pair["prompt_id"] == prompt_id_of(pair["prompt"])
        assert pair["chosen"][0] == pair["rejected"][0] == {"role": "user", "content": pair["prompt"]}
        assert pair["messages"] == pair["chosen"] and pair["chosen_model"] != pair["rejected_model"]
    assert all(r["reason"] for r in rejects)
    return pairs


def test_binarize_makes_valid_pairs_and_stats(pipeline):
    recipe, run_dir, results = pipeline
    check_preferences(run_dir, results["complete"].counts["prompts"]["accepted"])
    stats = json.loads((run_dir / "binarize" / "stats.json").read_text())
    assert set(stats["score_histograms"]) == {m.name for m in recipe.complete.models}
    assert sum(stats["wins"].values()) == stats["pairs"] == results["binarize"].counts["pairs"]
    assert 0.0 <= stats["fraction_chosen_longer"] <= 1.0
    assert (run_dir / "binarize" / "stats.png").stat().st_size > 10_000


def test_the_report_shows_the_funnel_and_judge_scores_in_a_browser(pipeline, tmp_path):
    from conftest import render_page

    from zephyr_ray.report import write_report

    _, run_dir, results = pipeline
    report = write_report(run_dir, tmp_path / "report.html")
    images = render_page(report.as_uri(), tmp_path / "report.png")
    assert [alt for alt, _ in images] == ["Data funnel", "Judge scores and preference pairs", "Timings"]
    assert all(width > 300 for _, width in images), images
    text = report.read_text()
    assert f"{results['binarize'].counts['pairs']} pairs" in text and "no training log history" in text
    keep = REPO / "artifacts" / "screenshots"
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / "report.png", keep / "report-feedback.png")  # for a person to look at


@pytest.fixture(scope="module")
def logprob_judged_through_a_kill(few, tiny_models, ray_local, tmp_path_factory):
    """The logprob judge (the tiny judge's probability of each rating) on the 16 prompts' completions, one completion
    per batch, with its vLLM engine actor SIGKILLed mid-pass: one pass serves the fault test and the logprob judge's
    own checks. Returns the recipe, the run, (all, judgeable, scored) judgments and the killed actor's id."""
    import threading

    from ray.util.state import list_actors

    _, run_dir = few
    tmp = tmp_path_factory.mktemp("logprob")
    # one completion per batch, so the pass is many small tasks and lasts long enough to be interrupted mid-way
    judge = yaml.safe_load((run_dir / "recipe.yaml").read_text())["judge"]
    recipe = load_recipe(tiny_recipe(tmp, tiny_models, judge={"kind": "logprob", **PROJECT_PROMPTS,
                                                              "engine": {**judge["engine"], "batch_size": 1}},
                                     binarize={"score": "overall"}))
    killed, done = [], threading.Event()

    def kill_the_engine_once_it_works() -> None:
        deadline = time.time() + 600
        while time.time() < deadline and not done.is_set():
            alive = list_actors(address=ray_local.address, filters=[("state", "=", "ALIVE")], limit=10_000)
            engines = [a for a in alive if "vLLMEngineStageUDF" in (a.class_name or "")]
            if engines:  # ALIVE once its constructor (the engine's start) returned: its 64 one-row batches
                # (a few seconds of work) are queued or running now, so the kill lands mid-pass; the row checks
                # hold wherever in the pass it lands
                try:
                    os.kill(engines[0].pid, signal.SIGKILL)
                except ProcessLookupError:  # the listing was stale (the actor had just exited): look again
                    continue
                killed.append(engines[0].actor_id)
                return
            time.sleep(0.5)

    killer = threading.Thread(target=kill_the_engine_once_it_works, daemon=True)
    killer.start()
    try:
        judged = rejudge(run_dir, recipe, tmp / "run")
    finally:
        done.set()
        killer.join(timeout=60)
    return recipe, tmp / "run", judged, killed


@pytest.mark.fault
@pytest.mark.reliability("fault", "a vLLM engine actor SIGKILLed mid-pass (judge, Ray Data actor pool)")
def test_a_killed_vllm_engine_actor_is_restarted_and_every_row_is_written_once(few, logprob_judged_through_a_kill,
                                                                               ray_local):
    """The judge's vLLM engine actor SIGKILLed in the middle of its pass: Ray Data starts a new one and retries the
    lost batches; the judgments hold every completion exactly once, like the undisturbed pass."""
    from ray.util.state import list_actors

    _, run_dir = few
    _, _, (judgments, judgeable, scored), killed = logprob_judged_through_a_kill
    assert killed, "no engine actor was killed while the pass ran"
    (actor,) = list_actors(address=ray_local.address, filters=[("actor_id", "=", killed[0])], detail=True)
    assert actor.num_restarts >= 1, "Ray never restarted the killed engine actor"

    def key(row: dict) -> tuple:
        return row["prompt_id"], row["model"]

    undisturbed = rows(run_dir / "judge" / "judgments")
    assert sorted(map(key, judgments)) == sorted(map(key, undisturbed))
    assert len(set(map(key, judgments))) == len(judgments), "a row was written twice"
    assert len(scored) >= len(judgeable) * 0.9 and len(judgeable) >= len(judgments) / 2
    record_reliability("fault", "a vLLM engine actor SIGKILLed mid-pass (judge, Ray Data actor pool)",
                       f"Ray restarted the engine actor ({actor.num_restarts}x) and Ray Data retried its lost "
                       f"batches; {len(judgments)} judgments written (logprob judge), {len(scored)} of "
                       f"{len(judgeable)} judgeable scored",
                       "nothing: every completion judged exactly once, none twice")


def test_logprob_judge_on_the_same_completions(few, logprob_judged_through_a_kill):
    _, run_dir = few
    recipe, other, (judgments, judgeable, scored), _ = logprob_judged_through_a_kill
    assert len(scored) >= len(judgeable) * 0.9 and len(judgeable) >= len(judgments) / 2
    assert all(1.0 <= r["overall"] <= 5.0 and r["raw_judgment"] in "12345" for r in scored)
    assert len({round(r["overall"], 6) for r in scored}) > len(scored) // 2, "expected continuous scores"
    run_stage("binarize", recipe, other)
    check_preferences(other, prompts_answered(run_dir))


def test_preferences_load_with_datasets_and_train_a_dpo_step(pipeline, tiny_models, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    _, run_dir, _ = pipeline
    dataset = datasets.load_dataset("parquet", data_files=str(run_dir / "binarize" / "preferences" / "*.parquet"),
                                    split="train")
    assert {"prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"} <= set(
        dataset.column_names)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["student"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=2, max_steps=1, report_to=[],
                     bf16=False, use_cpu=True, max_length=256, logging_steps=1, save_strategy="no")
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset.select_columns(["chosen", "rejected"]),
                         processing_class=tokenizer)
    output = trainer.train()
    assert output.global_step == 1 and output.training_loss > 0


def test_rerun_skips_finished_work_and_redoes_a_lost_model_identically(few):
    recipe, run_dir = few
    lost = run_dir / "complete" / "models" / "generator-1"
    before = sorted(rows(lost), key=lambda r: r["prompt_id"])
    shutil.rmtree(lost)
    (lost.parent / ".generator-1.tmp-deadbeef").mkdir()  # what a crash mid-write leaves
    result = run_stage("complete", recipe, run_dir)
    assert result.outputs.keys() == {"generator-1"}, "only the lost model is generated again"
    assert sorted(rows(lost), key=lambda r: r["prompt_id"]) == before
    assert not list(lost.parent.glob(".generator-1.tmp-*"))
    assert run_stage("judge", recipe, run_dir).skipped and run_stage("binarize", recipe, run_dir).skipped


def test_stage_numbers_stay_on_the_ray_metrics_endpoint(pipeline, ray_local):
    """Every stage's numbers are on Ray's Prometheus endpoint long after the stage ended: the module's earlier tests
    take minutes after the pipeline fixture, and a gauge Ray is not told again drops out after about half a minute."""
    import re

    _, _, results = pipeline
    # a gauge holds a stage's *last* run: synthesize ran once (the fixture); other tests re-ran judge and binarize
    expected = {("synthesize", "dialogues"): results["synthesize"].counts["dialogues"],
                ("synthesize", "seeds.accepted"): results["synthesize"].counts["seeds"]["accepted"]}
    deadline = time.time() + 60
    while True:
        body = urllib.request.urlopen(ray_local.metrics_url, timeout=10).read().decode()
        found = {}
        for stage, key in expected:
            pattern = rf'^ray_zephyr_stage_count{{[^}}]*key="{re.escape(key)}"[^}}]*stage="{stage}"[^}}]*}} (\S+)$'
            line = re.search(pattern, body, re.MULTILINE)
            if line:
                found[stage, key] = float(line.group(1))
        timed = set(re.findall(r'^ray_zephyr_stage_seconds\{[^}]*stage="(\w+)"', body, re.MULTILINE))
        if found == expected and {"synthesize", "complete", "judge", "binarize"} <= timed:
            return
        assert time.time() < deadline, f"stage numbers missing from the Ray metrics endpoint: {found}, {timed}"
        time.sleep(2)


def test_reward_model_judge_on_the_same_completions(few, tiny_models, tmp_path):
    """vLLM's classify runner on the tiny reward model; its scores are the raw logits transformers computes."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from zephyr_ray.tiny import reward_text

    _, run_dir = few
    engine = {"model": str(tiny_models["reward"]), "max_model_len": 1536, "batch_size": 16, "kv_cache_gib": 0.5}
    recipe = load_recipe(tiny_recipe(tmp_path, tiny_models, judge={"kind": "reward_model", "engine": engine,
                                                                   **PROJECT_PROMPTS}, binarize={"score": "overall"}))
    other = tmp_path / "run"
    _, judgeable, scored = rejudge(run_dir, recipe, other)
    assert len(scored) == len(judgeable) > 0 and all(r["judge"].endswith("(reward_model)") for r in scored)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["reward"])
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["reward"])
    for row in scored[:4]:
        chat = [m for m in row["messages"] if m["role"] != "system"]
        text = reward_text(tokenizer, [*chat, {"role": "assistant", "content": row["completion"]}])
        with torch.no_grad():
            expected = model(**tokenizer(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0].item()
        assert row["overall"] == pytest.approx(expected, abs=1e-3)
    run_stage("binarize", recipe, other)
    check_preferences(other, prompts_answered(run_dir))


@pytest.mark.fault
@pytest.mark.reliability("fault", "the job's driver SIGKILLed mid-stage (complete, after its first pool model)")
def test_killed_job_resumes_to_the_same_rows(few, tiny_models, ray_local, tmp_path):
    """`ray job submit` of jobs/stage.py; the job's driver is SIGKILLed once the first pool models are written (the
    first two run side by side on the test's 4 logical CPUs, the third after them); a second submission redoes only
    the missing model and ends with the rows of the uninterrupted run."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    _, run_dir = few
    recipe_path = tiny_recipe(tmp_path, tiny_models, complete={"prompts": {"path": str(run_dir / "prompts.jsonl")}})
    data = yaml.safe_load(recipe_path.read_text())
    data["complete"]["models"] = data["complete"]["models"][:3]  # two waves prove it; four models cost CI minutes
    recipe_path.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    client = JobSubmissionClient(ray_local.dashboard_url)
    entrypoint = f"{sys.executable} jobs/stage.py complete {recipe_path} --run-dir {run}"

    def submit() -> str:
        return client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(REPO)})

    def wait(job: str, statuses: set, seconds: float) -> JobStatus:
        deadline = time.time() + seconds
        while (status := client.get_job_status(job)) not in statuses:
            assert time.time() < deadline, f"job {job} still {status}: {client.get_job_logs(job)[-3000:]}"
            time.sleep(1)
        return status

    models = [m["name"] for m in data["complete"]["models"]]
    first_wave = [run / "complete" / "models" / name / "_SUCCESS" for name in models[:2]]
    job = submit()
    deadline = time.time() + 600
    while not all(marker.exists() for marker in first_wave):
        assert client.get_job_status(job) in (JobStatus.PENDING, JobStatus.RUNNING), client.get_job_logs(job)[-3000:]
        assert time.time() < deadline, "the first pool models were never written"
        time.sleep(0.5)
    os.kill(int(client.get_job_info(job).driver_info.pid), signal.SIGKILL)
    assert wait(job, {JobStatus.FAILED, JobStatus.STOPPED, JobStatus.SUCCEEDED}, 120) != JobStatus.SUCCEEDED
    assert not (run / "complete" / "models" / models[-1] / "_SUCCESS").exists(), "killed too late to prove resume"
    written_before = {name: (run / "complete" / "models" / name / "_SUCCESS").stat().st_mtime_ns
                      for name in models[:2]}

    job = submit()
    assert wait(job, {JobStatus.FAILED, JobStatus.STOPPED, JobStatus.SUCCEEDED}, 900) == JobStatus.SUCCEEDED, \
        client.get_job_logs(job)[-3000:]
    assert {name: (run / "complete" / "models" / name / "_SUCCESS").stat().st_mtime_ns
            for name in models[:2]} == written_before, "a finished model was generated again"
    for name in models:
        resumed = sorted(rows(run / "complete" / "models" / name), key=lambda r: r["prompt_id"])
        straight = sorted(rows(run_dir / "complete" / "models" / name), key=lambda r: r["prompt_id"])
        assert resumed == straight, name
        assert not list((run / "complete" / "models").glob(f".{name}.tmp-*"))
    record_reliability("fault", "the job's driver SIGKILLed mid-stage (complete, after its first pool model)",
                       f"the resubmitted job skipped the 2 finished models (written side by side), cleared the "
                       f"half-written one and generated the rest ({len(models) - 2} of {len(models)} models); rows "
                       "identical to an uninterrupted run "
                       "(per-row seeds)",
                       "nothing: every prompt once per model, no duplicate, no .tmp output left")


@pytest.fixture(scope="module")
def a100_cluster():
    """A Ray cluster of four nodes on this machine (``ray.cluster_utils.Cluster``, as Ray's own tests build one): a
    head, two nodes that stand in for GPU nodes by Ray's ``accelerator_type:A100`` resource (which GPU nodes carry)
    and a node of the worker group ``cpu`` (Ray's ``ray.io/node-group`` label, which an autoscaler gives a node of
    that type). Ray's state API (which node ran each task and actor) is served by the head's dashboard."""
    from types import SimpleNamespace

    from ray.cluster_utils import Cluster

    dashboard, started = free_port(), time.time()
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 3, "include_dashboard": True, "dashboard_port": dashboard, "env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        nodes = [cluster.add_node(num_cpus=2, resources={"accelerator_type:A100": 1}) for _ in range(2)]
        cpu_node = cluster.add_node(num_cpus=2, labels={"ray.io/node-group": "cpu"})
        cluster.wait_for_nodes()
        yield SimpleNamespace(cluster=cluster, nodes=nodes, cpu_node=cpu_node, state=f"http://127.0.0.1:{dashboard}")
    finally:
        cluster.shutdown()
        kill_orphaned_engine_processes(since=started)


def kill_orphaned_engine_processes(since: float) -> None:
    """vLLM processes left without a parent since ``since``. ``Cluster.remove_node`` kills a node's raylet and
    workers, but an engine-core process that an engine actor spawned there outlives it here (seen: one still
    loading its model when the node went, 1.2 GB and a little CPU for the rest of the test run); on a real cluster
    the machine goes with its node."""
    import psutil

    for process in psutil.process_iter(["name", "ppid", "create_time"]):
        if (process.info["name"] or "").startswith("VLLM::") and process.info["ppid"] == 1 \
                and process.info["create_time"] >= since:
            process.kill()


def complete_on_a100s(few, tmp_path: Path, batch_size: int = 2,
                      max_tokens: int | None = None) -> tuple[Path, Path, str]:
    """(recipe, run dir, model): the single-node run's recipe with its first pool model on two engine replicas pinned
    to A100 nodes, in batches of ``batch_size`` rows, and its CPU work on the ``cpu`` worker group; the second pool
    model is copied as done (a resumed run skips it)."""
    _, run_dir = few
    data = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    data["hardware"]["cpu_node_group"] = "cpu"
    model = data["complete"]["models"][0]
    model["engine"].update(concurrency=2, accelerator_type="A100", batch_size=batch_size)
    if max_tokens:
        model.setdefault("sampling", {})["max_tokens"] = max_tokens
    data["complete"]["models"] = data["complete"]["models"][:2]
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    done = data["complete"]["models"][1]["name"]
    shutil.copytree(run_dir / "complete" / "models" / done, run / "complete" / "models" / done)
    return recipe_path, run, model["name"]


def engine_actors(state_url: str, alive_only: bool = False) -> list:
    from ray.util.state import list_actors

    filters = [("state", "=", "ALIVE")] if alive_only else None
    return [a for a in list_actors(address=state_url, filters=filters, detail=True, limit=10_000)
            if "vLLMEngineStageUDF" in (a.class_name or "")]


def work_by_node(cluster: Any, job_id: str) -> tuple[set[str], set[str]]:
    """(what ran on the A100 nodes, what ran on the CPU node) for one job: the names of its tasks and actors, an
    actor's method calls under its class name."""
    from ray.util.state import list_actors, list_tasks

    gpu_nodes = {n.node_id for n in cluster.nodes}
    placed = [(a.node_id, a.class_name) for a in list_actors(address=cluster.state, detail=True, limit=10_000,
                                                             filters=[("job_id", "=", job_id)])]
    placed += [(t.node_id, t.name.split(".")[0] if t.type == "ACTOR_TASK" else t.name)
               for t in list_tasks(address=cluster.state, detail=True, limit=10_000, filters=[("job_id", "=", job_id)])
               if t.type != "ACTOR_CREATION_TASK"]
    return ({name for node, name in placed if node in gpu_nodes},
            {name for node, name in placed if node == cluster.cpu_node.node_id})


def stage_command(recipe_path: Path, run: Path, address: str) -> list[str]:
    return [sys.executable, "-m", "zephyr_ray.cli", "stage", "complete", str(recipe_path), "--run-dir", str(run),
            "--address", address]


def test_engine_replicas_spread_over_two_nodes_and_write_the_single_node_rows(few, a100_cluster, tmp_path):
    """complete with two engine replicas pinned to A100 nodes and ``hardware.cpu_node_group: cpu``: the replicas run
    on both A100 nodes, nothing else of the stage does (reads, validation, dedupe shuffle, prompt tokens, writes run on
    the CPU node), and every row equals the single-node run's. Ray Data starts feeding rows as soon as one engine is
    up, so a short pass on a busy machine can end before the second replica is placed (CI run 14): the stage here waits
    for the whole pool first (Ray Data's ``wait_for_min_actors_s``, which a user who wants every replica busy sets)."""
    recipe_path, run, name = complete_on_a100s(few, tmp_path)
    shown = subprocess.run(stage_command(recipe_path, run, a100_cluster.cluster.address), cwd=REPO,
                           capture_output=True, text=True, timeout=900,
                           env={**os.environ, "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "600"})
    assert shown.returncode == 0, shown.stdout[-3000:] + shown.stderr[-3000:]
    engines = engine_actors(a100_cluster.state)
    assert len({a.actor_id for a in engines}) == 2, [(a.class_name, a.state) for a in engines]
    assert {a.node_id for a in engines} == {n.node_id for n in a100_cluster.nodes}, "one replica on each A100 node"
    on_gpu_nodes, on_cpu_node = work_by_node(a100_cluster, job_id=engines[0].job_id)
    assert on_gpu_nodes == {"MapWorker(MapBatches(vLLMEngineStageUDF))"}, on_gpu_nodes
    missing = [kind for kind in ("Read", "HashShuffleAggregator", "_preprocess", "Write")  # _preprocess: prompt ids
               if not any(kind in name for name in on_cpu_node)]
    assert not missing, f"{missing} not seen on the CPU node: {on_cpu_node}"
    _, run_dir = few
    by_prompt = lambda rows_: sorted(rows_, key=lambda r: r["prompt_id"])  # noqa: E731
    assert by_prompt(rows(run / "complete" / "models" / name)) == by_prompt(
        rows(run_dir / "complete" / "models" / name))


def test_binarize_runs_on_the_cpu_node_while_gpu_nodes_sit_idle(few, a100_cluster, tmp_path):
    """binarize (read, group-by shuffle, pairing, writes: no engine) with ``hardware.cpu_node_group: cpu`` on the
    four-node cluster: every task and actor of its job runs on the CPU node, although the idle A100 nodes have free
    CPUs that Ray would otherwise spread to; its pairs equal the single-node run's."""
    from ray.util.state import list_jobs

    recipe_path, run, _ = complete_on_a100s(few, tmp_path)
    _, run_dir = few
    shutil.copytree(run_dir / "judge", run / "judge")
    before = {j.job_id for j in list_jobs(address=a100_cluster.state)}
    command = stage_command(recipe_path, run, a100_cluster.cluster.address)
    command[command.index("complete")] = "binarize"
    shown = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert shown.returncode == 0, shown.stdout[-3000:] + shown.stderr[-3000:]
    (job,) = {j.job_id for j in list_jobs(address=a100_cluster.state)} - before
    on_gpu_nodes, on_cpu_node = work_by_node(a100_cluster, job_id=job)
    assert on_gpu_nodes == set(), on_gpu_nodes
    assert any("HashShuffleAggregator" in name for name in on_cpu_node), on_cpu_node
    assert any("Write" in name for name in on_cpu_node), on_cpu_node
    by_prompt = lambda rows_: sorted(rows_, key=lambda r: r["prompt_id"])  # noqa: E731
    assert by_prompt(rows(run / "binarize" / "preferences")) == by_prompt(rows(run_dir / "binarize" / "preferences"))


@pytest.mark.fault
@pytest.mark.reliability("fault", "a worker node removed mid-stage (complete, two engine replicas on two nodes)")
def test_a_node_lost_mid_stage_costs_no_row(few, a100_cluster, tmp_path):
    """The A100 node of the first engine replica up is removed (its raylet and every process on it killed) while
    complete runs, and a fresh A100 node joins, as an autoscaler replaces a lost node: the stage finishes (the lost
    engine restarted elsewhere, its batches retried) or, if the job died with the node, a resubmitted stage resumes;
    either way every prompt is answered exactly once. One-row batches of up to 256 tokens keep the pass running well
    past the first engine's start."""
    recipe_path, run, name = complete_on_a100s(few, tmp_path, batch_size=1, max_tokens=256)
    log = tmp_path / "stage.log"
    with open(log, "w") as out:
        job = subprocess.Popen(stage_command(recipe_path, run, a100_cluster.cluster.address), cwd=REPO,
                               stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while not (engines := engine_actors(a100_cluster.state, alive_only=True)):
        assert job.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "no engine replica came up"
        time.sleep(0.5)
    victim = next(n for n in a100_cluster.nodes if n.node_id == engines[0].node_id)
    # the node goes first (killing a raylet takes no time; starting one takes seconds, in which a pass on a busy
    # machine has been seen to finish), then capacity comes back as the autoscaler would bring it: a fresh A100
    # node, where the lost engine restarts
    a100_cluster.cluster.remove_node(victim, allow_graceful=False)
    a100_cluster.nodes.remove(victim)
    assert not (run / "complete" / "models" / name / "_SUCCESS").exists(), "the pass ended before the node was lost"
    a100_cluster.nodes.append(a100_cluster.cluster.add_node(num_cpus=2, resources={"accelerator_type:A100": 1}))
    outcome = "the stage finished: the lost engine restarted on another node, its batches retried"
    if job.wait(timeout=900) != 0:
        outcome = "the stage died with the node; resubmitted, it resumed"
        again = subprocess.run(stage_command(recipe_path, run, a100_cluster.cluster.address), cwd=REPO,
                               capture_output=True, text=True, timeout=900)
        assert again.returncode == 0, log.read_text()[-2000:] + again.stdout[-2000:] + again.stderr[-2000:]
    _, run_dir = few
    written = rows(run / "complete" / "models" / name)
    single = rows(run_dir / "complete" / "models" / name)  # (longer answers here: the prompts are the same)
    assert len({r["prompt_id"] for r in written}) == len(written), "a prompt was answered twice"
    assert sorted(r["prompt_id"] for r in written) == sorted(r["prompt_id"] for r in single)
    assert not list((run / "complete" / "models").glob(f".{name}.tmp-*"))
    record_reliability("fault", "a worker node removed mid-stage (complete, two engine replicas on two nodes)",
                       f"{outcome}; {len(written)} of {len(single)} prompts answered, each once",
                       "nothing: every prompt once, no duplicate, no .tmp output left")
