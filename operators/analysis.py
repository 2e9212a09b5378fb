"""Canary analysis: Prometheus instant queries judged against thresholds.

Each metric yields Successful, Failed or Inconclusive. Inconclusive covers everything that is not
evidence of health: Prometheus unreachable, an HTTP or PromQL error, no series, NaN (0/0 when the
canary served nothing). The state machine counts it toward the failure limit; it is never a pass.
"""

from __future__ import annotations

import logging
import math
import string
from datetime import datetime

import aiohttp

from amalia_operator.constants import PROMETHEUS_TIMEOUT_S
from amalia_operator.models import AnalysisSettings, Measurement, Metric, MetricResult, Outcome
from amalia_operator.rollout import rfc3339

logger = logging.getLogger(__name__)


def render_query(metric: Metric, variant: str, window: str) -> str:
    return string.Template(metric.promql()).safe_substitute(variant=variant, window=window)


def judge(metric: Metric, value: float | None, message: str = "") -> MetricResult:
    """Compares one value with the metric's bounds."""
    if value is None or math.isnan(value):
        return MetricResult(
            metric=metric.name,
            outcome="Inconclusive",
            value=None,
            min=metric.min,
            max=metric.max,
            message=message or "no data",
        )
    failed = (metric.min is not None and value < metric.min) or (
        metric.max is not None and value > metric.max
    )
    outcome: Outcome = "Failed" if failed else "Successful"
    return MetricResult(
        metric=metric.name, outcome=outcome, value=value, min=metric.min, max=metric.max
    )


def combine(results: list[MetricResult], now: datetime) -> Measurement:
    outcomes = {r.outcome for r in results}
    outcome: Outcome = (
        "Failed"
        if "Failed" in outcomes
        else "Inconclusive"
        if "Inconclusive" in outcomes
        else "Successful"
    )
    return Measurement(outcome=outcome, time=rfc3339(now), results=results)


async def query(
    session: aiohttp.ClientSession, base_url: str, promql: str
) -> tuple[float | None, str]:
    """One instant query; returns (value, "") or (None, why there is no value)."""
    url = base_url.rstrip("/") + "/api/v1/query"
    try:
        async with session.get(url, params={"query": promql}) as resp:
            body = await resp.json(content_type=None)
            if resp.status != 200 or body.get("status") != "success":
                return None, f"prometheus answered {resp.status}: {body.get('error', '')}".strip()
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        return None, f"prometheus unreachable: {type(exc).__name__}: {exc}"
    data = body.get("data", {})
    series = data.get("result", [])
    if data.get("resultType") == "scalar":
        return float(series[1]), ""
    if not series:
        return None, "no data"
    if len(series) > 1:
        return None, f"query returned {len(series)} series; aggregate it to one"
    return float(series[0]["value"][1]), ""


async def measure(settings: AnalysisSettings, variant: str, now: datetime) -> Measurement:
    """Evaluates every metric of `settings` for `variant` once."""
    timeout = aiohttp.ClientTimeout(total=PROMETHEUS_TIMEOUT_S)
    results = []
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for metric in settings.metrics:
            promql = render_query(metric, variant, settings.window)
            value, message = await query(session, settings.prometheus_url, promql)
            result = judge(metric, value, message)
            logger.info("analysis %s for %s: %s", metric.name, variant, result.describe())
            results.append(result)
    return combine(results, now)
