"""Generation benchmark: the ray.data.llm pipeline (zephyr_ray.generate) vs a plain vllm.LLM loop, same engine settings.

    python bench/generation.py [--model artifacts/tiny-models/generator-0] [--rows 256]

Prints, in one run:
- tokens/s of a plain ``vllm.LLM.chat`` call and of the Ray Data pipeline writing Parquet, each measured as the
  *incremental* rate between N and 10N rows (so engine start-up, which dominates tiny runs, cancels out);
  their ratio is the pipeline's overhead;
- the driver's peak RSS while the pipeline runs N and 10N rows: streaming means it stays flat.
On tiny CPU models, per-row overhead dominates; these ratios say nothing about GPU throughput of 7B models.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil

from zephyr_ray.config import Engine, Hardware
from zephyr_ray.engines import detect_accelerator, vllm_engine_kwargs

MAX_TOKENS = 64


class PeakRSS:
    """Samples this process's RSS every 50 ms while active."""

    def __enter__(self) -> "PeakRSS":
        self.peak, self._stop = psutil.Process().memory_info().rss, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def chats(n: int) -> list[list[dict[str, str]]]:
    topics = ["tea", "rain", "bees", "trees", "music", "money", "sleep", "fish"]
    return [[{"role": "user", "content": f"Tell me about {topics[i % len(topics)]}, please ({i})."}]
            for i in range(n)]


def sampling(i: int) -> dict:
    return {"max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0.8, "seed": i}


def plain_vllm(engine: Engine, hardware: Hardware, sizes: list[int]) -> dict[int, tuple[float, int]]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=engine.model, **vllm_engine_kwargs(engine, hardware))
    timings = {}
    for n in sizes:
        started = time.perf_counter()
        outputs = llm.chat(chats(n), [SamplingParams(**sampling(i)) for i in range(n)], use_tqdm=False)
        timings[n] = (time.perf_counter() - started, sum(len(o.outputs[0].token_ids) for o in outputs))
    del llm
    return timings


def pipeline(engine: Engine, hardware: Hardware, sizes: list[int], out: Path) -> dict[int, tuple[float, int, int]]:
    import pyarrow.parquet as pq
    import ray

    from zephyr_ray.data import write_parquet_atomic
    from zephyr_ray.generate import generate

    timings = {}
    # a first pass, not timed: the first Ray Data execution of a fresh cluster also starts Ray's worker processes,
    # which would make N's pass the slower of the two and the incremental rate meaningless
    for n in [sizes[0], *sizes]:
        rows = [{"messages": m, "sampling_params": sampling(i)} for i, m in enumerate(chats(n))]
        with PeakRSS() as rss:
            started = time.perf_counter()
            ds = generate(ray.data.from_items(rows), engine, hardware)
            shutil.rmtree(out / f"n{n}", ignore_errors=True)
            write_parquet_atomic(ds.select_columns(["num_generated_tokens"]), out / f"n{n}")
            seconds = time.perf_counter() - started
        tokens = sum(pq.read_table(out / f"n{n}")["num_generated_tokens"].to_pylist())
        timings[n] = (seconds, tokens, rss.peak)
    return timings


def bench_arguments(description: str, batch_size: bool = False) -> argparse.Namespace:
    """--model and --rows, as every generation benchmark takes them (and --batch-size where it applies)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="artifacts/tiny-models/generator-0")
    parser.add_argument("--rows", type=int, default=256, help="N; the runs use N and 10N rows")
    if batch_size:
        parser.add_argument("--batch-size", type=int, default=64, help="rows per batch sent to an engine actor")
    return parser.parse_args()


def start_ray(num_cpus: int) -> None:
    """A local Ray for a benchmark: no dashboard, workers' logs and progress bars off the terminal."""
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


def main() -> None:
    args = bench_arguments(__doc__, batch_size=True)
    import ray

    hardware = Hardware(accelerator=detect_accelerator())
    engine = Engine(model=args.model, max_model_len=512, batch_size=args.batch_size, kv_cache_gib=1.0)
    sizes = [args.rows, 10 * args.rows]
    start_ray(num_cpus=4)
    with tempfile.TemporaryDirectory() as tmp:
        piped = pipeline(engine, hardware, sizes, Path(tmp))
    ray.shutdown()
    plain = plain_vllm(engine, hardware, sizes)

    def rate(t: dict) -> float:
        (s1, k1, *_), (s2, k2, *_) = t[sizes[0]], t[sizes[1]]
        return (k2 - k1) / (s2 - s1)

    print(f"\nmodel {args.model} on {hardware.accelerator}, {MAX_TOKENS} tokens per row, N={sizes[0]}, "
          f"pipeline batches of {args.batch_size}")
    for n in sizes:
        print(f"  {n:>5} rows: plain vLLM {plain[n][0]:7.1f}s {plain[n][1]:>6} tokens | pipeline {piped[n][0]:7.1f}s "
              f"{piped[n][1]:>6} tokens, driver peak RSS {piped[n][2] / 2**20:7.1f} MiB")
    plain_rate, piped_rate = rate(plain), rate(piped)
    print(f"incremental tokens/s: plain vLLM {plain_rate:.0f}, pipeline {piped_rate:.0f}, "
          f"ratio pipeline/plain {piped_rate / plain_rate:.2f}")
    print(f"driver peak RSS ratio 10N/N: {piped[sizes[1]][2] / piped[sizes[0]][2]:.2f} (1.00 = flat)")


if __name__ == "__main__":
    main()
