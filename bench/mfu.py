"""MFU of the dSFT trainer for a Mistral-7B-shaped model on one GPU.

    python bench/mfu.py [--layers 32] [--seq-len 2048] [--micro-batch 4] [--global-batch 8] [--steps 10]

Runs TRL's ``SFTTrainer`` with the TrainingArguments and model-loading arguments that ``train_sft`` generates for a
GPU recipe (bf16, gradient checkpointing, FlashAttention-2 when installed else SDPA, batch split by
``derive_batch``) on a randomly initialised model of Mistral-7B's shape (hidden 4096, MLP 14336, 32 heads, 8 KV
heads, vocab 32000), fed full-length rows of random token ids. Prints tokens/s over the steps after the warm-up and

    MFU = model FLOPs per token x tokens/s / peak bf16 FLOP/s,

model FLOPs per token = 6 x (parameters without the input embedding) + 12 x layers x hidden x seq_len (attention
scores and values, forward + backward, PaLM's convention; the recomputation of gradient checkpointing is not
counted, as MFU does not count it). The peak is the card's dense bf16 figure (``--peak-tflops``; 989 for H100/H200
SXM), and the same run also times a large bf16 matrix product so the figure can be read against what the card does.

One process, one GPU, no DeepSpeed: ZeRO-3 across 16 GPUs adds communication that one GPU cannot show, so this is
the per-GPU compute efficiency of the trainer, not the cluster's. The optimizer keeps its states in bf16 here (the
whole model must fit one card); the production run keeps fp32 master weights under ZeRO-3.
"""

from __future__ import annotations

import argparse
import tempfile
import time

MISTRAL_7B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
              "vocab_size": 32000, "max_position_embeddings": 32768, "rope_theta": 10000.0, "sliding_window": None,
              "tie_word_embeddings": False}


def flops_per_token(model, layers: int, hidden: int, seq_len: int) -> float:
    params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    return 6 * params + 12 * layers * hidden * seq_len


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4, help="largest per-device batch (recipe field)")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the rate")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--tokenizer", default="artifacts/tiny-models/student",
                        help="any tokenizer with ids < 32000 (the rows are random ids; it only pads)")
    args = parser.parse_args()

    import datasets
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from zephyr_ray.config import Hardware, TrainSFTConfig
    from zephyr_ray.train.loop import load_tokenizer, model_init_kwargs, trainer_arguments

    hardware = Hardware(accelerator="gpu", num_workers=1)
    training = TrainSFTConfig(learning_rate=2e-5, global_batch_size=args.global_batch,
                              max_per_device_batch_size=args.micro_batch, max_length=args.seq_len, zero_stage=0,
                              packing=False)
    init = model_init_kwargs(training, hardware)
    config = MistralConfig(num_hidden_layers=args.layers, **MISTRAL_7B)
    cuda = torch.cuda.is_available()  # without a GPU: a smoke run of the script itself, no MFU
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                 attn_implementation=init["attn_implementation"])
    params = sum(p.numel() for p in model.parameters())
    per_token = flops_per_token(model, args.layers, config.hidden_size, args.seq_len)
    tokenizer = load_tokenizer(args.tokenizer, training)
    rows = (args.steps + 1) * args.global_batch
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (rows, args.seq_len), generator=generator).tolist()
    train = datasets.Dataset.from_dict({"input_ids": ids})

    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            sync()
            step_ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        fields = trainer_arguments(training, hardware, out, {})
        fields.update(max_steps=args.steps, save_strategy="no", logging_steps=args.steps)
        fields.pop("model_init_kwargs")  # the model is built here, from the same kwargs
        if not cuda:
            fields.update(use_cpu=True)
        trainer = SFTTrainer(model=model, args=SFTConfig(**fields, packing=False), train_dataset=train,
                             processing_class=tokenizer, callbacks=[StepClock()])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()

    timed = step_ends[args.warmup:]
    seconds = timed[-1] - step_ends[args.warmup - 1]
    tokens = len(timed) * args.global_batch * args.seq_len
    rate = tokens / seconds
    mfu = per_token * rate / (args.peak_tflops * 1e12)
    measured_peak = matmul_tflops() if cuda else float("nan")
    print(f"\n{torch.cuda.get_device_name() if cuda else 'CPU (smoke run)'}; torch {torch.__version__}; attention {init['attn_implementation']}; "
          f"gradient checkpointing {fields['gradient_checkpointing']}; bf16 {fields['bf16']}")
    print(f"Mistral-7B-shaped model, {args.layers} layers: {params / 1e9:.2f}B parameters; seq {args.seq_len}; "
          f"micro batch {fields['per_device_train_batch_size']} x accumulation "
          f"{fields['gradient_accumulation_steps']} = global {args.global_batch}")
    print(f"steps {args.warmup + 1}-{args.steps}: {seconds / len(timed):.2f} s/step, {rate:,.0f} tokens/s; "
          f"model FLOPs/token {per_token / 1e9:.1f} GFLOP -> {per_token * rate / 1e12:.0f} TFLOP/s")
    print(f"MFU {mfu:.1%} of {args.peak_tflops:.0f} TFLOP/s peak; {per_token * rate / 1e12 / measured_peak:.1%} of "
          f"the {measured_peak:.0f} TFLOP/s an 8192^3 bf16 matmul reaches here; peak GPU memory "
          f"{torch.cuda.max_memory_allocated() / 2**30 if cuda else float('nan'):.1f} GiB")


if __name__ == "__main__":
    main()
