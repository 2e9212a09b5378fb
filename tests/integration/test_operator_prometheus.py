"""Canary analysis judged on what a real Ray Serve exports, through a real Prometheus; and the
shadow-traffic metrics judged by a real Prometheus over the series the ingress exports for them.

A local Ray Serve runs the demo layout (ingress + amalia-sft + amalia-dpo, the canary) and exports
its metrics as in production; Prometheus 2.42 scrapes them every second. Ray exports a labelled
series only after its first increment, and the tests rely on exactly that: a canary that served
nothing has no series at all (inconclusive, not failed), a canary that served only successes has no
5xx series (its error rate is 0, not "no data"), a Prometheus outage pauses the analysis without
counting anything, and a canary whose application is gone answers 503 and is rolled back.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import httpx
import pytest
from serve_harness import RunningServe, demo_app_config, free_port, running_serve

from amalia_operator import analysis
from amalia_operator.constants import REQUESTS_QUERY, REQUESTS_TOTAL_METRIC
from amalia_operator.models import Metric, RolloutSpec, RolloutStatus
from amalia_operator.rollout import Observations, ServeObservation, advance, measurement_due

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
STABLE, CANARY = "amalia-sft", "amalia-dpo"
# Long enough to hold the canary's successes and its failures when the failures come.
WINDOW = "60s"


@pytest.fixture(scope="module")
def served(demo_checkpoints: tuple[Path, Path]) -> Iterator[RunningServe]:
    sft, dpo = demo_checkpoints
    config = demo_app_config(sft, dpo, free_port(), weights={STABLE: 100, CANARY: 0})
    with running_serve(config, fresh=True) as serve:
        yield serve


@dataclass
class Prometheus:
    """A real Prometheus on a fixed loopback port; `stop` and `start` make an outage."""

    config: Path
    storage: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.storage}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not self._ready():
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None


@pytest.fixture(scope="module")
def prometheus(
    served: RunningServe, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    if not Path(PROMETHEUS).exists():
        pytest.fail("prometheus is not installed: run `make tools`")
    work = tmp_path_factory.mktemp("prometheus")
    target = served.metrics_url.removeprefix("http://").removesuffix("/metrics")
    config = work / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"- job_name: ray\n  static_configs: [{{targets: ['{target}']}}]\n"
    )
    server = Prometheus(config, work / "tsdb", free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def chat(served: RunningServe, model: str, n: int) -> list[int]:
    """`n` small chat completions pinned to `model`; their HTTP statuses."""
    body = {"model": model, "messages": [{"role": "user", "content": "Olá!"}], "max_tokens": 4}
    with httpx.Client(base_url=served.base_url, timeout=120) as client:
        return [client.post("/v1/chat/completions", json=body).status_code for _ in range(n)]


async def value_of(url: str, promql: str) -> float | None:
    async with aiohttp.ClientSession() as session:
        return (await analysis.query(session, url, promql)).value


async def wait_for(url: str, promql: str, ok: str, timeout_s: float = 90) -> float:
    """Polls until the query's value is `ok` ("data", "at-least:X"), bounded in time."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await value_of(url, promql)
        if value is not None and (ok == "data" or value >= float(ok.split(":")[1])):
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
                "window": WINDOW,
                "initialDelay": "0s",
                "minRequests": 10,
                "failureLimit": 0,
                "inconclusiveLimit": 5,
                "outageLimit": "10m",
                "metrics": [
                    {"name": "error-rate", "max": 0.05},
                    {"name": "ttft-p95-seconds", "max": 30.0},
                ],
            },
        }
    )


async def tick(spec: RolloutSpec, status: RolloutStatus) -> tuple[RolloutStatus, list[str]]:
    """What the kopf timer does, minus Kubernetes: measure when due, then advance."""
    await asyncio.sleep(1.1)  # the analysis interval
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


def outcomes(status: RolloutStatus) -> dict[str, str]:
    assert status.last_analysis is not None
    return {r.metric: r.outcome for r in status.last_analysis.results}


async def test_analysis_judges_real_ray_series_through_prometheus_outage_and_failure(
    served: RunningServe, prometheus: Prometheus
) -> None:
    url, spec = prometheus.url, make_spec(prometheus.url)
    requests = analysis.render_query(REQUESTS_QUERY, CANARY, WINDOW)
    stable_requests = analysis.render_query(REQUESTS_QUERY, STABLE, WINDOW)
    only_5xx = (
        f'sum(rate({REQUESTS_TOTAL_METRIC}{{variant="{CANARY}",status_class="5xx"}}[{WINDOW}]))'
    )

    # The stable serves; the canary has served nothing yet: no series of its own at all.
    assert chat(served, STABLE, 3) == [200] * 3
    await wait_for(url, stable_requests, "data")
    assert await value_of(url, requests) is None
    status = RolloutStatus()
    status, _ = await tick(spec, status)  # Deploying -> Stepping (the canary is healthy)
    status, _ = await tick(spec, status)  # analysis: nothing served is no evidence
    assert status.stage == "Stepping" and status.step_index == 0, status.message
    assert status.last_analysis is not None and status.last_analysis.outcome == "Inconclusive"
    assert status.analysis is not None and (
        status.analysis.failures,
        status.analysis.inconclusive,
    ) == (0, 1)

    # The canary serves only successes: Ray has no 5xx series for it, and that is a pass.
    assert chat(served, CANARY, 25) == [200] * 25
    await wait_for(url, requests, "at-least:10")
    assert await value_of(url, only_5xx) is None  # what made the old error-rate query "no data"
    status, _ = await tick(spec, status)
    assert status.step_index == 1, status.message
    assert status.last_analysis is not None and status.last_analysis.outcome == "Successful"
    results = {r.metric: r.value for r in status.last_analysis.results}
    assert results["error-rate"] == 0.0 and results["canary-requests"] >= 10
    assert results["ttft-p95-seconds"] is not None and results["ttft-p95-seconds"] > 0
    status, _ = await tick(spec, status)  # setWeight 50
    assert status.step_index == 2

    # Prometheus goes away: the analysis pauses; nothing is counted, nothing rolls back.
    prometheus.stop()
    status, events = await tick(spec, status)
    assert status.stage == "Stepping" and status.phase == "Progressing" and not events
    assert status.last_analysis is not None and status.last_analysis.outcome == "Error"
    assert "paused: Prometheus unavailable" in status.message
    assert status.analysis is not None and status.analysis.outage_since is not None
    assert (status.analysis.failures, status.analysis.inconclusive) == (0, 0)
    prometheus.start()

    # The canary's application goes away: the ingress answers 503 for it, and it is rolled back.
    from ray import serve

    serve.delete(CANARY)
    failed = chat(served, CANARY, 25)
    assert set(failed) == {503}
    error_rate = analysis.render_query(spec.analysis.metrics[0].promql(), CANARY, WINDOW)
    await wait_for(url, error_rate, "at-least:0.3")
    status, events = await tick(spec, status)
    assert status.phase == "RolledBack" and status.canary_weight == 0, status.message
    assert outcomes(status)["error-rate"] == "Failed"
    assert events and events[-1].startswith("AnalysisFailed: rolled back")
    value = next(r.value for r in status.last_analysis.results if r.metric == "error-rate")  # type: ignore[union-attr]
    assert value is not None and f"error-rate={value:.6g} (threshold <= 0.05)" in events[-1]


# === shadow traffic: the series the ingress exports for the variant it copies requests to ===
def shadow_series(now: int) -> str:
    """OpenMetrics for four canaries, shaped as Ray exports them (a labelled series is born at its
    first increment, often above 1): `quiet` was never shadowed (no series at all); `good` answered
    25 copies, none failed (no 5xx series), in European Portuguese, and the ingress dropped 5 more
    at its own in-flight limit; `bad` failed half of 20 and answered in Brazilian Portuguese;
    `gone` failed all 12 before answering anything (the ingress counts those as dropped,
    `unavailable`, and it has no answered series at all)."""
    counters: dict[str, list[tuple[str, float]]] = {
        "ray_amalia_shadow_requests": [
            ('variant="good",status_class="2xx"', 25),
            ('variant="bad",status_class="2xx"', 10),
            ('variant="bad",status_class="5xx"', 10),
        ],
        "ray_amalia_shadow_dropped": [
            ('variant="good",reason="in_flight_limit"', 5),
            ('variant="gone",reason="unavailable"', 12),
        ],
        "ray_amalia_shadow_output_tokens": [('variant="good"', 500), ('variant="bad"', 60)],
        "ray_amalia_shadow_variety_markers": [
            ('variant="good",variety="pt-PT"', 12),
            ('variant="bad",variety="pt-PT"', 2),
            ('variant="bad",variety="pt-BR"', 8),
        ],
    }
    lines = []
    times = range(now - 30, now + 1, 5)  # born 30 s ago, inside the window
    for family, series in counters.items():
        lines.append(f"# TYPE {family} counter")
        lines += [
            f"{family}_total{{{labels}}} {value} {t}" for labels, value in series for t in times
        ]
    lines.append("# TYPE ray_amalia_shadow_latency_seconds histogram")
    for variant, slow in (("good", 0), ("bad", 20)):
        for le, count in (("0.5", 25 - slow), ("2.0", 25 - slow), ("10.0", 25), ("+Inf", 25)):
            lines += [
                f'ray_amalia_shadow_latency_seconds_bucket{{variant="{variant}",le="{le}"}} '
                f"{count} {t}"
                for t in times
            ]
        for suffix, value in (("count", 25), ("sum", 30.0)):
            lines += [
                f'ray_amalia_shadow_latency_seconds_{suffix}{{variant="{variant}"}} {value} {t}'
                for t in times
            ]
    return "\n".join([*lines, "# EOF", ""])


@pytest.fixture(scope="module")
def shadow_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """A real Prometheus over a TSDB backfilled (promtool) with the shadow series."""
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    work = tmp_path_factory.mktemp("shadow-prometheus")
    (work / "series.om").write_text(shadow_series(int(time.time())))
    subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics",
                    str(work / "series.om"), str(work / "tsdb")],
                   check=True, capture_output=True)  # fmt: skip
    (work / "prometheus.yml").write_text("global: {evaluation_interval: 1s}\n")
    server = Prometheus(work / "prometheus.yml", work / "tsdb", free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_shadow_metrics_judge_shadowed_answers_and_read_nothing_shadowed_as_no_data(
    shadow_prometheus: Prometheus,
) -> None:
    settings = make_spec(shadow_prometheus.url).analysis
    metrics = [
        Metric(name="shadow-error-rate", max=0.05),
        Metric(name="shadow-latency-p95-seconds", max=5.0),
        Metric(name="shadow-output-tokens-per-request", min=5.0),
        Metric(name="shadow-pt-br-share", max=0.1),
    ]
    now = datetime.now(UTC)

    async def values(variant: str) -> tuple[str, dict[str, tuple[str, float | None]]]:
        measurement = await analysis.measure(settings, variant, now, metrics)
        return measurement.outcome, {r.metric: (r.outcome, r.value) for r in measurement.results}

    # Never shadowed: no series; the gate says too few, and no shadow metric is read (not 0).
    outcome, quiet = await values("quiet")
    assert outcome == "Inconclusive"
    assert quiet == {analysis.SHADOW_REQUESTS_RESULT: ("Inconclusive", 0.0)}

    outcome, good = await values("good")
    assert outcome == "Successful", good
    assert good[analysis.SHADOW_REQUESTS_RESULT] == ("Successful", 25.0)
    assert good["shadow-error-rate"] == ("Successful", 0.0)  # no 5xx series: no errors
    assert good["shadow-output-tokens-per-request"] == ("Successful", 20.0)
    assert good["shadow-pt-br-share"] == ("Successful", 0.0)  # no pt-BR series: none
    assert good["shadow-latency-p95-seconds"][1] is not None
    assert good["shadow-latency-p95-seconds"][1] <= 0.5

    outcome, bad = await values("bad")
    assert outcome == "Failed", bad
    assert bad["shadow-error-rate"] == ("Failed", 0.5)
    assert bad["shadow-pt-br-share"] == ("Failed", 0.8)
    assert bad["shadow-output-tokens-per-request"] == ("Failed", 3.0)
    assert bad["shadow-latency-p95-seconds"][0] == "Failed"

    # A canary that failed every copy before answering: judged (12 copies), and every one an error.
    outcome, gone = await values("gone")
    assert outcome == "Failed", gone
    assert gone[analysis.SHADOW_REQUESTS_RESULT] == ("Successful", 12.0)
    assert gone["shadow-error-rate"] == ("Failed", 1.0)
    assert gone["shadow-output-tokens-per-request"][0] == "Inconclusive"  # nothing answered
