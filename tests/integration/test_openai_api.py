"""The OpenAI API on a real Ray Serve (127.0.0.1), driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from serve_harness import RunningServe, demo_app_config, engine_stats, free_port, running_serve
from transformers import AutoTokenizer

from amalia_serve.constants import DEFAULT_SYSTEM_PROMPT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CHAT = [{"role": "user", "content": "Olá! Fala-me de Lisboa."}]


@pytest.fixture(scope="module")
def served(demo_checkpoints: tuple[Path, Path]) -> Iterator[RunningServe]:
    sft, dpo = demo_checkpoints
    with running_serve(demo_app_config(sft, dpo, free_port(), max_num_seqs=2, max_pending_requests=3)) as running:
        yield running


@pytest.fixture(scope="module")
def client(served: RunningServe) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(demo_checkpoints: tuple[Path, Path]):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(demo_checkpoints[0])


def chat_prompt_tokens(tokenizer, messages: list[dict[str, str]]) -> int:  # type: ignore[no-untyped-def]
    full = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *messages]
    return len(tokenizer.apply_chat_template(full, add_generation_prompt=True, tokenize=True)["input_ids"])


# ---- happy paths --------------------------------------------------------------------------------------------


def test_models_lists_alias_and_every_variant(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["amalia", "amalia-sft", "amalia-dpo"]


def test_chat_completion_reports_usage_equal_to_tokenizer_counts(client: openai.OpenAI, tokenizer) -> None:  # type: ignore[no-untyped-def]
    raw = client.chat.completions.with_raw_response.create(model="amalia-sft", messages=CHAT, max_tokens=12,
                                                           seed=3, temperature=0)  # fmt: skip
    reply = raw.parse()
    assert raw.headers["x-amalia-variant"] == "amalia-sft" == reply.model
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == chat_prompt_tokens(tokenizer, CHAT)
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_chat_stream_matches_non_stream_and_ends_with_usage_when_seeded(client: openai.OpenAI) -> None:
    args = {"model": "amalia-dpo", "messages": CHAT, "max_tokens": 40, "seed": 11, "temperature": 0.9}
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert {c.model for c in chunks} == {"amalia-dpo"}


def test_completion_and_its_stream_agree_and_count_prompt_tokens(client: openai.OpenAI, tokenizer) -> None:  # type: ignore[no-untyped-def]
    args = {"model": "amalia-sft", "prompt": "Portugal é um país", "max_tokens": 16, "seed": 4}
    whole = client.completions.create(**args)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**args, stream=True) if c.choices)
    assert streamed == whole.choices[0].text
    assert whole.usage.prompt_tokens == len(tokenizer("Portugal é um país")["input_ids"])
    assert whole.object == "text_completion"


def test_seed_reproduces_completion_and_other_seed_differs(client: openai.OpenAI) -> None:
    def run(seed: int) -> str:
        return client.chat.completions.create(model="amalia-sft", messages=CHAT, max_tokens=30,
                                              seed=seed).choices[0].message.content or ""  # fmt: skip

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_stop_string_ends_completion_before_it(client: openai.OpenAI) -> None:
    args = {"model": "amalia-sft", "messages": CHAT, "max_tokens": 60, "seed": 8}
    text = client.chat.completions.create(**args).choices[0].message.content or ""
    clean = [i for i in range(4, len(text) - 3) if "\ufffd" not in text[i : i + 3]]
    stop = text[clean[len(clean) // 2] : clean[len(clean) // 2] + 3]
    for stream in (False, True):
        if stream:
            chunks = list(client.chat.completions.create(**args, stop=[stop], stream=True))
            got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = chunks[-1].choices[0].finish_reason
        else:
            reply = client.chat.completions.create(**args, stop=[stop])
            got, reason = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert got == text[: text.index(stop)]
        assert reason == "stop"


def test_health_and_readiness_report_ok_when_variants_loaded(served: RunningServe) -> None:
    assert httpx.get(f"{served.base_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{served.base_url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["variants"] == {"amalia-sft": True, "amalia-dpo": True}


# ---- bad input ----------------------------------------------------------------------------------------------

BAD_REQUESTS = [
    ("malformed json", "/v1/chat/completions", b'{"model": "amalia", "messages": [', 400, "invalid_json", None),
    ("not an object", "/v1/chat/completions", b"[1, 2]", 400, "invalid_json", None),
    ("unknown model", "/v1/chat/completions",
     {"model": "gpt-4", "messages": CHAT}, 404, "model_not_found", "model"),
    ("wrong type", "/v1/chat/completions",
     {"model": "amalia", "messages": CHAT, "temperature": "hot"}, 422, "float_parsing", "temperature"),
    ("messages not a list", "/v1/chat/completions",
     {"model": "amalia", "messages": "olá"}, 422, "list_type", "messages"),
    ("empty messages", "/v1/chat/completions", {"model": "amalia", "messages": []}, 422, "too_short", "messages"),
    ("unknown role", "/v1/chat/completions",
     {"model": "amalia", "messages": [{"role": "robot", "content": "x"}]}, 422, "literal_error", "messages.0.role"),
    ("negative max_tokens", "/v1/chat/completions",
     {"model": "amalia", "messages": CHAT, "max_tokens": -5}, 422, "greater_than_equal", "max_tokens"),
    ("huge max_tokens", "/v1/chat/completions",
     {"model": "amalia", "messages": CHAT, "max_tokens": 10**9}, 400, "context_length_exceeded", "max_tokens"),
    ("context overflow", "/v1/completions",
     {"model": "amalia-sft", "prompt": "olá " * 3000, "max_tokens": 5}, 400, "context_length_exceeded", "max_tokens"),
    ("empty prompt", "/v1/completions", {"model": "amalia", "prompt": ""}, 422, "value_error", None),
    ("n > 1", "/v1/completions", {"model": "amalia", "prompt": "x", "n": 2}, 422, "less_than_equal", "n"),
    ("empty stop string", "/v1/completions",
     {"model": "amalia", "prompt": "x", "stop": ["a", ""]}, 422, "value_error", "stop"),
    ("missing model", "/v1/completions", {"prompt": "x"}, 422, "missing", "model"),
    ("unknown header variant", "/v1/chat/completions",
     {"model": "amalia", "messages": CHAT}, 400, "unknown_variant", "x-amalia-variant"),
    ("body too large", "/v1/completions",
     {"model": "amalia", "prompt": "x" * (5 * 1024 * 1024)}, 413, "request_too_large", None),
]


@pytest.mark.parametrize(("case", "path", "body", "status", "code", "param"), BAD_REQUESTS,
                         ids=[c[0] for c in BAD_REQUESTS])  # fmt: skip
def test_bad_request_gets_status_and_openai_error_shape(
    served: RunningServe, case: str, path: str, body: object, status: int, code: str, param: str | None
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    if case == "unknown header variant":
        headers["x-amalia-variant"] = "amalia-xyz"
    response = httpx.post(f"{served.base_url}{path}", content=content, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["param"] == param
    assert error["message"] and "Traceback" not in error["message"]


def test_context_overflow_message_states_prompt_and_limit(served: RunningServe) -> None:
    body = {"model": "amalia-sft", "prompt": "Olá", "max_tokens": 4000}
    error = httpx.post(f"{served.base_url}/v1/completions", json=body, timeout=60).json()["error"]
    assert "2048 tokens" in error["message"] and "4000 for the completion" in error["message"]


def test_openai_client_raises_typed_errors_for_bad_requests(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(model="amalia", messages=CHAT, max_tokens=100_000)  # type: ignore[arg-type]


# ---- cancellation -------------------------------------------------------------------------------------------


def test_client_disconnect_mid_stream_frees_engine_slot(served: RunningServe) -> None:
    before = engine_stats("amalia-sft")
    # Greedy decoding of this chat runs past 1500 tokens without an end-of-turn token (checked on the demo model).
    body = {"model": "amalia-sft", "messages": [{"role": "user", "content": "Olá"}], "max_tokens": 1800,
            "temperature": 0, "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{served.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert engine_stats("amalia-sft")["unfinished"] == 1
    deadline = time.monotonic() + 10
    while engine_stats("amalia-sft")["unfinished"] != 0:
        assert time.monotonic() < deadline, "engine slot still held 10 s after the client went away"
        time.sleep(0.1)
    assert engine_stats("amalia-sft")["aborted"] == before["aborted"] + 1


def test_variant_answers_429_in_openai_shape_when_its_engine_is_full(served: RunningServe) -> None:
    """The module's variants run 2 requests and hold 3 (max_pending_requests); a 4th is refused at once."""
    body = {"model": "amalia-dpo", "messages": [{"role": "user", "content": "Olá"}], "max_tokens": 1500,
            "temperature": 0, "stream": True}  # fmt: skip
    release = threading.Event()

    def hold_a_stream() -> int:
        with httpx.stream("POST", f"{served.base_url}/v1/chat/completions", json=body, timeout=120) as response:
            release.wait(60)
            return response.status_code

    with ThreadPoolExecutor(3) as pool:
        held = [pool.submit(hold_a_stream) for _ in range(3)]
        try:
            deadline = time.monotonic() + 30
            while engine_stats("amalia-dpo")["unfinished"] < 3:
                assert time.monotonic() < deadline, "3 requests never reached the engine"
                time.sleep(0.05)
            refused = httpx.post(f"{served.base_url}/v1/chat/completions", json={**body, "stream": False},
                                 timeout=60)  # fmt: skip
        finally:
            release.set()
        assert [f.result() for f in held] == [200, 200, 200]
    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"] == "2"  # ingress.retry_after_s's default
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "engine_queue_full")
