"""dSFT and dDPO on Ray Train with TRL under DeepSpeed ZeRO-3, on 2 CPU workers and the tiny models.

The training data are the tiny corpus' dialogues (the teacher's own), as a finished `synthesize` output; the
preference pairs are each reply against a shuffled copy of it. The first 12 dialogues are held out of both, so
32 train: four global batches of 8 an epoch, whole on any number of ranks.
"""

import json
import random
from pathlib import Path

import pytest
import yaml
from conftest import record_reliability

from zephyr_ray.config import load_recipe
from zephyr_ray.data import DialogueRow, PreferenceRow, prompt_id_of, write_parquet_atomic
from zephyr_ray.stages import run_stage
from zephyr_ray.tiny import load_corpus

REPO = Path(__file__).resolve().parents[1]
HELD_OUT = 12
pytestmark = [pytest.mark.engine, pytest.mark.timeout(1800)]


def turns(row: dict) -> list[dict]:
    return [m for m in row["messages"] if m["role"] != "system"]


def spoiled_pair(row: dict, rng: random.Random) -> dict:
    chat = turns(row)
    words = chat[-1]["content"].split()
    rng.shuffle(words)
    prompt = chat[0]["content"]
    return {"prompt": prompt, "prompt_id": prompt_id_of(prompt), "chosen": chat,
            "rejected": [*chat[:-1], {"role": "assistant", "content": " ".join(words)}], "messages": chat,
            "score_chosen": 2.0, "score_rejected": 1.0, "chosen_model": "corpus", "rejected_model": "shuffled",
            "judge": "construction", "num_scored": 2}


@pytest.fixture(scope="module")
def trained(tiny_models, ray_local, tmp_path_factory):
    """train_sft then train_dpo on the session's Ray, ZeRO-3 with 2 workers. train_sft runs as a user runs a stage
    (`zephyr-ray stage`, in its own process) and one of its workers is SIGKILLed after the first checkpoint (the
    fault test below): one training run serves the fault test and every test of what training makes."""
    import os
    import signal
    import sys

    import ray

    tmp = tmp_path_factory.mktemp("train")
    corpus = load_corpus()
    rng = random.Random(0)
    run_dir = tmp / "run"
    dialogues = [{"prompt": turns(r)[0]["content"], "prompt_id": prompt_id_of(turns(r)[0]["content"]),
                  "messages": turns(r)} for r in corpus[HELD_OUT:]]
    write_parquet_atomic(ray.data.from_items(dialogues), run_dir / "synthesize" / "dialogues",
                         schema=DialogueRow.arrow_schema())
    pairs = [spoiled_pair(r, rng) for r in corpus]
    write_parquet_atomic(ray.data.from_items(pairs[HELD_OUT:]), run_dir / "binarize" / "preferences",
                         schema=PreferenceRow.arrow_schema())
    text = (REPO / "jobs" / "configs" / "tiny-cpu.yaml").read_text()
    # model paths relative to the command's directory, as the shipped recipe writes them (Ray Train runs its workers
    # in a directory of its own: a relative student path once led them nowhere)
    data = yaml.safe_load(text.replace("./artifacts/tiny-models", os.path.relpath(tiny_models["teacher"].parent, REPO)))
    # the whole dialogues (the tiny recipe trains the assistant's turns only: its user simulator's are garbled; these
    # are the teacher's own, whose held-out loss falls as the student learns the chat; on the replies alone 8 epochs
    # of them overfit, CI run 18)
    # with a weight decay, as TRL passes it (trl_args): a resume that loses the no-decay group's setting (DeepSpeed's
    # ZeRO-3 universal loader gives every group the first one's) trains differently from the run that kept its ranks
    data["train_sft"].update(num_epochs=8, learning_rate=2.0e-3, save_steps=10, max_failures=2,
                             assistant_only_loss=False, trl_args={"weight_decay": 0.05})
    data["train_dpo"].update(num_epochs=3, save_steps=25, max_failures=0)
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(data))
    recipe = load_recipe(tmp / "recipe.yaml")

    log_path = tmp / "train_sft.log"
    command = [sys.executable, "-m", "zephyr_ray.cli", "stage", "train_sft", str(tmp / "recipe.yaml"), "--run-dir",
               str(run_dir), "--address", ray_local.address]
    job = start_until_checkpoint(command, run_dir, log_path,  # its build cache empty, as on a fresh machine
                                 env={**os.environ, "ZEPHYR_RAY_CACHE": str(tmp / "fresh-cache")})
    victim = next(line["pid"] for line in attempts(run_dir, "train_sft") if line["rank"] == 1)
    os.kill(victim, signal.SIGKILL)
    assert job.wait(timeout=900) == 0, log_path.read_text()[-3000:]
    results = {stage: run_stage(stage, recipe, run_dir) for stage in ("train_sft", "train_dpo")}
    assert results["train_sft"].skipped, "the killed-and-resumed train_sft finished: nothing to redo"
    return recipe, run_dir, results, pairs[:HELD_OUT]


def test_zero3_on_cpu_compiles_nothing_on_a_fresh_machine(trained):
    """train_sft ran with an empty build cache: DeepSpeed's shared-memory all-reduce (an inference kernel, which
    ZeRO training never calls) was not compiled, nor any other op, and the stage finished (it was killed and resumed
    on the way)."""
    _, run_dir, _, _ = trained
    cache = run_dir.parent / "fresh-cache"
    built = sorted(str(path.relative_to(cache)) for path in cache.rglob("*") if path.is_file())
    assert built == [], f"DeepSpeed built ops on the first training: {built}"
    assert (run_dir / "train_sft" / "model" / "_SUCCESS").exists()


def attempts(run_dir: Path, stage: str) -> list[dict]:
    return [json.loads(line) for path in sorted((run_dir / stage / "attempts").glob("rank*.jsonl"))
            for line in path.read_text().splitlines()]


@pytest.mark.parametrize("stage", ["train_sft", "train_dpo"])
def test_zero3_gives_each_of_two_ranks_about_half_the_parameters(trained, stage):
    """Every attempt of each rank (train_sft's second attempt is the resume after the killed worker)."""
    _, run_dir, _, _ = trained
    lines = attempts(run_dir, stage)
    first = [line for line in lines if line["global_step_at_start"] == 0]
    assert sorted(line["rank"] for line in first) == [0, 1] and all(line["world_size"] == 2 for line in lines)
    for line in lines:
        assert 0.45 <= line["params_held"] / line["params_total"] <= 0.55, line
    # each rank's memory, measured when its training ended (the last attempt's)
    memory = [json.loads((run_dir / stage / "attempts" / f"rank{rank}-memory.json").read_text()) for rank in (0, 1)]
    for record in memory:
        assert record["peak_rss_mib"] > record["rss_before_model_mib"] > 100, record
        # where it went: the start of training (with the peak of loading and partitioning), the first step
        assert record["peak_rss_mib"] >= record["peak_rss_at_train_begin_mib"] >= record["rss_at_train_begin_mib"]
        assert record["peak_rss_mib"] >= record["rss_after_first_step_mib"] > 100, record
        assert record["accelerator_peak_mib"] is None and record["global_step"] > 0, record


def held_out_loss(model_dir: Path, chats: list[list[dict]], assistant_only: bool) -> float:
    """Mean token loss of ``chats`` rendered with the model's own chat template, on the tokens SFT trains: every
    token, or with ``assistant_only`` the assistant's (the template's generation mask)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
    losses = []
    for chat in chats:
        rendered = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True,
                                                 return_assistant_tokens_mask=assistant_only)
        ids = rendered["input_ids"]
        labels = ids
        if assistant_only:
            mask = torch.as_tensor(rendered["assistant_masks"]).reshape(1, -1)
            labels = ids.masked_fill(mask == 0, -100)
        with torch.no_grad():
            losses.append(model(input_ids=ids, labels=labels).loss.item())
    return sum(losses) / len(losses)


def test_sft_lowers_held_out_loss_and_exports_a_plain_hf_model(trained, tiny_models):
    recipe, run_dir, results, _ = trained
    model = run_dir / "train_sft" / "model"
    assert results["train_sft"].outputs["model"] == str(model)
    held_out = [turns(r) for r in load_corpus()[:HELD_OUT]]
    only = recipe.train_sft.assistant_only_loss
    before, after = held_out_loss(tiny_models["student"], held_out, only), held_out_loss(model, held_out, only)
    assert after < 0.9 * before, (before, after)
    config = json.loads((model / "config.json").read_text())
    generation = json.loads((model / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"]
    assert not list(model.glob("*.bin")) and (model / "model.safetensors").is_file()
    card = (model / "README.md").read_text()
    assert "train_sft" in card and "dialogues" in card and '"loss"' in card
    metrics = json.loads((run_dir / "train_sft" / "metrics.json").read_text())
    assert metrics["epoch"] == pytest.approx(recipe.train_sft.num_epochs)


def test_exported_sft_model_chats_through_vllm_and_stops_at_eos(trained):
    from zephyr_ray.config import Hardware
    from zephyr_ray.engines import local_llm

    _, run_dir, _, _ = trained
    from vllm import SamplingParams

    llm = local_llm(str(run_dir / "train_sft" / "model"), Hardware(accelerator="cpu"), max_model_len=512,
                    kv_cache_gib=0.5)
    prompts = [[turns(r)[0]] for r in load_corpus()[:HELD_OUT]]
    outputs = llm.chat(prompts, SamplingParams(temperature=0.0, max_tokens=128), use_tqdm=False)
    stopped = [o.outputs[0].finish_reason == "stop" for o in outputs]
    assert sum(stopped) >= HELD_OUT // 2, f"only {sum(stopped)} of {HELD_OUT} replies ended at </s>"
    assert all("<|user|>" not in o.outputs[0].text for o in outputs), [o.outputs[0].text for o in outputs]


def test_dpo_prefers_held_out_chosen_replies_and_logs_its_metrics(trained):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe, run_dir, _, held_out_pairs = trained
    metrics = json.loads((run_dir / "train_dpo" / "metrics.json").read_text())
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(metrics)
    policy_dir, reference_dir = run_dir / "train_dpo" / "model", run_dir / "train_sft" / "model"
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir)

    def reply_logp(model, chat: list[dict]) -> float:
        prompt = tokenizer.apply_chat_template(chat[:-1], add_generation_prompt=True, return_dict=True)["input_ids"]
        full = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=full).logits[0, :-1]
        logps = torch.log_softmax(logits, -1).gather(-1, full[0, 1:, None])[:, 0]
        return logps[len(prompt) - 1:].sum().item()

    def reward(chat: list[dict]) -> float:
        return recipe.train_dpo.beta * (reply_logp(policy, chat) - reply_logp(reference, chat))

    wins = [reward(p["chosen"]) > reward(p["rejected"]) for p in held_out_pairs]
    assert sum(wins) / len(wins) > 0.5, wins


def sft_stage(trained, tmp_path: Path, address: str, **train_sft) -> tuple[Path, list[str]]:
    """(run dir, command): a new run holding the trained fixture's dialogues, and the `zephyr-ray stage train_sft`
    command that trains it on the Ray at ``address`` with the fixture's recipe, ``train_sft`` changed."""
    import shutil
    import sys

    _, run_dir, _, _ = trained
    data = yaml.safe_load((run_dir.parent / "recipe.yaml").read_text())
    data["train_sft"].update(train_sft)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    shutil.copytree(run_dir / "synthesize", run / "synthesize")
    return run, [sys.executable, "-m", "zephyr_ray.cli", "stage", "train_sft", str(tmp_path / "recipe.yaml"),
                 "--run-dir", str(run), "--address", address]


def registered_checkpoints(run: Path) -> int:
    """Checkpoints Ray Train has registered for a train_sft run (a checkpoint-* directory may be half-written)."""
    try:
        snapshot = run / "train_sft" / "ray" / "train_sft" / "checkpoint_manager_snapshot.json"
        return len(json.loads(snapshot.read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):
        return 0


def start_until_checkpoint(command: list[str], run: Path, log_path: Path, env: dict | None = None):
    """Start a `zephyr-ray stage train_sft` command (its output to ``log_path``); return its process once Ray Train
    has registered the run's first checkpoint."""
    import subprocess
    import time

    with open(log_path, "w") as log:
        job = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    deadline = time.time() + 600
    while not registered_checkpoints(run):
        assert job.poll() is None, log_path.read_text()[-3000:]
        assert time.time() < deadline, "no checkpoint was ever reported"
        time.sleep(0.2)
    return job


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.fault
@pytest.mark.reliability("fault", "a Ray Train worker SIGKILLed mid-epoch (train_sft, ZeRO-3, 2 workers)")
def test_a_killed_training_worker_resumes_from_the_checkpoint(trained):
    """The fixture's train_sft had rank 1's worker SIGKILLed after the first checkpoint: Ray Train restarted the
    group, the workers resumed at the checkpoint's step (not 0), and the stage finished with every step trained
    once, each checkpoint written once."""
    _, run, _, _ = trained
    lines = attempts(run, "train_sft")
    starts = {rank: [line["global_step_at_start"] for line in lines if line["rank"] == rank] for rank in (0, 1)}
    assert all(len(steps) == 2 and steps[0] == 0 and steps[1] > 0 for steps in starts.values()), starts
    assert starts[0][1] % 10 == 0 and starts[0][1] < lines[0]["max_steps"], starts
    metrics = json.loads((run / "train_sft" / "metrics.json").read_text())
    assert metrics["step"] == lines[0]["max_steps"]
    assert (run / "train_sft" / "model" / "model.safetensors").is_file()
    # checkpoints written once: the run's storage holds the kept checkpoints (save_total_limit, 2) and little else,
    # though 8 were saved by 2 ranks; each sits where the ranks wrote it
    saves = lines[0]["max_steps"] // 10 + (lines[0]["max_steps"] % 10 > 0)
    storage = run / "train_sft" / "ray"
    kept = sorted((storage / "train_sft" / "hf").glob("checkpoint-*"))
    assert saves >= 4 and len(kept) == 2, (saves, kept)
    one = max(directory_bytes(k) for k in kept)
    assert directory_bytes(storage) <= 1.1 * 2 * one, (directory_bytes(storage), one)
    snapshot = storage / "train_sft" / "checkpoint_manager_snapshot.json"
    registered = [c["checkpoint_dir_name"] for c in json.loads(snapshot.read_text())["checkpoint_results"]]
    assert sorted(registered) == [f"hf/{k.name}" for k in kept], registered
    record_reliability("fault", "a Ray Train worker SIGKILLed mid-epoch (train_sft, ZeRO-3, 2 workers)",
                       f"Ray Train restarted the worker group; both ranks resumed at step {starts[0][1]} (the last "
                       f"checkpoint), not 0; finished at step {metrics['step']} of {lines[0]['max_steps']}",
                       f"nothing: the {starts[0][1]} checkpointed steps were not redone, no step was skipped")


def test_training_metrics_show_on_the_ray_metrics_endpoint(trained, ray_local):
    """Rank 0 published each logged step; the metrics actor keeps the last values after the workers exit."""
    import time
    import urllib.request

    _, run_dir, _, _ = trained
    final = json.loads((run_dir / "train_dpo" / "metrics.json").read_text())
    wanted = {("train_sft", "loss"), ("train_dpo", "loss"), ("train_dpo", "rewards/margins"),
              ("train_dpo", "rewards/accuracies"), ("train_dpo", "step")}
    deadline = time.time() + 60
    while True:
        text = urllib.request.urlopen(ray_local.metrics_url, timeout=30).read().decode()
        seen = {}
        for line in text.splitlines():
            if line.startswith("ray_zephyr_train_metric{"):
                labels = dict(part.split("=", 1) for part in line[line.index("{") + 1:line.index("}")].split(","))
                seen[(labels["stage"].strip('"'), labels["name"].strip('"'))] = float(line.rsplit(" ", 1)[1])
        if wanted <= set(seen) or time.time() > deadline:
            break
        time.sleep(2)
    assert wanted <= set(seen), sorted(seen)
    assert seen[("train_dpo", "step")] == final["step"]
    assert seen[("train_dpo", "rewards/margins")] == pytest.approx(final["rewards/margins"], rel=1e-4)


def test_the_report_shows_the_loss_curves_and_dpo_margins_in_a_browser(trained, tmp_path):
    from conftest import render_page

    from zephyr_ray.report import write_report

    _, run_dir, _, _ = trained
    history = json.loads((run_dir / "train_dpo" / "log_history.json").read_text())
    steps = [row["step"] for row in history if "loss" in row]
    assert steps == list(range(1, len(steps) + 1))
    assert steps[-1] == json.loads((run_dir / "train_dpo" / "metrics.json").read_text())["step"]
    report = write_report(run_dir, tmp_path / "report.html")
    images = render_page(report.as_uri(), tmp_path / "report.png")
    assert [alt for alt, _ in images] == ["Data funnel", "Training", "Timings"]
    assert all(width > 300 for _, width in images), images
    text = report.read_text()
    assert "binarize has not run yet" in text and "no evaluation has run yet" in text


@pytest.mark.fault
@pytest.mark.reliability("fault", "a worker node removed mid-training (train_sft, ZeRO-3, 2 ranks on 2 nodes)")
def test_two_ranks_on_two_nodes_survive_losing_a_node_and_write_each_checkpoint_once(trained, tmp_path):
    """train_sft with its 2 workers on 2 nodes of a Ray cluster on this machine (``ray.cluster_utils.Cluster``: one
    CPU per worker node and none on the head, so the ranks cannot share a node), the run directory standing in for
    the shared NFS/EFS storage. After the first checkpoint, rank 1's node is removed (its raylet and processes
    killed): one node's CPU cannot hold the group, so training waits until a fresh node joins (capacity returning,
    as an autoscaler brings it), then both ranks resume from the checkpoint. ZeRO-3 across the nodes, every
    checkpoint written once (the storage holds the kept ones and little else), the exported model complete."""

    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        run, command = sft_stage(trained, tmp_path, cluster.address, num_epochs=4, save_steps=5, max_failures=2)
        job = start_until_checkpoint(command, run, tmp_path / "stage.log")
        rank1_node = next(line["node_id"] for line in attempts(run, "train_sft") if line["rank"] == 1)
        cluster.remove_node(next(n for n in nodes if n.node_id == rank1_node), allow_graceful=False)
        fresh = cluster.add_node(num_cpus=1)
        finished = job.wait(timeout=900)
    finally:
        cluster.shutdown()
    assert finished == 0, (tmp_path / "stage.log").read_text()[-3000:]
    lines = attempts(run, "train_sft")
    starts = {rank: [line["global_step_at_start"] for line in lines if line["rank"] == rank] for rank in (0, 1)}
    assert all(len(steps) == 2 and steps[0] == 0 and steps[1] > 0 for steps in starts.values()), starts
    assert starts[0][1] % 5 == 0, starts
    first, second = ([[line for line in lines if line["rank"] == rank][attempt] for rank in (0, 1)] for attempt in (0, 1))
    assert all(len({line["node_id"] for line in attempt}) == 2 for attempt in (first, second)), "ranks on 2 nodes"
    assert fresh.node_id in {line["node_id"] for line in second}, "the resumed group used the node that joined"
    assert all(0.45 <= line["params_held"] / line["params_total"] <= 0.55 for line in lines)
    metrics = json.loads((run / "train_sft" / "metrics.json").read_text())
    assert metrics["step"] == lines[0]["max_steps"]
    saves = -(-lines[0]["max_steps"] // 5)
    kept = sorted((run / "train_sft" / "ray" / "train_sft" / "hf").glob("checkpoint-*"))
    assert saves >= 4 and len(kept) == 2, (saves, kept)
    storage = directory_bytes(run / "train_sft" / "ray")
    assert storage <= 1.1 * 2 * max(directory_bytes(k) for k in kept), storage
    assert (run / "train_sft" / "model" / "model.safetensors").is_file()
    record_reliability("fault", "a worker node removed mid-training (train_sft, ZeRO-3, 2 ranks on 2 nodes)",
                       f"the worker group failed with the node; one node's CPU could not hold it, so it restarted "
                       f"when a fresh node joined: both ranks resumed at step "
                       f"{starts[0][1]} (the last checkpoint) on 2 nodes and finished at step {metrics['step']}",
                       f"nothing: the {starts[0][1]} checkpointed steps were not redone, no step was skipped")


@pytest.mark.fault
@pytest.mark.reliability("fault", "a training job stopped after a checkpoint, resubmitted on fewer workers "
                                  "(train_sft, ZeRO-3, 2 -> 1)")
def test_a_job_resubmitted_on_fewer_workers_trains_as_the_run_that_kept_them(trained, tmp_path, ray_local):
    """A node is lost for good: the user stops the job after its first checkpoint and submits it again with
    `num_workers: 1`. DeepSpeed cannot load two ranks' ZeRO-3 shards into one, so the stage converts the checkpoint
    to DeepSpeed's universal format and resumes from it: at the checkpoint's step, with its optimizer state and the
    same rows per step (the recipe's global batch), every later step's loss and the final weights those of the
    fixture's run, which trained the same recipe on 2 ranks throughout (its own resume was at the same size). The
    recipe has a weight decay, which the trainer leaves off the norm weights: the resume keeps it so."""
    import subprocess
    import time

    import psutil
    import torch
    from safetensors.torch import load_file

    _, reference, _, _ = trained
    run, command = sft_stage(trained, tmp_path, ray_local.address)
    job = start_until_checkpoint(command, run, tmp_path / "two-ranks.log")
    job.kill()
    job.wait()
    deadline = time.time() + 120
    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    while any(alive(line["pid"]) for line in attempts(run, "train_sft")):
        assert time.time() < deadline, "the stopped job's workers never exited"
        time.sleep(0.5)
    data = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    data["hardware"]["num_workers"] = 1
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    lines = attempts(run, "train_sft")
    first = [line for line in lines if line["world_size"] == 2]
    (last,) = [line for line in lines if line["world_size"] == 1]
    assert sorted(line["rank"] for line in first) == [0, 1] and len(lines) == 3, lines
    assert last["global_step_at_start"] % 10 == 0 and 0 < last["global_step_at_start"] < last["max_steps"], last
    assert last["params_held"] == last["params_total"], "one rank holds every parameter"

    def losses(run_dir: Path) -> dict[int, float]:
        history = json.loads((run_dir / "train_sft" / "log_history.json").read_text())
        return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}

    ours, theirs = losses(run), losses(reference)
    assert sorted(ours) == sorted(theirs) == list(range(1, last["max_steps"] + 1))
    after = range(last["global_step_at_start"] + 1, last["max_steps"] + 1)
    worst = max(abs(ours[step] - theirs[step]) / abs(theirs[step]) for step in after)
    assert worst < 1e-5, {step: (ours[step], theirs[step]) for step in after}
    weights, expected = (load_file(d / "train_sft" / "model" / "model.safetensors") for d in (run, reference))
    drift = max((weights[name] - expected[name]).abs().max().item() for name in expected)
    assert drift < 1e-5 and set(weights) == set(expected), drift
    assert torch.isfinite(weights["lm_head.weight"]).all()
    record_reliability("fault", "a training job stopped after a checkpoint, resubmitted on fewer workers "
                                "(train_sft, ZeRO-3, 2 -> 1)",
                       f"the step-{last['global_step_at_start']} checkpoint of 2 ranks loaded into 1 as a universal "
                       f"checkpoint; steps {after.start}-{after.stop - 1} trained with the loss of the run that kept "
                       f"its 2 ranks (largest relative difference {worst:.1e}), final weights within {drift:.1e}",
                       "nothing: no step redone or skipped, the optimizer state carried over")


@pytest.mark.reliability("hostile input", "a training job resubmitted with another zero_stage (or world size) than "
                                          "its checkpoint's")
def test_a_checkpoint_loads_on_any_world_size_and_names_the_zero_stages_that_cannot_load_it(trained):
    """What a resubmitted job does with the fixture's checkpoints (2 ranks, ZeRO-3), read as its workers read them:
    the same group loads them as saved, another world size as a universal checkpoint (the test above trains through
    that), and a recipe edited to ZeRO-1/2 or to no DeepSpeed, whose loaders cannot read ZeRO-3's state, is refused
    with the checkpoint's path, its stage and what to do, before DeepSpeed asserts or training resumes without its
    optimizer state. (Every stage to every stage, on checkpoints written in DeepSpeed's format: test_train_options.py;
    ZeRO-1 -> ZeRO-2 on another world size resumed by hand with every loss equal: README.)"""
    from zephyr_ray.train.loop import saved_deepspeed_layout, universal_needed

    _, run, _, _ = trained
    for stage in ("train_sft", "train_dpo"):
        checkpoints = sorted((run / stage / "ray" / stage / "hf").glob("checkpoint-*"),
                             key=lambda path: int(path.name.split("-")[1]))
        assert checkpoints, stage
        latest = checkpoints[-1]
        assert saved_deepspeed_layout(latest) == (2, 3)
        assert [universal_needed(latest, world, 3) for world in (2, 1, 4)] == [False, True, True]
        for zero_stage in (0, 1, 2):
            with pytest.raises(ValueError) as refused:
                universal_needed(latest, 2, zero_stage)
            said = str(refused.value)
            assert said.startswith(f"{latest}: this checkpoint holds ZeRO stage 3's state and the recipe now says "
                                   f"zero_stage {zero_stage}; ZeRO-3 and "), said
            assert f"set zero_stage back to 3, or remove the stage's checkpoints ({run / stage / 'ray' / stage}) to " \
                   "train from the start" in said, said
    record_reliability("hostile input", "a training job resubmitted with another zero_stage (or world size) than "
                                        "its checkpoint's",
                       "a ZeRO-3 checkpoint of 2 ranks (train_sft and train_dpo): loaded as saved by 2 ranks, as a "
                       "universal checkpoint by 1 or 4; zero_stage 0, 1 and 2 refused with the checkpoint's path, "
                       "its stage and the two ways on",
                       "nothing: the checkpoints are untouched, no step trains without its optimizer state")
