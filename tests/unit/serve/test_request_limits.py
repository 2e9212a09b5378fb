"""Per-request limits refuse what no context could hold before any variant tokenizes it, naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from amalia_serve.config import RequestLimits
from amalia_serve.openai_schema import ChatCompletionRequest, CompletionRequest
from amalia_serve.request_limits import LimitExceeded, check_request_limits

LIMITS = RequestLimits(max_messages=3, max_prompt_chars=20, max_stop_sequences=2, max_stop_chars=5)


def chat(messages: int = 1, content: str = "olá", **fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "amalia", "messages": [{"role": "user", "content": content}] * messages, **fields}
    )


def test_request_within_every_limit_passes_when_each_is_reached_exactly() -> None:
    check_request_limits(chat(messages=2, content="x" * 10, stop=["abcde", "fghij"]), LIMITS)
    check_request_limits(CompletionRequest(model="amalia", prompt="y" * 20, stop="12345"), LIMITS)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (chat(messages=4), "messages", "too_many_messages"),
        (chat(messages=3, content="x" * 7), "messages", "prompt_too_long"),
        (chat(content=[{"type": "text", "text": "x" * 15}, {"type": "text", "text": "y" * 6}]),  # type: ignore[arg-type]
         "messages", "prompt_too_long"),
        (CompletionRequest(model="amalia", prompt=["z" * 21]), "prompt", "prompt_too_long"),
        (chat(stop=["a", "b", "c"]), "stop", "too_many_stop_sequences"),
        (chat(stop="abcdef"), "stop", "stop_sequence_too_long"),
        (chat(stop=["a", "abcdef"]), "stop", "stop_sequence_too_long"),
    ],
    ids=["messages", "chat chars", "chat parts chars", "completion chars", "stop count", "stop length",
         "second stop length"],
)  # fmt: skip
def test_request_refused_naming_param_when_a_limit_is_passed(
    body: ChatCompletionRequest | CompletionRequest, param: str, code: str
) -> None:
    with pytest.raises(LimitExceeded) as refused:
        check_request_limits(body, LIMITS)
    assert (refused.value.param, refused.value.code) == (param, code)
    assert "at most" in str(refused.value)


def test_stop_strings_refused_when_limit_is_zero() -> None:
    with pytest.raises(LimitExceeded, match="1 stop sequences; at most 0"):
        check_request_limits(chat(stop="x"), RequestLimits(max_stop_sequences=0))


def test_default_limits_keep_openai_stop_count_and_fit_a_32k_context() -> None:
    limits = RequestLimits()
    assert limits.max_stop_sequences == 4
    assert limits.max_prompt_chars >= 32768 * 8

