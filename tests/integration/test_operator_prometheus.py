"""Canary analysis against a real Prometheus that scrapes a metrics endpoint this test serves.

The endpoint exports the per-variant series under the names the default queries use. The canary is
healthy first (analysis passes), then starts failing 40% of its requests: the next analysis fails
and the state machine rolls back, naming the metric, its value and its threshold.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from amalia_operator import analysis
from amalia_operator.constants import REQUESTS_TOTAL_METRIC, TTFT_BUCKET_METRIC
from amalia_operator.models import RolloutSpec, RolloutStatus
from amalia_operator.rollout import Observations, ServeObservation, advance, measurement_due

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
CANARY, STABLE = "amalia-dpo", "amalia-sft"
BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Canary:
    """Counters of a fake canary replica; `failing` flips its 5xx share and its TTFT."""

    failing: bool = False
    requests: dict[str, int] = field(default_factory=lambda: {"2xx": 0, "5xx": 0})
    ttft_buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    ttft_sum: float = 0.0

    def serve(self, n: int) -> None:
        for i in range(n):
            status = "5xx" if self.failing and i % 5 < 2 else "2xx"
            self.requests[status] += 1
            ttft = 0.3
            for b, bound in enumerate(BUCKETS):
                if ttft <= bound:
                    self.ttft_buckets[b] += 1
            self.ttft_buckets[-1] += 1
            self.ttft_sum += ttft

    def exposition(self) -> str:
        lines = [f"# TYPE {REQUESTS_TOTAL_METRIC} counter"]
        lines += [
            f'{REQUESTS_TOTAL_METRIC}{{variant="{CANARY}",status_class="{s}"}} {n}'
            for s, n in self.requests.items()
        ]
        base = TTFT_BUCKET_METRIC.removesuffix("_bucket")
        lines.append(f"# TYPE {base} histogram")
        for bound, count in zip([*map(str, BUCKETS), "+Inf"], self.ttft_buckets):
            lines.append(f'{TTFT_BUCKET_METRIC}{{variant="{CANARY}",le="{bound}"}} {count}')
        lines.append(f'{base}_sum{{variant="{CANARY}"}} {self.ttft_sum}')
        lines.append(f'{base}_count{{variant="{CANARY}"}} {self.ttft_buckets[-1]}')
        return "\n".join(lines) + "\n"


@pytest.fixture()
async def canary() -> AsyncIterator[tuple[Canary, int]]:
    state = Canary()

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=state.exposition(), content_type="text/plain")

    async def traffic() -> None:
        while True:
            state.serve(20)
            await asyncio.sleep(0.1)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    task = asyncio.create_task(traffic())
    yield state, port
    task.cancel()
    await runner.cleanup()


@pytest.fixture()
def prometheus(canary: tuple[Canary, int], tmp_path: Path) -> Iterator[str]:
    if not Path(PROMETHEUS).exists():
        pytest.skip("prometheus is not installed (scripts/install-test-tools.sh installs it)")
    _, target_port = canary
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"- job_name: canary\n  static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def wait_for_value(url: str, promql: str, ok: str, timeout_s: float = 40) -> float:
    """Polls until the query's value satisfies `ok` ("data", "above:X"), bounded in time."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            value, _ = await analysis.query(session, url, promql)
            if value is not None and (ok == "data" or value > float(ok.split(":")[1])):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{promql} never reached {ok} (last {value})")
            await asyncio.sleep(0.5)


def make_spec(url: str) -> RolloutSpec:
    return RolloutSpec.model_validate(
        {
            "rayServiceName": "amalia",
            "stable": {"name": STABLE, "modelPath": "/m/sft"},
            "canary": {"name": CANARY, "modelPath": "/m/dpo"},
            "steps": [{"analysis": {}}, {"setWeight": 50}, {"analysis": {}}],
            "analysis": {
                "prometheusURL": url,
                "interval": "1s",
                "window": "5s",
                "failureLimit": 0,
                "metrics": [
                    {"name": "error-rate", "max": 0.05},
                    {"name": "ttft-p95-seconds", "max": 2.0},
                ],
            },
        }
    )


async def tick(spec: RolloutSpec, status: RolloutStatus) -> tuple[RolloutStatus, list[str]]:
    """What the kopf timer does, minus Kubernetes: measure when due, then advance."""
    now = datetime.now(UTC)
    measurement = (
        await analysis.measure(spec.analysis, CANARY, now)
        if measurement_due(spec, status, now)
        else None
    )
    serve = ServeObservation(
        (STABLE, CANARY), {STABLE: 100, CANARY: 0}, {STABLE: "HEALTHY", CANARY: "HEALTHY"}
    )
    decision = advance(spec, 1, status, Observations(serve, measurement), now)
    return decision.status, [f"{e.reason}: {e.message}" for e in decision.events]


async def test_analysis_passes_then_rolls_back_when_canary_starts_failing(
    canary: tuple[Canary, int], prometheus: str
) -> None:
    state, _ = canary
    spec = make_spec(prometheus)
    error_rate = analysis.render_query(spec.analysis.metrics[0], CANARY, spec.analysis.window)
    ttft = analysis.render_query(spec.analysis.metrics[1], CANARY, spec.analysis.window)
    assert await wait_for_value(prometheus, error_rate, "data") == 0.0
    assert 0.1 < await wait_for_value(prometheus, ttft, "data") <= 0.5

    status = RolloutStatus()
    for _ in range(3):  # Deploying -> Stepping -> analysis at step 0 passes
        status, _events = await tick(spec, status)
    assert status.step_index == 1, status.message
    assert status.last_analysis is not None and status.last_analysis.outcome == "Successful"
    assert {r.metric: r.value for r in status.last_analysis.results}["error-rate"] == 0.0

    state.failing = True
    await wait_for_value(prometheus, error_rate, "above:0.3")
    status, _events = await tick(spec, status)  # setWeight 50
    status, events = await tick(spec, status)  # analysis at step 2: fails
    assert status.phase == "RolledBack" and status.canary_weight == 0
    failed = {r.metric: r for r in status.last_analysis.results}  # type: ignore[union-attr]
    assert (
        failed["error-rate"].outcome == "Failed"
        and failed["ttft-p95-seconds"].outcome == "Successful"
    )
    assert failed["error-rate"].value is not None and 0.3 <= failed["error-rate"].value <= 0.45
    assert events and events[-1].startswith("AnalysisFailed: rolled back")
    value = failed["error-rate"].value
    assert f"error-rate={value:.6g} (threshold <= 0.05)" in events[-1]
