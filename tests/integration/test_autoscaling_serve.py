"""Variants autoscale with the engine-load policy on a real local Ray Serve, and no request fails.

One scaling cycle runs once per module on the tiny demo checkpoints (vLLM's CPU build), with
short delays so it fits in minutes on two cores; the tests below each check one property of the
recorded timeline:

0. `amalia-dpo` (the canary, `min_replicas: 0`) starts at zero replicas; one request pinned to it
   waits for a replica to start and succeeds; idle again, it goes back to zero.
1. One stream on `amalia-sft` (`min_replicas: 1`): it holds one replica.
2. A step to 20 users streaming on the alias, split 90/10 (18 users sticky to `amalia-sft`, 2 to
   the canary): `amalia-sft` reaches `max_replicas` (2); the canary, woken from zero by its
   users, stays at one replica.
3. The load stops while 4 long streams keep running on `amalia-sft`: after `downscale_delay_s`
   it goes back to one replica, and the replica Serve removes still had streams, which finish
   (graceful drain).
Every request of every phase must succeed.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_harness import DEMO_ENGINE, free_port, running_serve

from amalia_serve.local_run import local_serve_config
from amalia_serve.routing import TrafficSplit
from benchmarks.bench_autoscale import (
    ReplicaSample,
    ReplicaWatcher,
    autoscaled_variant,
    stream_loops,
    wait_until,
)
from benchmarks.load import RequestResult, record_chat

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(900),
    # Ray 2.60 warns on every parse of a config with metrics_interval_s (the replica watcher reads
    # Serve's details four times a second), yet still has no other knob for it: docs/autoscaling.md.
    pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning"),
]

SFT, DPO = "amalia-sft", "amalia-dpo"
DOWNSCALE_DELAY_S = 12.0
# Short delays and a fast metrics path, so one cycle takes minutes; docs/autoscaling.md has the
# production values and what each one adds to the response time.
KNOBS = {
    "max_replicas": 2,
    "target_waiting_per_replica": 1,
    "upscale_delay_s": 1.0,
    "downscale_delay_s": DOWNSCALE_DELAY_S,
    "look_back_period_s": 3.0,
    "metrics_interval_s": 0.5,
}
STEP_STREAMS = 20
WEIGHTS = {SFT: 90, DPO: 10}
DRAIN_STREAMS = 4
LONG_TOKENS = 1500  # the demo context is 2048 tokens
# Bounds this test holds the run to; the measured values are printed and in benchmarks/RESULTS.md.
TO_TARGET_BOUND_S = 30.0  # metrics push + look-back + upscale delay
TO_SERVING_BOUND_S = 180.0  # plus a vLLM start on two loaded cores (measured 37-60 s)
TO_MIN_BOUND_S = DOWNSCALE_DELAY_S + 40.0  # plus the look-back and the drain of a long stream


@dataclass
class Cycle:
    watcher: ReplicaWatcher
    cold_start: RequestResult
    dpo_back_to_zero_s: float
    one_stream: tuple[float, float]
    step: float
    sft_serving: float
    load_stopped: float
    drained_replica_ongoing: float
    sft_back_to_min: ReplicaSample
    dpo_idle_again: ReplicaSample
    readyz_at_zero: dict[str, Any]  # status code and body of /readyz while the canary had no replica
    results: dict[str, list[RequestResult]] = field(default_factory=dict)
    metrics: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def sticky_users(variant: str, count: int) -> list[str]:
    """End-user ids the ingress's sticky routing sends to `variant` under WEIGHTS."""
    split = TrafficSplit((SFT, DPO), WEIGHTS)
    rng = random.Random(0)  # unused by sticky choices; the signature wants one
    keys = (f"user-{i}" for i in itertools.count())
    chosen = (
        key
        for key in keys
        if split.choose(model="amalia", header_variant=None, sticky_key=key, rng=rng).variant
        == variant
    )
    return list(itertools.islice(chosen, count))


# 20 users as a 90/10 split gives them: 18 on the stable variant, 2 on the canary.
STEP_USERS = sticky_users(SFT, STEP_STREAMS * 9 // 10) + sticky_users(DPO, STEP_STREAMS // 10)


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    text = httpx.get(url, timeout=10).text
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def replica_ongoing(url: str, replica_id: str) -> float:
    """Requests in a replica as Serve last exported them (`serve_replica_processing_queries`)."""
    values = [
        value
        for name, labels, value in scrape(url)
        if name == "ray_serve_replica_processing_queries"
        and replica_id in labels.get("replica", "")
    ]
    return max(values, default=-1.0)


async def run_cycle(base_url: str, metrics_url: str, watcher: ReplicaWatcher) -> Cycle:
    results: dict[str, list[RequestResult]] = {"one": [], "step": [], "drain": []}

    def holds(app: str, predicate: Callable[[ReplicaSample], bool]) -> Callable[[], bool]:
        return lambda: (s := watcher.latest(app)) is not None and predicate(s)

    def idle(s: ReplicaSample) -> bool:
        return s.target == 0 and not s.running and not s.stopping

    # 0. Scale from zero and back. Readiness first: it must not wake the canary.
    await wait_until(holds(DPO, idle), 60, "dpo at 0")
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        readyz = await client.get("/readyz")
        readyz_at_zero = {"http_status": readyz.status_code, **readyz.json()}
        await asyncio.sleep(3)
        readyz_at_zero["still_idle"] = holds(DPO, idle)()
        cold_start = await record_chat(client, DPO, [{"role": "user", "content": "Olá!"}], 16)
    served = time.monotonic()
    dpo_zero = await wait_until(holds(DPO, idle), TO_MIN_BOUND_S, "dpo back at 0")

    # 1. One stream.
    stop = asyncio.Event()
    one_start = time.monotonic()
    task = asyncio.create_task(stream_loops(base_url, SFT, 1, stop, results["one"]))
    await asyncio.sleep(15)
    stop.set()
    await task
    one_end = time.monotonic()

    # 2. Step to 20 users on the alias, 90/10.
    stop = asyncio.Event()
    step = time.monotonic()
    task = asyncio.create_task(
        stream_loops(base_url, "amalia", STEP_STREAMS, stop, results["step"], users=STEP_USERS)
    )
    sft_serving = await wait_until(
        holds(SFT, lambda s: len(s.running) >= 2), TO_SERVING_BOUND_S, "sft at 2"
    )
    await asyncio.sleep(10)

    # 3. The load stops; long streams keep both sft replicas busy while one is removed.
    drain_stop = asyncio.Event()
    drain = asyncio.create_task(
        stream_loops(base_url, SFT, DRAIN_STREAMS, drain_stop, results["drain"], LONG_TOKENS)
    )
    stop.set()
    await task
    load_stopped = time.monotonic()
    await wait_until(holds(SFT, lambda s: bool(s.stopping)), TO_MIN_BOUND_S, "sft stopping one")
    stopping = watcher.latest(SFT)
    assert stopping is not None
    drained_ongoing = await asyncio.to_thread(replica_ongoing, metrics_url, stopping.stopping[0])
    await wait_until(
        holds(SFT, lambda s: s.target == 1 and len(s.running) == 1 and not s.stopping),
        TO_MIN_BOUND_S,
        "sft back at 1",
    )
    drain_stop.set()
    await drain
    sft_min = watcher.first(SFT, lambda s: s.target == 1, after=load_stopped)
    dpo_idle = await asyncio.to_thread(watcher.wait_for, DPO, idle, TO_MIN_BOUND_S)
    assert sft_min is not None
    metrics = await asyncio.to_thread(scrape, metrics_url)
    return Cycle(
        watcher=watcher,
        cold_start=cold_start,
        dpo_back_to_zero_s=dpo_zero - served,
        one_stream=(one_start, one_end),
        step=step,
        sft_serving=sft_serving,
        load_stopped=load_stopped,
        drained_replica_ongoing=drained_ongoing,
        sft_back_to_min=sft_min,
        dpo_idle_again=dpo_idle,
        readyz_at_zero=readyz_at_zero,
        results=results,
        metrics=metrics,
    )


@pytest.fixture(scope="module")
def cycle(demo_checkpoints: tuple[Path, Path]) -> Iterator[Cycle]:
    sft_path, dpo_path = demo_checkpoints
    variants = [
        autoscaled_variant(SFT, sft_path, {**KNOBS, "min_replicas": 1}, DEMO_ENGINE),
        autoscaled_variant(DPO, dpo_path, {**KNOBS, "min_replicas": 0}, DEMO_ENGINE),
    ]
    config = local_serve_config(free_port(), WEIGHTS, variants)
    with running_serve(config) as served, ReplicaWatcher([SFT, DPO]) as watcher:
        recorded = asyncio.run(run_cycle(served.base_url, served.metrics_url, watcher))
    print(summary(recorded))  # the numbers of this run; see benchmarks/RESULTS.md
    yield recorded


def summary(c: Cycle) -> str:
    to_target = c.watcher.first(SFT, lambda s: s.target >= 2, after=c.step)
    requests = [r for phase in c.results.values() for r in phase]
    return (
        f"cold start {c.cold_start.ended - c.cold_start.started:.1f} s; "
        f"dpo back to 0 after {c.dpo_back_to_zero_s:.1f} s; "
        f"sft target 2 after {to_target.at - c.step if to_target else float('nan'):.1f} s, "
        f"serving after {c.sft_serving - c.step:.1f} s; "
        f"back to 1 after {c.sft_back_to_min.at - c.load_stopped:.1f} s; "
        f"drained replica had {c.drained_replica_ongoing:g} ongoing; "
        f"{len(requests)} requests, {sum(not r.ok for r in requests)} failed"
    )


def metric_values(c: Cycle, name: str, **labels: str) -> list[float]:
    return [
        value
        for metric, found, value in c.metrics
        if metric == name and all(found.get(k) == v for k, v in labels.items())
    ]


# === scale from zero ===


def test_first_request_waits_for_a_replica_and_succeeds_when_variant_is_at_zero(
    cycle: Cycle,
) -> None:
    assert cycle.cold_start.ok, cycle.cold_start
    assert cycle.cold_start.variant == DPO
    zero = cycle.watcher.first(DPO, lambda s: s.target == 0 and not s.running)
    assert zero is not None and zero.at <= cycle.cold_start.started


def test_readiness_counts_a_variant_at_zero_as_ready_without_waking_it(cycle: Cycle) -> None:
    ready = cycle.readyz_at_zero
    assert ready["http_status"] == 200 and ready["status"] == "ready", ready
    assert ready["scaled_to_zero"] == [DPO] and ready["variants"] == {SFT: True, DPO: True}
    assert ready["still_idle"], "asking /readyz woke the canary"


def test_idle_variant_returns_to_zero_after_its_downscale_delay(cycle: Cycle) -> None:
    assert DOWNSCALE_DELAY_S <= cycle.dpo_back_to_zero_s <= TO_MIN_BOUND_S


# === one stream ===


def test_variant_holds_min_replicas_when_one_stream(cycle: Cycle) -> None:
    start, end = cycle.one_stream
    samples = cycle.watcher.between(SFT, start, end)
    assert samples and {s.target for s in samples} == {1}
    assert {len(s.running) for s in samples} == {1}
    assert len(cycle.results["one"]) >= 3 and all(r.ok for r in cycle.results["one"])


# === sustained load ===


def test_variant_reaches_max_replicas_within_bound_when_load_is_sustained(cycle: Cycle) -> None:
    targeted = cycle.watcher.first(SFT, lambda s: s.target >= 2, after=cycle.step)
    assert targeted is not None and targeted.at - cycle.step <= TO_TARGET_BOUND_S
    assert cycle.sft_serving - cycle.step <= TO_SERVING_BOUND_S
    assert max(s.target for s in cycle.watcher.samples[SFT]) == KNOBS["max_replicas"]


def test_canary_scales_on_its_own_share_when_split_is_90_10(cycle: Cycle) -> None:
    step = cycle.results["step"]
    canary_users = set(STEP_USERS[-(STEP_STREAMS // 10) :])
    assert {r.variant for r in step if r.user in canary_users} == {DPO}
    assert {r.variant for r in step if r.user not in canary_users} == {SFT}
    # Woken from zero by its users, it stays at one replica while the stable variant doubles.
    during = cycle.watcher.between(DPO, cycle.step, cycle.load_stopped)
    assert max(s.target for s in during) == 1
    assert max(len(s.running) for s in during) == 1


# === after the load ===


def test_variant_returns_to_min_after_downscale_delay_when_load_stops(cycle: Cycle) -> None:
    assert DOWNSCALE_DELAY_S <= cycle.sft_back_to_min.at - cycle.load_stopped <= TO_MIN_BOUND_S


def test_streams_on_a_removed_replica_finish_when_it_drains(cycle: Cycle) -> None:
    assert cycle.drained_replica_ongoing >= 1
    drained = cycle.results["drain"]
    removal = cycle.watcher.first(SFT, lambda s: bool(s.stopping), after=cycle.load_stopped)
    assert removal is not None
    in_flight = [r for r in drained if r.started < removal.at < r.ended]
    assert len(in_flight) >= DRAIN_STREAMS - 1
    assert all(r.ok for r in in_flight), in_flight


def test_no_request_fails_across_the_cycle(cycle: Cycle) -> None:
    requests = [r for phase in cycle.results.values() for r in phase] + [cycle.cold_start]
    failed = [r for r in requests if not r.ok]
    assert not failed, failed[:3]
    assert len(requests) > 100


# === why: what the policy exported ===


def test_policy_exports_decisions_and_signals_per_variant(cycle: Cycle) -> None:
    ups = metric_values(
        cycle, "ray_amalia_autoscaling_decisions_total", variant=SFT, direction="up"
    )
    assert ups and sum(ups) >= 1
    for variant in (SFT, DPO):
        assert metric_values(cycle, "ray_amalia_autoscaling_desired_replicas", variant=variant)
        kv = metric_values(
            cycle, "ray_amalia_autoscaling_signal", variant=variant, signal="kv_cache_usage_target"
        )
        assert kv and kv[0] == pytest.approx(0.8)
