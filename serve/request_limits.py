"""Per-request limits (`ingress.limits`), checked on the parsed body before any variant tokenizes it.

Pure: the ingress turns a `LimitExceeded` into OpenAI's 400 with `param` naming the field. A prompt too long for
the context is still the engine's to refuse (it counts tokens); these limits stop what no context could hold
(and what would cost a variant's tokenizer or every engine step) from leaving the ingress at all.
"""

from __future__ import annotations

from amalia_serve.config import RequestLimits
from amalia_serve.openai_schema import ChatCompletionRequest, CompletionRequest


class LimitExceeded(ValueError):
    def __init__(self, message: str, param: str, code: str) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def check_request_limits(body: ChatCompletionRequest | CompletionRequest, limits: RequestLimits) -> None:
    """Raise LimitExceeded for the first limit `body` breaks."""
    if isinstance(body, ChatCompletionRequest):
        if len(body.messages) > limits.max_messages:
            raise LimitExceeded(
                f"{len(body.messages)} messages; at most {limits.max_messages} are allowed",
                "messages", "too_many_messages",
            )  # fmt: skip
        chars, param = sum(len(m.text()) for m in body.messages), "messages"
    else:
        chars, param = len(body.prompt_text()), "prompt"
    if chars > limits.max_prompt_chars:
        raise LimitExceeded(
            f"the prompt has {chars} characters; at most {limits.max_prompt_chars} are allowed",
            param, "prompt_too_long",
        )  # fmt: skip
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
    if len(stops) > limits.max_stop_sequences:
        raise LimitExceeded(
            f"{len(stops)} stop sequences; at most {limits.max_stop_sequences} are allowed",
            "stop", "too_many_stop_sequences",
        )  # fmt: skip
    longest = max(stops, key=len, default="")
    if len(longest) > limits.max_stop_chars:
        raise LimitExceeded(
            f"a stop sequence has {len(longest)} characters; at most {limits.max_stop_chars} are allowed",
            "stop", "stop_sequence_too_long",
        )  # fmt: skip
