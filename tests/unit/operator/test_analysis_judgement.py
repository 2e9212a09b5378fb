"""Analysis verdicts: thresholds, the request gate, and what each kind of silence means."""

from __future__ import annotations

import socket
from datetime import UTC, datetime

import pytest

from amalia_operator import analysis
from amalia_operator.analysis import Answer
from amalia_operator.constants import BUILTIN_QUERIES, REQUESTS_QUERY
from amalia_operator.models import AnalysisSettings, Metric

NOW = datetime(2026, 11, 26, tzinfo=UTC)
ERROR_RATE = Metric(name="error-rate", max=0.01)


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        (Answer(0.005), "Successful"),
        (Answer(0.01), "Successful"),
        (Answer(0.02), "Failed"),
        (Answer(None), "Inconclusive"),
        (Answer(float("nan")), "Inconclusive"),
        (Answer(None, "prometheus unreachable: ClientConnectorError"), "Error"),
    ],
)
def test_judge_compares_with_max_when_value_given(answer: Answer, outcome: str) -> None:
    assert analysis.judge(ERROR_RATE, answer).outcome == outcome


def test_judge_fails_when_value_below_min() -> None:
    metric = Metric(name="throughput", query="sum(rate(x[$window]))", min=5)
    assert analysis.judge(metric, Answer(4.9)).outcome == "Failed"
    assert analysis.judge(metric, Answer(5.0)).outcome == "Successful"


@pytest.mark.parametrize(
    ("answer", "minimum", "outcome"),
    [
        (Answer(None), 20, "Inconclusive"),  # no series: the canary never served a request
        (Answer(0.0), 0, "Inconclusive"),  # nothing served in the window, whatever the minimum
        (Answer(19.4), 20, "Inconclusive"),
        (Answer(20.0), 20, "Successful"),
        (Answer(None, "prometheus answered 503"), 20, "Error"),
    ],
)
def test_request_gate_counts_a_measurement_only_when_canary_served_enough(
    answer: Answer, minimum: int, outcome: str
) -> None:
    assert analysis.judge_requests(answer, minimum, "1m").outcome == outcome


def test_combine_lets_failure_beat_error_and_error_beat_silence() -> None:
    ok = analysis.judge(ERROR_RATE, Answer(0.0))
    silent = analysis.judge(ERROR_RATE, Answer(None))
    failed = analysis.judge(ERROR_RATE, Answer(9.0))
    down = analysis.judge(ERROR_RATE, Answer(None, "prometheus unreachable"))
    assert analysis.combine([ok, silent], NOW).outcome == "Inconclusive"
    assert analysis.combine([silent, down], NOW).outcome == "Error"
    assert analysis.combine([down, failed], NOW).outcome == "Failed"
    assert analysis.combine([ok, ok], NOW).outcome == "Successful"


def test_render_query_substitutes_variant_and_window_when_builtin() -> None:
    query = analysis.render_query(ERROR_RATE.promql(), "amalia-dpo", "2m")
    assert 'variant="amalia-dpo",status_class="5xx"}[2m]' in query
    assert "or vector(0)" in query  # no 5xx series means no errors, not no data
    assert "$" not in query
    assert "$" not in analysis.render_query(REQUESTS_QUERY, "amalia-dpo", "2m")
    assert set(BUILTIN_QUERIES) == {"error-rate", "ttft-p95-seconds"}


async def test_measure_is_error_not_failure_when_prometheus_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but never listening: connection refused
        settings = AnalysisSettings.model_validate({"prometheusURL": f"http://127.0.0.1:{port}"})
        measurement = await analysis.measure(settings, "amalia-dpo", NOW)
    assert measurement.outcome == "Error"
    (gate,) = measurement.results  # the metrics are not asked once the gate cannot be read
    assert gate.metric == analysis.REQUESTS_RESULT and "unreachable" in gate.message
