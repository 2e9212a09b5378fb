"""The OpenAI request bodies we accept and the response bodies we build.

Requests are Pydantic models (the ingress validates them and turns failures into OpenAI-shaped errors; the
per-request limits, such as the number of stop strings, are config and live in amalia_serve.request_limits). Fields OpenAI defines that we do not implement are refused when set to a non-default value rather than
silently ignored; unknown extra fields are ignored, as OpenAI-compatible servers do for forward compatibility.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from amalia_serve.sampling import SamplingParams


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class _GenerationRequest(_Request):
    model: str = Field(..., min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    user: str | None = Field(None, max_length=256)
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="Not supported; only 0 is accepted.")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="Not supported; only 0 is accepted.")
    ignore_eos: bool = Field(False, description="vLLM's extension: generate max_tokens even past end-of-sequence.")

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if any(not text for text in ([stop] if isinstance(stop, str) else stop or [])):
            raise ValueError("a stop string must not be empty")
        return stop

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling(self, max_tokens: int | None) -> SamplingParams:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=stops,
            ignore_eos=self.ignore_eos,
        )


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] | None = None

    def sampling(self) -> SamplingParams:
        return self._sampling(self.max_completion_tokens or self.max_tokens)

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] = Field(...)
    max_tokens: int | None = Field(16, ge=1)
    echo: Literal[False] = False
    logprobs: None = None

    @model_validator(mode="after")
    def _single_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("exactly one prompt per request is supported")
        if not self.prompt_text():
            raise ValueError("prompt must not be empty")
        return self

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def sampling(self) -> SamplingParams:
        return self._sampling(self.max_tokens)


CHAT_EXAMPLE = {"model": "amalia", "messages": [{"role": "user", "content": "Olá! Quem és tu?"}], "max_tokens": 32}
COMPLETION_EXAMPLE = {"model": "amalia", "prompt": "Lisboa é", "max_tokens": 16}


def openapi_request_body(model: type[BaseModel], example: dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its body itself: the model's JSON schema as the request body.

    The routes parse the raw body (so bad JSON and oversize bodies get OpenAI-shaped errors), which hides the
    model from FastAPI; this describes it in /openapi.json for clients and fuzzers without changing validation.
    References are inlined: the operation has no `$defs` of its own to point into.
    """
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    body = {"schema": inline(schema), "example": example}
    return {"requestBody": {"required": True, "content": {"application/json": body}}}


# ---- responses --------------------------------------------------------------------------------------------------


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_completion(
    rid: str, model: str, text: str, finish_reason: str | None, used: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": used,
    }


def chat_chunk(
    rid: str, model: str, created: int, delta: dict[str, str], finish_reason: str | None
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def text_completion(
    rid: str, model: str, text: str, finish_reason: str | None, used: dict[str, int] | None, created: int
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if used is not None:
        body["usage"] = used
    return body


def usage_chunk(rid: str, model: str, created: int, obj: str, used: dict[str, int]) -> dict[str, Any]:
    """The final stream chunk OpenAI sends when `stream_options.include_usage` is set: no choices, only usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": used}


def model_list(model_ids: list[str], owned_by: str = "amalia-serve") -> dict[str, Any]:
    created = int(time.time())
    return {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": created, "owned_by": owned_by} for m in model_ids],
    }
