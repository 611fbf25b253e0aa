"""Serving benchmark: `zephyr-ray serve` (Ray Serve LLM) against vLLM's own OpenAI server, the tool a user would run
instead, on the same model with the same engine settings, the same HTTP client and the same load.

    python bench/serving.py [--model artifacts/tiny-models/teacher] [--requests 200] [--concurrency 16]
                            [--sides vllm,serve,serve-direct] [--json runs/bench-serving.json]

Each side is started as a user starts it, in its own processes: `python -m vllm.entrypoints.openai.api_server` with
the flags that give the engine of `zephyr-ray serve` (``engines.vllm_engine_kwargs``: dtype, eager, KV cache, chat
template, ...), and `zephyr-ray serve` on a Ray of its own (``serve-direct``: with ``serve.direct_streaming``, the
replica serving vLLM's own app; ``serve+NAME=VALUE``: with Ray settings in its environment, to compare Ray Serve's
own knobs, e.g. ``serve-direct+RAY_SERVE_ENABLE_HA_PROXY=1`` for HAProxy in front). One side runs at a time. The
load, per side:

- closed loop, not streamed: ``--requests`` chat requests with ``--concurrency`` in flight: requests/s, p50 and p99;
- closed loop, streamed: the same, with time to first token (TTFT) and time per output token (TPOT) per request;
- one at a time: ``--single`` requests in sequence: p50 latency (the per-request overhead);
- CPU per request: the CPU time each of the side's processes spent in the first closed loop, divided by its
  requests, and the front end's share (every process but the engine's: vLLM's API server, or Serve's hops and the
  replica's vLLM front end). On a machine where the client, Ray and the engine share the cores this is steadier
  than throughput.

Every request asks for ``MAX_TOKENS`` tokens with ``ignore_eos``, so both sides generate the same number of tokens.
For Ray Serve the script then reads where the time went from Ray's own metrics (the proxy's request latency, and each
deployment's processing latency: the ingress and the LLMServer). Prints one row per side and load, the ratios
Serve/vLLM, and writes everything to ``--json``. On a 2-core machine the client, Ray's processes and the engine
share the cores, so a hop's CPU shows as lost throughput; on a GPU node the engine's step time dominates and the hops
run beside it (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = 32
ENGINE_PROCESSES = ("VLLM::EngineCore", "VLLM::Worker")  # the engine's own, on either side
SETTINGS = {"max_model_len": 512, "kv_cache_gib": 0.5}


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def vllm_server_args(model: str, port: int, template_file: Path) -> list[str]:
    """`vllm serve`'s command line for the engine `zephyr-ray serve` runs (same kwargs, as flags)."""
    from zephyr_ray.config import Hardware, ServedModel
    from zephyr_ray.engines import vllm_engine_kwargs

    engine = ServedModel(model_id="bench", **SETTINGS).engine(model)
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name",
            "bench", "--port", str(port), "--host", "127.0.0.1", "--chat-template", str(template_file),
            "--disable-uvicorn-access-log"]
    for key, value in vllm_engine_kwargs(engine, Hardware(accelerator="cpu", num_workers=1)).items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            if key == "enable_chunked_prefill":
                args.append("--no-enable-chunked-prefill")
        else:
            args += [flag, str(value)]
    return args


def wait_until(probe, seconds: float, what: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + seconds
    while not probe():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited ({process.returncode}): {log.read_text()[-3000:]}")
        if time.time() > deadline:
            raise TimeoutError(f"{what} not up in {seconds:.0f} s: {log.read_text()[-3000:]}")
        time.sleep(1)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:  # both: 200 once a model answers
            return response.status == 200
    except OSError:
        return False


def start_side(side: str, model: str, workdir: Path) -> tuple[subprocess.Popen, str, Path]:
    """(process, base URL, log) of one side, up and answering. ``side``: ``vllm``, or ``serve`` (``serve-direct``:
    direct streaming) with optional environment settings for its Ray (``serve+NAME=VALUE+...``: Ray Serve's own
    knobs, to compare them)."""
    port = free_port()
    name, *settings = side.split("+")
    log = workdir / f"{len(list(workdir.glob('*.log')))}-{name}.log"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # a Ray of its own
    env.update(setting.split("=", 1) for setting in settings)
    if name == "vllm":
        from zephyr_ray.chat import template_for

        template = workdir / "template.jinja"
        template.write_text(template_for(model, "zephyr", False))
        command = vllm_server_args(model, port, template)
    elif name in ("serve", "serve-direct"):
        recipe = workdir / "serve.yaml"
        recipe.write_text(json.dumps({"name": "bench", "hardware": {"accelerator": "cpu", "num_workers": 1},
                                      "serve": {"direct_streaming": name == "serve-direct",
                                                "models": [{"model_id": "bench", **SETTINGS, "min_replicas": 1,
                                                            "max_replicas": 1, "max_ongoing_requests": 256}]}}))
        command = [sys.executable, "-m", "zephyr_ray.cli", "serve", model, "--recipe", str(recipe), "--port", str(port)]
    else:
        raise SystemExit(f"--sides: unknown side {name!r} (vllm, serve, serve-direct, serve+NAME=VALUE...)")
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: healthy(url), 600, side, process, log)
    return process, url, log


def stop_side(process: subprocess.Popen) -> None:
    """Ctrl-C, as a user stops either server (`zephyr-ray serve` shuts Serve and its own Ray down)."""
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)


def body(i: int, stream: bool) -> dict:
    return {"model": "bench", "messages": [{"role": "user", "content": f"Question {i}: how do bees make honey?"}],
            "max_tokens": MAX_TOKENS, "temperature": 0.8, "seed": i, "ignore_eos": True, "stream": stream}


async def one_request(client, url: str, i: int, stream: bool) -> dict:
    started = time.perf_counter()
    if not stream:
        response = await client.post(f"{url}/v1/chat/completions", json=body(i, False))
        response.raise_for_status()
        tokens = response.json()["usage"]["completion_tokens"]
        return {"latency": time.perf_counter() - started, "tokens": tokens}
    first, chunks = None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body(i, True)) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                first = first or time.perf_counter()
                chunks += 1
    ended = time.perf_counter()
    return {"latency": ended - started, "ttft": (first or ended) - started, "tokens": MAX_TOKENS,
            "tpot": (ended - first) / (MAX_TOKENS - 1) if first else None, "chunks": chunks}


async def closed_loop(url: str, n: int, concurrency: int, stream: bool, offset: int,
                      server_pid: int | None = None) -> tuple[list[dict], float, dict[str, float]]:
    """(results, seconds, CPU ms per request by process when ``server_pid`` is given) of ``n`` requests with
    ``concurrency`` in flight, after a warm-up round (not counted) that also waits for the engine: Serve answers
    /v1/models while its engine is still starting."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def gated(i: int) -> dict:
            async with gate:
                return await one_request(client, url, offset + i, stream)

        await asyncio.gather(*(gated(i) for i in range(concurrency)))  # warm-up, not counted
        before = process_cpu(server_pid) if server_pid else {}
        started = time.perf_counter()
        results = await asyncio.gather(*(gated(concurrency + i) for i in range(n)))
        seconds = time.perf_counter() - started
        cpu = cpu_ms_per_request(before, process_cpu(server_pid), n) if server_pid else {}
        return results, seconds, cpu


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def process_cpu(root_pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of the side's processes, the server and every process under it (Ray's
    services, workers and replicas, the engine core), by pid, with a name: Ray's and vLLM's process titles
    (``ray::ServeReplica:...``, ``VLLM::EngineCore``; a Ray worker's title changes while it runs a method, so the
    pid is the key), else the executable's name."""
    import psutil

    try:
        root = psutil.Process(root_pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return {}
    seconds = {}
    for process in processes:
        try:
            title = (process.cmdline() or [""])[0]
            name = title.split(" ")[0] if title.startswith(("ray::", "VLLM::")) else process.name()
            times = process.cpu_times()
            seconds[process.pid] = (name.split(".")[0], times.user + times.system)
        except psutil.Error:
            continue
    return seconds


def cpu_ms_per_request(before: dict, after: dict, n: int) -> dict[str, float]:
    """Milliseconds of CPU per request by process name between two ``process_cpu`` readings, largest first."""
    spent: dict[str, float] = {}
    for pid, (name, seconds) in after.items():
        spent[name] = spent.get(name, 0.0) + seconds - before.get(pid, ("", 0.0))[1]
    return {name: ms for name, ms in sorted(((name, 1e3 * s / n) for name, s in spent.items()),
                                            key=lambda item: -item[1]) if ms >= 0.05}


def measure(url: str, n: int, concurrency: int, single: int, server_pid: int) -> dict:
    plain, plain_s, cpu = asyncio.run(closed_loop(url, n, concurrency, stream=False, offset=0, server_pid=server_pid))
    streamed, streamed_s, _ = asyncio.run(closed_loop(url, n, concurrency, stream=True, offset=10_000))
    alone, _, _ = asyncio.run(closed_loop(url, single, 1, stream=False, offset=20_000))
    return {
        "requests_per_s": n / plain_s, "tokens_per_s": sum(r["tokens"] for r in plain) / plain_s,
        "p50_s": percentile([r["latency"] for r in plain], 0.5),
        "p99_s": percentile([r["latency"] for r in plain], 0.99),
        "stream_requests_per_s": n / streamed_s,
        "ttft_p50_s": percentile([r["ttft"] for r in streamed], 0.5),
        "ttft_p99_s": percentile([r["ttft"] for r in streamed], 0.99),
        "tpot_p50_s": statistics.median(r["tpot"] for r in streamed if r["tpot"] is not None),
        "stream_chunks_p50": statistics.median(r["chunks"] for r in streamed),
        "single_p50_s": percentile([r["latency"] for r in alone], 0.5),
        "cpu_ms_per_request": cpu, "cpu_ms_per_request_total": sum(cpu.values()),
    }


def serve_breakdown(urls: list[str]) -> dict[str, float]:
    """Mean milliseconds per request in each hop, from Ray Serve's own histograms on Ray's metrics endpoints: the
    proxy's whole request, and each deployment's processing (ingress, LLMServer)."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for url in urls:
        text = urllib.request.urlopen(url, timeout=30).read().decode()
        for line in text.splitlines():
            for metric, label in (("ray_serve_http_request_latency_ms", None),
                                  ("ray_serve_deployment_processing_latency_ms", "deployment")):
                for suffix, table in (("_sum{", sums), ("_count{", counts)):
                    if line.startswith(metric + suffix):
                        labels = line[line.index("{") + 1:line.index("}")]
                        name = "proxy (whole request)" if label is None else next(
                            (part.split("=", 1)[1].strip('"') for part in labels.split(",")
                             if part.startswith(label + "=")), "?")
                        table[name] = table.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return {name: sums[name] / counts[name] for name in sums if counts.get(name)}


def metrics_urls() -> list[str]:
    """Ray's Prometheus endpoints on this machine, from the service-discovery file Ray's dashboard writes for
    Prometheus (the side's own Ray is the only one running during the benchmark)."""
    path = Path("/tmp/ray/prom_metrics_service_discovery.json")
    if not path.is_file():
        return []
    return [f"http://{target}/metrics" for group in json.loads(path.read_text()) for target in group["targets"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "artifacts" / "tiny-models" / "teacher"))
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--single", type=int, default=50, help="requests sent one at a time")
    parser.add_argument("--sides", default="vllm,serve,serve-direct",
                        help="vllm, serve, serve-direct, serve+NAME=VALUE (Ray env settings), in order; a side may "
                        "come again (vllm,serve,vllm,serve): each Serve side is compared with the vLLM run before it")
    parser.add_argument("--json", type=Path, default=REPO / "runs" / "bench-serving.json")
    args = parser.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="zr-bench-") as tmp:
        for run, side in enumerate(args.sides.split(","), 1):
            label = side if side not in results else f"{side} (run {run})"  # a side again: its own row
            process, url, log = start_side(side, args.model, Path(tmp))
            try:
                results[label] = measure(url, args.requests, args.concurrency, args.single, process.pid)
                results[label]["front_end_cpu_ms"] = sum(ms for name, ms in results[label]["cpu_ms_per_request"].items()
                                                         if name not in ENGINE_PROCESSES)
                if side != "vllm" and (urls := metrics_urls()):
                    results[label]["hops_ms"] = serve_breakdown(urls)
            finally:
                stop_side(process)
            print(f"{label}: {json.dumps(results[label])}", flush=True)
    print(f"\n{args.requests} chat requests, {args.concurrency} in flight, {MAX_TOKENS} tokens each (ignore_eos); "
          f"{args.single} one at a time; {args.model}")
    print(f"  {'side':<12} {'req/s':>7} {'p50':>7} {'p99':>7} | {'stream':>6} {'TTFT50':>7} {'TTFT99':>7} "
          f"{'TPOT50':>7} | {'single p50':>10}")
    for side, r in results.items():
        print(f"  {side:<12} {r['requests_per_s']:7.1f} {r['p50_s'] * 1e3:6.0f}ms {r['p99_s'] * 1e3:6.0f}ms | "
              f"{r['stream_requests_per_s']:6.1f} {r['ttft_p50_s'] * 1e3:6.0f}ms {r['ttft_p99_s'] * 1e3:6.0f}ms "
              f"{r['tpot_p50_s'] * 1e3:6.1f}ms | {r['single_p50_s'] * 1e3:8.1f}ms")
    print("\nCPU per request in the closed loop, not streamed (ms; the side's processes: server, Ray, engine):")
    for side, r in results.items():
        print(f"  {side:<12} {r['cpu_ms_per_request_total']:6.1f} in all, front end {r['front_end_cpu_ms']:5.1f}: "
              + ", ".join(f"{name} {ms:.1f}" for name, ms in list(r["cpu_ms_per_request"].items())[:6]))
    base = None
    for side, r in results.items():  # each Serve side against the vLLM run before it (the machine's speed drifts)
        if side.split(" (run ")[0] == "vllm":
            base = r
            continue
        if base is None:
            continue
        ratio = {key: r[key] / base[key] for key in ("requests_per_s", "stream_requests_per_s", "p50_s", "ttft_p50_s",
                                                      "tpot_p50_s")}
        print(f"ratio {side}/vllm: throughput {ratio['requests_per_s']:.2f} (streamed "
              f"{ratio['stream_requests_per_s']:.2f}), p50 {ratio['p50_s']:.2f}, TTFT p50 {ratio['ttft_p50_s']:.2f}, "
              f"TPOT p50 {ratio['tpot_p50_s']:.2f}, one at a time p50 "
              f"{(r['single_p50_s'] - base['single_p50_s']) * 1e3:+.1f} ms")
        if r.get("hops_ms"):
            print("  where Serve's time went (mean ms per request, Ray Serve's metrics): " + ", ".join(
                f"{name} {ms:.1f}" for name, ms in r["hops_ms"].items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"requests": args.requests, "concurrency": args.concurrency,
                                     "max_tokens": MAX_TOKENS, "model": args.model, "results": results}, indent=2))
    print(f"\nwritten: {args.json}")


if __name__ == "__main__":
    main()
