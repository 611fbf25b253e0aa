"""Training benchmark: the train_sft stage (Ray Train + DeepSpeed ZeRO-3, 2 workers; and ZeRO-2, and DDP) vs the
same TRL SFTTrainer in one plain process, on the same data, global batch and model.

    python bench/training.py [--models artifacts/tiny-models] [--epochs 6] [--global-batch 8]

Prints, in one run:
- tokens/s of each, measured as the *incremental* rate between E and 3E epochs (start-up of Ray Train, DeepSpeed
  and the processes cancels out), after an untimed warm-up run of each (one-time work, such as a JIT build of an op
  a configuration needs, happens there, not in a timed run); their ratio is the distributed path's overhead. On
  this 2-core CPU machine the two workers share the cores the plain process has to itself, so the ratio bounds the
  overhead from above;
- per-rank memory, measured: each rank's peak resident memory minus what it held before loading the model
  (``attempts/rank<N>-memory.json``, which every training stage writes), for ZeRO-3 and DDP (``zero_stage: 0``) at
  2 workers, training a few steps of a ~80M-parameter model of the student's shape (``--memory-model``: hidden
  size, layers; random weights) so that the model's state, not the libraries, fills it; beside it the model state
  each rank holds by count (fp32 parameter + gradient + two Adam moments = 16 bytes per parameter), and where each
  rank's memory went: at the start of training (model loaded, engine and optimizer built; with the peak by then,
  where loading a whole model before partitioning it shows), after the first step, at the end (``--memory-only``
  runs just these);
- with ``--step-breakdown`` instead: DeepSpeed's own forward, backward and optimizer-step times per micro-step
  (``wall_clock_breakdown``) under ZeRO-2 and ZeRO-3 on the tiny student: what ZeRO-3's parameter gathering costs.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BYTES_PER_PARAM = 16  # fp32 weights, gradients, Adam m and v
REPEAT = 4  # the corpus' dialogues, repeated, as training rows
BATCH: dict[str, int] = {}  # --global-batch: the same global batch (split over 2 ranks) for every run


def dialogues() -> list[dict]:
    from zephyr_ray.data import prompt_id_of
    from zephyr_ray.tiny import load_corpus

    rows = []
    for row in load_corpus() * REPEAT:
        chat = [m for m in row["messages"] if m["role"] != "system"]
        rows.append({"prompt": chat[0]["content"], "prompt_id": prompt_id_of(chat[0]["content"]), "messages": chat})
    return rows


def recipe_for(models: Path, tmp: Path, name: str, **train_sft) -> Path:
    data = yaml.safe_load((REPO / "jobs" / "configs" / "tiny-cpu.yaml").read_text().replace(
        "./artifacts/tiny-models", str(models.resolve())))
    data["train_sft"].update(save_steps=10_000, max_failures=0, **BATCH, **train_sft)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def ray_train(models: Path, tmp: Path, name: str, **train_sft) -> tuple[float, float, Path]:
    """(seconds, tokens, run dir) of one train_sft stage run."""
    import ray

    from zephyr_ray.config import load_recipe
    from zephyr_ray.data import DialogueRow, write_parquet_atomic
    from zephyr_ray.stages import run_stage

    run = tmp / name
    write_parquet_atomic(ray.data.from_items(dialogues()), run / "synthesize" / "dialogues",
                         schema=DialogueRow.arrow_schema())
    recipe = load_recipe(recipe_for(models, tmp, name, **train_sft))
    started = time.perf_counter()
    run_stage("train_sft", recipe, run)
    seconds = time.perf_counter() - started
    return seconds, json.loads((run / "train_sft" / "metrics.json").read_text())["num_tokens"], run


def plain(models: Path, epochs: float, tmp: Path) -> tuple[float, float]:
    """(seconds, tokens) of TRL's SFTTrainer in this process: no Ray, no DeepSpeed, the whole global batch."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    from zephyr_ray.config import load_recipe
    from zephyr_ray.train.loop import load_tokenizer

    cfg = load_recipe(recipe_for(models, tmp, "plain")).train_sft
    tokenizer = load_tokenizer(cfg.model, cfg)
    train = datasets.Dataset.from_list([{"messages": r["messages"]} for r in dialogues()])
    args = SFTConfig(output_dir=str(tmp / f"plain-{epochs}"), per_device_train_batch_size=cfg.global_batch_size,
                     gradient_accumulation_steps=1, learning_rate=cfg.learning_rate, num_train_epochs=epochs,
                     max_length=cfg.max_length, packing=cfg.packing, use_cpu=True, bf16=False, report_to=[],
                     save_strategy="no", logging_steps=1, disable_tqdm=True, seed=cfg.seed)
    trainer = SFTTrainer(model=cfg.model, args=args, train_dataset=train, processing_class=tokenizer)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return seconds, max(log.get("num_tokens", 0) for log in trainer.state.log_history)


def memory_model(models: Path, tmp: Path, hidden: int, layers: int) -> Path:
    """A model of the student's architecture and tokenizer, ``hidden`` wide and ``layers`` deep, random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    student = models / "student"
    config = AutoConfig.from_pretrained(student)
    heads = hidden // config.head_dim
    config.update({"hidden_size": hidden, "intermediate_size": hidden * 8 // 3, "num_hidden_layers": layers,
                   "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 4)})
    torch.manual_seed(0)
    out = tmp / f"memory-model-{hidden}x{layers}"
    AutoModelForCausalLM.from_config(config).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(student).save_pretrained(out)  # with the student's chat template
    return out


MEMORY_POINTS = {"at train begin": "rss_at_train_begin_mib", "peak by then": "peak_rss_at_train_begin_mib",
                 "after step 1": "rss_after_first_step_mib", "peak": "peak_rss_mib"}


def memory_records(run: Path) -> list[dict]:
    attempts = run / "train_sft" / "attempts"
    return [json.loads(path.read_text()) for path in sorted(attempts.glob("rank*-memory.json"))]


def measured_memory(run: Path) -> list[float]:
    """Per rank: peak resident MiB minus the MiB held before the model was loaded."""
    return [r["peak_rss_mib"] - r["rss_before_model_mib"] for r in memory_records(run)]


def memory_split(run: Path) -> str:
    """Each rank's resident MiB above what it held before the model, at each point its record has."""
    return "; ".join(f"rank {r['rank']}: " + ", ".join(f"{point} {r[key] - r['rss_before_model_mib']:.0f}"
                                                        for point, key in MEMORY_POINTS.items())
                     for r in memory_records(run))


def stage_deepspeed_config(models: Path, tmp: Path, name: str) -> dict:
    """The DeepSpeed config train_sft builds for the benchmark's recipe, to change one setting of."""
    from zephyr_ray.config import load_recipe
    from zephyr_ray.engines import deepspeed_config

    recipe = load_recipe(recipe_for(models, tmp, name))
    return deepspeed_config(recipe.train_sft, recipe.hardware)


def live_limited_deepspeed(args: argparse.Namespace, tmp: Path) -> dict:
    """The stage's own DeepSpeed config with ``stage3_max_live_parameters`` (and the prefetch bucket) lowered."""
    config = stage_deepspeed_config(args.models, tmp, "live-limited")
    config["zero_optimization"].update(stage3_max_live_parameters=int(args.max_live_parameters),
                                       stage3_prefetch_bucket_size=int(args.max_live_parameters))
    return config


BREAKDOWN = re.compile(r"time \(ms\) \| fwd: ([\d.]+) \| bwd: ([\d.]+) \|.*\| step: ([\d.]+)")


def step_breakdown(models: Path, tmp: Path, stage: int, steps: int = 40) -> tuple[float, float, float]:
    """Median (forward, backward, optimizer step) ms of rank 0's steps under DeepSpeed ZeRO-``stage`` on the tiny
    student, from DeepSpeed's own ``wall_clock_breakdown`` lines in the Ray workers' logs (the first 10 steps left
    out). Each stage runs on a Ray of its own, so its logs hold its workers only."""
    import statistics

    import ray

    config = stage_deepspeed_config(models, tmp, f"breakdown-{stage}")
    config["zero_optimization"]["stage"] = stage
    config.update(wall_clock_breakdown=True, steps_per_print=1)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _temp_dir=str(tmp / f"ray{stage}"))
    ray_train(models, tmp, f"breakdown-zero{stage}", trl_args={"max_steps": steps, "deepspeed": config})
    ray.shutdown()
    lines = [match.groups() for log in (tmp / f"ray{stage}").glob("session_*/logs/worker-*.out")
             for match in BREAKDOWN.finditer(log.read_text(errors="replace"))]
    times = [[float(t) for t in line] for line in lines[10:]]
    return tuple(statistics.median(column) for column in zip(*times, strict=True))  # type: ignore[return-value]


def held_params(run: Path) -> list[int]:
    lines = [json.loads(line) for path in sorted((run / "train_sft" / "attempts").glob("rank*.jsonl"))
             for line in path.read_text().splitlines()]
    return [line["params_held"] for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=REPO / "artifacts" / "tiny-models")
    parser.add_argument("--epochs", type=float, default=6.0,
                        help="E; the runs train E and 3E epochs (2 vs 6 was within a start-up's variation for DDP)")
    parser.add_argument("--memory-model", type=int, nargs=2, default=(768, 12), metavar=("HIDDEN", "LAYERS"))
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--memory-only", action="store_true", help="only the per-rank memory runs")
    parser.add_argument("--step-breakdown", action="store_true",
                        help="only DeepSpeed's own forward/backward/step times under ZeRO-2 and ZeRO-3")
    parser.add_argument("--max-live-parameters", type=float, default=1e7,
                        help="one more ZeRO-3 memory run with DeepSpeed's stage3_max_live_parameters (default 1e9: "
                             "more than this model has, so every gathered layer stays gathered); 0 skips it")
    parser.add_argument("--global-batch", type=int, default=None,
                        help="every run's global batch (the tiny recipe's is 8: 4 per rank), half of it per rank")
    args = parser.parse_args()
    if args.global_batch:
        BATCH.update(global_batch_size=args.global_batch, max_per_device_batch_size=args.global_batch // 2)
    import ray

    epochs = [args.epochs, 3 * args.epochs]
    if args.step_breakdown:
        with tempfile.TemporaryDirectory() as directory:
            for stage in (2, 3):
                fwd, bwd, step = step_breakdown(args.models, Path(directory), stage)
                print(f"ZeRO-{stage}, tiny student, 2 ranks, median ms per micro-step: forward {fwd:.1f}, backward "
                      f"{bwd:.1f}, optimizer step {step:.1f}, total {fwd + bwd + step:.1f}")
        return
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        if not args.memory_only:
            plain(args.models, args.epochs / 4, tmp)  # warm-up, untimed
            plain_runs = [plain(args.models, e, tmp) for e in epochs]
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        if not args.memory_only:
            ray_train(args.models, tmp, "warm-up", num_epochs=args.epochs / 4)  # untimed: builds any op once
            ray_runs = [ray_train(args.models, tmp, f"zero3-{e:g}", num_epochs=e) for e in epochs]
            ddp_runs = [ray_train(args.models, tmp, f"ddp-{e:g}", num_epochs=e, zero_stage=0) for e in epochs]
            zero2_runs = [ray_train(args.models, tmp, f"zero2-{e:g}", num_epochs=e, zero_stage=2) for e in epochs]
        big = memory_model(args.models, tmp, *args.memory_model)
        steps = {"model": str(big), "trl_args": {"max_steps": args.memory_steps}}
        memory_runs = {stage: ray_train(args.models, tmp, f"memory-zero{stage}", zero_stage=stage, **steps)[2]
                       for stage in (3, 0)}
        if args.max_live_parameters:
            memory_runs["live"] = ray_train(args.models, tmp, "memory-live", zero_stage=3, model=str(big), trl_args={
                "max_steps": args.memory_steps, "deepspeed": live_limited_deepspeed(args, tmp)})[2]
        ray.shutdown()
        zero3_held, ddp_held = held_params(memory_runs[3]), held_params(memory_runs[0])
        zero3_mib, ddp_mib = measured_memory(memory_runs[3]), measured_memory(memory_runs[0])
        splits = {name: memory_split(memory_runs[stage]) for name, stage in (("ZeRO-3", 3), ("DDP", 0))}
        if args.max_live_parameters:
            splits[f"ZeRO-3, stage3_max_live_parameters {args.max_live_parameters:g}"] = memory_split(
                memory_runs["live"])

    def rate(runs: list) -> float:
        (s1, t1, *_), (s2, t2, *_) = runs
        return (t2 - t1) / (s2 - s1)

    if not args.memory_only:
        print(f"\ntrain_sft on the tiny student, {len(dialogues())} dialogues, epochs {epochs[0]:g} and {epochs[1]:g}")
        for e, (ps, pt), (rs, rt, _) in zip(epochs, plain_runs, ray_runs, strict=True):
            print(f"  {e:>4g} epochs: plain TRL {ps:6.1f}s {pt:>8.0f} tokens | Ray Train + ZeRO-3 x2 {rs:6.1f}s "
                  f"{rt:>8.0f} tokens")
        plain_rate, ray_rate, ddp_rate, zero2_rate = map(rate, (plain_runs, ray_runs, ddp_runs, zero2_runs))
        print(f"incremental tokens/s: plain TRL {plain_rate:.0f}, Ray Train + DeepSpeed ZeRO-3 (2 workers) "
              f"{ray_rate:.0f}, ratio {ray_rate / plain_rate:.2f}; Ray Train + DDP (2 workers, no DeepSpeed) "
              f"{ddp_rate:.0f}, ratio {ddp_rate / plain_rate:.2f}; Ray Train + DeepSpeed ZeRO-2 "
              f"{zero2_rate:.0f}, ratio {zero2_rate / plain_rate:.2f}")
    zero3_bytes, ddp_bytes = max(zero3_held) * BYTES_PER_PARAM, max(ddp_held) * BYTES_PER_PARAM
    print(f"per-rank memory, {max(ddp_held) / 1e6:.1f}M-parameter model ({args.memory_model[0]} wide, "
          f"{args.memory_model[1]} layers), {args.memory_steps} steps, 2 workers:")
    print(f"  measured (peak RSS - RSS before the model): ZeRO-3 {[round(m) for m in zero3_mib]} MiB, "
          f"DDP {[round(m) for m in ddp_mib]} MiB, ratio ZeRO-3/DDP {max(zero3_mib) / max(ddp_mib):.2f}")
    print(f"  by count (params held x {BYTES_PER_PARAM} B): ZeRO-3 {zero3_bytes / 2**20:.0f} MiB, "
          f"DDP {ddp_bytes / 2**20:.0f} MiB, ratio {zero3_bytes / ddp_bytes:.2f}")
    for name, split in splits.items():
        print(f"  {name}, MiB above the resident set before the model: {split}")


if __name__ == "__main__":
    main()
