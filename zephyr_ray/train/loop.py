"""What dSFT and dDPO share: the Ray Train ``TorchTrainer`` around a TRL trainer, under DeepSpeed, with checkpoints
reported to Ray Train, resume from the latest one, and the export of the final model.

Each Ray Train worker runs the TRL trainer of its stage (``sft.py``, ``dpo.py``) on the stage's Parquet input,
loaded with ``datasets``; the HF Trainer's distributed sampler gives each rank its share, in an order fixed by the
recipe's seed, so a resumed run sees the batches an uninterrupted one would.

Checkpoints: every ``save_steps`` optimizer steps, and at the last step, the Trainer writes a checkpoint (the ZeRO-3
shards of each rank, and the full weights gathered on save) straight into Ray Train's experiment directory
(``<run_dir>/<stage>/ray/<stage>/hf``: the run directory is the storage every node shares), and rank 0 registers that
directory with Ray Train as it is (``report_checkpoint_once``): one copy per save, not one per rank. Ray Train keeps
the newest ``save_total_limit`` and deletes the rest. A worker that dies makes Ray Train restart the group
(``FailureConfig``); the restarted workers and a re-run of the stage both resume from the latest checkpoint, read
where it lies.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import Hardware, Recipe, Training, derive_batch
from ..data import SUCCESS_MARKER, write_text_atomic
from ..engines import local_path_or_hub_id
from ..stage import StageResult

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               *TOKENIZER_FILES)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# DeepSpeed's model states of a checkpoint: rank 0's under ZeRO-3, the one file under ZeRO-1/2
MODEL_STATES = ("zero_pp_rank_0_mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt")


def chat_template_of(training: Training) -> str:
    from ..chat import ZEPHYR_CHAT_TEMPLATE

    return ZEPHYR_CHAT_TEMPLATE if training.chat_template == "zephyr" else training.chat_template


def load_tokenizer(model: str, training: Training) -> Any:
    """The model's tokenizer with the recipe's chat template, as every other path renders it (led by the BOS when
    the tokenizer adds one: ``chat.prompt_template``), saved with the trained model; pad falls back to EOS (Mistral
    has no pad token)."""
    from transformers import AutoTokenizer

    from ..chat import prompt_template

    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    tokenizer.chat_template = prompt_template(tokenizer, chat_template_of(training))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def worker_inputs(config: dict[str, Any], training: Training) -> tuple[dict[str, Any], Any, Any]:
    """In a Ray Train worker: set up the process for this hardware, then (extra TrainingArguments, tokenizer with
    the recipe's chat template, the stage's training rows as a ``datasets.Dataset``)."""
    import datasets

    from ..engines import prepare_training_process

    recipe: Recipe = config["recipe"]
    check_run_dir_is_shared(config["data_files"])
    config["rss_before_model_mib"] = resident_mib()  # the rank's memory record (attempt_log_callback) starts here
    extra = prepare_training_process(recipe.hardware, config["cache_dir"], deepspeed=training.zero_stage > 0)
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", config["tensorboard_dir"])
    tokenizer = load_tokenizer(config["model"], training)
    rows = datasets.load_dataset("parquet", data_files=config["data_files"], split="train")
    if "prompt_id" in rows.column_names:  # Ray Data writes rows in no fixed order: one order, so a seed is one model
        rows = rows.sort("prompt_id")
    return extra, tokenizer, rows


def check_run_dir_is_shared(data_files: list[str]) -> None:
    """Every rank reads the stage's input from the run directory and writes its checkpoint shards there: on a node
    that does not see the files the driver's node wrote, say so, instead of a bare FileNotFoundError."""
    missing = [f for f in data_files if not Path(f).exists()]
    if missing:
        import socket

        raise FileNotFoundError(
            f"{missing[0]} (and {len(missing) - 1} more) not found on {socket.gethostname()}: this stage's run "
            "directory must be on storage every node mounts (NFS, EFS, a shared volume); pass such a --run-dir")


def attention_implementation(hardware: Hardware, bf16: bool = True) -> str:
    """FlashAttention-2 on GPU when the ``flash-attn`` extra is installed and the model trains in bf16 (its kernels
    take no fp32), else PyTorch's SDPA (CPU: always SDPA)."""
    import importlib.util

    if hardware.accelerator == "gpu" and bf16 and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def model_init_kwargs(training: Training, hardware: Hardware) -> dict[str, Any]:
    """How the TRL trainers load the model (and DPO's reference): bf16 on GPU when the recipe asks, fp32 on CPU;
    the attention kernel; never remote code, never pickled weights."""
    bf16 = training.bf16 and hardware.accelerator == "gpu"
    return {"dtype": "bfloat16" if bf16 else "float32", "attn_implementation": attention_implementation(hardware, bf16),
            "trust_remote_code": False, "use_safetensors": True}


def trainer_arguments(training: Training, hardware: Hardware, output_dir: str, extra: dict[str, Any],
                      load_universal: bool = False, **stage_args: Any) -> dict:
    """TrainingArguments fields for TRL's SFTConfig/DPOConfig from a recipe section and the stage's own fields
    (``stage_args``: SFT's packing, DPO's beta, ...); ``trl_args`` win over all of them. ``load_universal``: the
    checkpoint to resume from is a universal one (``resume_checkpoint``)."""
    from ..engines import deepspeed_config

    per_device, accumulation = derive_batch(training.global_batch_size, hardware.num_workers,
                                            training.max_per_device_batch_size)
    gpu = hardware.accelerator == "gpu"
    args = dict(output_dir=output_dir, per_device_train_batch_size=per_device,
                gradient_accumulation_steps=accumulation, learning_rate=training.learning_rate,
                lr_scheduler_type=training.lr_scheduler_type, warmup_steps=training.warmup_ratio,  # < 1: a ratio
                num_train_epochs=training.num_epochs, max_length=training.max_length, bf16=training.bf16 and gpu,
                gradient_checkpointing=training.gradient_checkpointing and gpu, seed=training.seed,
                data_seed=training.seed, logging_steps=1, save_strategy="steps", save_steps=training.save_steps,
                save_only_model=False, report_to=list(training.report_to), disable_tqdm=True, dataloader_num_workers=0,
                model_init_kwargs=model_init_kwargs(training, hardware),
                deepspeed=deepspeed_config(training, hardware, load_universal) if training.zero_stage else None,
                **extra)
    args.update(stage_args)
    args.update(training.trl_args)
    return args


def save_at_end_callback() -> Any:
    """A checkpoint at the last step too, whatever ``save_steps`` is, so the final model is always reported."""
    from transformers import TrainerCallback

    class SaveAtEnd(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.global_step >= state.max_steps:
                control.should_save = True
            return control

    return SaveAtEnd()


def resident_mib() -> float:
    """This process's resident memory now, in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_resident_mib() -> float:
    """This process's peak resident memory so far, in MiB: the kernel's high-water mark, which can trail the
    resident set read just now by a few pages (seen: 1 MiB), so never below that."""
    import resource

    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, resident_mib())  # Linux counts KiB


def attempt_log_callback(record_dir: str, rss_before_model_mib: float | None = None) -> Any:
    """Each rank appends one line per (re)start of training to ``record_dir/rank<N>.jsonl``: the global step it
    starts from (0, or the checkpoint's step after a restart), the Ray node it runs on, and how many parameters it
    holds itself, next to the model's total (under ZeRO-3 each rank keeps about 1/world of them). When training
    ends, ``rank<N>-memory.json``: the rank's measured memory, where it went and when. Its resident set before the
    model was loaded; at the start of training (model loaded, DeepSpeed's engine or DDP's wrapper and the optimizer
    built), with the peak so far (loading a whole model before partitioning it shows there); after the first step
    (gradients and optimizer states exist); the process's peak; and the accelerator's peak allocation on GPU."""
    import torch.distributed as dist
    from transformers import TrainerCallback

    def rank() -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    class AttemptLog(TrainerCallback):
        def __init__(self) -> None:
            self.memory: dict[str, float] = {}

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            import torch

            accelerator = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
            write_text_atomic(Path(record_dir) / f"rank{rank()}-memory.json", json.dumps({
                "rank": rank(), "peak_rss_mib": round(peak_resident_mib(), 1),
                "rss_before_model_mib": rss_before_model_mib, **self.memory,
                "accelerator_peak_mib": accelerator, "global_step": state.global_step}))

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if "rss_after_first_step_mib" not in self.memory:
                self.memory["rss_after_first_step_mib"] = round(resident_mib(), 1)

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            self.memory.update(rss_at_train_begin_mib=round(resident_mib(), 1),
                               peak_rss_at_train_begin_mib=round(peak_resident_mib(), 1))
            params = list(model.parameters()) if model is not None else []
            total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
            local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
            import ray

            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
            line = {"rank": rank(), "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                    "node_id": node, "global_step_at_start": state.global_step, "max_steps": state.max_steps,
                    "params_held": local, "params_total": total, "pid": os.getpid()}
            Path(record_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(record_dir) / f"rank{rank()}.jsonl", "a") as log:
                log.write(json.dumps(line) + "\n")

    return AttemptLog()


def ray_metrics_callback(stage: str) -> Any:
    """Rank 0 publishes each logged step (loss, DPO rewards, ...) as Ray metrics, for the dashboard and Grafana."""
    from transformers import TrainerCallback

    from ..metrics import record_training

    class RayMetrics(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if state.is_world_process_zero and logs:
                record_training(stage, {**logs, "step": state.global_step})

    return RayMetrics()


def latest_hf_checkpoint() -> str | None:
    """The HF checkpoint this worker restarts from (None on a fresh start): read where it lies in the run's shared
    storage; copied to local disk only from a remote filesystem."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    local = getattr(checkpoint.filesystem, "type_name", "local") == "local"
    path = checkpoint.path if local else checkpoint.to_directory()
    logger.info("resuming from %s", path)
    return path


def resume_checkpoint(zero_stage: int) -> tuple[str | None, bool]:
    """(the HF checkpoint this worker restarts from, or None; whether DeepSpeed must load it as a universal one,
    ``universal_needed``). Rank 0 converts it once, beside its shards, while the other ranks wait for it."""
    import time

    import torch.distributed as dist

    path = latest_hf_checkpoint()
    world = dist.get_world_size() if dist.is_initialized() else 1
    if path is None or not universal_needed(Path(path), world, zero_stage):
        return path, False
    if not dist.is_initialized() or dist.get_rank() == 0:
        saved = saved_deepspeed_layout(Path(path))
        logger.info("the checkpoint %s was saved by %d ranks under ZeRO stage %d, this group has %d under stage %d: "
                    "loading it as a universal checkpoint", path, *saved, world, zero_stage)
        convert_to_universal(Path(path), saved[0])
    else:  # polled, not a collective barrier: a 7B conversion can outlast the process group's timeout
        while not universal_ready(Path(path)):
            time.sleep(2)
    return path, True


def universal_needed(checkpoint: Path, world: int, zero_stage: int) -> bool:
    """Whether a group of ``world`` ranks under ``zero_stage`` must load the checkpoint as a universal one.

    DeepSpeed loads ZeRO shards only into as many ranks as wrote them. When the worker group differs in size from
    the one that saved the checkpoint (a job resubmitted with fewer workers after a node was lost for good, or with
    more), or the recipe's ``zero_stage`` is 1 where the checkpoint's was 2 or the other way, the checkpoint is
    loaded in DeepSpeed's universal format (``checkpoint.load_universal``): training resumes at its step with its
    optimizer and scheduler state; the recipe's ``global_batch_size`` is kept across world sizes (the per-device
    batch and accumulation are derived from it), so each later step trains the rows it would have. (Not the last
    step of an epoch whose rows do not fill it: accelerate evens out the ranks' last batches by repeating rows, one
    rank does not, so that step differs between world sizes.)

    Between ZeRO-3 and ZeRO-1/2, and between DeepSpeed and none (``zero_stage: 0``), the optimizer state cannot be
    carried (DeepSpeed 0.19 writes even a universal checkpoint in its stage's layout, and each loader reads only its
    own: seen here, ZeRO-3's wants the step in ``optimizer_state.pt``, ZeRO-1/2's in each parameter's ``step.pt``):
    a ValueError says so and what to do, rather than a resume without it or DeepSpeed's own assertion."""
    saved = saved_deepspeed_layout(checkpoint)
    written = saved[1] if saved else 0
    family = {0: "no DeepSpeed", 1: "ZeRO-1/2", 2: "ZeRO-1/2", 3: "ZeRO-3"}
    if family[written] != family[zero_stage]:
        held = f"ZeRO stage {written}'s state" if saved else "no DeepSpeed state (zero_stage 0)"
        other = f" (or {3 - written})" if written in (1, 2) else ""
        raise ValueError(f"{checkpoint}: this checkpoint holds {held} and the recipe now says zero_stage "
                         f"{zero_stage}; {family[written]} and {family[zero_stage]} cannot load each other's "
                         f"optimizer state: set zero_stage back to {written}{other}, or remove the stage's "
                         f"checkpoints ({checkpoint.parent.parent}) to train from the start")
    return saved is not None and saved != (world, zero_stage)


def refuse_unloadable_checkpoints(experiment: Path, zero_stage: int) -> None:
    """``universal_needed``'s ValueError for the newest DeepSpeed checkpoint of a stage's Ray Train experiment,
    before any worker starts: an edited ``zero_stage`` that cannot load it then fails once, with that message,
    instead of in every worker start Ray Train retries (``max_failures``, unlimited at -1). The workers check again
    on the checkpoint Ray Train gives them (and a checkpoint without DeepSpeed state is only seen there)."""
    steps = {int(path.name.split("-")[1]): path for path in (experiment / "hf").glob("checkpoint-*")
             if path.name.split("-")[1].isdigit() and (path / "latest").is_file()}
    if steps:
        universal_needed(steps[max(steps)], 1, zero_stage)


def saved_deepspeed_layout(checkpoint: Path) -> tuple[int, int] | None:
    """(data-parallel ranks, ZeRO stage) that saved the DeepSpeed state of an HF checkpoint, as DeepSpeed itself
    records them in the model states (``dp_world_size``, not a count of shard files, which a re-save of the same
    step by fewer ranks would leave stale; the stage from the config it saved with), or None when it holds none
    (trained without DeepSpeed)."""
    import torch

    latest = checkpoint / "latest"
    if not latest.is_file():
        return None
    folder = checkpoint / latest.read_text().strip()
    for name in MODEL_STATES:
        if (folder / name).is_file():  # DeepSpeed's own file, read as DeepSpeed reads it (mapped: not the weights)
            states = torch.load(folder / name, map_location="cpu", weights_only=False, mmap=True)
            stage = states.get("ds_config", {}).get("zero_optimization", {}).get("stage")
            return int(states["dp_world_size"]), int(stage if stage is not None else 3 if "zero_pp" in name else 2)
    return None


def universal_ready(checkpoint: Path) -> bool:
    """Whether the checkpoint's universal form is complete: ``latest_universal`` is written last, naming it."""
    tag = (checkpoint / "latest").read_text().strip()
    pointer = checkpoint / "latest_universal"
    return ((checkpoint / f"{tag}_universal").is_dir() and pointer.is_file()
            and pointer.read_text().strip() == f"{tag}_universal")


def convert_to_universal(checkpoint: Path, saved: int) -> None:
    """DeepSpeed's ``ds_to_universal`` on the checkpoint's ZeRO state of ``saved`` ranks (shards of other ranks, left
    by a cut-off save of the same step, are not read), into ``<tag>_universal`` beside it, named by
    ``latest_universal``. In a process of its own (it forks workers); written under a temporary name and renamed, so
    a conversion cut short is redone and one done on an earlier start is reused."""
    import re
    import subprocess
    import sys

    if universal_ready(checkpoint):
        return
    tag = (checkpoint / "latest").read_text().strip()
    target = checkpoint / f"{tag}_universal"
    for stale in checkpoint.glob(".*.tmp-*"):  # an earlier start's cut-off conversion
        shutil.rmtree(stale, ignore_errors=True)
    scratch = checkpoint / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    shards = scratch.with_name(scratch.name + "-input")
    shards.mkdir()
    for file in (checkpoint / tag).iterdir():
        rank = re.search(r"zero_pp_rank_(\d+)_", file.name)
        if rank is None or int(rank[1]) < saved:
            (shards / file.name).symlink_to(file.resolve())
    done = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(shards), "--output_folder", str(scratch), "--inject_missing_state"],
                          capture_output=True, text=True)
    shutil.rmtree(shards)
    if done.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        output = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        raise RuntimeError(f"converting {checkpoint / tag} to a universal checkpoint failed (exit "
                           f"{done.returncode}):\n{output}")
    logger.debug("ds_to_universal on %s:\n%s", checkpoint / tag, done.stdout[-5000:] + done.stderr[-5000:])
    shutil.rmtree(target, ignore_errors=True)
    scratch.rename(target)
    write_text_atomic(checkpoint / "latest_universal", target.name)
    logger.info("converted %s to a universal checkpoint: %s", checkpoint / tag, target)


def universal_resume_callback(checkpoint: str) -> Any:
    """Two mends, before the first step, of what DeepSpeed 0.19's ZeRO-3 loader leaves after loading the universal
    form of ``checkpoint`` (seen here; both harmless after a ZeRO-1/2 load, whose loader gets them right):

    - every optimizer sub-group's Adam state holds the same ``step`` tensor (its loader assigns one object to
      each), which PyTorch's Adam advances in place once per sub-group and step, so every sub-group's bias
      correction runs ahead: each gets its own copy (on its parameter's device where the optimizer is fused or
      capturable, as PyTorch requires there). Without it, at the first step after such a resume the norm weights
      (the second sub-group) moved differently from a run that kept its ranks, the other weights alike from the
      next step on.
    - every parameter group gets the first group's hyperparameters, so with a ``weight_decay`` the norms and biases
      (the trainer's group without decay) are decayed too: each group gets back its own, as the checkpoint saved
      them. Without it (weight_decay 0.1), losses 3e-5 apart at the second step after a resume, 5e-4 by the
      eighth."""
    import torch
    from transformers import TrainerCallback

    universal = Path(checkpoint) / (Path(checkpoint) / "latest_universal").read_text().strip()

    class UniversalResume(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
            while hasattr(optimizer, "optimizer"):  # accelerate's wrapper -> DeepSpeed's ZeRO -> the torch optimizer
                optimizer = optimizer.optimizer
            groups = getattr(optimizer, "param_groups", [])
            saved = torch.load(universal / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False,
                               mmap=True)["param_groups"]
            if len(saved) == len(groups):
                for group, saved_group in zip(groups, saved):
                    group.update({key: value for key, value in saved_group.items() if key != "params"})
            else:  # not seen: the same model and trainer make the same groups
                logger.warning("%s: %d optimizer parameter groups saved, %d now: their hyperparameters are left as "
                               "DeepSpeed loaded them", universal, len(saved), len(groups))
            on_device = any(g.get("fused") or g.get("capturable") for g in groups)
            untied = 0
            for param, param_state in getattr(optimizer, "state", {}).items():
                step = param_state.get("step")
                if torch.is_tensor(step):
                    param_state["step"] = step.detach().clone().to(param.device if on_device else step.device)
                    untied += 1
            logger.info("resumed from a universal checkpoint: %d optimizer states have a step of their own, %d "
                        "parameter groups their own hyperparameters (weight decay %s)", untied, len(groups),
                        [group.get("weight_decay") for group in groups])

    return UniversalResume()


def report_checkpoint_once() -> Any:
    """After each save, every rank reports to Ray Train (a barrier: all ranks have written their shards) and rank 0
    alone registers the checkpoint directory, already in the experiment directory, without copying it.

    Ray's ``RayTrainReportCallback`` instead has every rank copy the whole checkpoint folder to local temp and upload
    it: for a 7B model under ZeRO-3 on 16 GPUs, 16 copies of ~100 GB per save."""
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode
    from transformers import TrainerCallback

    class ReportCheckpointOnce(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            metrics: dict[str, Any] = {}
            for log in state.log_history:
                metrics.update(log)
            checkpoint = None
            if state.is_world_process_zero:
                checkpoint = Checkpoint.from_directory(os.path.join(args.output_dir,
                                                                    f"checkpoint-{state.global_step}"))
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)

    return ReportCheckpointOnce()


def train_with_ray(trainer: Any, resume_from: str | None, config: dict[str, Any], universal: bool = False) -> None:
    """Report checkpoints to Ray Train, resume from ``resume_from`` (a universal checkpoint with ``universal``),
    train."""
    from ray.train.huggingface.transformers import prepare_trainer

    if universal:
        trainer.add_callback(universal_resume_callback(resume_from))
    trainer.add_callback(attempt_log_callback(config["record_dir"], config.get("rss_before_model_mib")))
    trainer.add_callback(ray_metrics_callback(config["stage"]))
    trainer.add_callback(save_at_end_callback())
    trainer.add_callback(report_checkpoint_once())
    trainer = prepare_trainer(trainer)
    trainer.train(resume_from_checkpoint=resume_from)


def loop_config(stage: str, recipe: Recipe, model: str, data_files: list[str], run_dir: Path,
                reference: str | None = None) -> dict[str, Any]:
    """What every Ray Train worker of ``stage`` gets: the recipe, the model to start from (and DPO's reference), its
    Parquet input, and where to write (absolute paths: Ray Train runs its workers in a directory of its own, where
    a recipe's relative paths lead nowhere)."""
    stage_dir = (run_dir / stage).resolve()
    return {"stage": stage, "recipe": recipe, "model": local_path_or_hub_id(model),
            "reference": local_path_or_hub_id(reference) if reference else None,
            "data_files": [str(Path(f).resolve()) for f in data_files],
            "output_dir": str(ray_experiment_dir(stage, run_dir) / "hf"),
            "cache_dir": str(build_cache_dir()), "record_dir": str(stage_dir / "attempts"),
            "tensorboard_dir": str(stage_dir / "tensorboard")}


def ray_experiment_dir(stage: str, run_dir: Path) -> Path:
    """Ray Train's experiment directory for ``stage``: its storage path (``<run_dir>/<stage>/ray``) and run name."""
    return (run_dir / stage / "ray" / stage).resolve()


def build_cache_dir() -> Path:
    """Where DeepSpeed's JIT-built CPU ops go, should a recipe need one (the shared-memory all-reduce is skipped:
    ``engines.skip_deepspeed_inference_allreduce``): per user and machine (``$ZEPHYR_RAY_CACHE``, else
    ``~/.cache/zephyr-ray``), so each is compiled once, not once per run directory. Torch rebuilds an op whose
    sources or flags changed, and locks the directory while it builds."""
    configured = os.environ.get("ZEPHYR_RAY_CACHE")
    return Path(configured or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "zephyr-ray").expanduser()


def run_torch_trainer(stage: str, worker: Callable[[dict], None], worker_config: dict[str, Any], recipe: Recipe,
                      training: Training, run_dir: Path) -> Any:
    """Run ``worker`` on ``hardware.num_workers`` Ray Train workers; returns Ray Train's result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    refuse_unloadable_checkpoints(ray_experiment_dir(stage, run_dir), training.zero_stage)
    hardware = recipe.hardware
    gpu = hardware.accelerator == "gpu"
    resources = {"CPU": hardware.cpus_per_worker, **({"GPU": 1} if gpu else {})}
    trainer = TorchTrainer(
        worker,
        train_loop_config=worker_config,
        scaling_config=ScalingConfig(num_workers=hardware.num_workers, use_gpu=gpu, resources_per_worker=resources),
        run_config=RunConfig(name=stage, storage_path=str(ray_experiment_dir(stage, run_dir).parent),
                             failure_config=FailureConfig(max_failures=training.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=training.save_total_limit),
                             # Ray Train's print-to-logger patch defeats dill's stdout capture: datasets'
                             # fingerprinting of TRL's map functions then dumps their bytecode into the logs
                             worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}),
    )
    return trainer.fit()


def merge_adapter(source: Path, out: Path) -> None:
    """A LoRA checkpoint (adapter only) -> the base model with the adapter merged in, at ``out``, so the exported
    model serves and trains on (DPO) like any other; the adapter itself is kept in ``out/adapter``. The base is
    loaded from the path or hub id the adapter names, the one the workers trained from."""
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(source, dtype="auto", trust_remote_code=False)
    model.merge_and_unload().save_pretrained(out, safe_serialization=True)
    (out / "adapter").mkdir()
    for name in ADAPTER_FILES:
        shutil.copy2(source / name, out / "adapter" / name)


def export_model(checkpoint: Any, out: Path, card: str) -> None:
    """The final checkpoint's full weights, config, tokenizer (with the chat template) and generation config as a
    plain HF directory at ``out`` (written beside it, then renamed into place), plus ``README.md`` (the card)."""
    from transformers import GenerationConfig

    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    with checkpoint.as_directory() as directory:
        source = Path(directory)
        tmp.mkdir(parents=True)
        if (source / "trainer_state.json").is_file():  # every logged step: the report's curves
            history = json.loads((source / "trainer_state.json").read_text()).get("log_history", [])
            (out.parent / "log_history.json").write_text(json.dumps(history, indent=1) + "\n")
        if (source / "adapter_config.json").is_file():
            merge_adapter(source, tmp)
        # a model over transformers' shard size (50 GB) comes as model-0000i-of-0000n.safetensors with an index
        for name in [*MODEL_FILES, *sorted(p.name for p in source.glob("model-*-of-*.safetensors"))]:
            if (source / name).is_file() and not (tmp / name).exists():
                shutil.copy2(source / name, tmp / name)
    if not any(tmp.glob("*.safetensors")):
        raise RuntimeError(f"{source}: the final checkpoint holds no safetensors weights")
    config = json.loads((tmp / "config.json").read_text())
    tokenizer_config = json.loads((tmp / "tokenizer_config.json").read_text())
    generation = GenerationConfig.from_pretrained(tmp) if (tmp / "generation_config.json").is_file() \
        else GenerationConfig()
    eos = config.get("eos_token_id")
    generation.eos_token_id, generation.pad_token_id = eos, config.get("pad_token_id", eos)
    generation.bos_token_id = config.get("bos_token_id")
    generation.save_pretrained(tmp)
    if "chat_template" not in tokenizer_config and not (tmp / "chat_template.jinja").is_file():
        raise RuntimeError(f"{source}: the tokenizer lost its chat template")
    (tmp / "README.md").write_text(card)
    (tmp / SUCCESS_MARKER).write_text(json.dumps({"model": out.name}) + "\n")  # what a re-run looks for
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def model_card(stage: str, recipe: Recipe, training: Training, base: str, data: dict[str, Any],
               metrics: dict[str, Any]) -> str:
    """README.md of an exported model: what it is, the recipe section, the data it saw, its final metrics."""
    import yaml

    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return "\n".join([
        f"# {recipe.name}: {stage}",
        "",
        (f"Trained by zephyr-ray stage `{stage}` from `{base}` with the recipe `{recipe.name}` "
         f"({recipe.hardware.num_workers} {recipe.hardware.accelerator} workers, ZeRO stage {training.zero_stage})."),
        ("Chat template: Zephyr's (`<|system|>`, `<|user|>`, `<|assistant|>`, each turn closed by `</s>`)."
         if training.chat_template == "zephyr" else "Chat template: the recipe's own (see chat_template.jinja)."),
        "",
        "## Data",
        "```json", json.dumps(data, indent=2), "```",
        "",
        f"## Recipe section `{stage}`",
        "```yaml", yaml.safe_dump(training.model_dump(), sort_keys=False).strip(), "```",
        "",
        "## Final metrics",
        "```json", json.dumps(numbers, indent=2), "```",
        "",
    ])


def finish(stage: str, result: Any, recipe: Recipe, training: Training, base: str, data: dict[str, Any],
           run_dir: Path, seconds: float) -> StageResult:
    """Export the final model and record the stage."""
    if result.error is not None:
        raise RuntimeError(f"{stage}: training failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"{stage}: training reported no checkpoint")
    out = run_dir / stage / "model"
    metrics = dict(result.metrics or {})
    export_model(result.checkpoint, out, model_card(stage, recipe, training, base, data, metrics))
    (out.parent / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    counts = {"train_rows": data.get("rows", 0), "global_step": metrics.get("step", metrics.get("global_step", 0))}
    stage_result = StageResult(stage, counts=counts, seconds=seconds,
                               outputs={"model": str(out), "checkpoints": str(run_dir / stage / "ray")})
    stage_result.save(run_dir)
    logger.info("%s: model exported to %s (%s)", stage, out, {k: metrics[k] for k in list(metrics)[:6]})
    return stage_result
