"""``zephyr-ray plan``: what a recipe will ask of a cluster, worked out on paper before anything runs.

Per stage: the engines or training workers and their GPUs (with the same rules the stages use:
``engines.side_by_side`` and ``engines.engine_replicas``), rows and tokens (dataset sizes where they are known, else
the assumption used), hours and cost from throughput figures written down in ``ASSUMPTIONS`` with where each comes
from, checkpoint size and disk, memory fit per GPU, and the problems found (a model that does not fit, GPUs left idle,
CPU work that would start a GPU node). Nothing is downloaded: model sizes come from a local config.json or the size
in the model's name ("13b").
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import DatasetSource, Engine, Hardware, Recipe, derive_batch
from .data import local_row_count

# Each figure, and where it comes from. Change one and every estimate scales with it.
ASSUMPTIONS: dict[str, tuple[float, str]] = {
    "train_mfu": (0.35, "bench/mfu.py on one H200 (2026-12-04, 7B shape, micro batch 8): our SFT trainer 40.0% MFU "
                        "without DeepSpeed, 35.4% under ZeRO-3 with one rank; across nodes its collectives add to "
                        "that, which this figure does not count"),
    "training_extra_gib_7b": (8.3, "bench/mfu.py on one H200 (2026-12-04): ZeRO-3's peak 116.2 GiB minus 107.9 GiB "
                                   "of model states, 7.24B parameters, micro batch 8 x 2048 tokens, gradient "
                                   "checkpointing: activations, logits and DeepSpeed's buffers; scaled by tokens per "
                                   "micro batch and model size (linearly: the cautious reading of two points)"),
    "zero3_step_extra_gib": (6.4, "bench/mfu.py on one H200 (2026-12-04): ZeRO-3's peak at micro batch 2 and 4 alike, "
                                  "114.3 GiB, 6.4 over the model states: the optimizer step's fp32 gradients of one "
                                  "sub-group (DeepSpeed's sub_group_size, 1e9 parameters), whatever the batch"),
    "usable_gpu_memory_share": (0.9, "what PyTorch can allocate of a GPU (139.8 of 140.4 GiB on an H200) less "
                                     "room for the allocator's fragmentation"),
    "attention_flops_factor": (1.06, "attention adds ~6% to 6 x parameters FLOPs per token at 2k context "
                                     "(45.9 vs 43.4 GFLOP per token for Mistral-7B)"),
    "dpo_cost_factor": (8 / 6, "DPO: policy forward and backward (6N) plus a reference forward (2N) per token"),
    "generated_tokens_per_s_per_gpu_7b": (2500.0, "vLLM, 7B model, large batch on one A100 (vLLM's published "
                                                  "offline throughput order); scaled by 7B / model size"),
    "prefill_speedup": (8.0, "a prompt token costs about 1/8 of a generated one at large batch"),
    "model_load_minutes": (5.0, "download from the hub cache and load of a 7B-13B model per engine"),
    "dialogue_tokens": (1400.0, "UltraChat 200k: ~1,400 tokens per dialogue"),
    "prompt_tokens": (100.0, "an UltraFeedback prompt with its principle system prompt"),
    "answer_prompt_tokens": (200.0, "an MT-Bench turn with the conversation so far"),
    "answer_tokens": (300.0, "an MT-Bench answer"),
    "completion_tokens": (350.0, "UltraFeedback completions: ~350 tokens (at most the pool's max_tokens)"),
    "judge_prompt_tokens": (1200.0, "a rubric judge prompt with one completion"),
    "judge_generated_tokens": (150.0, "a rubric judgment"),
    "dpo_sequence_tokens": (700.0, "one of a preference pair's two sequences, the prompt and one answer "
                            "(UltraFeedback: ~200 + ~500); TRL's DPO trains on prompt + chosen and prompt + rejected, "
                            "each cut at max_length"),
    "weights_share_of_gpu": (0.9 * 0.8, "vLLM takes gpu_memory_utilization 0.9 of a GPU (its default); weights past "
                                       "80% of that leave too small a KV cache for batched generation"),
    "rows_when_unknown": (10000.0, "a dataset whose size is not known here (a hub id not in KNOWN_ROWS)"),
}

# Rows of public datasets the shipped recipes read (their dataset cards), so plan needs no download.
KNOWN_ROWS: dict[tuple[str, str], int] = {
    ("HuggingFaceH4/ultrachat_200k", "train_sft"): 207_865,
    ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs"): 61_135,
    ("HuggingFaceH4/mt_bench_prompts", "train"): 80,
}

# GPU peak bf16 dense TFLOP/s (vendor data sheets).
GPU_TFLOPS: dict[str, float] = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "A10G": 125.0, "L4": 121.0}

# Instance types: GPUs, GPU type, GiB per GPU, on-demand $/h (AWS list prices, us-east-1).
INSTANCE_TYPES: dict[str, tuple[int, str | None, int, float]] = {
    "p4d.24xlarge": (8, "A100", 40, 32.77),
    "p4de.24xlarge": (8, "A100", 80, 40.97),
    "m6i.4xlarge": (0, None, 0, 0.768),
    "m6i.8xlarge": (0, None, 0, 1.536),
}

# Endpoint judges: $ per 1M input and output tokens (OpenAI list prices).
ENDPOINT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4": (30.0, 60.0), "gpt-4-turbo": (10.0, 30.0), "gpt-4o": (2.5, 10.0), "gpt-4o-mini": (0.15, 0.6),
}


@dataclass
class Cluster:
    """What plan needs of a cluster: its GPU node type and what nodes cost."""

    gpus: int
    gpu_type: str = "A100"
    gpu_memory_gib: float = 80.0
    gpus_per_node: int = 8
    gpu_node_usd_per_hour: float | None = None
    always_on_usd_per_hour: float = 0.0  # the head
    cpu_worker_groups: tuple[str, ...] = ()  # node types without GPUs that can start
    head_cpus: float = 1.0


@dataclass
class StagePlan:
    stage: str
    gpus_used: int
    gpus_available: int
    hours: float
    cost_usd: float | None
    work: str = ""
    actors: str = ""
    memory: str = ""
    disk_gib: float = 0.0
    judge_usd: float = 0.0  # an endpoint judge's fees within a GPU stage
    problems: list[str] = field(default_factory=list)


def cluster_from_yaml(path: Path) -> Cluster:
    """A Ray cluster launcher config: the largest GPU node type at its max_workers, the head's price."""
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    types = config.get("available_node_types") or {}
    head = types.get(config.get("head_node_type"), {})
    # as Ray's autoscaler reads it: a node type without max_workers may grow to the cluster's max_workers (Ray's
    # default 2), and no type beyond it
    cluster_max = int(config.get("max_workers", 2))

    def max_workers(node_type: dict) -> int:
        return min(int(node_type.get("max_workers", cluster_max)), cluster_max)

    gpu_types = {name: t for name, t in types.items() if (t.get("resources") or {}).get("GPU", 0) > 0}
    if not gpu_types:
        raise ValueError(f"{path}: no node type with GPUs in available_node_types")
    name, node = max(gpu_types.items(), key=lambda item: item[1]["resources"]["GPU"] * max_workers(item[1]))
    per_node = int(node["resources"]["GPU"])
    instance = (node.get("node_config") or {}).get("InstanceType", "")
    known = INSTANCE_TYPES.get(instance)
    accelerator = next((k.split(":", 1)[1] for k in node["resources"] if k.startswith("accelerator_type:")),
                       known[1] if known else "A100")
    head_instance = (head.get("node_config") or {}).get("InstanceType", "")
    cpu_workers = tuple(n for n, t in types.items() if n != config.get("head_node_type") and n not in gpu_types
                        and max_workers(t) > 0)
    return Cluster(gpus=per_node * max_workers(node), gpu_type=accelerator,
                   gpu_memory_gib=known[2] if known else 80.0, gpus_per_node=per_node,
                   gpu_node_usd_per_hour=known[3] if known else None,
                   always_on_usd_per_hour=INSTANCE_TYPES.get(head_instance, (0, None, 0, 0.0))[3],
                   cpu_worker_groups=cpu_workers,
                   head_cpus=float((head.get("resources") or {}).get("CPU", 1)))


def model_parameters(model: str) -> float | None:
    """Parameters of a model: from its config.json where it is at hand (hidden size, layers, vocabulary, experts),
    else from its name ("Llama-2-13b" -> 13e9; "Mixtral-8x7B" -> 8 x 7e9, an upper bound: experts share the
    attention); None when neither says."""
    from .engines import _model_config

    config = _model_config(model, fetch=False)
    if config:
        h, layers, vocab = (config.get(k) for k in ("hidden_size", "num_hidden_layers", "vocab_size"))
        inter = config.get("intermediate_size") or 4 * (h or 0)
        heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
        experts = config.get("num_local_experts") or config.get("num_experts") or 1
        if all(isinstance(v, int) for v in (h, layers, vocab, inter, heads, experts)):
            kv_dim = h * (kv or heads) // heads
            return float(layers * (2 * h * h + 2 * h * kv_dim + 3 * h * inter * experts) + 2 * vocab * h)
    found = re.search(r"(?:(\d+)\s*x\s*)?(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])", Path(model).name)
    return int(found.group(1) or 1) * float(found.group(2)) * 1e9 if found else None


def dataset_rows(source: DatasetSource | None) -> tuple[int, str]:
    """(rows, how known) of a dataset: a local file's own count, a known public set's card, else the assumption."""
    if source is None:
        return 0, "none"
    path = Path(source.path).expanduser()
    rows, how = None, ""
    if path.exists():  # counted as the stage will read it (raises, naming the path, where it cannot)
        rows, how = local_row_count(str(path), source.split), path.name
    if rows is None and (source.path, source.split) in KNOWN_ROWS:
        rows, how = KNOWN_ROWS[(source.path, source.split)], f"{source.path} ({source.split}, its dataset card)"
    if rows is None:
        rows, how = int(ASSUMPTIONS["rows_when_unknown"][0]), f"{source.path}: size unknown here, assumed"
    if source.limit is not None and source.limit < rows:
        rows, how = source.limit, f"{how}, limit {source.limit}"
    return rows, how


def _a(name: str) -> float:
    return ASSUMPTIONS[name][0]


def _generation_hours(engines: list[tuple[str, Engine, float, float]], hardware: Hardware, cluster: Cluster,
                      plan: StagePlan) -> None:
    """Hours and GPUs of generation passes: (label, engine, prompt tokens, generated tokens) per engine, run in the
    waves the stage runs them in."""
    from .engines import engine_replicas, gpus_per_engine, side_by_side

    capacity = (float("inf"), float(cluster.gpus))
    hours, used, actors, memory = 0.0, 0, [], []
    for wave in side_by_side([e for _, e, _, _ in engines], hardware, capacity):
        wave_hours, wave_gpus = 0.0, 0
        for index in wave:
            label, engine, prompt_tokens, generated = engines[index]
            replicas = engine_replicas(engine, hardware, capacity, sharing=len(wave))
            replicas = replicas if isinstance(replicas, int) else replicas[1]
            per_engine = gpus_per_engine(engine)
            params = model_parameters(engine.model)
            if params is None:
                plan.problems.append(f"{label}: the size of {engine.model} is unknown here (no local config.json, "
                                     "no size in its name): its time is not estimated")
                continue
            speed = _a("generated_tokens_per_s_per_gpu_7b") * 7.24e9 / params * per_engine
            seconds = (generated + prompt_tokens / _a("prefill_speedup")) / (speed * replicas)
            wave_hours = max(wave_hours, seconds / 3600 + _a("model_load_minutes") / 60)
            wave_gpus += replicas * per_engine
            unit = "GPU" if hardware.accelerator == "gpu" else "CPU"
            actors.append(f"{label}: {replicas} x vLLM engine ({per_engine} {unit}{'s' if per_engine > 1 else ''})")
            weights = params * 2 / 2**30 / per_engine
            memory.append(f"{label}: {weights:.0f} GiB weights per GPU")
            if hardware.accelerator == "gpu" and weights > _a("weights_share_of_gpu") * cluster.gpu_memory_gib:
                plan.problems.append(f"{label}: {engine.model} needs {weights:.0f} GiB of weights per GPU, more than "
                                     f"a {cluster.gpu_memory_gib:g} GiB {cluster.gpu_type} leaves beside a KV cache "
                                     f"(raise tensor_parallel_size)")
        hours += wave_hours
        used = max(used, wave_gpus)
    plan.hours, plan.gpus_used = hours, min(used, cluster.gpus)
    plan.actors, plan.memory = "; ".join(actors), "; ".join(memory)
    if hardware.accelerator == "cpu":  # the throughput figures are GPUs', and CPU engines take none of a GPU node's
        plan.hours, plan.memory, plan.gpus_used = 0.0, "", 0
    elif plan.gpus_used < cluster.gpus:
        plan.problems.append(f"uses {plan.gpus_used} of {cluster.gpus} GPUs: set concurrency to 'auto' or raise it")


def _training(stage: str, rows: int, tokens_per_row: float, cost_factor: float, training: Any, model: str,
              hardware: Hardware, cluster: Cluster, plan: StagePlan, reference: bool = False) -> None:
    params = model_parameters(model)
    workers = hardware.num_workers
    plan.gpus_used = workers if hardware.accelerator == "gpu" else 0
    plan.actors = f"{workers} Ray Train workers ({'1 GPU' if plan.gpus_used else '1 CPU'} each), " \
                  f"DeepSpeed ZeRO-{training.zero_stage}"
    tokens = rows * tokens_per_row * training.num_epochs
    plan.work = f"{rows:,} rows x {tokens_per_row:,.0f} tokens x {training.num_epochs:g} epochs = {tokens / 1e6:,.0f}M tokens"
    if params is None:
        plan.problems.append(f"the size of {model} is unknown here: its time is not estimated")
        return
    if hardware.accelerator == "cpu":
        return
    flops_per_token = 6 * params * _a("attention_flops_factor") * cost_factor
    speed = _a("train_mfu") * GPU_TFLOPS.get(cluster.gpu_type, 312.0) * 1e12 / flops_per_token
    plan.hours = tokens / (speed * workers) / 3600
    # bf16 weights and gradients (2 + 2 bytes), fp32 master weights and Adam moments (12 bytes): ZeRO-1 shards the
    # optimizer's 12 over the ranks, ZeRO-2 the gradients too, ZeRO-3 everything (the DPO reference's bf16 weights
    # with it; below ZeRO-3 each rank holds the whole reference)
    ranks, stage = workers, training.zero_stage
    per_parameter = (2 / ranks if stage == 3 else 2) + (2 / ranks if stage >= 2 else 2) + (
        12 / ranks if stage >= 1 else 12) + ((2 / ranks if stage == 3 else 2) if reference else 0)
    states = per_parameter * params / 2**30
    more_ranks = "add workers" if stage == 3 else "use zero_stage 3 (it shards the weights too)" + (
        " or add workers" if stage else "")  # below ZeRO-3 more ranks shrink only what the stage shards
    plan.memory = f"{states:.1f} GiB model states per rank ({per_parameter:.3g} B/parameter at ZeRO-{stage} over " \
                  f"{ranks} ranks{', with the reference model' if reference else ''})"
    usable = _a("usable_gpu_memory_share") * cluster.gpu_memory_gib
    if training.gradient_checkpointing:
        per_device, _ = derive_batch(training.global_batch_size, workers, training.max_per_device_batch_size)
        sequences = per_device * (2 if reference else 1)  # DPO: each pair is a chosen and a rejected sequence
        extra = _a("training_extra_gib_7b") * sequences * training.max_length / (8 * 2048) * params / 7.24e9
        if training.zero_stage == 3:
            extra = max(extra, _a("zero3_step_extra_gib") * min(params, 1e9) / 1e9)
        plan.memory += f" + {extra:.1f} GiB activations and buffers ({sequences} x {training.max_length} tokens)"
        if states + extra > usable:
            plan.problems.append(f"{states + extra:.0f} GiB per rank ({states:.0f} of model states) do not fit a "
                                 f"{cluster.gpu_memory_gib:g} GiB {cluster.gpu_type}: {more_ranks} or lower "
                                 f"max_per_device_batch_size")
    else:
        plan.memory += ", plus activations (not estimated without gradient checkpointing)"
        if states > usable:
            plan.problems.append(f"{states:.0f} GiB of model states per rank do not fit a "
                                 f"{cluster.gpu_memory_gib:g} GiB {cluster.gpu_type}: {more_ranks}")
    checkpoint = (2 * params + 14 * params) / 2**30  # gathered bf16 weights + per-rank optimizer shards
    plan.disk_gib = checkpoint * (training.save_total_limit + 1)  # kept checkpoints + the export
    if workers > cluster.gpus:
        plan.problems.append(f"{workers} workers need {workers} GPUs; the cluster has {cluster.gpus}")


def plan_recipe(recipe: Recipe, cluster: Cluster) -> list[StagePlan]:
    """One ``StagePlan`` per stage the recipe has."""
    hardware = recipe.hardware
    plans: list[StagePlan] = []

    def new(stage: str) -> StagePlan:
        plans.append(StagePlan(stage=stage, gpus_used=0, gpus_available=cluster.gpus, hours=0.0, cost_usd=None))
        return plans[-1]

    def cpu_work(plan: StagePlan, what: str) -> None:
        plan.actors = f"{what} (CPU only)"
        group = hardware.cpu_node_group
        if not cluster.cpu_worker_groups and cluster.head_cpus == 0:
            plan.problems.append(f"{what} is CPU work, and the cluster has no CPU worker type while its head takes "
                                 "none: a GPU node starts to run it")
        elif cluster.cpu_worker_groups and group is None:
            plan.problems.append(f"{what} is CPU work that may run on GPU nodes (and start one): set "
                                 f"hardware.cpu_node_group to {cluster.cpu_worker_groups[0]!r}")

    dialogues = 0
    if (cfg := recipe.synthesize) is not None:
        plan = new("synthesize")
        if cfg.dataset is not None:
            dialogues, how = dataset_rows(cfg.dataset)
            plan.work = f"{dialogues:,} dialogues read ({how})"
            cpu_work(plan, "reading and validating the dialogues")
        else:
            dialogues, how = dataset_rows(cfg.seeds)
            per_turn = min(cfg.sampling.max_tokens, _a("dialogue_tokens") / (2 * cfg.num_turns))
            generated = dialogues * (2 * cfg.num_turns - 1) * per_turn
            plan.work = f"{dialogues:,} seeds ({how}) x {2 * cfg.num_turns - 1} turns ~ {generated / 1e6:,.0f}M tokens"
            _generation_hours([("teacher", cfg.teacher, generated * 2, generated)], hardware, cluster, plan)
    if (cfg := recipe.train_sft) is not None:
        plan = new("train_sft")
        _training("train_sft", dialogues, min(_a("dialogue_tokens"), cfg.max_length), 1.0, cfg,
                  cfg.model or "", hardware, cluster, plan)
    asked, completions = 0, 0
    if (cfg := recipe.complete) is not None:
        plan = new("complete")
        prompts, how = dataset_rows(cfg.prompts)
        asked, completions = prompts, prompts * sum(m.samples for m in cfg.models)
        engines = [(m.name, m.engine, prompts * _a("prompt_tokens"),
                    prompts * m.samples * min(m.sampling.max_tokens, _a("completion_tokens"))) for m in cfg.models]
        plan.work = f"{prompts:,} prompts ({how}) x {len(cfg.models)} models"
        if completions > prompts * len(cfg.models):
            plan.work += f" ({completions // max(prompts, 1)} answers a prompt)"
        _generation_hours(engines, hardware, cluster, plan)
    if (cfg := recipe.judge) is not None:
        plan = new("judge")
        prompt_tokens, generated = completions * _a("judge_prompt_tokens"), completions * _a("judge_generated_tokens")
        plan.work = f"{completions:,} completions x ({_a('judge_prompt_tokens'):,.0f} prompt + " \
                    f"{_a('judge_generated_tokens'):,.0f} generated tokens)"
        if cfg.endpoint is not None:
            cpu_work(plan, f"HTTP clients of {cfg.endpoint.model}")
            price = ENDPOINT_PRICES.get(cfg.endpoint.model)
            plan.hours = completions / cfg.endpoint.qps / 3600
            if price:
                plan.cost_usd = (prompt_tokens * price[0] + generated * price[1]) / 1e6
                plan.work += f"; ${price[0]:g} / ${price[1]:g} per 1M tokens; {cfg.endpoint.qps:g} requests/s"
            else:
                plan.problems.append(f"no price known for endpoint model {cfg.endpoint.model}: cost not estimated")
        else:
            _generation_hours([("judge", cfg.engine, prompt_tokens, generated)], hardware, cluster, plan)
    pairs = 0
    if (cfg := recipe.binarize) is not None:
        plan = new("binarize")
        pairs, how = dataset_rows(cfg.dataset) if cfg.dataset is not None else (asked, "one per prompt")
        plan.work = f"{pairs:,} preference pairs ({how})"
        cpu_work(plan, "grouping scores into pairs")
    if (cfg := recipe.train_dpo) is not None:
        plan = new("train_dpo")
        base = cfg.model or (recipe.train_sft.model if recipe.train_sft else "") or ""
        _training("train_dpo", pairs, 2 * min(_a("dpo_sequence_tokens"), cfg.max_length), _a("dpo_cost_factor"), cfg,
                  base, hardware, cluster, plan, reference=True)
    if (cfg := recipe.evaluate) is not None:
        plan = new("evaluate")
        # what run_evaluate asks: the evaluated model and the pairwise baseline answer every set (MT-Bench in two
        # turns, the pairwise prompts, the exact-match questions); exact_match.models answer its questions only
        mt_bench = dataset_rows(cfg.mt_bench.questions)[0] if cfg.mt_bench else 0
        instructions = dataset_rows(cfg.pairwise.prompts)[0] if cfg.pairwise and cfg.pairwise.prompts else 0
        checkable = dataset_rows(cfg.exact_match.questions)[0] if cfg.exact_match else 0
        base = (recipe.train_sft.model if recipe.train_sft else None) or ""
        models = [cfg.model] + ([cfg.pairwise.baseline] if cfg.pairwise and cfg.pairwise.baseline else [])
        others = cfg.exact_match.models if cfg.exact_match else []

        def generated(sets: list[tuple[int, int]]) -> float:  # (answers, max_tokens) per set
            return sum(n * min(limit, _a("answer_tokens")) for n, limit in sets)

        every_set = [(mt_bench * 2, cfg.mt_bench.max_tokens if cfg.mt_bench else 0),
                     (instructions, cfg.pairwise.sampling.max_tokens if cfg.pairwise else 0),
                     (checkable, cfg.exact_match.sampling.max_tokens if cfg.exact_match else 0)]
        exact_only = every_set[2:]
        engines = [(m.name, m.model_copy(update={"model": base}) if m.model in ("train_dpo", "train_sft") else m,
                    sum(n for n, _ in sets) * _a("answer_prompt_tokens"), generated(sets))
                   for m, sets in [(m, every_set) for m in models] + [(m, exact_only) for m in others]]
        asked = [f"{n} {what}" for n, what in ((mt_bench, "MT-Bench questions x 2 turns"),
                                                (instructions, "pairwise prompts"),
                                                (checkable, "exact-match questions")) if n]
        plan.work = f"{' + '.join(asked) or 'no questions'} x {len(models)} models"
        if others and checkable:
            plan.work += f", exact match x {len(others)} more"
        plan.work += ", then judged"
        compared = (instructions or mt_bench) if cfg.pairwise else 0  # each pair judged in both orders
        judgments = mt_bench * 2 * len(models) + compared * 2
        if cfg.judge.engine is not None:
            engines.append(("judge", cfg.judge.engine, judgments * _a("judge_prompt_tokens"),
                            judgments * _a("judge_generated_tokens")))
        if checkable and recipe.judge is not None and recipe.judge.engine is not None:  # its agreement with the truth
            scored = checkable * (len(models) + len(others))
            engines.append(("feedback judge", recipe.judge.engine, scored * _a("judge_prompt_tokens"),
                            scored * _a("judge_generated_tokens")))
        _generation_hours(engines, hardware, cluster, plan)
        plan.problems = [p for p in plan.problems if not p.startswith("uses ")]  # 80 questions fill no cluster
        if cfg.judge.endpoint is not None and (price := ENDPOINT_PRICES.get(cfg.judge.endpoint.model)):
            plan.judge_usd = judgments * (_a("judge_prompt_tokens") * price[0]
                                          + _a("judge_generated_tokens") * price[1]) / 1e6
            plan.work += f" by {cfg.judge.endpoint.model} ({judgments} judgments, ~${plan.judge_usd:,.0f})"
    for plan in plans:
        if hardware.cpu_node_group and hardware.cpu_node_group not in cluster.cpu_worker_groups:
            plan.problems.append(f"hardware.cpu_node_group {hardware.cpu_node_group!r} is no CPU worker type of the "
                                 f"cluster ({', '.join(cluster.cpu_worker_groups) or 'none'}): the stage's CPU work "
                                 "would wait for a node that never starts")
        if plan.gpus_used and cluster.gpu_node_usd_per_hour is not None:
            nodes = math.ceil(plan.gpus_used / cluster.gpus_per_node)
            plan.cost_usd = plan.hours * (nodes * cluster.gpu_node_usd_per_hour + cluster.always_on_usd_per_hour) \
                + plan.judge_usd
        elif plan.cost_usd is None and not plan.gpus_used:
            plan.cost_usd = 0.0
    return plans + _round_plans(recipe, cluster)


def _round_plans(recipe: Recipe, cluster: Cluster) -> list[StagePlan]:
    """The stages of every round (``rounds:``), each priced as the recipe's own: round r's recipe
    (``rounds.recipe_for_round``) with its share of the prompts and the dSFT model's size for its policy."""
    from .rounds import recipe_for_round

    cfg = recipe.rounds
    if cfg is None or recipe.complete is None:
        return []
    prompts = recipe.complete.prompts.model_copy(update={
        "limit": max(1, cfg.prompts_a_round(dataset_rows(recipe.complete.prompts)[0]))})
    model = (recipe.train_sft.model if recipe.train_sft else None) or recipe.complete.models[0].engine.model
    plans = []
    for round_number in range(1, cfg.count + 1):
        for plan in plan_recipe(recipe_for_round(recipe, round_number, prompts, model, model, model), cluster):
            plan.stage = f"rounds/{round_number}/{plan.stage}"
            plans.append(plan)
    return plans


def default_cluster(hardware: Hardware) -> Cluster:
    """Without ``--cluster``: as many GPUs as the recipe's training workers (prices unknown), or none on CPU."""
    return Cluster(gpus=hardware.num_workers if hardware.accelerator == "gpu" else 0,
                   cpu_worker_groups=(hardware.cpu_node_group,) if hardware.cpu_node_group else ())


def plan_text(plans: list[StagePlan]) -> str:
    lines = []
    for p in plans:
        cost = "cost unknown" if p.cost_usd is None else f"${p.cost_usd:,.0f}"
        lines.append(f"{p.stage}: {p.gpus_used} of {p.gpus_available} GPUs, {p.hours:.2f} h, {cost}")
        for label, value in (("work", p.work), ("actors", p.actors), ("memory", p.memory)):
            if value:
                lines.append(f"  {label}: {value}")
        if p.disk_gib:
            lines.append(f"  disk: {p.disk_gib:,.0f} GiB of checkpoints and export in the run's storage")
        lines += [f"  problem: {problem}" for problem in p.problems]
    total = plan_json(plans)["total"]
    cost = "cost unknown" if total["cost_usd"] is None else f"${total['cost_usd']:,.0f}"
    lines.append(f"total: {total['hours']:.1f} h of GPU time, {cost}; {total['elapsed_hours']:.1f} h from the first "
                 "stage to the last (one after another, the stages on CPU included)")
    return "\n".join(lines)


def plan_json(plans: list[StagePlan]) -> dict[str, Any]:
    costs = [p.cost_usd for p in plans]
    return {"stages": [asdict(p) for p in plans],
            "total": {"hours": sum(p.hours for p in plans if p.gpus_used),
                      "cost_usd": None if any(c is None for c in costs) else sum(costs),
                      "elapsed_hours": sum(p.hours for p in plans)},  # the stages run one after another
            "assumptions": {name: {"value": value, "source": source} for name, (value, source) in ASSUMPTIONS.items()}}


def plan_markdown(plans: list[StagePlan]) -> str:
    """The plan as the table docs/cluster.md shows (written by ``zephyr-ray plan --markdown``)."""
    lines = ["| stage | work | GPUs used | time | cost |", "|---|---|---|---|---|"]
    for p in plans:
        cost = "-" if p.cost_usd is None else f"~${p.cost_usd:,.0f}"
        time = f"~{p.hours:.1f} h" if p.hours >= 0.1 else "minutes"
        lines.append(f"| {p.stage} | {p.work} | {p.gpus_used} of {p.gpus_available} | {time} | {cost} |")
    total = plan_json(plans)["total"]
    cost = "-" if total["cost_usd"] is None else f"**~${total['cost_usd']:,.0f}**"
    lines.append(f"| **total** | | | **~{total['hours']:.1f} h** of GPU time | {cost} |")
    return "\n".join(lines)
