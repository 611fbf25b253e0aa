"""Scale-out benchmark: the generation pipeline with 2 engine replicas vs 1, same engine, same rows.

    python bench/replicas.py [--model artifacts/tiny-models/generator-0] [--rows 256]

Prints, in one run, rows/s and tokens/s of ``zephyr_ray.generate`` writing Parquet with ``concurrency: 1`` and
``concurrency: 2``, each measured as the *incremental* rate between N and 10N rows (engine start-up cancels out),
and their ratio. On a GPU cluster each replica has its own GPU and the ratio approaches 2; on a 2-core CPU machine
both replicas share the same two cores, so the ratio says what Ray Data's split costs or gains there, not what
GPUs would do.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from generation import bench_arguments, pipeline, start_ray

from zephyr_ray.config import Engine, Hardware
from zephyr_ray.engines import detect_accelerator


def main() -> None:
    args = bench_arguments(__doc__)
    import ray

    hardware = Hardware(accelerator=detect_accelerator())
    sizes = [args.rows, 10 * args.rows]
    start_ray(num_cpus=max(4, os.cpu_count() or 1))
    results = {}
    for replicas in (1, 2):
        engine = Engine(model=args.model, max_model_len=512, batch_size=64, kv_cache_gib=1.0, concurrency=replicas)
        with tempfile.TemporaryDirectory() as tmp:
            results[replicas] = pipeline(engine, hardware, sizes, Path(tmp))
    ray.shutdown()

    def rates(t: dict) -> tuple[float, float]:
        (s1, k1, _), (s2, k2, _) = t[sizes[0]], t[sizes[1]]
        return (sizes[1] - sizes[0]) / (s2 - s1), (k2 - k1) / (s2 - s1)

    print(f"\nmodel {args.model} on {hardware.accelerator} ({os.cpu_count()} cores), N={sizes[0]}")
    for replicas, timings in results.items():
        rows_rate, tokens_rate = rates(timings)
        print(f"  {replicas} replica{'s' if replicas > 1 else ''}: "
              + ", ".join(f"{n} rows {timings[n][0]:.1f}s" for n in sizes)
              + f" | incremental {rows_rate:.1f} rows/s, {tokens_rate:.0f} tokens/s")
    ratio = rates(results[2])[0] / rates(results[1])[0]
    print(f"rows/s ratio 2 replicas / 1: {ratio:.2f}")


if __name__ == "__main__":
    main()
