"""Calling a variant over its DeploymentHandle: the next item of its stream before a deadline, cancelling
the call, and the OpenAI-shaped error each failure maps to. The request path (amalia_serve.ingress) and
shadow copies (amalia_serve.shadow) share them, so a copy fails exactly the way a request would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from fastapi.responses import JSONResponse
from ray.serve.exceptions import BackPressureError

from amalia_serve import openai_schema as oai
from amalia_serve.protocol import GenerationFailure

logger = logging.getLogger(f"ray.serve.{__name__}")  # lands in the replica logs under Serve

# Codes of the failures next_item maps a call's exception to.
VARIANT_OVERLOADED = "variant_overloaded"
VARIANT_UNAVAILABLE = "variant_unavailable"
REQUEST_TIMEOUT = "request_timeout"


class ApiError(Exception):
    """A request answered with an error in OpenAI's shape: HTTP status, message, type, param, code, headers."""

    def __init__(
        self, status: int, message: str, error_type: str = "invalid_request_error",
        param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.error_type, self.param, self.code = (
            status, message, error_type, param, code,
        )  # fmt: skip
        self.headers = headers or {}

    @classmethod
    def from_failure(cls, failure: GenerationFailure) -> ApiError:
        """What the variant refused or failed, as the caller is answered."""
        return cls(failure.status, failure.message, failure.error_type, failure.param, failure.code)

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(
            oai.error_body(self.message, self.error_type, self.param, self.code),
            status_code=self.status,
            headers={**self.headers, **(headers or {})},
        )


async def next_item(stream: Any, variant: str, deadline: float, timeout_s: float) -> Any:
    """The next item of a variant's stream, before `deadline` (the event loop's clock).

    Past the deadline, when the variant's queue is full or when the call fails (its replica died, say), the
    stream is cancelled, so the variant's generator ends and its engine frees the slot, and ApiError says why:
    504, 429 or 503.
    """
    try:
        async with asyncio.timeout_at(deadline):
            return await anext(stream)
    except TimeoutError:
        error = ApiError(504, f"the request did not finish within {timeout_s:g} s (ingress.request_timeout_s); "
                         "it was stopped", "timeout_error", code=REQUEST_TIMEOUT)  # fmt: skip
    except BackPressureError:
        error = ApiError(429, f"variant {variant} is at capacity; retry later", "rate_limit_error",
                         code=VARIANT_OVERLOADED)  # fmt: skip
    except Exception:
        logger.exception("variant %s failed", variant)
        error = ApiError(503, f"variant {variant} is unavailable", "service_unavailable",
                         code=VARIANT_UNAVAILABLE)  # fmt: skip
    cancel_call(stream)
    raise error


def cancel_call(stream: Any) -> None:
    """Cancel a variant call, so its generator ends and the engine frees the slot.

    Serve's cancel() first fetches the call's assignment, and when that failed (a full queue: BackPressureError;
    the variant's application gone: DeploymentUnavailableError) it raises that failure again, out of the handler
    that is answering it (Ray 2.60); such a call holds nothing. Letting that error escape skipped the 429/503
    answer and the request metric, so a canary failing this way looked healthy to the analysis.
    """
    with contextlib.suppress(Exception):
        stream.cancel()
