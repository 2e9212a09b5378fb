"""One trace per request from the caller's traceparent down to the generation, exported by real replicas.

Three applications share one local Ray: traced (exporting to a real OTLP/HTTP receiver on loopback),
sampler off, and a collector that is down. Each sets the standard OTEL_* variables in its runtime_env.
"""

from __future__ import annotations

import copy
import json
import secrets
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from otlp_receiver import OtlpHttpReceiver, ReceivedSpan
from serve_harness import RunningServe, demo_app_config, free_port, running_serve

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SERVER, INTERNAL = 2, 1
CHAT = [{"role": "user", "content": "Olá, quem és tu?"}]


def traced_apps(
    base: dict[str, Any], name: str, prefix: str, env: dict[str, str], variants: list[str]
) -> list[dict[str, Any]]:
    """A front app plus its own variant apps, all with the given OTEL_* environment."""
    front, *variant_apps = copy.deepcopy(base["applications"])
    front["name"], front["route_prefix"] = name, prefix
    renamed = []
    for app, new_name in zip(variant_apps, variants):
        app["name"] = app["args"]["name"] = new_name
        renamed.append(app)
    front["deployments"][0]["user_config"] = {"weights": {v: 1 for v in variants}}
    for app in [front, *renamed]:
        app["runtime_env"] = {"env_vars": env}
    return [front, *renamed]


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpHttpReceiver]:
    with OtlpHttpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def served(demo_checkpoints: tuple[Path, Path], receiver: OtlpHttpReceiver) -> Iterator[RunningServe]:
    sft, dpo = demo_checkpoints
    base = demo_app_config(sft, dpo, free_port())
    common = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    on = {**common, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": "amalia-test"}
    off = {**on, "OTEL_TRACES_SAMPLER": "always_off"}
    down = {**common, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    base["applications"] = [
        *traced_apps(base, "amalia", "/", on, ["amalia-sft", "amalia-dpo"]),
        *traced_apps(base, "collector-down", "/down", down, ["down-sft"]),
        *traced_apps(base, "untraced", "/plain", common, ["plain-sft"]),
    ]
    # The sampler-off front routes to the traced amalia-sft, which exports to the receiver: only the front's
    # decision, carried in the traceparent it forwards, keeps that variant's spans out.
    sampler_off = copy.deepcopy(base["applications"][0])
    sampler_off.update(name="sampler-off", route_prefix="/off", runtime_env={"env_vars": off})
    sampler_off["deployments"][0]["user_config"] = {"weights": {"amalia-sft": 1}}
    base["applications"].insert(1, sampler_off)
    with running_serve(base) as running:
        yield running


def traceparent() -> tuple[str, str, str]:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{parent_id}-01", trace_id, parent_id


def spans_of(receiver: OtlpHttpReceiver, trace_id: str, count: int) -> list[ReceivedSpan]:
    spans = receiver.wait_for_spans(lambda s: sum(x.trace_id == trace_id for x in s) >= count, timeout_s=30)
    return [s for s in spans if s.trace_id == trace_id]


def test_request_spans_share_callers_trace_and_chain_ingress_to_generation(
    served: RunningServe, receiver: OtlpHttpReceiver
) -> None:
    header, trace_id, parent_id = traceparent()
    body = {"model": "amalia", "messages": CHAT, "max_tokens": 9, "temperature": 0.7, "top_p": 0.9}
    response = httpx.post(f"{served.base_url}/v1/chat/completions", json=body, timeout=60,
                          headers={"traceparent": header, "tracestate": "mesh=1"})  # fmt: skip
    assert response.status_code == 200
    usage, variant = response.json()["usage"], response.headers["x-amalia-variant"]
    spans = spans_of(receiver, trace_id, 2)
    (server,) = [s for s in spans if s.kind == SERVER]
    (generation,) = [s for s in spans if s.kind == INTERNAL]
    assert server.parent_span_id == parent_id
    assert generation.parent_span_id == server.span_id
    assert server.attributes["amalia.route.variant"] == variant
    assert server.attributes["amalia.route.reason"] == "weighted"
    assert server.attributes["http.response.status_code"] == 200
    assert generation.attributes["gen_ai.operation.name"] == "chat"
    assert generation.attributes["gen_ai.request.model"] == "amalia"
    assert generation.attributes["gen_ai.response.model"] == variant
    assert generation.attributes["gen_ai.request.max_tokens"] == 9
    assert generation.attributes["gen_ai.request.temperature"] == pytest.approx(0.7)
    assert generation.attributes["gen_ai.request.top_p"] == pytest.approx(0.9)
    assert generation.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert generation.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert list(generation.attributes["gen_ai.response.finish_reasons"]) == ["length"]
    assert generation.event_names() == ["queued", "first_token", "finished"]
    assert generation.attributes["gen_ai.server.time_to_first_token"] > 0
    assert generation.resource["service.name"] == "amalia-test"
    assert generation.resource["amalia.variant"] == variant
    # Prompts can hold personal data: no content unless AMALIA_TRACE_CONTENT is set.
    assert not any("Olá" in json.dumps(s.attributes, ensure_ascii=False) for s in spans)


def test_streamed_generation_span_ends_with_stream_and_counts_its_tokens(
    served: RunningServe, receiver: OtlpHttpReceiver
) -> None:
    header, trace_id, _ = traceparent()
    body = {"model": "amalia-dpo", "prompt": "Portugal é", "max_tokens": 25, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{served.base_url}/v1/completions", json=body, timeout=60,
                      headers={"traceparent": header}) as response:  # fmt: skip
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        streamed_at_ns = time.time_ns()
    usage = json.loads(events[-2])["usage"]
    spans = spans_of(receiver, trace_id, 2)
    (generation,) = [s for s in spans if s.kind == INTERNAL]
    (server,) = [s for s in spans if s.kind == SERVER]
    assert generation.attributes["gen_ai.operation.name"] == "text_completion"
    assert generation.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert generation.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert generation.end_ns <= streamed_at_ns and server.end_ns >= generation.end_ns
    assert server.attributes["amalia.route.reason"] == "pinned"


def test_failed_request_marks_span_error_type_without_prompt_text(
    served: RunningServe, receiver: OtlpHttpReceiver
) -> None:
    header, trace_id, _ = traceparent()
    body = {"model": "amalia-sft", "prompt": "segredo pessoal", "max_tokens": 100_000}
    response = httpx.post(f"{served.base_url}/v1/completions", json=body, headers={"traceparent": header})
    assert response.status_code == 400
    (generation,) = [s for s in spans_of(receiver, trace_id, 2) if s.kind == INTERNAL]
    assert generation.status_code == 2
    assert generation.attributes["error.type"].endswith("ContextLengthExceeded")
    assert "segredo" not in json.dumps(generation.attributes) + generation.status_message


def test_sampler_off_exports_nothing(served: RunningServe, receiver: OtlpHttpReceiver) -> None:
    header, trace_id, _ = traceparent()
    body = {"model": "amalia", "messages": CHAT, "max_tokens": 3}
    assert httpx.post(f"{served.base_url}/off/v1/chat/completions", json=body, timeout=60,
                      headers={"traceparent": header}).status_code == 200  # fmt: skip
    time.sleep(2.0)  # 40 export intervals of 50 ms
    assert not [s for s in receiver.spans() if s.trace_id == trace_id]


def test_dead_collector_costs_no_request_and_little_latency(served: RunningServe) -> None:
    """Bound: p50 latency with a dead collector stays within 1.5x + 20 ms of the untraced app's."""
    body = {"model": "amalia", "messages": CHAT, "max_tokens": 4, "temperature": 0}

    def p50(prefix: str) -> float:
        latencies = []
        for _ in range(20):
            started = time.perf_counter()
            response = httpx.post(f"{served.base_url}{prefix}/v1/chat/completions", json=body, timeout=60,
                                  headers={"traceparent": traceparent()[0]})  # fmt: skip
            latencies.append(time.perf_counter() - started)
            assert response.status_code == 200
        return statistics.median(latencies)

    p50("/plain"), p50("/down")  # warm both
    plain, down = p50("/plain"), p50("/down")
    assert down <= plain * 1.5 + 0.020, f"p50 {down * 1000:.1f} ms with a dead collector vs {plain * 1000:.1f} ms"
