"""One model variant as a Ray Serve deployment: a shim between DeploymentHandle calls and the engine."""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import AsyncIterator

import ray
from ray import serve

from amalia_serve.config import VariantConfig
from amalia_serve.constants import ENGINE_CLS
from amalia_serve.engine import Engine, EngineError, EngineOutput, EngineStats
from amalia_serve.metrics import VariantMetrics
from amalia_serve.protocol import GenerationFailure, GenerationRequest
from amalia_serve.tracing import GenerationTrace, active_tracing, configure_tracing

logger = logging.getLogger(f"ray.serve.{__name__}")  # lands in the replica logs under Serve


def _engine_class() -> type[Engine]:
    module, _, name = ENGINE_CLS.partition(":")
    cls: type[Engine] = getattr(importlib.import_module(module), name)
    return cls


def _replica_cpus() -> int:
    """CPUs Ray assigned to this replica: torch gets that many threads, so replicas do not fight over cores."""
    try:
        return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    except Exception:  # noqa: BLE001  (outside a Ray worker: no assigned resources to read)
        return 1


@serve.deployment
class VariantServer:
    """Serves one variant; the deployment is named after it (see `app.build_app`)."""

    def __init__(self, variant: VariantConfig) -> None:
        self.variant = variant
        configure_tracing("variant", variant.name)
        engine_config = variant.engine
        if engine_config.torch_threads is None:
            engine_config = engine_config.model_copy(update={"torch_threads": _replica_cpus()})
        self.metrics = VariantMetrics(variant.name)
        self.engine = _engine_class().from_checkpoint(
            variant.model_path, engine_config, on_step=self._observe_step
        )
        logger.info("variant %s ready (max context %d)", variant.name, self.engine.max_model_len)

    def _observe_step(self, batch_size: int, running: int, waiting: int) -> None:
        if batch_size:
            self.metrics.record_batch_size(batch_size)
        self.metrics.set_load(running, waiting)

    async def generate(
        self, request: GenerationRequest
    ) -> AsyncIterator[EngineOutput | GenerationFailure]:
        """Stream engine outputs; a refused request yields one GenerationFailure and ends."""
        received_at = time.monotonic()
        span = GenerationTrace(
            request.trace_carrier,
            request.operation,
            request_model=request.requested_model,
            response_model=self.variant.name,
            max_tokens=request.sampling.max_tokens,
            temperature=request.sampling.temperature,
            top_p=request.sampling.top_p,
            prompt=request.messages if request.messages is not None else request.prompt,
        )
        completion: list[str] | None = [] if active_tracing().record_content else None
        try:
            if request.operation == "chat":
                assert request.messages is not None
                prompt_ids = self.engine.encode_chat(request.messages)
            else:
                assert request.prompt is not None
                prompt_ids = self.engine.encode_text(request.prompt)
            stream = self.engine.generate(prompt_ids, request.sampling, request.request_id)
            span.queued()
            first = await anext(stream)
        except EngineError as exc:
            span.failed(exc)
            yield GenerationFailure(exc.status, str(exc), exc.error_type, exc.param, exc.code)
            return
        span.first_token(time.monotonic() - received_at)
        if first.queue_wait_s is not None:
            self.metrics.record_queue_wait(first.queue_wait_s)
        previous_at = time.monotonic()
        out = first
        try:
            while True:
                if completion is not None:
                    completion.append(out.text)
                if out.finish_reason is not None:
                    # Ended before the last yield: the caller stops reading at the final output and never
                    # waits for the end-of-stream message, so the span must not depend on it.
                    span.finished(out.prompt_tokens, out.output_tokens, out.finish_reason,
                                  "".join(completion) if completion is not None else None)  # fmt: skip
                    self.metrics.record_tokens(out.prompt_tokens, out.output_tokens)
                yield out
                if out.finish_reason is not None:
                    return
                out = await anext(stream)
                now = time.monotonic()
                self.metrics.record_inter_token(now - previous_at, out.new_tokens)
                previous_at = now
        except BaseException as exc:  # cancellation included: the span says so, then it propagates
            span.failed(exc)
            if out.finish_reason is None:
                self.metrics.record_tokens(out.prompt_tokens, out.output_tokens)
            raise
        finally:
            await stream.aclose()  # frees the engine slot when the caller went away mid-stream

    async def ready(self) -> bool:
        return True

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def check_health(self) -> None:
        if not self.engine.is_alive():
            raise RuntimeError(f"engine of variant {self.variant.name} has stopped")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout_s=2.0)
