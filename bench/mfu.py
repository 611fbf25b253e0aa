"""train_sft's trainer on one GPU, Mistral-7B-shaped: ZeRO-3 (the recipe's default) against plain TRL, MFU and memory.

    python bench/mfu.py [--layers 32] [--seq-len 2048] [--micro-batch 8] [--global-batch 8] [--steps 10]
                        [--zero-stages 3,0] [--json FILE]

For each ZeRO stage, in a process of its own (so memory peaks and DeepSpeed's state don't mix), runs TRL's
``SFTTrainer`` with the TrainingArguments, DeepSpeed config and model-loading arguments that ``train_sft`` generates
for a GPU recipe with one worker (bf16, gradient checkpointing, FlashAttention-2 when installed else SDPA, the batch
split by ``derive_batch``; under ZeRO-3 the model is built inside DeepSpeed's ``zero.Init``, as TRL loads it) on a
randomly initialised model of Mistral-7B's shape (hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocab 32000), fed
full-length rows of random token ids. Stage 0 is the baseline a user would pick instead: the same trainer in one plain
process, no DeepSpeed. Prints, per stage, tokens/s over the steps after the warm-up, the peak GPU memory PyTorch
allocated (a measurement, not a formula), the share of the timed steps the GPU was running a kernel (NVML's
utilisation, sampled every 0.1 s: what is missing is time the GPU waited on the host), and

    MFU = model FLOPs per token x tokens/s / peak bf16 FLOP/s,

model FLOPs per token = 6 x (parameters without the input embedding) + 12 x layers x hidden x seq_len (attention
scores and values, forward + backward, PaLM's convention; the recomputation of gradient checkpointing is not
counted, as MFU does not count it). The peak is the card's dense bf16 figure (``--peak-tflops``; 989 for H100/H200
SXM); the run also times an 8192^3 bf16 matrix product so the figure can be read against what the card does.

What one GPU shows and what it cannot: ZeRO-3 with one rank keeps the whole model's fp32 master weights and Adam
states (16 bytes per parameter, ~116 GB for 7.2B), so its memory is the single-rank worst case and its speed is
DeepSpeed's own overhead (per-parameter hooks, partition bookkeeping) without the all-gathers and reduce-scatters of
16 ranks. Plain TRL with ``dtype: bfloat16`` (train_sft's model load on GPU) keeps bf16 weights and bf16 Adam states.
Ray Train adds a worker process around the same trainer (``bench/training.py`` measures that on CPU). Without a GPU
the script runs itself on CPU with a 2-layer model of hidden size 256 (a smoke run: no MFU).

Measured on one H200 (2026-12-04; docs/benchmarks.md "On a GPU" has the table): micro batch 8, ZeRO-3 35% MFU at
116 GiB, 0.88x plain TRL's tokens/s (40% MFU, 58 GiB); at micro batch 2, 0.60-0.69x, the GPU busy 70% of the time
under ZeRO-3 against 96% without it (DeepSpeed's Python hooks hold it back).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

MISTRAL_7B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
              "vocab_size": 32000, "max_position_embeddings": 32768, "rope_theta": 10000.0, "sliding_window": None,
              "tie_word_embeddings": False}
CPU_SMOKE = {"hidden_size": 256, "intermediate_size": 896, "num_attention_heads": 4, "num_key_value_heads": 1}
RESULT_PREFIX = "MFU-RESULT "


def parameter_count(model) -> tuple[int, int]:
    """(all parameters, the input embedding's): ZeRO-3 empties each parameter and keeps its size in ``ds_numel``."""
    def size(p) -> int:
        return getattr(p, "ds_numel", p.numel())

    return sum(size(p) for p in model.parameters()), size(model.get_input_embeddings().weight)


def matmul_tflops(size: int = 8192, repeat: int = 10) -> float:
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeat):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeat / (time.perf_counter() - started) / 1e12


def one_stage(args: argparse.Namespace) -> dict:
    """Train ``args.steps`` steps under ``args.zero_stage`` in this process; the measurements as a dict."""
    import torch

    cuda = torch.cuda.is_available()
    if args.zero_stage or not cuda:  # one rank, as a Ray Train worker of a one-worker group sees it (CPU: gloo)
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(args.port)}.items():
            os.environ.setdefault(key, value)

    import datasets
    from transformers import AutoModelForCausalLM, MistralConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from zephyr_ray.config import Hardware, TrainSFTConfig
    from zephyr_ray.engines import prepare_training_process
    from zephyr_ray.tiny import build_tokenizer
    from zephyr_ray.train.loop import load_tokenizer, trainer_arguments

    hardware = Hardware(accelerator="gpu" if cuda else "cpu", num_workers=1)
    training = TrainSFTConfig(learning_rate=2e-5, global_batch_size=args.global_batch,
                              max_per_device_batch_size=args.micro_batch, max_length=args.seq_len,
                              zero_stage=args.zero_stage, packing=False)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step_ends: list[float] = []  # time.time(): the parent matches them with its GPU utilisation samples

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            sync()
            step_ends.append(time.time())

    with tempfile.TemporaryDirectory() as out:
        extra = prepare_training_process(hardware, os.path.join(out, "cache"), deepspeed=args.zero_stage > 0)
        build_tokenizer().save_pretrained(os.path.join(out, "tokenizer"))  # it only pads: the rows are random ids
        tokenizer = load_tokenizer(os.path.join(out, "tokenizer"), training)
        fields = trainer_arguments(training, hardware, os.path.join(out, "trainer"), extra)
        fields.update(max_steps=args.steps, save_strategy="no", logging_steps=args.steps)
        init = fields.pop("model_init_kwargs")  # the model is built here, from the same kwargs
        # Arguments first: under ZeRO-3 they register DeepSpeed's config, so from_config builds the model inside
        # zero.Init, parameters partitioned as they are made (TRL's from_pretrained does the same in train_sft).
        sft_args = SFTConfig(**fields, packing=False)
        shape = MISTRAL_7B if cuda else {**MISTRAL_7B, **CPU_SMOKE}
        config = MistralConfig(num_hidden_layers=args.layers, **shape)
        dtype, attention = getattr(torch, init["dtype"]), init["attn_implementation"]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        if args.zero_stage == 3:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
        else:
            with torch.device("cuda" if cuda else "cpu"):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
        params, embedding = parameter_count(model)
        per_token = 6 * (params - embedding) + 12 * args.layers * config.hidden_size * args.seq_len
        rows = (args.steps + 1) * args.global_batch
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(3, config.vocab_size, (rows, args.seq_len), generator=generator).tolist()
        train = datasets.Dataset.from_dict({"input_ids": ids})
        trainer = SFTTrainer(model=model, args=sft_args, train_dataset=train, processing_class=tokenizer,
                             callbacks=[StepClock()])
        started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - started

    timed = step_ends[args.warmup:]
    seconds = timed[-1] - step_ends[args.warmup - 1]
    tokens = len(timed) * args.global_batch * args.seq_len
    return {
        "zero_stage": args.zero_stage, "device": torch.cuda.get_device_name() if cuda else "CPU (smoke run)",
        "torch": torch.__version__, "attention": init["attn_implementation"], "dtype": init["dtype"],
        "gradient_checkpointing": fields["gradient_checkpointing"], "bf16": fields["bf16"],
        "parameters": params, "layers": args.layers, "seq_len": args.seq_len,
        "micro_batch": fields["per_device_train_batch_size"], "accumulation": fields["gradient_accumulation_steps"],
        "global_batch": args.global_batch, "steps_timed": len(timed), "seconds_per_step": seconds / len(timed),
        "timed_window": [step_ends[args.warmup - 1], timed[-1]],
        "tokens_per_s": tokens / seconds, "flops_per_token": per_token, "train_seconds": train_seconds,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
    }


class GpuBusy:
    """Samples the GPU's utilisation (the share of time a kernel ran, NVML's figure) every 0.1 s in a thread:
    well under 100% over the timed steps means the GPU waited on the host (Python, launches, synchronisation)."""

    def __init__(self) -> None:
        import threading

        import pynvml  # nvidia-ml-py: what torch.cuda.utilization reads too

        pynvml.nvmlInit()
        self.handle, self.nvml = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml
        self.samples: list[tuple[float, int]] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while not self.stopped.wait(0.1):
            self.samples.append((time.time(), self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu))

    def mean(self, start: float, end: float) -> float | None:
        inside = [busy for at, busy in self.samples if start <= at <= end]
        return sum(inside) / len(inside) / 100 if inside else None

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def run_stage(stage: int, argv: list[str], timeout: float, gpu: bool) -> dict | None:
    """One stage in a child process, its output passed through as it comes; None (reason printed) when it fails."""
    import threading

    command = [sys.executable, os.path.abspath(__file__), *argv, "--child-stage", str(stage)]
    print(f"\n== ZeRO stage {stage}: {' '.join(command)}", flush=True)
    try:
        busy = GpuBusy() if gpu else None
    except ImportError:
        busy = None
        print("no nvidia-ml-py (pynvml) here: the GPU's busy share is not measured", flush=True)
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(timeout, child.kill)
    timer.start()
    result = None
    for line in child.stdout:
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
        else:
            print(line, end="", flush=True)
    timed_out = not timer.is_alive()
    timer.cancel()
    code = child.wait()
    if busy is not None:
        busy.stop()
        if result is not None:
            result["gpu_busy"] = busy.mean(*result["timed_window"])
    if result is None:
        reason = f"killed after {timeout:.0f} s" if timed_out else f"exit {code}"
        print(f"ZeRO stage {stage}: no result ({reason}); its output is above", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None, help="32 on GPU (Mistral-7B), 2 for the CPU smoke run")
    parser.add_argument("--seq-len", type=int, default=None, help="2048 on GPU, 128 on CPU")
    parser.add_argument("--micro-batch", type=int, default=8,
                        help="largest per-device batch (recipe field; the Zephyr-7B recipe's is 8)")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the rate")
    parser.add_argument("--zero-stages", default="3,0",
                        help="ZeRO stages to run, each in its own process; 0 = plain TRL")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for each stage's process")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--port", type=int, default=29531, help=argparse.SUPPRESS)
    parser.add_argument("--child-stage", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child_stage is not None:
        args.zero_stage = args.child_stage
        print(RESULT_PREFIX + json.dumps(one_stage(args)), flush=True)
        return

    import torch

    cuda = torch.cuda.is_available()
    args.layers = args.layers or (32 if cuda else 2)
    args.seq_len = args.seq_len or (2048 if cuda else 128)
    passed = ["--layers", str(args.layers), "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
              "--global-batch", str(args.global_batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    results = [r for stage in (int(s) for s in args.zero_stages.split(","))
               if (r := run_stage(stage, passed, args.timeout, cuda)) is not None]
    measured_peak = matmul_tflops() if cuda else float("nan")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"results": results, "matmul_tflops": measured_peak, "peak_tflops": args.peak_tflops}, out,
                      indent=1)
    if not results:
        sys.exit("no stage finished")
    first = results[0]
    print(f"\n{first['device']}; torch {first['torch']}; attention {first['attention']}; weights {first['dtype']}; "
          f"gradient checkpointing {first['gradient_checkpointing']}; bf16 {first['bf16']}; "
          f"an 8192^3 bf16 matmul: {measured_peak:.0f} TFLOP/s")
    print(f"Mistral-7B-shaped model, {args.layers} layers: {first['parameters'] / 1e9:.2f}B parameters; seq "
          f"{args.seq_len}; micro batch {first['micro_batch']} x accumulation {first['accumulation']} = global "
          f"{args.global_batch}; steps {args.warmup + 1}-{args.steps} timed")
    baseline = next((r for r in results if r["zero_stage"] == 0), None)
    print(f"{'trainer':<24}{'s/step':>8}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'of matmul':>11}"
          f"{'peak GiB':>10}{'GPU busy':>10}{'vs plain':>10}")
    for r in results:
        achieved = r["flops_per_token"] * r["tokens_per_s"] / 1e12
        name = f"ZeRO-{r['zero_stage']} (DeepSpeed)" if r["zero_stage"] else "plain TRL (no DeepSpeed)"
        ratio = r["tokens_per_s"] / baseline["tokens_per_s"] if baseline else float("nan")
        peak = r["peak_allocated_gib"] if r["peak_allocated_gib"] is not None else float("nan")
        busy = r.get("gpu_busy") if r.get("gpu_busy") is not None else float("nan")
        print(f"{name:<24}{r['seconds_per_step']:>8.2f}{r['tokens_per_s']:>11,.0f}{achieved:>9.0f}"
              f"{achieved / args.peak_tflops:>7.1%}{achieved / measured_peak:>11.1%}{peak:>10.1f}{busy:>10.0%}"
              f"{ratio:>10.2f}")


if __name__ == "__main__":
    main()
