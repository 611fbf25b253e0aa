"""The one place that knows CPU from GPU: vLLM engine kwargs and Ray placement for an ``Engine`` config.

Every other module asks here, so a CPU run and a GPU run share all other lines of code.
"""

from __future__ import annotations

import os
from typing import Any

from .config import Engine, Hardware

# vLLM's CPU backend reads ``gpu_memory_utilization`` as the fraction of *host RAM* for the KV cache; its default
# (0.92) cannot be allocated beside everything else on a small machine. 0.3 leaves room for Ray and training.
CPU_KV_CACHE_FRACTION = 0.3
# vLLM's CPU default for sequences scheduled at once (offline engines; its server uses 128).
CPU_MAX_NUM_SEQS = 256
# Tokens per engine step on CPU (vLLM's CPU default); never below max_model_len, as prompts are not split there.
CPU_MAX_BATCHED_TOKENS = 2048


# config.json keys that bound a model's sequence length (the ones vLLM reads); the smallest present is the limit.
_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length",
                "max_seq_length", "seq_len")


def _model_config(model: str, fetch: bool = True) -> dict[str, Any] | None:
    """The model's config.json: from its directory, or (``fetch``) from the hub, cached, for a hub id; None when it
    cannot be read."""
    import json
    from pathlib import Path

    path = Path(model).expanduser() / "config.json"
    try:
        if not path.is_file():
            from .data import is_hub_id

            if not (fetch and is_hub_id(model)):
                return None
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, "config.json"))
        config = json.loads(path.read_text(encoding="utf-8"))
    except Exception:  # offline, gated, not a model: vLLM will say so when it loads the model
        return None
    return config if isinstance(config, dict) else None


def model_context_limit(model: str, fetch: bool = True) -> tuple[int, str] | None:
    """(tokens, why) for the longest sequence ``model`` allows, read from its config.json as vLLM reads it (the
    smallest length key, times a RoPE scaling factor); None when the config cannot be read here."""
    config = _model_config(model, fetch)
    if config is None:
        return None
    config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    found = {key: config[key] for key in _LENGTH_KEYS
             if isinstance(config.get(key), int) and not isinstance(config.get(key), bool) and config[key] > 0}
    if not found:
        return None
    key = min(found, key=found.get)
    limit, why = found[key], f"{key} in its config.json"
    rope = config.get("rope_scaling")
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) not in ("su", "longrope", "llama3",
                                                                                   "mrope", "default"):
        factor = rope.get("factor")
        if isinstance(factor, (int, float)) and factor > 1:
            base = rope.get("original_max_position_embeddings", limit) if rope.get("rope_type", rope.get("type")) \
                == "yarn" else limit
            limit, why = int(base * factor), f"{why}, with RoPE scaling x{factor:g}"
    return limit, why


def context_length(engine: Engine, hardware: Hardware, fetch: bool = True) -> int | None:
    """The engine's ``max_model_len``: as configured, or the model's own limit capped by
    ``hardware.max_model_len_cap``; None (vLLM decides) when neither is known. A configured value above the model's
    limit raises ``ValueError`` naming the field and the limit, before any engine starts."""
    limit = model_context_limit(engine.model, fetch)
    if engine.max_model_len is None:
        return min(limit[0], hardware.max_model_len_cap) if limit else None
    if limit and engine.max_model_len > limit[0]:
        raise ValueError(f"max_model_len {engine.max_model_len} is above the limit of {engine.model}: "
                         f"{limit[0]} tokens ({limit[1]}); lower max_model_len or leave it unset")
    return engine.max_model_len


def kv_cache_bytes_needed(model: str, max_model_len: int, max_num_seqs: int, dtype_bytes: int = 4) -> int | None:
    """KV-cache bytes that ``max_num_seqs`` sequences of ``max_model_len`` tokens fill (keys and values of every
    layer, from the model's config.json); None when the config does not say."""
    config = _model_config(model, fetch=False)
    if config is None:
        return None
    if isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    layers, heads, hidden = (config.get(k) for k in ("num_hidden_layers", "num_attention_heads", "hidden_size"))
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim")
    if not head_dim and isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        head_dim = hidden // heads
    if not all(isinstance(v, int) and v > 0 for v in (layers, kv_heads, head_dim)):
        return None
    return 2 * layers * kv_heads * head_dim * dtype_bytes * max_model_len * max_num_seqs


def engine_problems(section: Any, key: str, hardware: Hardware, fetch: bool = True) -> list[str]:
    """What would stop the engines of a recipe section (or a whole recipe) before they start, one line each, named
    by key: a ``max_model_len`` above the model's limit, and a model that ships no chat template while the engine
    sets none (its first prompt could not be rendered). This run's models (not yet trained; training
    saves a template with each) are skipped, and hub models unless ``fetch``."""
    from .chat import shipped_chat_template
    from .config import RUN_MODELS, PolicyEngine, ServedModel, _walk

    problems = []
    for path, value in _walk(section, (key,) if key else ()):
        if isinstance(value, ServedModel) and value.model:
            value = value.engine(value.model)
        if not isinstance(value, Engine) or value.model in RUN_MODELS or isinstance(value, PolicyEngine):
            continue  # models this run trains first (a round's policy is set by the round)
        where = ".".join(str(p) for p in path)
        try:
            context_length(value, hardware, fetch)
        except ValueError as err:
            problems.append(f"{where}.max_model_len: {err}")
        if value.chat_template is not None:
            continue
        known, template = shipped_chat_template(value.model, fetch)
        if known and template is None:
            problems.append(f"{where}.chat_template: {value.model} ships no chat template (none in "
                            "tokenizer_config.json, no chat_template.jinja): set one ('zephyr', Jinja text, or a "
                            ".jinja file)")
    return problems


def vllm_engine_kwargs(engine: Engine, hardware: Hardware) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` / ``vLLMEngineProcessorConfig.engine_kwargs`` / ``LLMConfig.engine_kwargs``."""
    max_model_len = context_length(engine, hardware)
    kwargs: dict[str, Any] = {
        "max_model_len": max_model_len,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "trust_remote_code": engine.trust_remote_code,
        "load_format": "safetensors",  # never unpickle weights
    }
    if hardware.accelerator == "cpu":
        # fp32: the CPU kernels for bf16 need AVX-512; eager: CUDA graphs do not exist here.
        kwargs.update(dtype="float32", enforce_eager=True, gpu_memory_utilization=CPU_KV_CACHE_FRACTION)
        # No chunked prefill on CPU: when a prompt is split across steps, vLLM rewinds the request's seeded
        # generator (`set_offset`), which a CPU torch.Generator does not have, and the engine dies ("CPU Generator
        # does not use offset"). Every completion carries a seed, so every split prompt killed an engine; Ray
        # restarted it and retried the batch, and the rows came out right but ~30x slower.
        kwargs.update(enable_chunked_prefill=False,
                      max_num_batched_tokens=max(CPU_MAX_BATCHED_TOKENS, max_model_len or 0))
    else:
        kwargs.update(dtype="bfloat16")
    if max_model_len is None:
        del kwargs["max_model_len"]  # vLLM derives it from the model
    if engine.kv_cache_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(engine.kv_cache_gib * 2**30)
    elif hardware.accelerator == "cpu" and max_model_len:
        # vLLM's CPU backend takes its fraction of RAM whatever the model (6.4 GiB of this 24 GiB machine for a
        # model whose 256 full-length sequences fill 0.5 GiB), and zeroes it at every start (~7 s here): take no
        # more than the engine can fill, so small models start fast and leave RAM to the rest.
        needed = kv_cache_bytes_needed(engine.model, max_model_len,
                                       int(engine.engine_kwargs.get("max_num_seqs", CPU_MAX_NUM_SEQS)))
        if needed is not None and needed < CPU_KV_CACHE_FRACTION * _host_memory_bytes():
            kwargs["kv_cache_memory_bytes"] = needed
    kwargs.update(engine.engine_kwargs)
    return kwargs


def _host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def placement_bundles(engine: Engine, hardware: Hardware) -> list[dict[str, float]]:
    """Ray placement-group bundles for one engine replica: one GPU per rank (tensor x pipeline parallel), or one
    CPU."""
    if hardware.accelerator == "cpu":
        return [{"CPU": 1}]
    return [{"GPU": 1, "CPU": 1} for _ in range(gpus_per_engine(engine))]


def gpus_per_engine(engine: Engine) -> int:
    """GPUs one engine replica takes: tensor x pipeline parallel ranks."""
    return engine.tensor_parallel_size * int(engine.engine_kwargs.get("pipeline_parallel_size", 1))


# What one CPU engine takes of a Ray cluster's logical CPUs (its bundle, and a quarter CPU for the tasks that
# tokenize its prompts: with the 30% KV-cache default, two engines at a time on 4 logical CPUs), and what is kept
# for the light tasks beside the engines (reads, pre- and postprocessing, writes): Ray Data starts every actor pool
# of an execution at once, and an execution whose engines took every CPU would wait forever for the tasks that feed
# them.
CPU_ENGINE_CPUS = 1.25
CPU_TASK_RESERVE = 1.0


def cluster_capacity(hardware: Hardware) -> tuple[float, float]:
    """(CPUs, GPUs) that engines can have: the running Ray cluster's, and on GPU at least ``hardware.num_workers``
    GPUs (an autoscaling cluster may start with none; Ray's autoscaler adds nodes for the engines that wait)."""
    import ray

    resources = ray.cluster_resources() if ray.is_initialized() else {}
    cpus = float(resources.get("CPU", os.cpu_count() or 1))
    gpus = float(resources.get("GPU", 0))
    if hardware.accelerator == "gpu":
        gpus = max(gpus, float(hardware.num_workers))
    return cpus, gpus


def _minimum_replicas(engine: Engine) -> int:
    value = engine.concurrency
    return 1 if value == "auto" else value if isinstance(value, int) else value[0]


def side_by_side(engines: list[Engine], hardware: Hardware, capacity: tuple[float, float]) -> list[list[int]]:
    """The engines (indices, in order) grouped into waves whose engines fit on the cluster at the same time: each wave
    runs as one Ray Data execution, and Ray schedules its engines. On GPU a wave holds engines whose GPUs (their
    minimum replicas) add up to the cluster's; on CPU, engines while the CPUs keep ``CPU_TASK_RESERVE`` free."""
    cpus, gpus = capacity
    room = gpus if hardware.accelerator == "gpu" else cpus - CPU_TASK_RESERVE
    waves: list[list[int]] = []
    used = 0.0
    for index, engine in enumerate(engines):
        need = _minimum_replicas(engine) * (gpus_per_engine(engine) if hardware.accelerator == "gpu"
                                            else CPU_ENGINE_CPUS)
        if waves and used + need <= room:
            waves[-1].append(index)
            used += need
        else:
            waves.append([index])
            used = need
    return waves


def engine_replicas(engine: Engine, hardware: Hardware, capacity: tuple[float, float],
                    sharing: int = 1) -> int | tuple[int, int]:
    """The engine's Ray Data actor-pool size: as configured, or for 'auto' its share of the cluster's GPUs (the
    cluster's GPUs split evenly among the ``sharing`` engines of its wave) in whole replicas; 1 on CPU."""
    if engine.concurrency != "auto":
        return engine.concurrency
    if hardware.accelerator == "cpu":
        return 1
    return max(1, int(capacity[1] // max(sharing, 1)) // gpus_per_engine(engine))


def engine_env_vars(hardware: Hardware) -> dict[str, str]:
    """Environment of the processes that hold vLLM engines: Ray Data's engine actors and ``chat``. (Ray Serve LLM
    sets its own executor for CPU replicas, the multiprocess one, whatever this says.)

    On CPU, vLLM replaces its single-process executor with a multiprocess one (to pin OpenMP threads) unless V1
    multiprocessing is off, so each engine spawns a worker process that imports torch and vLLM again: ~7 s more per
    engine start on 2 cores, for one engine of one CPU bundle. Off, the model runs in the engine-core process, as Ray
    runs a one-device engine on GPUs ("uni"); ``vllm.LLM`` (``chat``) then runs the engine in its own process.
    """
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if hardware.accelerator == "cpu" else {}


def prepare_process_env(hardware: Hardware) -> None:
    """Environment a process needs before importing torch-based libraries for this hardware."""
    if hardware.accelerator == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def detect_accelerator() -> str:
    """'gpu' when CUDA is visible to torch, else 'cpu'."""
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def local_path_or_hub_id(model: str) -> str:
    """``model`` as an absolute path when it names something on this machine (relative to this directory), else as
    given (a hub id): for processes that run in other directories (Ray Train's workers, Serve's replicas)."""
    from pathlib import Path

    local = Path(model).expanduser()
    return str(local.resolve()) if local.exists() else model


def check_model_dir(path: str) -> list[str]:
    """Problems that keep a local model directory from loading (empty list = fine). Weights must be safetensors."""
    from pathlib import Path

    model = Path(path).expanduser()
    if not model.is_dir():
        return [f"{path}: no such model directory"]
    problems = []
    if not (model / "config.json").is_file():
        problems.append(f"{path}: no config.json")
    if not any(model.glob("*.safetensors")):
        unsafe = sorted(p.name for p in model.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        problems.append(f"{path}: no .safetensors weights" + (f" (pickle weights {unsafe} are not loaded)"
                                                              if unsafe else ""))
    if not (model / "tokenizer.json").is_file() and not (model / "tokenizer_config.json").is_file():
        problems.append(f"{path}: no tokenizer")
    return problems


def local_llm(model: str, hardware: Hardware, max_model_len: int | None = None, kv_cache_gib: float | None = None,
              **engine_kwargs: Any) -> Any:
    """A ``vllm.LLM`` for ``model`` on this machine's hardware (used by ``zephyr-ray chat``). On CPU this sets
    ``engine_env_vars`` in this process's environment, so the engine runs inside this process."""
    os.environ.update(engine_env_vars(hardware))
    from vllm import LLM

    engine = Engine(model=model, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib, engine_kwargs=engine_kwargs)
    return LLM(model=model, **vllm_engine_kwargs(engine, hardware))


def actor_pool_size(replicas: int | tuple[int, int]) -> tuple[int, int]:
    """``ray.data.llm``'s concurrency for our replicas: it reads a bare number n as an autoscaling pool of 1 to n
    (which a short pass never scales up), so a number becomes the range (n, n): that many engines from the start."""
    return (replicas, replicas) if isinstance(replicas, int) else replicas


NODE_GROUP_LABEL = "ray.io/node-group"  # Ray's node label: the node type (cluster.yaml) or worker group (KubeRay)


def cpu_work_selector(hardware: Hardware) -> dict[str, str] | None:
    """The label selector for work that needs no accelerator: the recipe's CPU worker group, or None (anywhere)."""
    return {NODE_GROUP_LABEL: hardware.cpu_node_group} if hardware.cpu_node_group else None


def keep_engines_off_cpu_nodes(processor: Any, hardware: Hardware) -> Any:
    """Give a ``ray.data.llm`` processor's engine operator a selector of its own ("not the CPU group"): Ray Data
    merges the run's CPU-group selector (``configure_ray_data``) into every operator whose own selector lacks the
    key, which would send the engines to CPU nodes too. Returns the processor."""
    if hardware.cpu_node_group:
        stage = processor.get_stage_by_name("vLLMEngineStage")
        stage.map_batches_kwargs["label_selector"] = {NODE_GROUP_LABEL: f"!{hardware.cpu_node_group}"}
    return processor


def vllm_processor_config(engine: Engine, hardware: Hardware, sharing: int = 1, **overrides: Any) -> Any:
    """A ``ray.data.llm`` vLLM processor config for ``engine``: one actor pool of ``engine_replicas`` engines (its
    share of the cluster when ``sharing`` engines run side by side)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    options: dict[str, Any] = {
        "model_source": engine.model,
        "engine_kwargs": vllm_engine_kwargs(engine, hardware),
        "batch_size": engine.batch_size,
        "concurrency": actor_pool_size(engine_replicas(engine, hardware, cluster_capacity(hardware), sharing)),
        "accelerator_type": engine.accelerator_type,
        "placement_group_config": {"bundles": placement_bundles(engine, hardware)},
        "should_continue_on_error": True,  # a failed row is marked and counted, not the end of the job
    }
    # The prompt's token ids come with each row (generate.prompt_tokens_of: one path for training, generation and
    # Serve), so Ray's chat-template and tokenize stages are off.
    options.update(chat_template_stage=False, tokenize_stage=False)
    if hardware.accelerator == "cpu":
        # On a small CPU machine every stage actor is one more Python process to start (seconds each on 2 cores)
        # beside the engine's own: vLLM detokenizes the output itself. GPU runs keep Ray's detokenize stage, which
        # keeps that work off the engine.
        options.update(detokenize_stage=False, runtime_env={"env_vars": engine_env_vars(hardware)})
    options.update(overrides)
    return vLLMEngineProcessorConfig(**options)


def deepspeed_config(training: Any, hardware: Hardware, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config for a training section. Batch sizes, learning rate and clipping are "auto": the HF
    Trainer fills them from its own arguments, so the recipe states each number once.

    ZeRO-3 gathers the full 16-bit weights when the Trainer saves, so every checkpoint holds a plain HF model
    beside the per-rank optimizer shards. bf16 on GPU when the recipe asks for it; fp32 on CPU. ``load_universal``:
    resume from the universal form of a checkpoint saved by another number of ranks (``train.loop``).
    """
    config: dict[str, Any] = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": training.zero_stage, "overlap_comm": hardware.accelerator == "gpu",
                              "contiguous_gradients": True},
        "bf16": {"enabled": training.bf16 and hardware.accelerator == "gpu"},
        "zero_allow_untested_optimizer": True,
    }
    if training.zero_stage == 3:
        config["zero_optimization"].update(stage3_gather_16bit_weights_on_model_save=True,
                                           stage3_param_persistence_threshold="auto",
                                           stage3_prefetch_bucket_size="auto", reduce_bucket_size="auto")
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return config


def prepare_training_process(hardware: Hardware, cache_dir: str, deepspeed: bool = True) -> dict[str, Any]:
    """Set up one Ray Train worker for DeepSpeed; returns the extra TrainingArguments this hardware needs.

    On CPU, accelerate refuses DeepSpeed when ``use_cpu`` is set, and without DeepSpeed mode the HF side sees a world
    of one while DeepSpeed sees all workers. So: DeepSpeed mode on, a gloo process group that accelerate adopts
    (``use_configured_state``), and DeepSpeed's JIT-built CPU ops cached under ``cache_dir``. Without DeepSpeed
    (``zero_stage: 0``) the same gloo group runs plain DDP.
    """
    prepare_process_env(hardware)
    if hardware.accelerator != "cpu":
        return {}
    from accelerate import PartialState

    if deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        skip_deepspeed_inference_allreduce()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(cache_dir, "torch_extensions"))
    PartialState(backend="gloo")
    return {"ddp_backend": "gloo", "accelerator_config": {"use_configured_state": True}}


def skip_deepspeed_inference_allreduce() -> None:
    """Tell DeepSpeed not to build its shared-memory all-reduce op on CPU.

    DeepSpeed's comm backend builds this op (C++, compiled on first use) as it starts on CPU. Only DeepSpeed's
    inference tensor-parallel layers call it; ZeRO training's collectives go through the gloo group. So the op is
    marked unbuildable (DeepSpeed keeps that mark in ``deepspeed.ops.__compatible_ops__``), and the first training
    on a fresh machine skips the compile (80 CPU-seconds measured) and each rank its ~66 MB shared-memory buffer.
    """
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
