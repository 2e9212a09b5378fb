"""Autoscaling benchmark: how fast a variant follows a load step, and what users see before and after.

One variant (the tiny demo checkpoint on vLLM's CPU build) autoscales between 1 and 2 replicas with
the engine-load policy. The run holds one stream, then steps to `--streams` concurrent streams and
measures, from the step:

- `to_target_s`: until Serve's target says 2 replicas (the policy's decision after its signals,
  the metrics push and `upscale_delay_s`);
- `to_serving_s`: until the second replica is RUNNING, which is when Serve's routers send it
  requests (the target plus a vLLM engine start);
- TTFT p95 and output tokens/s in the window before the second replica serves and in an equal
  window once it does;
- after the load stops, `to_min_s` until the target is back to 1 (`downscale_delay_s` plus the
  look-back window), and whether any request failed across the whole cycle.

The knobs are short so a run takes minutes on two cores; docs/autoscaling.md explains how each
one adds to the response time in production. The last line printed is one JSON object.
``tests/integration/test_autoscaling_serve.py`` drives the same load generator and replica watcher.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.load import RequestResult, record_chat

PROMPTS = [
    "Fala-me de Lisboa.",
    "Explica como funciona a fotossíntese.",
    "Escreve uma carta a um amigo sobre os Açores.",
    "Descreve a história do Porto.",
]


# ---- load -----------------------------------------------------------------------------------------------


async def stream_loops(
    base_url: str,
    model: str,
    concurrency: int,
    stop: asyncio.Event,
    results: list[RequestResult],
    max_tokens: int = 48,
    users: list[str] | None = None,
) -> None:
    """`concurrency` streams back to back until `stop` is set; each appends its results. With
    `users`, stream i sends as `users[i]`, so the ingress keeps it on one variant (sticky), the way
    a user of a 90/10 split stays on one model version."""

    async def loop(index: int) -> None:
        round_ = 0
        user = users[index] if users else None
        while not stop.is_set():
            prompt = PROMPTS[(index + round_) % len(PROMPTS)]
            results.append(
                await record_chat(
                    client, model, [{"role": "user", "content": prompt}], max_tokens, user=user
                )
            )
            round_ += 1

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        await asyncio.gather(*(loop(i) for i in range(concurrency)))


# ---- replica counts over time ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaSample:
    at: float
    target: int
    running: tuple[str, ...]
    """Replica ids in state RUNNING."""
    stopping: tuple[str, ...]


@dataclass
class ReplicaWatcher:
    """Samples Serve's target and replica states of each variant deployment in a thread."""

    apps: list[str]
    interval_s: float = 0.25
    samples: dict[str, list[ReplicaSample]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self.samples = {app: [] for app in self.apps}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        assert client is not None, "Serve is not running in this process's Ray"
        while not self._stop.is_set():
            details = client.get_serve_details()
            now = time.monotonic()
            for app in self.apps:
                deployment = details["applications"][app]["deployments"][app]
                replicas = deployment["replicas"]
                self.samples[app].append(
                    ReplicaSample(
                        at=now,
                        target=deployment["target_num_replicas"],
                        running=tuple(r["replica_id"] for r in replicas if r["state"] == "RUNNING"),
                        stopping=tuple(
                            r["replica_id"] for r in replicas if r["state"] == "STOPPING"
                        ),
                    )
                )
            self._stop.wait(self.interval_s)

    def latest(self, app: str) -> ReplicaSample | None:
        samples = self.samples[app]
        return samples[-1] if samples else None

    def first(
        self, app: str, predicate: Callable[[ReplicaSample], bool], after: float = 0.0
    ) -> ReplicaSample | None:
        return next((s for s in self.samples[app] if s.at >= after and predicate(s)), None)

    def between(self, app: str, start: float, end: float) -> list[ReplicaSample]:
        return [s for s in self.samples[app] if start <= s.at <= end]

    def wait_for(
        self, app: str, predicate: Callable[[ReplicaSample], bool], timeout_s: float
    ) -> ReplicaSample:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            sample = self.latest(app)
            if sample is not None and predicate(sample):
                return sample
            time.sleep(self.interval_s)
        raise TimeoutError(f"{app}: condition not met in {timeout_s:.0f}s; last {self.latest(app)}")


async def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll `condition` without blocking the event loop; the monotonic time it became true."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout_s:.0f}s")
        await asyncio.sleep(0.25)
    return time.monotonic()


# ---- the Serve config ------------------------------------------------------------------------------------


def autoscaled_variant(
    name: str,
    model_path: Path,
    autoscaling: dict[str, Any],
    engine: dict[str, Any],
    num_cpus: float = 0.5,
    graceful_shutdown_timeout_s: float = 120.0,
) -> dict[str, Any]:
    """A variant application with autoscaling. `max_ongoing_requests` stays at the engine's own
    limit (2 x max_num_seqs), so overflow queues at the ingress's handle, where the policy sees it,
    instead of being refused with 429 by the engine."""
    from amalia_serve.local_run import variant_app_config

    deployment = {
        "autoscaling_config": autoscaling,
        "max_ongoing_requests": 2 * int(engine["max_num_seqs"]),
        "graceful_shutdown_timeout_s": graceful_shutdown_timeout_s,
        "ray_actor_options": {"num_cpus": num_cpus},
    }
    return variant_app_config(name, model_path, engine, deployment)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def window_stats(results: list[RequestResult], start: float, end: float) -> dict[str, Any]:
    """TTFT p50/p95 of requests started in [start, end) and output tokens/s of those that ended in it."""
    ttfts = [r.ttft_s for r in results if start <= r.started < end and r.ttft_s is not None]
    tokens = sum(r.tokens for r in results if start <= r.ended < end and r.ok)
    return {
        "requests": len(ttfts),
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p95_s": percentile(ttfts, 0.95),
        "output_tokens_per_s": tokens / (end - start) if end > start else None,
    }


# ---- the benchmark ---------------------------------------------------------------------------------------


async def step_load(
    base_url: str, watcher: ReplicaWatcher, args: argparse.Namespace
) -> dict[str, Any]:
    app = "amalia-sft"
    results: list[RequestResult] = []
    stop_one, stop_many = asyncio.Event(), asyncio.Event()
    one = asyncio.create_task(stream_loops(base_url, app, 1, stop_one, results, args.max_tokens))
    await asyncio.sleep(args.hold_s)
    stop_one.set()
    await one
    step = time.monotonic()
    many = asyncio.create_task(
        stream_loops(base_url, app, args.streams, stop_many, results, args.max_tokens)
    )
    targeted = await wait_until(
        lambda: (s := watcher.latest(app)) is not None and s.target >= 2, args.timeout_s, "target 2"
    )
    serving = await wait_until(
        lambda: (s := watcher.latest(app)) is not None and len(s.running) >= 2,
        args.timeout_s,
        "2 replicas running",
    )
    window = max(serving - step, 10.0)
    await asyncio.sleep(window)
    stop_many.set()
    await many
    stopped = time.monotonic()
    back = await asyncio.to_thread(
        watcher.wait_for, app, lambda s: s.target == 1 and not s.stopping, args.timeout_s
    )
    return {
        "streams": args.streams,
        "to_target_s": round(targeted - step, 1),
        "to_serving_s": round(serving - step, 1),
        "before": window_stats(results, step, serving),
        "after": window_stats(results, serving, serving + window),
        "to_min_s": round(back.at - stopped, 1),
        "requests": len(results),
        "failed": sum(not r.ok for r in results),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--hold-s", type=float, default=10.0, help="one stream before the step")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--upscale-delay-s", type=float, default=2.0)
    parser.add_argument("--downscale-delay-s", type=float, default=15.0)
    parser.add_argument("--look-back-period-s", type=float, default=4.0)
    parser.add_argument("--metrics-interval-s", type=float, default=0.5)
    parser.add_argument("--timeout-s", type=float, default=240.0)
    parser.add_argument("--models", type=Path, default=ROOT / ".models")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from serve_harness import DEMO_ENGINE, free_port, running_serve

    from amalia_serve.demo_model import write_demo_models
    from amalia_serve.local_run import local_serve_config

    sft, _ = write_demo_models(args.models)
    autoscaling = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_waiting_per_replica": 1,
        "upscale_delay_s": args.upscale_delay_s,
        "downscale_delay_s": args.downscale_delay_s,
        "look_back_period_s": args.look_back_period_s,
        "metrics_interval_s": args.metrics_interval_s,
    }
    variant = autoscaled_variant("amalia-sft", sft, autoscaling, DEMO_ENGINE)
    config = local_serve_config(free_port(), {"amalia-sft": 100}, [variant])
    with running_serve(config) as served, ReplicaWatcher(["amalia-sft"]) as watcher:
        report = asyncio.run(step_load(served.base_url, watcher, args))
    report["knobs"] = autoscaling
    print(json.dumps(report))
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
