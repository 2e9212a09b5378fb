"""Tracing against a real OTLP receiver on loopback; no Ray.

Each test builds its own `Tracing` (an isolated provider) from the environment, the way a replica's
`configure_tracing` does, so env variants need no subprocess. "Two processes" are mimicked by two
providers whose only link is the carrier dict, which is JSON round-tripped and used from an empty
`contextvars.Context`, so nothing ambient can leak the parent.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import socket
import time
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.resources import Resource

from amalia_serve import tracing
from amalia_serve.tracing import (
    GenerationTrace,
    ShadowSpan,
    Tracing,
    TracingSettings,
    build_resource,
    extract_carrier,
    server_span,
)
from tests.otlp_receiver import (  # noqa: F401 (the *_fixture names register pytest fixtures)
    OtlpGrpcReceiver,
    OtlpHttpReceiver,
    ReceivedSpan,
    otlp_grpc_receiver_fixture,
    otlp_receiver_fixture,
)

CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"
SECRET_PROMPT = "O meu NIF é 123456789"
SECRET_COMPLETION = "Guardei o teu NIF"
SPAN_KIND_INTERNAL, SPAN_KIND_SERVER, SPAN_KIND_CLIENT = 1, 2, 3
STATUS_UNSET, STATUS_ERROR = 0, 2


@pytest.fixture(autouse=True)
def clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_") or name in (
            "POD_NAME",
            "POD_NAMESPACE",
            "NODE_NAME",
            tracing.CONTENT_ENV,
        ):
            monkeypatch.delenv(name)
    # Export within tens of milliseconds instead of the 5 s default batch delay.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")


@pytest.fixture
def to_receiver(
    monkeypatch: pytest.MonkeyPatch, otlp_receiver: OtlpHttpReceiver
) -> OtlpHttpReceiver:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.endpoint)
    return otlp_receiver


@pytest.fixture
def replicas() -> Iterator[list[Tracing]]:
    """Tracings made by a test; shut down (flushed) afterwards, bounded."""
    made: list[Tracing] = []
    yield made
    for item in made:
        item.shutdown(timeout_s=2.0)


def _replica(made: list[Tracing], component: str, variant: str | None = None) -> Tracing:
    made.append(Tracing.from_env(component, variant))
    return made[-1]


def _serve_one_request(
    ingress: Tracing,
    variant: Tracing,
    *,
    prompt: str = SECRET_PROMPT,
    error: BaseException | None = None,
) -> None:
    """Ingress span -> carrier over a 'process boundary' -> variant generation span."""
    headers = {
        "Traceparent": TRACEPARENT,
        "Content-Type": "application/json",
        "Authorization": "Bearer x",
    }
    with server_span(
        "/v1/chat/completions", "POST", extract_carrier(headers, ingress), ingress
    ) as span:
        span.set_route("amalia-dpo", "weighted")
        wire = json.dumps(span.carrier)

        def variant_side() -> None:
            generation = GenerationTrace(
                json.loads(wire),
                "chat",
                "amalia",
                "amalia-dpo",
                64,
                0.7,
                0.9,
                prompt=prompt,
                tracing=variant,
            )
            generation.queued()
            if error is not None:
                generation.failed(error)
                raise error  # reaches the ingress through the handle call
            generation.first_token(0.125)
            generation.finished(12, 5, "stop", completion=SECRET_COMPLETION)

        contextvars.Context().run(variant_side)
        span.set_status_code(200)


def _by_kind(spans: list[ReceivedSpan], kind: int) -> ReceivedSpan:
    (match,) = [span for span in spans if span.kind == kind]
    return match


def test_generation_span_continues_caller_trace_when_carrier_crosses_processes(
    to_receiver: OtlpHttpReceiver, replicas: list[Tracing]
) -> None:
    _serve_one_request(_replica(replicas, "ingress"), _replica(replicas, "variant", "amalia-dpo"))

    spans = to_receiver.wait_for_spans(2)
    server, generation = _by_kind(spans, SPAN_KIND_SERVER), _by_kind(spans, SPAN_KIND_INTERNAL)
    assert server.trace_id == generation.trace_id == CALLER_TRACE_ID
    assert server.parent_span_id == CALLER_SPAN_ID
    assert generation.parent_span_id == server.span_id
    assert server.name == "POST /v1/chat/completions"
    assert server.attributes == {
        "http.request.method": "POST",
        "url.path": "/v1/chat/completions",
        "http.route": "/v1/chat/completions",
        "amalia.route.variant": "amalia-dpo",
        "amalia.route.reason": "weighted",
        "http.response.status_code": 200,
    }
    assert generation.name == "chat amalia"
    assert generation.attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "amalia-serve",
        "gen_ai.request.model": "amalia",
        "gen_ai.response.model": "amalia-dpo",
        "gen_ai.request.max_tokens": 64,
        "gen_ai.request.temperature": 0.7,
        "gen_ai.request.top_p": 0.9,
        "gen_ai.server.time_to_first_token": 0.125,
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 5,
        "gen_ai.response.finish_reasons": ["stop"],
    }
    assert generation.event_names() == ["queued", "first_token", "finished"]
    assert (server.status_code, generation.status_code) == (STATUS_UNSET, STATUS_UNSET)
    assert (
        server.resource["amalia.component"] == "ingress" and "amalia.variant" not in server.resource
    )
    assert generation.resource["amalia.variant"] == "amalia-dpo"
    assert generation.resource["service.name"] == "amalia-serve"
    assert SECRET_PROMPT not in repr(spans) and SECRET_COMPLETION not in repr(spans)


def test_generation_span_records_prompt_and_completion_when_content_opted_in(
    monkeypatch: pytest.MonkeyPatch, to_receiver: OtlpHttpReceiver, replicas: list[Tracing]
) -> None:
    monkeypatch.setenv(tracing.CONTENT_ENV, "true")
    _serve_one_request(_replica(replicas, "ingress"), _replica(replicas, "variant", "amalia-dpo"))

    generation = _by_kind(to_receiver.wait_for_spans(2), SPAN_KIND_INTERNAL)
    assert json.loads(generation.attributes["gen_ai.input.messages"]) == [
        {"role": "user", "content": SECRET_PROMPT}
    ]
    assert json.loads(generation.attributes["gen_ai.output.messages"]) == [
        {"role": "assistant", "content": SECRET_COMPLETION}
    ]


class PromptLeakingError(RuntimeError):
    pass


def test_spans_record_error_type_not_message_when_generation_and_route_fail(
    to_receiver: OtlpHttpReceiver, replicas: list[Tracing]
) -> None:
    ingress, variant = _replica(replicas, "ingress"), _replica(replicas, "variant", "amalia-sft")
    with pytest.raises(PromptLeakingError):
        _serve_one_request(
            ingress, variant, error=PromptLeakingError(f"bad token in {SECRET_PROMPT}")
        )

    spans = to_receiver.wait_for_spans(2)
    expected_type = f"{__name__}.PromptLeakingError"
    for span in (_by_kind(spans, SPAN_KIND_SERVER), _by_kind(spans, SPAN_KIND_INTERNAL)):
        assert span.status_code == STATUS_ERROR
        assert span.attributes["error.type"] == expected_type
        assert span.status_message == ""
    assert SECRET_PROMPT not in repr(spans)


def test_server_span_is_error_only_when_status_code_is_5xx(
    to_receiver: OtlpHttpReceiver, replicas: list[Tracing]
) -> None:
    ingress = _replica(replicas, "ingress")
    for code in (429, 503):
        with server_span("/v1/completions", "POST", {}, ingress) as span:
            span.set_status_code(code)

    by_code = {s.attributes["http.response.status_code"]: s for s in to_receiver.wait_for_spans(2)}
    assert by_code[429].status_code == STATUS_UNSET and "error.type" not in by_code[429].attributes
    assert (
        by_code[503].status_code == STATUS_ERROR and by_code[503].attributes["error.type"] == "503"
    )
    assert by_code[429].parent_span_id is None  # no traceparent: a new root


def test_generation_span_ends_once_as_cancelled_when_stream_is_cancelled(
    to_receiver: OtlpHttpReceiver, replicas: list[Tracing]
) -> None:
    variant = _replica(replicas, "variant", "amalia-sft")
    with server_span("/v1/completions", "POST", {}, _replica(replicas, "ingress")) as span:
        span.keep_open()  # a streamed body: the span ends when the stream does
        generation = GenerationTrace(
            span.carrier, "text_completion", "amalia-sft", "amalia-sft", tracing=variant
        )
        generation.first_token(0.05)
    generation.failed(asyncio.CancelledError())
    generation.finished(3, 1, "stop")  # a late finally must not reopen or relabel the span
    span.record_error(asyncio.CancelledError())
    span.end()
    span.end()

    spans = to_receiver.wait_for_spans(2)
    server, gen = _by_kind(spans, SPAN_KIND_SERVER), _by_kind(spans, SPAN_KIND_INTERNAL)
    assert gen.name == "text_completion amalia-sft"
    assert gen.event_names() == ["first_token", "cancelled"]
    assert (
        gen.attributes["amalia.cancelled"] is True
        and "gen_ai.usage.output_tokens" not in gen.attributes
    )
    assert gen.status_code == STATUS_UNSET and server.status_code == STATUS_UNSET
    assert server.attributes["amalia.cancelled"] is True
    assert server.end_ns >= gen.end_ns  # the server span outlived its with-block
    time.sleep(0.2)
    assert len(to_receiver.spans()) == 2


def test_server_span_ends_when_block_raises_after_keep_open(
    to_receiver: OtlpHttpReceiver, replicas: list[Tracing]
) -> None:
    with (
        pytest.raises(TimeoutError),
        server_span("/v1/completions", "POST", {}, _replica(replicas, "ingress")) as span,
    ):
        span.keep_open()
        raise TimeoutError  # the streaming response was never returned

    (server,) = to_receiver.wait_for_spans(1)
    assert server.status_code == STATUS_ERROR and server.attributes["error.type"] == "TimeoutError"


def test_nothing_is_exported_when_sampler_is_always_off(
    monkeypatch: pytest.MonkeyPatch, to_receiver: OtlpHttpReceiver, replicas: list[Tracing]
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    ingress, variant = _replica(replicas, "ingress"), _replica(replicas, "variant", "amalia-sft")
    for _ in range(5):
        _serve_one_request(ingress, variant)
    assert ingress.shutdown(timeout_s=2.0) and variant.shutdown(timeout_s=2.0)

    to_receiver.assert_quiet(for_s=0.3)
    assert to_receiver.export_requests == 0


def test_spans_reach_collector_when_protocol_is_grpc(
    monkeypatch: pytest.MonkeyPatch, otlp_grpc_receiver: OtlpGrpcReceiver, replicas: list[Tracing]
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", otlp_grpc_receiver.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    _serve_one_request(_replica(replicas, "ingress"), _replica(replicas, "variant", "amalia-sft"))

    spans = otlp_grpc_receiver.wait_for_spans(2)
    assert {span.trace_id for span in spans} == {CALLER_TRACE_ID}
    assert otlp_grpc_receiver.content_encodings[0] == "grpc"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_request_path_stays_fast_when_collector_is_down(
    monkeypatch: pytest.MonkeyPatch, replicas: list[Tracing]
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    # Small batches and a small queue: the exporter thread is always busy failing and the queue
    # overflows, which must drop spans rather than slow the caller.
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4")
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "16")
    ingress, variant = _replica(replicas, "ingress"), _replica(replicas, "variant", "amalia-sft")
    assert ingress.enabled

    start = time.perf_counter()
    for _ in range(100):
        _serve_one_request(ingress, variant)
    request_path_s = time.perf_counter() - start
    assert request_path_s < 0.5, (
        f"100 traced requests took {request_path_s:.3f}s with the collector down"
    )

    start = time.perf_counter()
    ingress.shutdown(timeout_s=0.5)
    variant.shutdown(timeout_s=0.5)
    shutdown_s = time.perf_counter() - start
    assert shutdown_s < 1.5, f"shutdown took {shutdown_s:.3f}s with the collector down"


def test_shadow_span_is_a_client_child_of_the_request_and_parents_the_copy_when_traced(
    to_receiver: OtlpHttpReceiver, replicas: list[Tracing]
) -> None:
    ingress, variant = _replica(replicas, "ingress"), _replica(replicas, "variant", "amalia-dpo")
    with server_span("/v1/chat/completions", "POST", {"traceparent": TRACEPARENT}, ingress) as span:
        carrier = dict(span.carrier)
    # The copy starts after the request's span ended, as a late child of the same trace.
    shadow = ShadowSpan(carrier, "amalia-dpo", ingress)
    assert shadow.carrier["traceparent"] != carrier["traceparent"]
    GenerationTrace(shadow.carrier, "chat", "amalia", "amalia-dpo", tracing=variant).finished(5, 3, "stop")
    shadow.answered(503)
    shadow.dropped("overloaded")  # ended already: ignored

    spans = to_receiver.wait_for_spans(3)
    server, client = _by_kind(spans, SPAN_KIND_SERVER), _by_kind(spans, SPAN_KIND_CLIENT)
    generation = _by_kind(spans, SPAN_KIND_INTERNAL)
    assert server.trace_id == client.trace_id == generation.trace_id == CALLER_TRACE_ID
    assert client.parent_span_id == server.span_id and generation.parent_span_id == client.span_id
    assert client.name == "shadow amalia-dpo"
    assert client.attributes == {
        "amalia.shadow": True,
        "amalia.route.variant": "amalia-dpo",
        "http.response.status_code": 503,
        "error.type": "503",
    }
    assert client.status_code == STATUS_ERROR


def test_dropped_shadow_span_names_the_reason_and_is_no_error_when_the_copy_was_not_taken(
    to_receiver: OtlpHttpReceiver, replicas: list[Tracing]
) -> None:
    shadow = ShadowSpan({"traceparent": TRACEPARENT}, "amalia-dpo", _replica(replicas, "ingress"))
    shadow.dropped("overloaded")
    (client,) = to_receiver.wait_for_spans(1)
    assert client.parent_span_id == CALLER_SPAN_ID
    assert client.attributes["amalia.shadow.dropped"] == "overloaded"
    assert client.status_code == STATUS_UNSET


def test_tracing_is_noop_when_no_endpoint_is_set() -> None:
    off = Tracing.from_env("variant", "amalia-sft")
    assert not off.enabled
    assert extract_carrier({"traceparent": TRACEPARENT}, off) == {}
    with server_span("/v1/completions", "POST", {"traceparent": TRACEPARENT}, off) as span:
        span.set_route("amalia-sft", "weighted")
        span.set_status_code(500)
        assert span.carrier == {}
    generation = GenerationTrace({}, "chat", "amalia", "amalia-sft", tracing=off)
    generation.queued()
    generation.first_token(0.1)
    generation.finished(1, 1, "length")
    assert not generation.span_context.is_valid
    shadow = ShadowSpan({"traceparent": TRACEPARENT}, "amalia-dpo", off)
    shadow.answered(200)
    assert shadow.carrier == {}


def test_configure_tracing_keeps_first_setup_when_called_twice(
    monkeypatch: pytest.MonkeyPatch, otlp_receiver: OtlpHttpReceiver
) -> None:
    monkeypatch.setattr(tracing, "_configured", False)
    monkeypatch.setattr(tracing, "_active", Tracing.disabled())
    monkeypatch.setattr(tracing.atexit, "register", lambda fn: fn)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.endpoint)
    tracing.configure_tracing("variant", "amalia-sft")
    first = tracing.active_tracing()
    tracing.configure_tracing("variant", "amalia-dpo")
    try:
        assert first.enabled and tracing.active_tracing() is first
        GenerationTrace({}, "chat", "amalia", "amalia-sft").finished(
            1, 1, "stop"
        )  # the default tracing
        (span,) = otlp_receiver.wait_for_spans(1)
        assert span.resource["amalia.variant"] == "amalia-sft"
    finally:
        first.shutdown(timeout_s=2.0)


def test_extract_carrier_keeps_only_propagation_headers_when_headers_are_mixed(
    monkeypatch: pytest.MonkeyPatch, replicas: list[Tracing]
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    headers = {
        "TraceParent": TRACEPARENT,
        "tracestate": "k=v",
        "Baggage": "tenant=a",
        "Cookie": "s=1",
    }
    carrier = extract_carrier(headers, _replica(replicas, "ingress"))
    assert carrier == {"traceparent": TRACEPARENT, "tracestate": "k=v", "baggage": "tenant=a"}


def test_resource_names_pod_namespace_node_when_downward_api_env_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {"POD_NAME": "amalia-worker-0", "POD_NAMESPACE": "llm", "NODE_NAME": "gpu-3"}
    attributes = build_resource("variant", "amalia-sft", env).attributes
    assert attributes["service.name"] == "amalia-serve"
    assert attributes["service.version"] == tracing._package_version() != "0+unknown"
    assert (
        attributes["k8s.pod.name"],
        attributes["k8s.namespace.name"],
        attributes["k8s.node.name"],
    ) == (
        "amalia-worker-0",
        "llm",
        "gpu-3",
    )
    assert (attributes["amalia.component"], attributes["amalia.variant"]) == (
        "variant",
        "amalia-sft",
    )


def test_resource_env_overrides_defaults_but_not_variant_when_otel_env_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "amalia-prod")
    monkeypatch.setenv(
        "OTEL_RESOURCE_ATTRIBUTES", "k8s.pod.name=from-env,amalia.variant=wrong,team=llm"
    )
    resource: Resource = build_resource("variant", "amalia-dpo", {"POD_NAME": "from-downward-api"})
    assert resource.attributes["service.name"] == "amalia-prod"
    assert resource.attributes["k8s.pod.name"] == "from-env"
    assert resource.attributes["team"] == "llm"
    assert resource.attributes["amalia.variant"] == "amalia-dpo"


@pytest.mark.parametrize(
    ("env", "enabled", "protocol"),
    [
        ({}, False, "http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True, "http/protobuf"),
        (
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            },
            True,
            "grpc",
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            },
            True,
            "http/protobuf",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"},
            False,
            "http/protobuf",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"},
            False,
            "http/protobuf",
        ),
    ],
)
def test_settings_follow_otel_env_when_endpoint_and_protocol_vary(
    env: dict[str, str], enabled: bool, protocol: str
) -> None:
    settings = TracingSettings.from_env(env)
    assert (settings.enabled, settings.protocol) == (enabled, protocol)


def test_settings_leave_timeout_to_sdk_when_otel_timeout_is_set() -> None:
    assert TracingSettings.from_env({}).export_timeout_s == tracing.DEFAULT_EXPORT_TIMEOUT_S
    assert TracingSettings.from_env({"OTEL_EXPORTER_OTLP_TIMEOUT": "20"}).export_timeout_s is None


def test_settings_reject_protocol_when_unsupported() -> None:
    with pytest.raises(ValueError, match="protocol"):
        TracingSettings.from_env(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
            }
        )
