"""Analysis verdicts: thresholds, the request gates (live and shadow), and what each kind of
silence means."""

from __future__ import annotations

import socket
from datetime import UTC, datetime

import pytest

from amalia_operator import analysis
from amalia_operator.analysis import Answer
from amalia_operator.constants import (
    BUILTIN_QUERIES,
    REQUESTS_QUERY,
    SHADOW_BUILTINS,
    SHADOW_COPIES_QUERY,
)
from amalia_operator.models import AnalysisSettings, Metric, RolloutSpec

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
    assert set(BUILTIN_QUERIES) - SHADOW_BUILTINS == {"error-rate", "ttft-p95-seconds"}


@pytest.mark.parametrize(
    ("name", "series", "zero_when_absent"),
    [
        ("shadow-error-rate", 'ray_amalia_shadow_requests_total{variant="v",status_class="5xx"}',
         True),
        ("shadow-error-rate",
         'ray_amalia_shadow_dropped_total{variant="v",reason="unavailable"}', True),
        ("shadow-latency-p95-seconds", 'ray_amalia_shadow_latency_seconds_bucket{variant="v"}',
         False),
        ("shadow-output-tokens-per-request", 'ray_amalia_shadow_output_tokens_total{variant="v"}',
         False),
        ("shadow-pt-br-share",
         'ray_amalia_shadow_variety_markers_total{variant="v",variety="pt-BR"}', True),
    ],
)  # fmt: skip
def test_shadow_builtins_read_shadow_series_and_absent_ones_as_no_data_when_rendered(
    name: str, series: str, zero_when_absent: bool
) -> None:
    metric = Metric(name=name, max=1.0)
    query = analysis.render_query(metric.promql(), "v", "2m")
    assert metric.shadow and series in query and "$" not in query
    # A numerator that counts bad things reads "no such series" as 0 (none happened); the whole
    # answer is still empty when nothing was shadowed (its denominator has no series).
    assert ("or vector(0)" in query) is zero_when_absent
    assert "ray_amalia_requests_total" not in query  # never the live series
    # The gate counts the copies the canary answered and those it failed before answering.
    gate = analysis.render_query(SHADOW_COPIES_QUERY, "v", "2m")
    assert 'ray_amalia_shadow_requests_total{variant="v"}' in gate
    assert 'ray_amalia_shadow_dropped_total{variant="v",reason="unavailable"}' in gate


def test_metric_source_says_what_a_custom_query_measures_when_given() -> None:
    assert not Metric(name="error-rate", max=0.01).shadow
    assert not Metric(name="mine", query="q", max=1).shadow
    assert Metric(name="mine", query="q", max=1, source="shadow").shadow
    with pytest.raises(ValueError, match="source is for custom queries only"):
        Metric(name="shadow-error-rate", max=0.01, source="live")


def spec_with(metrics: list[dict[str, object]], step_metrics: list[str]) -> RolloutSpec:
    return RolloutSpec.model_validate(
        {
            "rayServiceName": "amalia",
            "stable": {"name": "a", "modelPath": "/a"},
            "canary": {"name": "b", "modelPath": "/b"},
            "steps": [{"analysis": {"metrics": step_metrics}}, {"analysis": {}}],
            "analysis": {"metrics": metrics},
        }
    )


def test_analysis_step_judges_only_the_metrics_it_names_when_given() -> None:
    spec = spec_with(
        [{"name": "error-rate", "max": 0.01}, {"name": "shadow-error-rate", "max": 0.01}],
        ["shadow-error-rate"],
    )
    assert [m.name for m in spec.metrics_for(spec.steps[0])] == ["shadow-error-rate"]
    assert [m.name for m in spec.metrics_for(spec.steps[1])] == ["error-rate", "shadow-error-rate"]
    with pytest.raises(ValueError, match=r"names \['shadow-error-rate'\], which spec.analysis"):
        spec_with([{"name": "error-rate", "max": 0.01}], ["shadow-error-rate"])


async def test_measure_is_error_not_failure_when_prometheus_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but never listening: connection refused
        settings = AnalysisSettings.model_validate({"prometheusURL": f"http://127.0.0.1:{port}"})
        measurement = await analysis.measure(settings, "amalia-dpo", NOW)
    assert measurement.outcome == "Error"
    (gate,) = measurement.results  # the metrics are not asked once the gate cannot be read
    assert gate.metric == analysis.REQUESTS_RESULT and "unreachable" in gate.message


async def test_measure_gates_shadow_metrics_on_shadowed_requests_when_step_names_them() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        settings = AnalysisSettings.model_validate({"prometheusURL": f"http://127.0.0.1:{port}"})
        shadow = [Metric(name="shadow-error-rate", max=0.01)]
        only_shadow = await analysis.measure(settings, "amalia-dpo", NOW, shadow)
        both = await analysis.measure(
            settings, "amalia-dpo", NOW, [Metric(name="error-rate", max=0.01), *shadow]
        )
    assert [r.metric for r in only_shadow.results] == [analysis.SHADOW_REQUESTS_RESULT]
    assert [r.metric for r in both.results] == [
        analysis.REQUESTS_RESULT,
        analysis.SHADOW_REQUESTS_RESULT,
    ]


@pytest.mark.parametrize(
    ("answer", "outcome"), [(Answer(None), "Inconclusive"), (Answer(25.0), "Successful")]
)
def test_shadow_gate_reads_nothing_shadowed_as_too_few_when_no_series(
    answer: Answer, outcome: str
) -> None:
    gate = analysis.judge_requests(answer, 20, "1m", shadow=True)
    assert gate.metric == analysis.SHADOW_REQUESTS_RESULT and gate.outcome == outcome
    if outcome == "Inconclusive":
        assert gate.message == "the canary answered too few shadowed requests in 1m to judge"
