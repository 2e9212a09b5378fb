"""What crosses the DeploymentHandle between the ingress and a variant (plain dataclasses: cheap to pickle)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from amalia_serve.sampling import SamplingParams

Operation = Literal["chat", "text_completion"]


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    operation: Operation
    requested_model: str  # what the client asked for: the alias or a variant name
    sampling: SamplingParams
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    # W3C trace context of the ingress span, so the variant's spans join the caller's trace.
    trace_carrier: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationFailure:
    """A refused request, sent as the first and only stream item so the ingress can answer with its status."""

    status: int
    message: str
    error_type: str
    param: str | None = None
    code: str | None = None
