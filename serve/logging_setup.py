"""JSON logs that carry the current trace and span ids, so a log line joins its trace.

The ids are stamped on every ``LogRecord`` when it is created (a wrapped record factory), not by a
handler or formatter. That is what lets them survive Ray Serve's own logging setup: Serve clears and
rebuilds the handlers of the ``ray.serve`` logger whenever a ``logging_config`` is applied, but its
JSON encoding (``logging_config: {encoding: JSON}``) writes every non-standard record attribute, so
``trace_id`` and ``span_id`` appear in Serve's JSON replica logs with no further wiring. Outside Ray
(the CLI, tests, benchmarks) ``configure_json_logging`` installs an equivalent JSON formatter that
uses the same key names as Ray's, so both kinds of log line parse alike.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from opentelemetry import trace

from amalia_serve.caller_identity import current_caller_label

TRACE_ID_KEY = "trace_id"
SPAN_ID_KEY = "span_id"
CALLER_KEY = "caller"

# Attributes every LogRecord has; anything else was passed through `extra=` or stamped by a factory
# or filter and belongs in the JSON object.
_STANDARD_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _stamp_records(flag: str, stamp: Callable[[logging.LogRecord], None]) -> None:
    """Wrap the record factory so ``stamp`` sees every new record; once per ``flag``."""
    current = logging.getLogRecordFactory()
    wrapped: Any = current
    while wrapped is not None:  # another stamp's wrapper may sit on top of this one's
        if getattr(wrapped, "_amalia_stamp", None) == flag:
            return
        wrapped = getattr(wrapped, "_amalia_inner", None)

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = current(*args, **kwargs)
        stamp(record)
        return record

    factory._amalia_stamp = flag  # type: ignore[attr-defined]
    factory._amalia_inner = current  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def _stamp_trace_ids(record: logging.LogRecord) -> None:
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        setattr(record, TRACE_ID_KEY, trace.format_trace_id(span_context.trace_id))
        setattr(record, SPAN_ID_KEY, trace.format_span_id(span_context.span_id))


def _stamp_caller(record: logging.LogRecord) -> None:
    caller = current_caller_label()
    if caller is not None:
        setattr(record, CALLER_KEY, caller)


def install_log_correlation() -> None:
    """Stamp ``trace_id`` (32 hex) and ``span_id`` (16 hex) on records made inside a valid span.

    Idempotent. Records made outside any span get neither key, so untraced lines stay short.
    """
    _stamp_records(TRACE_ID_KEY, _stamp_trace_ids)


def install_caller_log_field() -> None:
    """Stamp ``caller`` (``namespace/serviceaccount``) on records made while serving a request.

    The ingress sets the caller per request (amalia_serve.caller_identity) when a
    service mesh identifies callers. Idempotent; records outside a request get no key.
    """
    _stamp_records(CALLER_KEY, _stamp_caller)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the key names of Ray's ``JSONFormatter`` plus ``name``."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "asctime": self.formatTime(record),
            "levelname": record.levelname,
            "name": record.name,
            "message": record.getMessage(),
            "filename": record.filename,
            "lineno": record.lineno,
            "process": record.process,
        }
        if record.exc_info:
            payload["exc_text"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _STANDARD_RECORD_ATTRS:
                payload[key] = value
        return json.dumps(payload, ensure_ascii=False, default=str)


def configure_json_logging(level: int | str = logging.INFO) -> None:
    """Send the root logger to stderr as JSON lines with trace ids; replaces its handlers."""
    install_log_correlation()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers.clear()
    root.addHandler(handler)
    root.setLevel(level)
