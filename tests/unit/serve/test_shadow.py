"""The shadow dispatcher on a real event loop: the in-flight bound, what is dropped and why, what a copy
records, and cancellation. The variant call is an asyncio stand-in with the interface of Serve's
DeploymentResponseGenerator (`anext`, `cancel()`); tests/integration/test_routing_serve.py runs the
real one on Ray Serve.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from amalia_serve.engine import EngineOutput
from amalia_serve.metrics import ShadowMetrics
from amalia_serve.protocol import GenerationFailure, GenerationRequest
from amalia_serve.sampling import SamplingParams
from amalia_serve.shadow import ShadowDispatcher

SFT, DPO = "amalia-sft", "amalia-dpo"
REQUEST = GenerationRequest(
    request_id="chatcmpl-1",
    operation="chat",
    requested_model="amalia",
    sampling=SamplingParams(max_tokens=8, temperature=0.0, seed=7),
    messages=[{"role": "user", "content": "Como vou para o Porto?"}],
    trace_carrier={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
)


def output(text: str, tokens: int, final: bool = False) -> EngineOutput:
    return EngineOutput("r", text, 1, 5, tokens, "stop" if final else None)


ANSWER = [output("Apanhe o ", 2), output("comboio e depois o autocarro.", 6, final=True)]


class RecordingMetrics(ShadowMetrics):
    """The real metrics (their record methods run too) plus a log of what was recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[str, int, int]] = []
        self.latencies: list[float] = []
        self.dropped: Counter[tuple[str, str]] = Counter()
        self.variety: Counter[tuple[str, str]] = Counter()

    def record_copy(self, variant: str, status_code: int, latency_s: float, output_tokens: int) -> None:
        super().record_copy(variant, status_code, latency_s, output_tokens)
        self.copies.append((variant, status_code, output_tokens))
        self.latencies.append(latency_s)

    def record_dropped(self, variant: str, reason: str) -> None:
        super().record_dropped(variant, reason)
        self.dropped[(variant, reason)] += 1

    def record_variety(self, variant: str, pt_pt: int, pt_br: int) -> None:
        super().record_variety(variant, pt_pt, pt_br)
        self.variety[(variant, "pt-PT")] += pt_pt
        self.variety[(variant, "pt-BR")] += pt_br


@dataclass
class FakeCall:
    """One variant call: waits for `gate`, then yields `items` (an exception in them is raised there)."""

    items: list[Any]
    gate: asyncio.Event
    cancelled: bool = False
    _next: int = field(default=0)

    def __aiter__(self) -> FakeCall:
        return self

    async def __anext__(self) -> Any:
        await self.gate.wait()
        if self._next == len(self.items):
            raise StopAsyncIteration
        item = self.items[self._next]
        self._next += 1
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


class FakeVariant:
    """Answers every call with `items` once `gate` is set; keeps the requests and calls it got."""

    def __init__(self, items: list[Any], open_gate: bool = True) -> None:
        self.items = items
        self.gate = asyncio.Event()
        if open_gate:
            self.gate.set()
        self.requests: list[tuple[str, GenerationRequest]] = []
        self.calls: list[FakeCall] = []

    def __call__(self, variant: str, request: GenerationRequest) -> FakeCall:
        self.requests.append((variant, request))
        self.calls.append(FakeCall(list(self.items), self.gate))
        return self.calls[-1]


async def settle(dispatcher: ShadowDispatcher) -> None:
    for _ in range(100):
        if dispatcher.in_flight == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{dispatcher.in_flight} copies still running")


def dispatcher(
    variant: FakeVariant, max_in_flight: int = 4, timeout_s: float = 5.0
) -> tuple[ShadowDispatcher, RecordingMetrics]:
    recorded = RecordingMetrics()
    return ShadowDispatcher(variant, recorded, timeout_s, max_in_flight), recorded


async def test_copy_is_the_same_request_under_its_own_id_when_submitted() -> None:
    variant = FakeVariant(ANSWER)
    shadows, _ = dispatcher(variant)
    assert shadows.submit(DPO, REQUEST, SFT, "Apanhe o comboio.")
    await settle(shadows)
    ((name, copy),) = variant.requests
    assert name == DPO
    assert copy.request_id.startswith("shadow-") and copy.request_id != REQUEST.request_id
    assert (copy.messages, copy.sampling, copy.operation) == (REQUEST.messages, REQUEST.sampling, "chat")
    assert copy.requested_model == "amalia"
    assert variant.calls[0].cancelled  # the call is released once read, like a request's


async def test_answered_copy_records_status_latency_tokens_and_both_answers_varieties_when_done() -> None:
    shadows, recorded = dispatcher(FakeVariant(ANSWER))
    shadows.submit(DPO, REQUEST, SFT, "Peguei o ônibus e depois o trem.")
    await settle(shadows)
    assert recorded.copies == [(DPO, 200, 6)]
    assert 0 <= recorded.latencies[0] < 1
    assert recorded.variety == Counter(
        {(DPO, "pt-PT"): 2, (DPO, "pt-BR"): 0, (SFT, "pt-PT"): 0, (SFT, "pt-BR"): 2}
    )
    assert not recorded.dropped


async def test_copies_past_max_in_flight_are_dropped_and_counted_when_variant_is_slow() -> None:
    variant = FakeVariant(ANSWER, open_gate=False)
    shadows, recorded = dispatcher(variant, max_in_flight=2)
    sent = [shadows.submit(DPO, REQUEST, SFT, "") for _ in range(5)]
    assert sent == [True, True, False, False, False]
    assert shadows.in_flight == 2
    assert recorded.dropped == Counter({(DPO, "in_flight_limit"): 3})
    variant.gate.set()
    await settle(shadows)
    assert [status for _, status, _ in recorded.copies] == [200, 200]
    assert shadows.submit(DPO, REQUEST, SFT, "")  # room again once they finished
    await settle(shadows)
    assert len(variant.requests) == 3


async def test_submit_returns_before_the_copy_starts_when_called() -> None:
    variant = FakeVariant(ANSWER, open_gate=False)
    shadows, _ = dispatcher(variant)
    assert shadows.submit(DPO, REQUEST, SFT, "")
    assert variant.requests == []  # nothing ran yet: the copy is a task of the loop
    variant.gate.set()
    await settle(shadows)
    assert len(variant.requests) == 1


@pytest.mark.parametrize(
    ("items", "reason"),
    [
        ([BackPressureError(num_queued_requests=8, max_queued_requests=8)], "overloaded"),
        ([GenerationFailure(429, "queue full", "rate_limit_error", code="engine_queue_full")], "overloaded"),
        ([DeploymentUnavailableError(DeploymentID(name=DPO, app_name=DPO))], "unavailable"),
        ([RuntimeError("replica died before answering")], "unavailable"),
    ],
)
async def test_copy_is_dropped_with_its_reason_when_variant_cannot_take_it(items: list[Any], reason: str) -> None:
    variant = FakeVariant(items)
    shadows, recorded = dispatcher(variant)
    shadows.submit(DPO, REQUEST, SFT, "")
    await settle(shadows)
    assert recorded.dropped == Counter({(DPO, reason): 1})
    assert recorded.copies == [] and not recorded.variety
    assert variant.calls[0].cancelled


@pytest.mark.parametrize(
    ("items", "status", "tokens"),
    [
        ([GenerationFailure(400, "context too long", "invalid_request_error")], 400, 0),
        ([output("Apanhe", 1), GenerationFailure(503, "engine died", "service_unavailable")], 503, 1),
        ([output("Apanhe", 1), RuntimeError("replica died mid-answer")], 503, 1),
    ],
)
async def test_copy_counts_as_answered_with_an_error_when_variant_refuses_or_fails_mid_answer(
    items: list[Any], status: int, tokens: int
) -> None:
    shadows, recorded = dispatcher(FakeVariant(items))
    shadows.submit(DPO, REQUEST, SFT, "")
    await settle(shadows)
    assert recorded.copies == [(DPO, status, tokens)]
    assert not recorded.dropped and not recorded.variety  # no answer to compare


async def test_copy_past_the_deadline_is_stopped_and_counted_as_504_when_variant_hangs() -> None:
    variant = FakeVariant(ANSWER, open_gate=False)
    shadows, recorded = dispatcher(variant, timeout_s=0.05)
    shadows.submit(DPO, REQUEST, SFT, "")
    await settle(shadows)
    assert recorded.copies == [(DPO, 504, 0)]
    assert variant.calls[0].cancelled


async def test_close_cancels_running_copies_and_their_calls_when_ingress_shuts_down() -> None:
    variant = FakeVariant(ANSWER, open_gate=False)
    shadows, recorded = dispatcher(variant)
    for _ in range(3):
        shadows.submit(DPO, REQUEST, SFT, "")
    await asyncio.sleep(0.01)  # the copies are waiting on the variant
    await shadows.close()
    assert shadows.in_flight == 0
    assert [call.cancelled for call in variant.calls] == [True, True, True]
    assert recorded.copies == [] and not recorded.dropped


async def test_new_bound_applies_to_the_next_copy_when_max_in_flight_changes() -> None:
    variant = FakeVariant(ANSWER, open_gate=False)
    shadows, recorded = dispatcher(variant, max_in_flight=1)
    assert shadows.submit(DPO, REQUEST, SFT, "")
    assert not shadows.submit(DPO, REQUEST, SFT, "")
    shadows.max_in_flight = 3
    assert shadows.submit(DPO, REQUEST, SFT, "") and shadows.submit(DPO, REQUEST, SFT, "")
    assert not shadows.submit(DPO, REQUEST, SFT, "")
    variant.gate.set()
    await settle(shadows)
    assert recorded.dropped == Counter({(DPO, "in_flight_limit"): 2})
