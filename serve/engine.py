"""The engine interface a variant replica serves through, and what crosses it.

This module imports neither torch nor vLLM: the ingress (CPU-only pods) and the tests of the request path import it.
The one implementation that serves traffic is `amalia_serve.vllm_engine.VLLMEngine` (vLLM's AsyncLLM); another
class with the same interface can be named in `AMALIA_ENGINE_CLS` (the benchmark's naive `generate` baseline does).

Contract of `generate`: it yields text deltas; the last output has `finish_reason` `stop` or `length` and nothing
follows it. A request the engine refuses raises an `EngineError` before the first output; an engine that dies raises
`EngineUnavailable` at any point. Closing the generator early aborts the request and frees its slot.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from amalia_serve.sampling import SamplingParams

if TYPE_CHECKING:
    from amalia_serve.config import VariantConfig
    from amalia_serve.metrics import VariantMetrics

FinishReason = Literal["stop", "length"]
ChatMessages = list[dict[str, str]]


class EngineError(Exception):
    """A request the engine refuses; `status` is the HTTP status the API answers with."""

    status = 400
    error_type = "invalid_request_error"
    code: str | None = None
    param: str | None = None


class ContextLengthExceeded(EngineError):
    code = "context_length_exceeded"
    param = "max_tokens"

    def __init__(self, prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens, but you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the completion). "
            f"Shorten the prompt or lower max_tokens."
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len


class EngineOverloaded(EngineError):
    status = 429
    error_type = "rate_limit_error"
    code = "engine_queue_full"


class EngineUnavailable(EngineError):
    """The engine has stopped or died; Serve replaces the replica once its health check fails."""

    status = 503
    error_type = "service_unavailable"
    code = "engine_unavailable"


@dataclass
class EngineOutput:
    """A text delta of one request; the last one has `finish_reason` set."""

    request_id: str
    text: str
    new_tokens: int
    prompt_tokens: int
    output_tokens: int
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class EngineStats:
    """A replica's load as its engine last reported it: what autoscaling and the tests read."""

    running: int  # requests in the running batch
    waiting: int  # requests queued for a batch slot
    kv_cache_usage: float  # fraction of KV-cache blocks in use, 0..1
    unfinished: int  # requests accepted and not yet finished or aborted (waiting + running + in prefill)
    aborted: int  # requests ended by their caller before they finished, since start
    max_num_seqs: int  # the batch size the engine runs with (its own default when the config set none)


class Engine(abc.ABC):
    """Generation over one variant's checkpoint."""

    @classmethod
    @abc.abstractmethod
    async def start(cls, variant: VariantConfig, metrics: VariantMetrics | None = None) -> Engine:
        """Load the variant's checkpoint and return an engine ready to serve; raises on an unservable one."""

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int:
        """Context window in tokens (prompt + completion)."""

    @abc.abstractmethod
    def generate(
        self, prompt: ChatMessages | str, sampling: SamplingParams, request_id: str
    ) -> AsyncIterator[EngineOutput]:
        """Stream the completion of a chat (rendered with the checkpoint's template) or of a raw prompt."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a request and free its slot; unknown or finished ids are ignored."""

    @abc.abstractmethod
    async def check_health(self) -> None:
        """Raise if the engine cannot serve any more (Serve then replaces the replica)."""

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop the engine and whatever processes it started."""
