"""Analysis verdicts: thresholds, and everything that is not evidence counts as Inconclusive."""

from __future__ import annotations

import socket
from datetime import UTC, datetime

import pytest

from amalia_operator import analysis
from amalia_operator.models import AnalysisSettings, Metric

NOW = datetime(2026, 11, 26, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "outcome"),
    [
        (0.005, "Successful"),
        (0.01, "Successful"),
        (0.02, "Failed"),
        (None, "Inconclusive"),
        (float("nan"), "Inconclusive"),
    ],
)
def test_judge_compares_with_max_when_value_given(value: float | None, outcome: str) -> None:
    assert analysis.judge(Metric(name="error-rate", max=0.01), value).outcome == outcome


def test_judge_fails_when_value_below_min() -> None:
    metric = Metric(name="throughput", query="sum(rate(x[$window]))", min=5)
    assert analysis.judge(metric, 4.9).outcome == "Failed"
    assert analysis.judge(metric, 5.0).outcome == "Successful"


def test_combine_is_inconclusive_not_successful_when_one_metric_has_no_data() -> None:
    ok = analysis.judge(Metric(name="error-rate", max=0.01), 0.0)
    silent = analysis.judge(Metric(name="ttft-p95-seconds", max=2.0), None, "no data")
    assert analysis.combine([ok, silent], NOW).outcome == "Inconclusive"
    failed = analysis.judge(Metric(name="ttft-p95-seconds", max=2.0), 9.0)
    assert analysis.combine([silent, failed], NOW).outcome == "Failed"


def test_render_query_substitutes_variant_and_window_when_builtin() -> None:
    query = analysis.render_query(Metric(name="error-rate", max=0.01), "amalia-dpo", "2m")
    assert 'variant="amalia-dpo",status_class="5xx"}[2m]' in query
    assert "$" not in query


async def test_measure_is_inconclusive_when_prometheus_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but never listening: connection refused
        settings = AnalysisSettings.model_validate({"prometheusURL": f"http://127.0.0.1:{port}"})
        measurement = await analysis.measure(settings, "amalia-dpo", NOW)
    assert measurement.outcome == "Inconclusive"
    assert all(
        r.outcome == "Inconclusive" and "unreachable" in r.message for r in measurement.results
    )
