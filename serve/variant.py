"""One model variant as a Ray Serve deployment: a shim between DeploymentHandle calls and the engine."""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import AsyncIterator

from ray import serve

from amalia_serve.autoscaling import replica_stats
from amalia_serve.config import VariantConfig
from amalia_serve.constants import ENGINE_CLS
from amalia_serve.engine import Engine, EngineError, EngineOutput, EngineStats
from amalia_serve.metrics import VariantMetrics
from amalia_serve.protocol import GenerationFailure, GenerationRequest
from amalia_serve.tracing import GenerationTrace, active_tracing, configure_tracing

logger = logging.getLogger(f"ray.serve.{__name__}")  # lands in the replica logs under Serve


def engine_class() -> type[Engine]:
    module, _, name = ENGINE_CLS.partition(":")
    cls: type[Engine] = getattr(importlib.import_module(module), name)
    return cls


def _failure(exc: EngineError) -> GenerationFailure:
    return GenerationFailure(exc.status, str(exc), exc.error_type, exc.param, exc.code)


@serve.deployment
class VariantServer:
    """Serves one variant; the deployment is named after it (see `app.build_app`)."""

    async def __init__(self, variant: VariantConfig) -> None:
        self.variant = variant
        configure_tracing("variant", variant.name)
        self.metrics = VariantMetrics(variant.name)
        self.engine = await engine_class().start(variant, self.metrics)
        logger.info("variant %s ready (max context %d)", variant.name, self.engine.max_model_len)

    async def generate(
        self, request: GenerationRequest
    ) -> AsyncIterator[EngineOutput | GenerationFailure]:
        """Stream engine outputs. A refused request yields one GenerationFailure and ends; an engine that fails
        mid-stream yields a GenerationFailure after the outputs it did produce."""
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
        prompt = request.messages if request.operation == "chat" else request.prompt
        assert prompt is not None
        stream = self.engine.generate(prompt, request.sampling, request.request_id)
        span.queued()
        first = True
        try:
            async for out in stream:
                if first:
                    span.first_token(time.monotonic() - received_at)
                    first = False
                if completion is not None:
                    completion.append(out.text)
                if out.finish_reason is not None:
                    # Ended before the last yield: the caller stops reading at the final output and never
                    # waits for the end-of-stream message, so the span must not depend on it.
                    span.finished(out.prompt_tokens, out.output_tokens, out.finish_reason,
                                  "".join(completion) if completion is not None else None)  # fmt: skip
                yield out
                if out.finish_reason is not None:
                    return
        except EngineError as exc:
            span.failed(exc)
            yield _failure(exc)
        except BaseException as exc:  # cancellation included: the span says so, then it propagates
            span.failed(exc)
            raise
        finally:
            await stream.aclose()  # aborts the request in the engine when the caller went away mid-stream

    async def ready(self) -> bool:
        return True

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom-metrics hook, read every few seconds when the deployment autoscales: the
        engine's load for the engine-load policy (amalia_serve.autoscaling)."""
        stats = self.engine.stats()
        return replica_stats(stats.running, stats.waiting, stats.kv_cache_usage, stats.max_num_seqs)

    async def check_health(self) -> None:
        """Serve's health check: a dead engine fails it, and Serve replaces the replica."""
        await self.engine.check_health()

    async def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            await engine.shutdown()
