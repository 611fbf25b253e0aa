"""Training benchmark: the train_sft stage (Ray Train + DeepSpeed ZeRO-3, 2 workers) vs the same TRL SFTTrainer in
one plain process, on the same data, global batch and model.

    python bench/training.py [--models artifacts/tiny-models] [--epochs 2]

Prints, in one run:
- tokens/s of each, measured as the *incremental* rate between E and 3E epochs (start-up of Ray Train, DeepSpeed
  and the processes cancels out); their ratio is the distributed path's overhead. On this 2-core CPU machine the
  two workers share the cores the plain process has to itself, so the ratio bounds the overhead from above;
- per-rank model-state memory (fp32 parameter + gradient + two Adam moments = 16 bytes per parameter a rank
  holds) under ZeRO-3 and under DDP (``zero_stage: 0``) at 2 workers, from the parameter counts each rank reports
  at the start of training (``attempts/rank<N>.jsonl``), and their ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BYTES_PER_PARAM = 16  # fp32 weights, gradients, Adam m and v
REPEAT = 4  # the corpus' dialogues, repeated, as training rows


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
    data["train_sft"].update(save_steps=10_000, max_failures=0, **train_sft)
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


def held_params(run: Path) -> list[int]:
    lines = [json.loads(line) for path in sorted((run / "train_sft" / "attempts").glob("rank*.jsonl"))
             for line in path.read_text().splitlines()]
    return [line["params_held"] for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=REPO / "artifacts" / "tiny-models")
    parser.add_argument("--epochs", type=float, default=2.0, help="E; the runs train E and 3E epochs")
    args = parser.parse_args()
    import ray

    epochs = [args.epochs, 3 * args.epochs]
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        plain_runs = [plain(args.models, e, tmp) for e in epochs]
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        ray_runs = [ray_train(args.models, tmp, f"zero3-{e:g}", num_epochs=e) for e in epochs]
        ddp_run = ray_train(args.models, tmp, "ddp", num_epochs=1, zero_stage=0)
        zero3_held, ddp_held = held_params(ray_runs[0][2]), held_params(ddp_run[2])
        ray.shutdown()

    def rate(runs: list) -> float:
        (s1, t1, *_), (s2, t2, *_) = runs
        return (t2 - t1) / (s2 - s1)

    print(f"\ntrain_sft on the tiny student, {len(dialogues())} dialogues, epochs {epochs[0]:g} and {epochs[1]:g}")
    for e, (ps, pt), (rs, rt, _) in zip(epochs, plain_runs, ray_runs, strict=True):
        print(f"  {e:>4g} epochs: plain TRL {ps:6.1f}s {pt:>8.0f} tokens | Ray Train + ZeRO-3 x2 {rs:6.1f}s "
              f"{rt:>8.0f} tokens")
    plain_rate, ray_rate = rate(plain_runs), rate(ray_runs)
    print(f"incremental tokens/s: plain TRL {plain_rate:.0f}, Ray Train + DeepSpeed ZeRO-3 (2 workers) {ray_rate:.0f}, "
          f"ratio {ray_rate / plain_rate:.2f}")
    zero3_bytes, ddp_bytes = max(zero3_held) * BYTES_PER_PARAM, max(ddp_held) * BYTES_PER_PARAM
    print(f"per-rank model state (params held x {BYTES_PER_PARAM} B): ZeRO-3 {zero3_bytes / 2**20:.2f} MiB "
          f"({zero3_held}), DDP {ddp_bytes / 2**20:.2f} MiB ({ddp_held}), "
          f"ratio ZeRO-3/DDP {zero3_bytes / ddp_bytes:.2f}")


if __name__ == "__main__":
    main()
