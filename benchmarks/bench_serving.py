"""Serving benchmark: continuous batching vs one stream and vs a naive `generate` server, and the Serve overhead.

Everything is measured in one run on one local Ray cluster, on the realistic CPU checkpoint
(SmolLM2-135M-Instruct, `amalia-serve demo-models .models --realistic`):

- single-stream and 16-concurrent streaming output tokens/s through HTTP (`concurrency_speedup`);
- the same 16 concurrent requests against the naive baseline behind the same API (`vs_naive`);
- p50 latency of a 1-token completion in-process vs through Serve's HTTP path (`serve_overhead_ms_p50`),
  next to Ray Serve's own floor, a no-op FastAPI ingress -> DeploymentHandle -> deployment (`serve_floor_ms_p50`);
- in-process, our engine vs transformers' own continuous batching (`generate_batch`) on the same prompts.

The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "Write a long story about a lighthouse keeper in Portugal.",
    "Explain in detail how photosynthesis works.",
    "Describe the history of Lisbon from the Romans to today.",
    "List twenty ideas for a weekend in the Algarve and explain each.",
    "Write a detailed guide to making bread at home.",
    "Explain how a transformer language model generates text, step by step.",
    "Describe the water cycle for a ten-year-old, with examples.",
    "Write a long letter to a friend about a trip to the Azores.",
]


def noop_app() -> Any:
    """Ray Serve's floor: the same shape as our path (FastAPI ingress -> handle -> deployment), doing nothing."""
    from fastapi import FastAPI
    from ray import serve
    from ray.serve.handle import DeploymentHandle

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Noop:
        async def __call__(self) -> str:
            return "ok"

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class NoopIngress:
        def __init__(self, backend: DeploymentHandle) -> None:
            self.backend = backend

        @api.post("/noop")
        async def noop(self) -> dict[str, str]:
            return {"result": await self.backend.remote()}

    return NoopIngress.bind(Noop.bind())


def serve_config(model: str, port: int, threads: int) -> dict[str, Any]:
    from amalia_serve.local_run import local_serve_config, variant_app_config

    def variant(name: str, env: dict[str, str]) -> dict[str, Any]:
        engine = {"max_batch_size": 16, "max_queue_size": 64, "torch_threads": threads}
        deployment = {"num_replicas": 1, "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": threads}}
        return {**variant_app_config(name, model, engine, deployment), "runtime_env": {"env_vars": env}}

    naive_env = {"AMALIA_ENGINE_CLS": "benchmarks.naive_engine:NaiveGenerateEngine", "PYTHONPATH": str(ROOT)}
    front_args = {"ingress": {"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}}}
    variants = [variant("cb", {}), variant("naive", naive_env)]
    return local_serve_config(port, {"cb": 1, "naive": 0}, variants, front_args)


async def stream_tokens(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> int:
    body = {
        "model": model, "max_tokens": max_tokens, "temperature": 0.7, "seed": 1, "stream": True,
        "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": prompt}],
    }  # fmt: skip
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"usage"' in line:
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
    return tokens


async def throughput(base_url: str, model: str, concurrency: int, rounds: int, max_tokens: int) -> float:
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        await stream_tokens(client, model, PROMPTS[0], 8)  # warm-up
        started = time.perf_counter()
        total = 0
        for r in range(rounds):
            jobs = [stream_tokens(client, model, PROMPTS[(r + i) % len(PROMPTS)], max_tokens)
                    for i in range(concurrency)]  # fmt: skip
            total += sum(await asyncio.gather(*jobs))
        return total / (time.perf_counter() - started)


def p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


async def http_latency(base_url: str, path: str, body: dict[str, Any] | None, n: int) -> float:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        samples = []
        for i in range(n + 5):
            started = time.perf_counter()
            response = await client.post(path, json=body)
            response.raise_for_status()
            if i >= 5:
                samples.append(time.perf_counter() - started)
        return p50_ms(samples)


async def paired_overhead(base_url: str, engine: Any, n: int) -> tuple[float, float, float]:
    """p50 of a 1-token completion over HTTP and in-process, and p50 of their paired difference.

    The two are measured alternately, so drift in CPU speed hits both sides of each pair alike; the model's
    own forward (~85 ms here) dominates either latency and would otherwise drown a few ms of overhead.
    """
    from amalia_serve.sampling import SamplingParams

    body = {"model": "cb", "prompt": "Olá", "max_tokens": 1, "temperature": 0}
    params = SamplingParams(max_tokens=1, temperature=0.0)
    http, local = [], []
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        for i in range(n + 5):
            started = time.perf_counter()
            (await client.post("/v1/completions", json=body)).raise_for_status()
            middle = time.perf_counter()
            async for _ in engine.generate(engine.encode_text("Olá"), params):
                pass
            ended = time.perf_counter()
            if i >= 5:
                http.append(middle - started)
                local.append(ended - middle)
    return p50_ms(http), p50_ms(local), p50_ms([h - l for h, l in zip(http, local)])


async def engine_throughput(engine: Any, n: int, max_tokens: int) -> float:
    from amalia_serve.sampling import SamplingParams

    async def one(prompt: str) -> int:
        last = 0
        ids = engine.encode_chat([{"role": "user", "content": prompt}])
        async for out in engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=1)):
            last = out.output_tokens
        return last

    started = time.perf_counter()
    total = sum(await asyncio.gather(*(one(PROMPTS[i % len(PROMPTS)]) for i in range(n))))
    return total / (time.perf_counter() - started)


def hf_continuous_batching_throughput(engine: Any, n: int, max_tokens: int) -> float | str:
    """transformers' own continuous batching on the same model and prompts, in-process."""
    from transformers import GenerationConfig

    try:
        inputs = [engine.encode_chat([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]) for i in range(n)]
        config = GenerationConfig(max_new_tokens=max_tokens, do_sample=True, temperature=0.7,
                                  eos_token_id=engine.tokenizer.eos_token_id,
                                  pad_token_id=engine.tokenizer.pad_token_id)  # fmt: skip
        started = time.perf_counter()
        outputs = engine.model.generate_batch(inputs=inputs, generation_config=config, progress_bar=False)
        elapsed = time.perf_counter() - started
        tokens = sum(len(out.generated_tokens) for out in outputs.values())
        return tokens / elapsed
    except Exception as exc:  # noqa: BLE001  (an API that moved is a finding to print, not a crash)
        return f"failed: {type(exc).__name__}: {exc}"[:200]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / ".models" / "smollm2-135m-instruct"))
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--latency-samples", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the model replica")
    args = parser.parse_args()
    if not (Path(args.model) / "config.json").exists():
        print(f"{args.model} missing: run `amalia-serve demo-models .models --realistic` first", file=sys.stderr)
        return 2

    from ray import serve

    from amalia_serve.config import EngineConfig
    from amalia_serve.engine import Engine
    from amalia_serve.local_run import deploy_config, start_local_ray, wait_until_running

    sys.path.insert(0, str(ROOT / "tests"))
    from serve_harness import free_port

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    start_local_ray(num_cpus=8, dashboard=False)
    results: dict[str, Any] = {"model": Path(args.model).name, "cpus": os.cpu_count(),
                               "concurrency": args.concurrency, "max_tokens": args.max_tokens}  # fmt: skip
    engine = None
    try:
        deploy_config(serve_config(args.model, port, args.threads))
        wait_until_running(["amalia", "cb", "naive"], timeout_s=600)
        serve.run(noop_app(), name="noop", route_prefix="/floor")

        single = asyncio.run(throughput(base_url, "cb", 1, 2, args.max_tokens))
        batched = asyncio.run(throughput(base_url, "cb", args.concurrency, args.rounds, args.max_tokens))
        naive = asyncio.run(throughput(base_url, "naive", args.concurrency, 1, args.max_tokens))
        results.update(single_stream_tok_s=round(single, 1), concurrent_tok_s=round(batched, 1),
                       naive_concurrent_tok_s=round(naive, 1))  # fmt: skip

        # The in-process engine idles while Serve answers and the replica idles while it runs.
        engine = Engine.from_checkpoint(args.model, EngineConfig(torch_threads=args.threads, max_batch_size=16))
        http_p50, inproc_p50, overhead_p50 = asyncio.run(paired_overhead(base_url, engine, args.latency_samples))
        floor_p50 = asyncio.run(http_latency(base_url, "/floor/noop", None, args.latency_samples))
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()

    assert engine is not None
    try:
        ours_inproc = asyncio.run(engine_throughput(engine, args.concurrency, args.max_tokens))
        hf_cb = hf_continuous_batching_throughput(engine, args.concurrency, args.max_tokens)
    finally:
        engine.shutdown()

    results.update(
        concurrency_speedup=round(batched / single, 2),
        vs_naive=round(batched / naive, 2),
        http_1token_ms_p50=round(http_p50, 2),
        inprocess_1token_ms_p50=round(inproc_p50, 2),
        serve_overhead_ms_p50=round(overhead_p50, 2),
        serve_floor_ms_p50=round(floor_p50, 2),
        engine_inprocess_tok_s=round(ours_inproc, 1),
        hf_generate_batch_tok_s=round(hf_cb, 1) if isinstance(hf_cb, float) else hf_cb,
    )
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
