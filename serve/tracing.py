"""OpenTelemetry tracing for every Serve replica: ingress HTTP spans, per-request generation spans.

Configured only through the standard ``OTEL_*`` environment variables and off (a no-op tracer, no
thread, no propagation work) unless an OTLP endpoint is set. The SDK keeps reading the variables it
already understands (sampler, exporter endpoint/headers/timeout, batch queue sizes); this module
adds only the resource, the protocol choice and a short export timeout default.

Ray Serve does not carry trace context over a ``DeploymentHandle`` call, so the ingress turns the
request's W3C headers into a plain ``dict[str, str]`` carrier (:func:`extract_carrier`, then
``ServerSpan.carrier``) and the variant restores its parent from that dict
(:class:`GenerationTrace`).

Prompts can hold personal data: prompt and completion text are recorded only with
``AMALIA_TRACE_CONTENT=true``, and errors are recorded by exception type, never by message.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata
from typing import Any, Literal

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from pydantic import Field

from amalia_serve.config import AmaliaModel
from amalia_serve.logging_setup import install_log_correlation

logger = logging.getLogger(__name__)

TRACER_NAME = "amalia_serve"
DEFAULT_SERVICE_NAME = "amalia-serve"
CONTENT_ENV = "AMALIA_TRACE_CONTENT"
# Seconds one export may take, retries included, unless OTEL_EXPORTER_OTLP[_TRACES]_TIMEOUT says
# otherwise; the SDK default (10 s) keeps a dead collector's backlog around for too long.
DEFAULT_EXPORT_TIMEOUT_S = 3.0
# Bounds the exit-time flush so a dead collector cannot hold up a replica's shutdown.
SHUTDOWN_TIMEOUT_S = 5.0

# Kubernetes downward-API variables the chart sets -> semantic-convention resource keys.
_K8S_ENV_TO_RESOURCE = {
    "POD_NAME": "k8s.pod.name",
    "POD_NAMESPACE": "k8s.namespace.name",
    "NODE_NAME": "k8s.node.name",
}

Operation = Literal["chat", "text_completion"]
Protocol = Literal["grpc", "http/protobuf"]


class TracingSettings(AmaliaModel):
    """What this module reads from the environment itself; everything else stays with the SDK."""

    enabled: bool = Field(description="An OTLP traces endpoint is set and the SDK is not disabled.")
    protocol: Protocol = Field("http/protobuf", description="OTLP transport of the span exporter.")
    record_content: bool = Field(False, description="Record prompt and completion text on spans.")
    export_timeout_s: float | None = Field(
        DEFAULT_EXPORT_TIMEOUT_S,
        description="Exporter timeout; null lets the SDK read its env variables.",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> TracingSettings:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        disabled = (
            env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
            or env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none"
        )
        protocol = (
            env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        )
        timeout_set = bool(
            env.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or env.get("OTEL_EXPORTER_OTLP_TIMEOUT")
        )
        return cls.model_validate(
            {
                "enabled": bool(endpoint) and not disabled,
                "protocol": protocol.strip().lower(),
                "record_content": env.get(CONTENT_ENV, "").strip().lower() in ("1", "true", "yes"),
                "export_timeout_s": None if timeout_set else DEFAULT_EXPORT_TIMEOUT_S,
            }
        )


def build_resource(
    component: str, variant: str | None, env: Mapping[str, str] = os.environ
) -> Resource:
    """Service, version and Kubernetes placement as defaults that OTEL_SERVICE_NAME and
    OTEL_RESOURCE_ATTRIBUTES may override; the replica's own identity (component, variant)
    always wins."""
    defaults: dict[str, str] = {
        "service.name": DEFAULT_SERVICE_NAME,
        "service.version": _package_version(),
    }
    defaults.update({key: env[var] for var, key in _K8S_ENV_TO_RESOURCE.items() if env.get(var)})
    from_env = OTELResourceDetector().detect().attributes
    attributes: dict[str, str] = {
        key: value for key, value in defaults.items() if key not in from_env
    }
    attributes["amalia.component"] = component
    if variant is not None:
        attributes["amalia.variant"] = variant
    return Resource.create(attributes)


def _package_version() -> str:
    try:
        return metadata.version("amalia-serve")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def _build_exporter(settings: TracingSettings) -> SpanExporter:
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter(timeout=settings.export_timeout_s)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    return HttpExporter(timeout=settings.export_timeout_s)


class Tracing:
    """One process's tracer plus the switches the span helpers need. Build with :meth:`from_env`."""

    def __init__(
        self,
        tracer: trace.Tracer,
        record_content: bool = False,
        provider: TracerProvider | None = None,
        exporter: SpanExporter | None = None,
    ) -> None:
        self.tracer = tracer
        self.record_content = record_content
        self.enabled = provider is not None
        self._provider = provider
        self._exporter = exporter

    @classmethod
    def disabled(cls) -> Tracing:
        return cls(trace.NoOpTracer())

    @classmethod
    def from_env(cls, component: str, variant: str | None = None) -> Tracing:
        """A new provider with a batch exporter when an endpoint is set, else the no-op tracer.

        The provider is deliberately not made global: Ray Serve's own (alpha) tracing may claim the
        global slot, and tests need several isolated providers in one process.
        """
        settings = TracingSettings.from_env()
        if not settings.enabled:
            return cls.disabled()
        # sampler=None: the SDK reads OTEL_TRACES_SAMPLER/_ARG (default parentbased_always_on).
        provider = TracerProvider(
            resource=build_resource(component, variant), shutdown_on_exit=False
        )
        exporter = _build_exporter(settings)
        # Export runs on the processor's thread; a full queue (OTEL_BSP_MAX_QUEUE_SIZE) drops spans.
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(
            provider.get_tracer(TRACER_NAME, _package_version()),
            settings.record_content,
            provider,
            exporter,
        )

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> bool:
        """Flush what is queued, waiting at most ``timeout_s``; True when it finished in time.

        The SDK's own shutdown can take one export timeout per queued batch against a dead
        collector, so it runs on a helper thread and whatever is left after the bound is dropped.
        """
        provider, exporter = self._provider, self._exporter
        if provider is None or exporter is None:
            return True
        self._provider = None
        worker = threading.Thread(
            target=provider.shutdown, name="amalia-trace-shutdown", daemon=True
        )
        worker.start()
        worker.join(timeout_s)
        if not worker.is_alive():
            return True
        # Aborts the retry back-off; the remaining batches then fail fast and are dropped.
        exporter.shutdown()
        return False


_active = Tracing.disabled()
_configure_lock = threading.Lock()
_configured = False


def configure_tracing(component: str, variant: str | None = None) -> None:
    """Set up this process's tracing from the environment; later calls do nothing.

    Call it from each replica's constructor: ``component`` is ``"ingress"`` or ``"variant"``, and
    ``variant`` the variant (deployment) name, the resource attribute ``amalia.variant``.
    """
    global _active, _configured
    with _configure_lock:
        if _configured:
            return
        _configured = True
        tracing = Tracing.from_env(component, variant)
        if tracing.enabled:
            install_log_correlation()
            atexit.register(tracing.shutdown)
            logger.info("tracing on: component=%s variant=%s", component, variant)
        _active = tracing


def active_tracing() -> Tracing:
    return _active


def extract_carrier(headers: Mapping[str, str], tracing: Tracing | None = None) -> dict[str, str]:
    """The propagation headers (``traceparent``, ``tracestate``, ``baggage``) of an HTTP request.

    ``headers`` may be Starlette's case-insensitive headers or any mapping; ``{}`` when tracing is
    off or none are present.
    """
    if not (tracing or _active).enabled:
        return {}
    fields = propagate.get_global_textmap().fields
    return {key.lower(): value for key, value in headers.items() if key.lower() in fields}


def _error_type(exc: BaseException) -> str:
    # The type names the failure without its message, which may quote the prompt.
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def _is_cancellation(exc: BaseException) -> bool:
    return isinstance(exc, (asyncio.CancelledError, GeneratorExit))


class ServerSpan:
    """The ingress's SERVER span for one HTTP request; :func:`server_span` makes it."""

    def __init__(self, span: trace.Span, carrier: dict[str, str]) -> None:
        self._span = span
        self.carrier = carrier
        self._keep_open = False
        self._ended = False

    def set_route(self, variant: str, reason: str) -> None:
        self._span.set_attributes({"amalia.route.variant": variant, "amalia.route.reason": reason})

    def set_status_code(self, code: int) -> None:
        self._span.set_attribute("http.response.status_code", code)
        if code >= 500:  # 4xx is the client's error, not the server span's (HTTP semconv)
            self._span.set_status(Status(StatusCode.ERROR))
            self._span.set_attribute("error.type", str(code))

    def record_error(self, exc: BaseException) -> None:
        if _is_cancellation(exc):
            self._span.set_attribute("amalia.cancelled", True)
            return
        self._span.set_status(Status(StatusCode.ERROR))
        self._span.set_attribute("error.type", _error_type(exc))

    def keep_open(self) -> None:
        """The span outlives the ``with`` block (a streamed body); the caller calls :meth:`end`."""
        self._keep_open = True

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            self._span.end()


@contextmanager
def server_span(
    route: str, method: str, carrier: Mapping[str, str], tracing: Tracing | None = None
) -> Iterator[ServerSpan]:
    """A SERVER span, child of the caller's trace in ``carrier``, current inside the block.

    An exception escaping the block is recorded by type and re-raised. The span ends with the block
    unless ``keep_open()`` was called, e.g. before returning a ``StreamingResponse`` whose body
    generator then calls ``end()`` in its ``finally``.
    """
    tracing = tracing or _active
    if not tracing.enabled:
        yield ServerSpan(trace.INVALID_SPAN, {})
        return
    parent = propagate.extract(carrier)
    span = tracing.tracer.start_span(
        f"{method} {route}",
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"http.request.method": method, "url.path": route, "http.route": route},
    )
    own_context = trace.set_span_in_context(span, parent)
    outgoing: dict[str, str] = {}
    propagate.inject(outgoing, context=own_context)
    handle = ServerSpan(span, outgoing)
    token = otel_context.attach(own_context)
    try:
        yield handle
    except BaseException as exc:
        handle.record_error(exc)
        handle.end()  # even after keep_open(): no response body will run to end it
        raise
    finally:
        otel_context.detach(token)
        if not handle._keep_open:
            handle.end()


class ShadowSpan:
    """The ingress's CLIENT span of one shadow copy (amalia_serve.shadow), marked ``amalia.shadow``.

    Its parent is the answered request's server span, given as that request's carrier: the copy runs
    after the server span ended, as a late child of the same trace. :attr:`carrier` goes with the copy
    so the shadow variant's generation span joins the trace under this span. The first of
    :meth:`answered`, :meth:`dropped` or :meth:`cancelled` ends it.
    """

    def __init__(self, parent: Mapping[str, str], variant: str, tracing: Tracing | None = None) -> None:
        tracing = tracing or _active
        self.carrier: dict[str, str] = {}
        self._ended = not tracing.enabled
        if self._ended:
            self._span: trace.Span = trace.INVALID_SPAN
            return
        self._span = tracing.tracer.start_span(
            f"shadow {variant}",
            context=propagate.extract(parent),
            kind=SpanKind.CLIENT,
            attributes={"amalia.shadow": True, "amalia.route.variant": variant},
        )
        propagate.inject(self.carrier, context=trace.set_span_in_context(self._span))

    def answered(self, status_code: int) -> None:
        if self._ended:
            return
        self._span.set_attribute("http.response.status_code", status_code)
        if status_code >= 500:
            self._span.set_status(Status(StatusCode.ERROR))
            self._span.set_attribute("error.type", str(status_code))
        self._end()

    def dropped(self, reason: str) -> None:
        """Not answered, for `reason` (amalia_serve.metrics.DROP_REASONS): no error of this service."""
        if not self._ended:
            self._span.set_attribute("amalia.shadow.dropped", reason)
            self._end()

    def cancelled(self) -> None:
        if not self._ended:
            self._span.set_attribute("amalia.cancelled", True)
            self._end()

    def _end(self) -> None:
        self._ended = True
        self._span.end()


Prompt = str | Sequence[Mapping[str, Any]]


class GenerationTrace:
    """The variant's span for one generation, parented by the ingress span in ``carrier``.

    Not a context manager and never made current: a streamed generation spans many async yields.
    The first of :meth:`finished`, :meth:`failed` or :meth:`cancelled` ends it; later calls are
    ignored, so a ``finally`` may call :meth:`failed` or :meth:`cancelled` unconditionally.
    """

    def __init__(
        self,
        carrier: Mapping[str, str],
        operation: Operation,
        request_model: str,
        response_model: str,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        prompt: Prompt | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        tracing = tracing or _active
        self._record_content = tracing.record_content
        self._ended = not tracing.enabled
        if self._ended:
            self._span: trace.Span = trace.INVALID_SPAN
            return
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": DEFAULT_SERVICE_NAME,
            "gen_ai.request.model": request_model,
            "gen_ai.response.model": response_model,
        }
        optional = {
            "gen_ai.request.max_tokens": max_tokens,
            "gen_ai.request.temperature": temperature,
            "gen_ai.request.top_p": top_p,
        }
        attributes.update({key: value for key, value in optional.items() if value is not None})
        if prompt is not None and self._record_content:
            attributes["gen_ai.input.messages"] = _messages_json(prompt, role="user")
        self._span = tracing.tracer.start_span(
            f"{operation} {request_model}",
            context=propagate.extract(carrier),
            kind=SpanKind.INTERNAL,  # the model runs in this process (GenAI semconv)
            attributes=attributes,
        )

    @property
    def span_context(self) -> trace.SpanContext:
        return self._span.get_span_context()

    def queued(self) -> None:
        if not self._ended:
            self._span.add_event("queued")

    def first_token(self, ttft_s: float) -> None:
        if not self._ended:
            self._span.set_attribute("gen_ai.server.time_to_first_token", ttft_s)
            self._span.add_event("first_token", {"gen_ai.server.time_to_first_token": ttft_s})

    def finished(
        self,
        input_tokens: int,
        output_tokens: int,
        finish_reason: str,
        completion: str | None = None,
    ) -> None:
        if self._ended:
            return
        self._span.set_attributes(
            {
                "gen_ai.usage.input_tokens": input_tokens,
                "gen_ai.usage.output_tokens": output_tokens,
                "gen_ai.response.finish_reasons": [finish_reason],
            }
        )
        if completion is not None and self._record_content:
            self._span.set_attribute(
                "gen_ai.output.messages", _messages_json(completion, role="assistant")
            )
        self._span.add_event("finished", {"gen_ai.response.finish_reasons": [finish_reason]})
        self._end()

    def failed(self, exc: BaseException) -> None:
        """Ends the span as an error (type only); cancellation is routed to :meth:`cancelled`."""
        if _is_cancellation(exc):
            self.cancelled()
            return
        if self._ended:
            return
        self._span.set_status(Status(StatusCode.ERROR))
        self._span.set_attribute("error.type", _error_type(exc))
        self._end()

    def cancelled(self) -> None:
        """The client went away before the end; not a server error, so the status stays unset."""
        if self._ended:
            return
        self._span.set_attribute("amalia.cancelled", True)
        self._span.add_event("cancelled")
        self._end()

    def _end(self) -> None:
        self._ended = True
        self._span.end()


def _messages_json(content: Prompt, role: str) -> str:
    messages = (
        [{"role": role, "content": content}]
        if isinstance(content, str)
        else [dict(m) for m in content]
    )
    return json.dumps(messages, ensure_ascii=False)
