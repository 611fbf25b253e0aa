"""`zephyr-ray plan`: the shipped 7B recipe on the shipped cluster, and the problems plan must find."""

import json
import re
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from zephyr_ray.config import load_recipe
from zephyr_ray.plan import cluster_from_yaml, model_parameters, plan_json, plan_markdown, plan_recipe

SEVEN_B = REPO / "jobs" / "configs" / "zephyr-7b.yaml"


def plan_of(recipe_path, cluster_path=REPO / "cluster.yaml"):
    return plan_recipe(load_recipe(recipe_path), cluster_from_yaml(cluster_path))


def test_the_7b_recipe_on_the_shipped_cluster_uses_every_gpu_and_has_no_problem():
    shown = subprocess.run([sys.executable, "-m", "zephyr_ray.cli", "plan", str(SEVEN_B), "--cluster",
                            str(REPO / "cluster.yaml"), "--json"], capture_output=True, text=True, cwd=REPO, check=True)
    planned = json.loads(shown.stdout)
    stages = {s["stage"]: s for s in planned["stages"]}
    assert list(stages) == ["synthesize", "train_sft", "complete", "judge", "binarize", "train_dpo", "evaluate"]
    for stage in stages.values():
        assert {"stage", "gpus_used", "gpus_available", "hours", "cost_usd", "problems"} <= set(stage)
        assert stage["problems"] == [], (stage["stage"], stage["problems"])
        assert stage["gpus_available"] == 16
    assert all(stages[s]["gpus_used"] == 16 for s in ("train_sft", "complete", "train_dpo"))
    assert stages["judge"]["gpus_used"] == 0 and stages["binarize"]["gpus_used"] == 0  # GPT-4 judge: HTTP only
    assert 0 < planned["total"]["hours"] < 24 and planned["total"]["cost_usd"] > 0
    # UltraFeedback's 61,135 prompts x 4 models, judged by gpt-4 at OpenAI's prices: the judge is the big bill
    assert stages["judge"]["cost_usd"] > 10 * stages["train_sft"]["cost_usd"]
    assert all(value["source"] for value in planned["assumptions"].values())


def test_plan_prints_each_stage_and_the_totals_as_the_docs_tell_users_to_run_it():
    """`zephyr-ray plan RECIPE --cluster cluster.yaml` as README and docs/cluster.md write it (text, no flag): a line
    per stage with its GPUs, hours and cost, and the totals, GPU time and the time from the first stage to the last
    (the GPT-4 judge's hours on CPU nodes included), as --json has them."""
    command = [sys.executable, "-m", "zephyr_ray.cli", "plan", "jobs/configs/zephyr-7b.yaml",
               "--cluster", "cluster.yaml"]
    shown = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=True).stdout
    planned = json.loads(subprocess.run([*command, "--json"], capture_output=True, text=True, cwd=REPO,
                                        check=True).stdout)
    for stage in planned["stages"]:
        assert re.search(rf"^{stage['stage']}: {stage['gpus_used']} of 16 GPUs, {stage['hours']:.2f} h, \$[\d,]+$",
                         shown, re.M), (stage["stage"], shown)
    total = planned["total"]
    assert total["elapsed_hours"] > total["hours"] + 10  # the judge at 5 requests/s: most of the elapsed time
    assert shown.splitlines()[-1].startswith(f"total: {total['hours']:.1f} h of GPU time, ${total['cost_usd']:,.0f}; "
                                             f"{total['elapsed_hours']:.1f} h from the first stage to the last"), shown
    assert "problem:" not in shown


def test_docs_cluster_md_shows_what_plan_prints():
    page = (REPO / "docs" / "cluster.md").read_text()
    table = re.search(r"<!-- plan: (.*?) -->\n(.*?)\n<!-- /plan -->", page, re.S)
    assert table, "docs/cluster.md lost its generated plan table"
    assert table.group(1) == "zephyr-ray plan jobs/configs/zephyr-7b.yaml --cluster cluster.yaml --markdown"
    assert table.group(2) == plan_markdown(plan_of(SEVEN_B)), "regenerate the table with the command above it"


def test_without_a_cpu_worker_type_cpu_work_would_start_a_gpu_node(tmp_path):
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    del config["available_node_types"]["cpu"]
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(config))
    recipe = yaml.safe_load(SEVEN_B.read_text())
    del recipe["hardware"]["cpu_node_group"]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    problems = {p.stage: p.problems for p in plan_of(tmp_path / "recipe.yaml", tmp_path / "cluster.yaml")}
    for stage in ("synthesize", "judge", "binarize"):
        assert any("a GPU node starts" in problem for problem in problems[stage]), (stage, problems[stage])
    assert problems["train_sft"] == []


def test_cpu_work_without_or_with_a_wrong_cpu_node_group(tmp_path):
    """The 7B recipe names cluster.yaml's CPU node type; without the field its CPU stages may use (and start) GPU
    nodes, and a group the cluster has no node type for would leave every stage's CPU work waiting."""
    data = yaml.safe_load(SEVEN_B.read_text())
    assert data["hardware"]["cpu_node_group"] == "cpu"
    for group, stages, text in ((None, ("synthesize", "judge", "binarize"), "set hardware.cpu_node_group to 'cpu'"),
                                ("cpus", ("synthesize", "train_sft", "complete", "judge", "binarize", "train_dpo",
                                          "evaluate"), "'cpus' is no CPU worker type of the cluster (cpu)")):
        data["hardware"]["cpu_node_group"] = group
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(data))
        problems = {p.stage: " ".join(p.problems) for p in plan_of(path, REPO / "cluster.yaml")}
        assert [stage for stage in problems if text in problems[stage]] == list(stages), problems


def test_plan_finds_idle_gpus_a_model_too_big_and_too_few_gpus(tmp_path):
    data = yaml.safe_load(SEVEN_B.read_text())
    data["complete"]["models"][0]["engine"]["concurrency"] = 2
    data["complete"]["models"] = data["complete"]["models"][:1] + [
        {"name": "big", "engine": {"model": "meta-llama/Llama-2-70b-chat-hf", "max_model_len": 4096}}]
    data["hardware"]["num_workers"] = 32
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    plans = {p.stage: p for p in plan_of(path)}
    complete = " ".join(plans["complete"].problems)
    assert "big: meta-llama/Llama-2-70b-chat-hf needs 130 GiB of weights per GPU" in complete
    assert "raise tensor_parallel_size" in complete
    assert "32 workers need 32 GPUs; the cluster has 16" in " ".join(plans["train_sft"].problems)


def test_explicit_replicas_that_leave_gpus_idle_are_a_problem(tmp_path):
    data = yaml.safe_load(SEVEN_B.read_text())
    for model in data["complete"]["models"]:
        model["engine"]["concurrency"] = 1
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    complete = next(p for p in plan_of(path) if p.stage == "complete")
    assert complete.gpus_used == 4 and any("uses 4 of 16 GPUs" in p for p in complete.problems)
    assert complete.hours > next(p for p in plan_of(SEVEN_B) if p.stage == "complete").hours


@pytest.mark.parametrize(("model", "expected"), [("meta-llama/Llama-2-13b-chat-hf", 13e9),
                                                 ("mistralai/Mistral-7B-v0.1", 7e9), ("some/model", None),
                                                 ("mistralai/Mixtral-8x7B-Instruct-v0.1", 56e9)])
def test_model_sizes_come_from_the_name_when_no_config_is_here(model, expected):
    assert model_parameters(model) == expected


def test_a_mixture_of_experts_counts_every_expert(tmp_path):
    """Mixtral-8x7B's config.json (its published values): 46.7B parameters, not the 7B its name suggests."""
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["MixtralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "num_experts_per_tok": 2, "vocab_size": 32000}))
    assert model_parameters(str(tmp_path)) == pytest.approx(46.7e9, rel=0.01)


def test_a_local_models_size_comes_from_its_config(tiny_models):
    from safetensors import safe_open

    path = tiny_models["teacher"]
    with safe_open(str(path / "model.safetensors"), "pt") as weights:
        actual = sum(_product(weights.get_slice(name).get_shape()) for name in weights.keys())
    assert model_parameters(str(path)) == pytest.approx(actual, rel=0.02)


def _product(shape: list[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def test_the_tiny_cpu_recipe_plans_one_engine_per_model_and_no_gpu():
    """On the machine's own cluster, and on the shipped GPU cluster.yaml (`plan --cluster cluster.yaml`): a CPU
    recipe's engines take one CPU each and no GPU (they were counted as GPUs there: "1 of 16 GPUs")."""
    recipe = load_recipe(REPO / "jobs" / "configs" / "tiny-cpu.yaml")
    planned = plan_json(plan_recipe(recipe, cluster_from_default()))
    assert all(s["gpus_used"] == 0 and s["gpus_available"] == 0 for s in planned["stages"])
    complete = next(s for s in planned["stages"] if s["stage"] == "complete")
    assert complete["actors"].count("1 x vLLM engine (1 CPU)") == 4
    on_gpus = plan_json(plan_recipe(recipe, cluster_from_yaml(REPO / "cluster.yaml")))
    assert all(s["gpus_used"] == 0 and s["gpus_available"] == 16 and s["hours"] == 0 for s in on_gpus["stages"])
    assert on_gpus["stages"][0]["actors"] == "teacher: 1 x vLLM engine (1 CPU)"


def cluster_from_default():
    from zephyr_ray.config import Hardware
    from zephyr_ray.plan import default_cluster

    return default_cluster(Hardware(accelerator="cpu", num_workers=2))


def test_node_types_without_max_workers_grow_to_the_clusters_max_workers_as_rays_autoscaler_reads_them(tmp_path):
    """Ray fills a node type's missing max_workers with the cluster's (default 2) and caps every type there."""
    shipped = yaml.safe_load((REPO / "cluster.yaml").read_text())
    (gpu_type,) = [name for name, t in shipped["available_node_types"].items() if t["resources"].get("GPU")]
    per_node = shipped["available_node_types"][gpu_type]["resources"]["GPU"]
    del shipped["available_node_types"][gpu_type]["max_workers"]
    for cluster_max, nodes in ((4, 4), (1, 1), (None, 2)):
        if cluster_max is None:
            shipped.pop("max_workers")
        else:
            shipped["max_workers"] = cluster_max
        (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(shipped))
        assert cluster_from_yaml(tmp_path / "cluster.yaml").gpus == per_node * nodes


def test_model_states_per_rank_follow_the_zero_stage(tmp_path):
    """Bytes a parameter on each of 16 ranks: ZeRO-3 shards all 16, ZeRO-2 the gradients and optimizer (2 + 14/16),
    ZeRO-1 the optimizer (4 + 12/16), ZeRO-0 nothing; more workers help only what the stage shards."""
    data = yaml.safe_load(SEVEN_B.read_text())
    memory = {}
    for stage in (3, 2, 1, 0):
        data["train_sft"]["zero_stage"] = stage
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
        memory[stage] = next(p for p in plan_of(tmp_path / "recipe.yaml") if p.stage == "train_sft")
    for stage, per_parameter in ((3, 1.0), (2, 2.875), (1, 4.75), (0, 16)):
        assert memory[stage].memory.startswith(f"{per_parameter * 7e9 / 2**30:.1f} GiB model states per rank ("
                                               f"{per_parameter:.3g} B/parameter at ZeRO-{stage} over 16 ranks"), \
            memory[stage].memory
    assert not memory[2].problems and not memory[3].problems
    assert any("use zero_stage 3" in p and "add workers" not in p for p in memory[0].problems), memory[0].problems


def test_a_dpo_pair_is_two_sequences_each_cut_at_max_length(tmp_path):
    """TRL's DPO trains on prompt + chosen and prompt + rejected, each at most max_length tokens."""
    data = yaml.safe_load(SEVEN_B.read_text())
    work = {}
    for max_length in (1024, 600):
        data["train_dpo"].update(max_length=max_length, max_prompt_length=256)
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
        work[max_length] = next(p for p in plan_of(tmp_path / "recipe.yaml") if p.stage == "train_dpo").work
    assert "rows x 1,400 tokens" in work[1024] and "rows x 1,200 tokens" in work[600], work


def plan_cli(recipe) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zephyr_ray.cli", "plan", str(recipe)], capture_output=True,
                          text=True, cwd=REPO)


def test_prompts_in_every_layout_the_stage_reads_are_counted(tmp_path):
    """A folder of JSONL files, a JSON list saved with a byte-order mark, a local copy of a hub dataset (its
    data/<split>-*.parquet): counted as the stage reads them; a CSV file is one clear error naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = json.dumps({"prompt": "How do bees make honey?"})
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.jsonl").write_text(f"{row}\n{row}\n")
    (tmp_path / "folder" / "b.jsonl").write_text(f"{row}\n\n{row}\n{row}\n")
    (tmp_path / "list.json").write_bytes(b"\xef\xbb\xbf" + f"[{row}, {row}]".encode())
    (tmp_path / "hub" / "data").mkdir(parents=True)
    (tmp_path / "hub" / "README.md").write_text("---\nconfigs: [{config_name: default}]\n---\n")
    table = pa.table({"prompt": ["x"] * 7})
    pq.write_table(table, tmp_path / "hub" / "data" / "train_prefs-00000-of-00001.parquet")
    pq.write_table(table.slice(0, 3), tmp_path / "hub" / "data" / "test_prefs-00000-of-00001.parquet")
    (tmp_path / "prompts.csv").write_text("prompt\nHow do bees make honey?\n")
    data = yaml.safe_load(SEVEN_B.read_text())
    for prompts, expected in ((tmp_path / "folder", "5 prompts"), (tmp_path / "list.json", "2 prompts"),
                              (tmp_path / "hub", "7 prompts")):
        data["complete"]["prompts"] = {"path": str(prompts), "split": "train_prefs"}
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
        complete = next(p for p in plan_of(tmp_path / "recipe.yaml") if p.stage == "complete")
        assert complete.work.startswith(expected), complete.work
    data["complete"]["prompts"] = {"path": str(tmp_path / "prompts.csv")}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    shown = plan_cli(tmp_path / "recipe.yaml")
    assert shown.returncode == 2 and "Traceback" not in shown.stderr, shown.stderr
    assert f"{tmp_path / 'prompts.csv'}: not a .jsonl, .json or .parquet file" in shown.stderr, shown.stderr


def test_a_cluster_file_without_gpus_is_one_clear_error(tmp_path):
    (tmp_path / "cluster.yaml").write_text("available_node_types: {head: {resources: {CPU: 4}}}\n"
                                           "head_node_type: head\n")
    shown = subprocess.run([sys.executable, "-m", "zephyr_ray.cli", "plan", str(SEVEN_B), "--cluster",
                            str(tmp_path / "cluster.yaml")], capture_output=True, text=True, cwd=REPO)
    assert shown.returncode == 2 and "no node type with GPUs" in shown.stderr and "Traceback" not in shown.stderr


def test_rounds_are_planned_stage_by_stage_after_the_recipes_own(tmp_path):
    """A 7B recipe with two rounds on the shipped cluster: every round's five stages priced as the recipe's own,
    with the policy's 4 answers a prompt, half the preference prompts a round (split), and no problem; the shipped
    tiny rounds recipe plans on CPU."""
    variant = tmp_path / "zephyr-7b-rounds.yaml"
    variant.write_text(f"base: {SEVEN_B}\nname: zephyr-7b-rounds\nrounds: {{count: 2, samples: 4}}\n")
    planned = plan_json(plan_of(variant))
    stages = {s["stage"]: s for s in planned["stages"]}
    own = ["synthesize", "train_sft", "complete", "judge", "binarize", "train_dpo", "evaluate"]
    assert list(stages) == own + [f"rounds/{r}/{s}" for r in (1, 2) for s in own[2:]]
    assert all(not s["problems"] for s in stages.values()), [(s["stage"], s["problems"]) for s in stages.values()]
    prompts = int(re.match(r"([\d,]+) prompts", stages["complete"]["work"]).group(1).replace(",", ""))
    for r in (1, 2):
        complete = stages[f"rounds/{r}/complete"]
        assert complete["work"].startswith(f"{prompts // 2:,} prompts") and "(4 answers a prompt)" in complete["work"]
        assert complete["gpus_used"] == 16 and complete["actors"].startswith("policy: ")
        assert stages[f"rounds/{r}/judge"]["work"].startswith(f"{prompts // 2 * 4:,} completions")
        assert stages[f"rounds/{r}/train_dpo"]["gpus_used"] == 16 and stages[f"rounds/{r}/train_dpo"]["cost_usd"] > 0
    without = plan_json(plan_of(SEVEN_B))["total"]
    assert planned["total"]["cost_usd"] > without["cost_usd"] and planned["total"]["hours"] > without["hours"]
    tiny = plan_json(plan_recipe(load_recipe(REPO / "jobs" / "configs" / "tiny-cpu-rounds.yaml"),
                                 cluster_from_default()))
    joined = next(s for s in tiny["stages"] if s["stage"] == "rounds/2/complete")
    assert joined["actors"].count("1 x vLLM engine (1 CPU)") == 5  # the pool joins the policy


def test_evaluate_is_planned_with_every_set_and_every_model_it_asks(tmp_path):
    """The evaluate stage's work is what run_evaluate asks: MT-Bench in two turns, the pairwise prompts and the
    exact-match questions for the evaluated model and the baseline, the exact-match questions for its extra models,
    and the feedback judge on the exact-match replies (the tiny recipe has them all). A 7B recipe given GSM8K-format
    questions plans more hours for its evaluation than without them."""
    tiny = {s.stage: s for s in plan_recipe(load_recipe(REPO / "jobs" / "configs" / "tiny-cpu.yaml"),
                                            cluster_from_default())}["evaluate"]
    assert tiny.work == ("16 MT-Bench questions x 2 turns + 48 pairwise prompts + 48 exact-match questions x 2 models, "
                         "exact match x 1 more, then judged")
    assert [actor.split(":")[0] for actor in tiny.actors.split("; ")] == ["dpo", "sft", "base", "judge",
                                                                          "feedback judge"]
    questions = tmp_path / "gsm8k.jsonl"  # GSM8K's test split has 1,319 of these
    questions.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n"
                                             f"#### {i + 1}"}) + "\n" for i in range(1319)))
    recipe = yaml.safe_load(SEVEN_B.read_text())
    recipe["evaluate"]["exact_match"] = {"questions": {"path": str(questions)}, "models": [
        {"name": "sft", "model": "train_sft", "max_model_len": 4096}]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with_gsm8k = {s.stage: s for s in plan_of(tmp_path / "recipe.yaml")}["evaluate"]
    without = {s.stage: s for s in plan_of(SEVEN_B)}["evaluate"]
    assert with_gsm8k.work.startswith("80 MT-Bench questions x 2 turns + 1319 exact-match questions x 2 models")
    assert with_gsm8k.hours > without.hours and not with_gsm8k.problems


def test_a_ranks_memory_is_its_model_states_plus_the_measured_activations(tmp_path):
    """16 bytes a parameter over the ZeRO-3 ranks, plus activations scaled from bench/mfu.py's H200 run: one worker
    of a 7B model does not fit an 80 GB A100, two do at micro batch 8, and not at micro batch 32."""
    data = yaml.safe_load(SEVEN_B.read_text())

    def train_sft(workers, micro_batch):
        data["hardware"]["num_workers"] = workers
        data["train_sft"]["max_per_device_batch_size"] = micro_batch
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(data))
        return next(p for p in plan_of(path) if p.stage == "train_sft")

    one, two, two_large = train_sft(1, 8), train_sft(2, 8), train_sft(2, 32)
    assert one.memory.startswith("104.3 GiB model states per rank") and "8 x 2048 tokens" in one.memory
    assert any("do not fit a 80 GiB A100" in problem for problem in one.problems), one.problems
    assert two.memory.startswith("52.2 GiB model states per rank") and two.problems == []
    assert "32 x 2048 tokens" in two_large.memory
    assert any("lower max_per_device_batch_size" in problem for problem in two_large.problems), two_large.problems
