"""Log records carry the current trace/span ids, in our JSON lines and in Ray Serve's."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider

from amalia_serve.caller_identity import current_caller
from amalia_serve.logging_setup import (
    JsonFormatter,
    configure_json_logging,
    install_caller_log_field,
    install_log_correlation,
)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    factory, root = logging.getLogRecordFactory(), logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    logging.setLogRecordFactory(factory)
    root.handlers[:] = handlers
    root.setLevel(level)


def _json_lines(
    log: logging.Logger, formatter: logging.Formatter
) -> tuple[list[dict[str, object]], str, str]:
    """Log one line inside a span and one outside; return the parsed lines and the span's ids."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    log.addHandler(handler)
    log.propagate = False
    tracer = TracerProvider().get_tracer("test")
    try:
        with tracer.start_as_current_span("work") as span:
            log.warning("inside %s", "span", extra={"variant": "amalia-sft"})
        log.warning("outside")
    finally:
        log.removeHandler(handler)
    ids = span.get_span_context()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    return lines, f"{ids.trace_id:032x}", f"{ids.span_id:016x}"


def test_json_lines_carry_trace_and_span_ids_when_logged_inside_a_span() -> None:
    install_log_correlation()
    install_log_correlation()  # idempotent: one wrapper, not two
    (inside, outside), trace_id, span_id = _json_lines(
        logging.getLogger("amalia.test.json"), JsonFormatter()
    )

    assert (inside["trace_id"], inside["span_id"]) == (trace_id, span_id)
    assert len(trace_id) == 32 and len(span_id) == 16
    assert inside["message"] == "inside span" and inside["variant"] == "amalia-sft"
    assert inside["levelname"] == "WARNING" and inside["name"] == "amalia.test.json"
    assert "trace_id" not in outside and "span_id" not in outside


def test_ray_json_formatter_carries_trace_ids_when_correlation_is_installed() -> None:
    # Ray Serve's `logging_config: {encoding: JSON}` formats replica logs with this class.
    from ray._common.formatters import JSONFormatter as RayJSONFormatter

    install_log_correlation()
    (inside, outside), trace_id, span_id = _json_lines(
        logging.getLogger("ray.serve.amalia.test"), RayJSONFormatter()
    )

    assert (inside["trace_id"], inside["span_id"]) == (trace_id, span_id)
    assert "trace_id" not in outside


def test_configure_json_logging_writes_json_with_exception_when_root_logs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_json_logging("DEBUG")
    try:
        raise KeyError("boom")
    except KeyError:
        logging.getLogger("amalia.test.root").exception("failed")

    (line,) = capsys.readouterr().err.splitlines()
    record = json.loads(line)
    assert record["message"] == "failed" and "KeyError" in record["exc_text"]
    assert logging.getLogger().level == logging.DEBUG


def _new_record() -> logging.LogRecord:
    return logging.getLogRecordFactory()("amalia.test", logging.INFO, __file__, 1, "m", (), None)


def _wrappers() -> int:
    factory, depth = logging.getLogRecordFactory(), 0
    while hasattr(factory, "_amalia_inner"):
        factory, depth = factory._amalia_inner, depth + 1
    return depth


def test_records_carry_caller_when_logged_while_serving_a_mesh_request() -> None:
    install_caller_log_field()
    install_log_correlation()
    install_caller_log_field()  # idempotent even beneath another wrapper
    install_log_correlation()
    assert _wrappers() == 2

    token = current_caller.set("team-a/chat")
    try:
        inside = _new_record()
    finally:
        current_caller.reset(token)
    outside = _new_record()

    assert json.loads(JsonFormatter().format(inside))["caller"] == "team-a/chat"
    assert not hasattr(outside, "caller")
