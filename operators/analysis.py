"""Canary analysis: Prometheus instant queries judged against thresholds.

A measurement first asks how many requests the canary served in the window. Fewer than
`minRequests` is no evidence either way: the measurement is Inconclusive and the metrics are not
judged. Then each metric yields Successful, Failed, Inconclusive (no data, NaN) or Error
(Prometheus unreachable, an HTTP or PromQL error). The measurement is Failed if any metric failed
(evidence beats silence), else Error if Prometheus failed to answer, else Inconclusive, else
Successful. The state machine counts Failed toward the failure limit, Inconclusive toward the
inconclusive limit, and pauses on Error: an outage says nothing about the canary.

Ray exports a labelled series only after its first increment, so "no data" means different things
per query: the built-in error rate turns "no 5xx series" into 0 (`or vector(0)`), and a canary that
served nothing is caught by the request count before any metric is read.

Metrics of shadow traffic (the canary's answers to copied requests, which nobody sees) have their
own gate: the shadowed requests the canary answered in the window. A canary at weight 0 with shadow
traffic is judged on its shadow metrics alone (an analysis step may name the metrics it judges); a
live metric there would have no requests to count and make the measurement inconclusive.
"""

from __future__ import annotations

import logging
import math
import string
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp

from amalia_operator.constants import PROMETHEUS_TIMEOUT_S, REQUESTS_QUERY, SHADOW_COPIES_QUERY
from amalia_operator.models import (
    AnalysisSettings,
    Measurement,
    Metric,
    MetricResult,
    Outcome,
    rfc3339,
)

logger = logging.getLogger(__name__)
# The request-count gates appear among a measurement's results under these names.
REQUESTS_RESULT = "canary-requests"
SHADOW_REQUESTS_RESULT = "canary-shadow-requests"
_SEVERITY: tuple[Outcome, ...] = ("Failed", "Error", "Inconclusive", "Successful")


@dataclass(frozen=True)
class Answer:
    """One instant query's result: a value, no data (`value` None), or an `error`."""

    value: float | None
    error: str | None = None


def render_query(template: str, variant: str, window: str) -> str:
    return string.Template(template).safe_substitute(variant=variant, window=window)


def judge(metric: Metric, answer: Answer) -> MetricResult:
    """Compares one answer with the metric's bounds."""
    bounds: dict[str, Any] = {"metric": metric.name, "min": metric.min, "max": metric.max}
    if answer.error is not None:
        return MetricResult(**bounds, outcome="Error", message=answer.error)
    if answer.value is None or math.isnan(answer.value):
        return MetricResult(**bounds, outcome="Inconclusive", message="no data")
    failed = (metric.min is not None and answer.value < metric.min) or (
        metric.max is not None and answer.value > metric.max
    )
    return MetricResult(**bounds, outcome="Failed" if failed else "Successful", value=answer.value)


def judge_requests(
    answer: Answer, min_requests: int, window: str, shadow: bool = False
) -> MetricResult:
    """The gate: enough canary requests (live, or shadowed with `shadow`) in the window for the
    metrics to mean something."""
    name = SHADOW_REQUESTS_RESULT if shadow else REQUESTS_RESULT
    bounds: dict[str, Any] = {"metric": name, "min": float(min_requests)}
    if answer.error is not None:
        return MetricResult(**bounds, outcome="Error", message=answer.error)
    # No series at all: the canary has not served (or answered a shadowed) request since it started.
    served = 0.0 if answer.value is None or math.isnan(answer.value) else answer.value
    if served < min_requests or served == 0:
        what = "shadowed requests" if shadow else "requests"
        return MetricResult(
            **bounds,
            outcome="Inconclusive",
            value=served,
            message=f"the canary answered too few {what} in {window} to judge",
        )
    return MetricResult(**bounds, outcome="Successful", value=served)


def combine(results: list[MetricResult], now: datetime) -> Measurement:
    outcomes = {r.outcome for r in results}
    outcome: Outcome = next((o for o in _SEVERITY if o in outcomes), "Successful")
    return Measurement(outcome=outcome, time=rfc3339(now), results=results)


async def query(session: aiohttp.ClientSession, base_url: str, promql: str) -> Answer:
    """One instant query."""
    url = base_url.rstrip("/") + "/api/v1/query"
    try:
        async with session.get(url, params={"query": promql}) as resp:
            body = await resp.json(content_type=None)
            if resp.status != 200 or body.get("status") != "success":
                reason = f"prometheus answered {resp.status}: {body.get('error', '')}".strip()
                return Answer(None, reason)
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        return Answer(None, f"prometheus unreachable: {type(exc).__name__}: {exc}")
    data = body.get("data", {})
    series = data.get("result", [])
    if data.get("resultType") == "scalar":
        return Answer(float(series[1]))
    if not series:
        return Answer(None)
    if len(series) > 1:
        return Answer(None, f"query returned {len(series)} series; aggregate it to one")
    return Answer(float(series[0]["value"][1]))


async def measure(
    settings: AnalysisSettings, variant: str, now: datetime, metrics: list[Metric] | None = None
) -> Measurement:
    """Evaluates `metrics` (default: all of `settings`) for `variant` once, each kind (live,
    shadow) after its own request gate."""
    timeout = aiohttp.ClientTimeout(total=PROMETHEUS_TIMEOUT_S)
    chosen = settings.metrics if metrics is None else metrics
    results: list[MetricResult] = []
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def ask(template: str) -> Answer:
            return await query(
                session, settings.prometheus_url, render_query(template, variant, settings.window)
            )

        for shadow, gate_query in ((False, REQUESTS_QUERY), (True, SHADOW_COPIES_QUERY)):
            group = [m for m in chosen if m.shadow == shadow]
            if not group:
                continue
            answer = await ask(gate_query)
            gate = judge_requests(answer, settings.min_requests, settings.window, shadow)
            results.append(gate)
            if gate.outcome == "Successful":
                for metric in group:
                    results.append(judge(metric, await ask(metric.promql())))
    for result in results:
        logger.info("analysis of %s: %s %s", variant, result.outcome, result.describe())
    return combine(results, now)
