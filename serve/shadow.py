"""Shadow traffic: once a request was answered, a copy of it goes to the shadow variant, and only metrics
see the copy's answer.

Which requests are copied is decided with the route (amalia_serve.routing.ShadowPolicy); the ingress
calls `ShadowDispatcher.submit` once the caller has the whole answer. `submit` never waits: it starts the
copy as a task on the ingress's event loop, or drops it, counted, when `max_in_flight` copies already run
on this replica. A copy is the same request (messages or prompt, sampling parameters, seed) under its own
request id and a span of its own, read to its end like a request that is not streamed, within the same
deadline as a request (`ingress.request_timeout_s`). What it shows goes to ShadowMetrics: its status,
latency and output tokens, or why it was dropped, and the pt-PT/pt-BR markers (amalia_variety) of
its answer and of the answer the caller got, so the two varieties are compared over the same requests.
The ingress cancels the copies still running when it shuts down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Callable
from typing import Any

from amalia_serve.engine import EngineOutput
from amalia_serve.metrics import ShadowMetrics
from amalia_serve.protocol import GenerationFailure, GenerationRequest
from amalia_serve.tracing import ShadowSpan
from amalia_serve.variant_calls import VARIANT_UNAVAILABLE, ApiError, cancel_call, next_item
from amalia_variety import count_markers

# Starts a call of `variant` with the request: an async iterator of EngineOutput | GenerationFailure that
# has cancel() (a DeploymentResponseGenerator of the variant's `generate`).
OpenCall = Callable[[str, GenerationRequest], Any]


def drop_reason(error: ApiError, answered_anything: bool) -> str | None:
    """Why a failed copy counts as dropped rather than answered; None: it was answered, with an error.

    A copy the variant had no room for (its Serve queue or its engine's queue full: 429) or that could not
    reach a replica (503 `variant_unavailable`) before the variant produced anything was never taken.
    Whatever fails after the first output, and every other status, is the variant's answer.
    """
    if answered_anything:
        return None
    if error.status == 429:
        return "overloaded"
    if error.code == VARIANT_UNAVAILABLE:
        return "unavailable"
    return None


class ShadowDispatcher:
    """Starts, bounds, records and, at shutdown, cancels the shadow copies of one ingress replica."""

    def __init__(
        self, open_call: OpenCall, metrics: ShadowMetrics, timeout_s: float, max_in_flight: int
    ) -> None:
        self._open_call = open_call
        self._metrics = metrics
        self._timeout_s = timeout_s
        self.max_in_flight = max_in_flight  # the ingress sets it again on every reconfigure
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def submit(
        self, variant: str, request: GenerationRequest, answered_by: str, answer: str
    ) -> bool:
        """Copy `request`, which `answered_by` answered with `answer`, to `variant`; False when dropped.

        Call it from the event loop, after the answer was sent: it returns at once, and the copy runs on.
        """
        if len(self._tasks) >= self.max_in_flight:
            self._metrics.record_dropped(variant, "in_flight_limit")
            return False
        copy = dataclasses.replace(request, request_id=f"shadow-{uuid.uuid4().hex}")
        task = asyncio.get_running_loop().create_task(self._copy(variant, copy, answered_by, answer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def close(self) -> None:
        """Cancel the copies still running (each cancels its variant call) and wait until they ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _copy(self, variant: str, request: GenerationRequest, answered_by: str, answer: str) -> None:
        span = ShadowSpan(request.trace_carrier, variant)
        loop = asyncio.get_running_loop()
        started = loop.time()
        stream = self._open_call(variant, dataclasses.replace(request, trace_carrier=span.carrier))
        text: list[str] = []
        last: EngineOutput | None = None
        try:
            while last is None or last.finish_reason is None:
                item = await next_item(stream, variant, started + self._timeout_s, self._timeout_s)
                if isinstance(item, GenerationFailure):
                    raise ApiError.from_failure(item)
                last = item
                text.append(item.text)
        except ApiError as exc:
            reason = drop_reason(exc, answered_anything=last is not None)
            if reason is not None:
                self._metrics.record_dropped(variant, reason)
                span.dropped(reason)
            else:
                output_tokens = last.output_tokens if last is not None else 0
                self._metrics.record_copy(variant, exc.status, loop.time() - started, output_tokens)
                span.answered(exc.status)
            return
        except asyncio.CancelledError:
            span.cancelled()
            raise
        finally:
            cancel_call(stream)
        assert last is not None  # the loop ends only with the final output
        self._metrics.record_copy(variant, 200, loop.time() - started, last.output_tokens)
        span.answered(200)
        # Both answers of the same request, scored only when both exist, so the two varieties are
        # compared over the same requests.
        for by, words in ((variant, "".join(text)), (answered_by, answer)):
            counts = count_markers(words)
            self._metrics.record_variety(by, counts.pt_pt, counts.pt_br)
