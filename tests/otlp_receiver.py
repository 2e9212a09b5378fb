"""A real OTLP trace receiver for tests: OTLP/HTTP (protobuf, gzip-aware) and OTLP/gRPC, loopback.

Both decode ``ExportTraceServiceRequest`` with ``opentelemetry-proto`` into :class:`ReceivedSpan`
rows, resource attributes included, so a test asserts on what a collector would have been sent.
Use it as a context manager or through the pytest fixtures at the bottom::

    from tests.otlp_receiver import OtlpHttpReceiver
    with OtlpHttpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}   # e.g. runtime_env.env_vars
        ...
        spans = receiver.wait_for_spans(lambda s: any(x.kind == 1 for x in s), timeout_s=30)
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

TRACES_PATH = "/v1/traces"


@dataclass(frozen=True)
class ReceivedEvent:
    name: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str  # 32 hex
    span_id: str  # 16 hex
    parent_span_id: str | None
    kind: int  # opentelemetry.proto Span.SpanKind: 1 internal, 2 server, 3 client
    status_code: int  # 0 unset, 1 ok, 2 error
    status_message: str
    attributes: dict[str, Any]
    events: tuple[ReceivedEvent, ...]
    resource: dict[str, Any]
    start_ns: int
    end_ns: int

    def event_names(self) -> list[str]:
        return [event.name for event in self.events]


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return None if kind is None else getattr(value, kind)


def _attributes(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def decode_spans(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(_decode_span(span, resource))
    return spans


def _decode_span(span: Span, resource: dict[str, Any]) -> ReceivedSpan:
    return ReceivedSpan(
        name=span.name,
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex() or None,
        kind=span.kind,
        status_code=span.status.code,
        status_message=span.status.message,
        attributes=_attributes(span.attributes),
        events=tuple(ReceivedEvent(e.name, _attributes(e.attributes)) for e in span.events),
        resource=resource,
        start_ns=span.start_time_unix_nano,
        end_ns=span.end_time_unix_nano,
    )


class SpanStore:
    """Spans received so far, shared by the transports, with bounded waits."""

    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._cond = threading.Condition()
        self.export_requests = 0
        self.content_encodings: list[str] = []

    def add(self, spans: list[ReceivedSpan], encoding: str = "") -> None:
        with self._cond:
            self._spans.extend(spans)
            self.export_requests += 1
            self.content_encodings.append(encoding)
            self._cond.notify_all()

    def spans(self) -> list[ReceivedSpan]:
        with self._cond:
            return list(self._spans)

    def clear(self) -> None:
        with self._cond:
            self._spans.clear()

    def wait_for_spans(
        self, predicate: Callable[[list[ReceivedSpan]], bool] | int, timeout_s: float = 10.0
    ) -> list[ReceivedSpan]:
        """Block until ``predicate(spans)`` holds (or, given an int, that many spans arrived).

        Raises ``TimeoutError`` listing what did arrive, so a failing test says what it saw.
        """
        check = (lambda spans: len(spans) >= predicate) if isinstance(predicate, int) else predicate
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not check(self._spans):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = [span.name for span in self._spans]
                    raise TimeoutError(f"spans not received within {timeout_s}s; got {names}")
                self._cond.wait(remaining)
            return list(self._spans)

    def assert_quiet(self, for_s: float) -> None:
        """Fail if any span arrives within ``for_s`` seconds (for 'nothing is exported' tests)."""
        with self._cond:
            self._cond.wait_for(lambda: bool(self._spans), timeout=for_s)
            assert not self._spans, f"unexpected spans: {[span.name for span in self._spans]}"


def _make_handler(store: SpanStore) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path != TRACES_PATH:
                self._reply(404, b"")
                return
            if (
                self.headers.get("Content-Type", "").split(";")[0].strip()
                != "application/x-protobuf"
            ):
                self._reply(415, b"")
                return
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            encoding = self.headers.get("Content-Encoding", "").lower()
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            store.add(decode_spans(request), encoding)
            self._reply(200, trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

        def _reply(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output clean

    return Handler


class OtlpHttpReceiver(SpanStore):
    """OTLP/HTTP receiver; ``endpoint`` is the base URL for ``OTEL_EXPORTER_OTLP_ENDPOINT``."""

    def __init__(self) -> None:
        super().__init__()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        # A short poll interval keeps shutdown (and so fixture teardown) under 0.1 s.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="otlp-http", daemon=True
        )

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, store: SpanStore) -> None:
        self._store = store

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._store.add(decode_spans(request), "grpc")
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpGrpcReceiver(SpanStore):
    """OTLP/gRPC receiver; ``endpoint`` is ``http://127.0.0.1:PORT`` (plaintext)."""

    def __init__(self) -> None:
        import grpc

        super().__init__()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        add_servicer = trace_service_pb2_grpc.add_TraceServiceServicer_to_server
        add_servicer(_TraceService(self), self._server)  # type: ignore[no-untyped-call]
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None)


# Fixture functions are named apart from their fixtures, so importing them (into a test module or
# a conftest) does not shadow the test parameters that use them.
@pytest.fixture(name="otlp_receiver")
def otlp_receiver_fixture() -> Iterator[OtlpHttpReceiver]:
    """A running OTLP/HTTP receiver."""
    with OtlpHttpReceiver() as receiver:
        yield receiver


@pytest.fixture(name="otlp_grpc_receiver")
def otlp_grpc_receiver_fixture() -> Iterator[OtlpGrpcReceiver]:
    """A running OTLP/gRPC receiver."""
    with OtlpGrpcReceiver() as receiver:
        yield receiver
