"""Serving benchmark: the Serve app (HTTP, proxy, ingress, router, LLMServer replica) vs the same vLLM engine
called directly in this process, under the same closed-loop load.

    python bench/serving.py [--model artifacts/tiny-models/teacher] [--requests 200] [--concurrency 16]

Both sides get the same engine settings (``engines.vllm_engine_kwargs`` of one served model), the same chat
prompts (distinct, seeded sampling) and the same number of requests in flight. Prints requests/s, output
tokens/s, p50 and p99 latency of each, and the ratios Serve/direct (throughput below 1 and latency above 1 are
Serve's overhead). On a 2-core CPU machine the HTTP client, proxy and ingress share the cores with the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = 32


def prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Question {i}: how do bees make honey, and why?"}] for i in range(n)]


def summary(name: str, latencies: list[float], tokens: int, seconds: float) -> dict:
    ordered = sorted(latencies)
    return {"name": name, "requests_per_s": len(ordered) / seconds, "tokens_per_s": tokens / seconds,
            "p50_s": statistics.median(ordered), "p99_s": ordered[max(0, int(0.99 * len(ordered)) - 1)]}


def through_serve(model: str, n: int, concurrency: int) -> dict:
    import ray
    import requests
    from ray import serve

    from zephyr_ray.config import Hardware, ServeConfig, ServedModel
    from zephyr_ray.serving import serve_locally

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    served = ServedModel(model_id="bench", model=model, max_model_len=512, kv_cache_gib=0.5, min_replicas=1,
                         max_replicas=1, max_ongoing_requests=max(64, concurrency))
    url = serve_locally(ServeConfig(models=[served], api_key_env="ZEPHYR_RAY_BENCH_NO_KEY"),
                        Hardware(accelerator="cpu", num_workers=1), port=8799)

    def one(i_messages: tuple[int, list[dict]]) -> tuple[float, int]:
        i, messages = i_messages
        started = time.perf_counter()
        response = requests.post(f"{url}/v1/chat/completions", timeout=600, json={
            "model": "bench", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.8, "seed": i})
        response.raise_for_status()
        return time.perf_counter() - started, response.json()["usage"]["completion_tokens"]

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, enumerate(prompts(concurrency))))  # warm-up
        started = time.perf_counter()
        results = list(pool.map(one, enumerate(prompts(n))))
        seconds = time.perf_counter() - started
    serve.shutdown()
    ray.shutdown()
    return summary("Ray Serve app (HTTP)", [r[0] for r in results], sum(r[1] for r in results), seconds)


def direct(model: str, n: int, concurrency: int) -> dict:
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from zephyr_ray.config import Hardware, ServedModel
    from zephyr_ray.engines import vllm_engine_kwargs

    served = ServedModel(model_id="bench", max_model_len=512, kv_cache_gib=0.5)
    kwargs = vllm_engine_kwargs(served.engine(model), Hardware(accelerator="cpu", num_workers=1))
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, **kwargs))
    tokenizer = AutoTokenizer.from_pretrained(model)

    async def one(i: int, messages: list[dict], gate: asyncio.Semaphore) -> tuple[float, int]:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, seed=i)
        async with gate:
            started = time.perf_counter()
            async for output in engine.generate(prompt, params, request_id=f"bench-{i}-{time.time_ns()}"):
                final = output
            return time.perf_counter() - started, len(final.outputs[0].token_ids)

    async def run(items: list[list[dict]]) -> list[tuple[float, int]]:
        gate = asyncio.Semaphore(concurrency)
        return await asyncio.gather(*(one(i, m, gate) for i, m in enumerate(items)))

    async def main() -> tuple[list, float]:
        await run(prompts(concurrency))  # warm-up
        started = time.perf_counter()
        results = await run(prompts(n))
        return results, time.perf_counter() - started

    results, seconds = asyncio.run(main())
    engine.shutdown()
    return summary("vLLM AsyncLLM, direct", [r[0] for r in results], sum(r[1] for r in results), seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "artifacts" / "tiny-models" / "teacher"))
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    base = direct(args.model, args.requests, args.concurrency)
    served = through_serve(args.model, args.requests, args.concurrency)
    print(f"\n{args.requests} chat requests, {args.concurrency} in flight, {MAX_TOKENS} tokens max, {args.model}")
    for row in (base, served):
        print(f"  {row['name']:<24} {row['requests_per_s']:7.2f} req/s {row['tokens_per_s']:8.1f} tokens/s "
              f"p50 {row['p50_s']:.3f}s p99 {row['p99_s']:.3f}s")
    print(f"ratio Serve/direct: throughput {served['requests_per_s'] / base['requests_per_s']:.2f}, "
          f"p50 latency {served['p50_s'] / base['p50_s']:.2f}, p99 latency {served['p99_s'] / base['p99_s']:.2f}")


if __name__ == "__main__":
    main()
