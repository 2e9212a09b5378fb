"""Bounded queues, Retry-After, the request deadline and the request limits, on a real Ray Serve (127.0.0.1).

Two front applications share the variant applications: `amalia` (route `/`) with small queues and small limits,
and `short` (route `/short`) whose deadline (`ingress.request_timeout_s`) is 2 s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from serve_harness import (
    RunningServe,
    demo_app_config,
    engine_paused,
    engine_stats,
    free_port,
    running_serve,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CHAT = [{"role": "user", "content": "Olá"}]
# Longer than the 2 s deadline on any CPU: the demo model's context is 2048 tokens.
LONG = {"messages": CHAT, "max_tokens": 1900, "ignore_eos": True, "temperature": 0}
DEADLINE_S = 2.0
INGRESS_ONGOING = 4  # requests one ingress replica of `amalia` takes at once; Serve's proxy queues 1 more
LIMITS = {"max_messages": 4, "max_prompt_chars": 100, "max_stop_sequences": 2, "max_stop_chars": 8}


@pytest.fixture(scope="module")
def served(demo_checkpoints: tuple[Path, Path]) -> Iterator[RunningServe]:
    sft, dpo = demo_checkpoints
    config = demo_app_config(sft, dpo, free_port())
    front, sft_app = config["applications"][0], config["applications"][1]
    front["args"]["ingress"] = {
        "deployment": {"num_replicas": 1, "max_ongoing_requests": INGRESS_ONGOING, "max_queued_requests": 1,
                       "ray_actor_options": {"num_cpus": 0.25}},
        "limits": LIMITS,
    }  # fmt: skip
    # amalia-sft's replica takes two requests at a time and each ingress replica queues one more for it.
    sft_app["args"]["deployment"].update({"max_ongoing_requests": 2, "max_queued_requests": 1})
    short = json.loads(json.dumps(front))
    short.update(name="short", route_prefix="/short")
    short["args"]["ingress"] = {"request_timeout_s": DEADLINE_S,
                                "deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}}}
    config["applications"].append(short)
    with running_serve(config) as running:
        yield running


def openai_error(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def wait_for(condition: Any, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s:.0f} s"
        time.sleep(0.05)


class HeldRequests:
    """Short chats sent while their variant's engine is paused (serve_harness.engine_paused): they stay in
    flight, whatever the speed of the model, until the engine goes on."""

    def __init__(self, url: str, model: str, count: int) -> None:
        self.pool = ThreadPoolExecutor(count)
        body = {"model": model, "messages": CHAT, "max_tokens": 4}
        self.futures = []
        for _ in range(count):  # one by one, so each has found its place before the next comes
            self.futures.append(self.pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=120))
            time.sleep(0.5)
        time.sleep(1)

    def statuses(self) -> list[int]:
        """Once the engine goes on: every held request's status."""
        statuses = [f.result().status_code for f in self.futures]
        self.pool.shutdown()
        return statuses


# ---- bounded queues and Retry-After -------------------------------------------------------------------------


def warm(url: str, model: str) -> None:
    """One request through, so the ingress's handle to the variant knows its replicas and its queue bound."""
    reply = httpx.post(f"{url}/v1/chat/completions", json={"model": model, "messages": CHAT, "max_tokens": 2},
                       timeout=60)  # fmt: skip
    assert reply.status_code == 200, reply.text


def test_full_variant_queue_answers_429_with_retry_after_in_openai_shape(served: RunningServe) -> None:
    """amalia-sft's replica takes 2 requests and each ingress replica queues 1 more for it; the next is refused
    at once."""
    warm(served.base_url, "amalia-sft")
    with engine_paused("amalia-sft"):
        held = HeldRequests(served.base_url, "amalia-sft", 3)
        started = time.monotonic()
        refused = httpx.post(f"{served.base_url}/v1/chat/completions", timeout=60,
                             json={"model": "amalia-sft", "messages": CHAT, "max_tokens": 4})  # fmt: skip
        waited = time.monotonic() - started
    assert held.statuses() == [200, 200, 200], "the held requests are served once the engine goes on"
    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"] == "2"
    error = openai_error(refused)
    assert (error["type"], error["code"]) == ("rate_limit_error", "variant_overloaded")
    assert waited < 5, f"a refusal must not wait for the queue ({waited:.1f} s)"


def test_full_ingress_queue_gets_serve_proxy_429_with_retry_after_in_plain_text(served: RunningServe) -> None:
    """Serve's proxy answers for the ingress when the ingress's own queue is full: 429 and Retry-After from the
    ingress's backpressure_config, and a plain-text body (Ray 2.60 writes it; no setting changes it). OpenAI's
    client still raises RateLimitError."""
    client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    warm(served.base_url, "amalia-dpo")
    # The pool outlives the pause: its exit waits for the queued request, which needs the engine running.
    with ThreadPoolExecutor(1) as pool:
        with engine_paused("amalia-dpo"):
            held = HeldRequests(served.base_url, "amalia-dpo", INGRESS_ONGOING)  # the ingress replica is full
            queued = pool.submit(httpx.get, f"{served.base_url}/healthz", timeout=90)
            time.sleep(1)  # the proxy holds it in the ingress's queue
            refused = httpx.get(f"{served.base_url}/v1/models", timeout=30)
            with pytest.raises(openai.RateLimitError) as raised:
                client.models.list()
        assert queued.result().status_code == 200, "the queued request is served once the ingress has room"
    assert held.statuses() == [200] * INGRESS_ONGOING
    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"] == "2"
    assert refused.headers["content-type"].startswith("text/plain")
    assert refused.text.startswith("Request dropped due to backpressure")
    assert raised.value.response.headers["retry-after"] == "2"


# ---- the request deadline -----------------------------------------------------------------------------------


def test_deadline_before_first_byte_answers_504_in_openai_shape_and_frees_the_engine_slot(
    served: RunningServe,
) -> None:
    wait_for(lambda: engine_stats("amalia-dpo")["unfinished"] == 0, "amalia-dpo idle before the test")
    before = engine_stats("amalia-dpo")
    started = time.monotonic()
    reply = httpx.post(f"{served.base_url}/short/v1/chat/completions", json={"model": "amalia-dpo", **LONG},
                       timeout=60)  # fmt: skip
    took = time.monotonic() - started
    assert reply.status_code == 504, reply.text
    error = openai_error(reply)
    assert (error["type"], error["code"]) == ("timeout_error", "request_timeout")
    assert "request_timeout_s" in error["message"]
    assert DEADLINE_S <= took < DEADLINE_S + 3, f"answered after {took:.1f} s"
    wait_for(lambda: engine_stats("amalia-dpo")["unfinished"] == 0, "the engine slot freed", 10)
    assert engine_stats("amalia-dpo")["aborted"] == before["aborted"] + 1


def test_deadline_mid_stream_ends_with_timeout_error_event_and_frees_the_engine_slot(
    served: RunningServe,
) -> None:
    wait_for(lambda: engine_stats("amalia-dpo")["unfinished"] == 0, "amalia-dpo idle before the test")
    before = engine_stats("amalia-dpo")
    events = []
    body = {"model": "amalia-dpo", **LONG, "stream": True}
    with httpx.stream("POST", f"{served.base_url}/short/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert len(events) > 2, "the stream should have started before the deadline"
    assert "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert (error["type"], error["code"]) == ("timeout_error", "request_timeout")
    wait_for(lambda: engine_stats("amalia-dpo")["unfinished"] == 0, "the engine slot freed", 10)
    assert engine_stats("amalia-dpo")["aborted"] == before["aborted"] + 1


# ---- request limits -----------------------------------------------------------------------------------------

LIMIT_CASES = [
    ("messages", {"messages": CHAT * 5}, "messages", "too_many_messages"),
    ("prompt chars", {"messages": [{"role": "user", "content": "x" * 60}] * 2}, "messages", "prompt_too_long"),
    ("stop count", {"messages": CHAT, "stop": ["a", "b", "c"]}, "stop", "too_many_stop_sequences"),
    ("stop length", {"messages": CHAT, "stop": "123456789"}, "stop", "stop_sequence_too_long"),
]


@pytest.mark.parametrize(("case", "fields", "param", "code"), LIMIT_CASES, ids=[c[0] for c in LIMIT_CASES])
def test_request_past_a_limit_gets_400_naming_the_param(
    served: RunningServe, case: str, fields: dict[str, Any], param: str, code: str
) -> None:
    reply = httpx.post(f"{served.base_url}/v1/chat/completions", json={"model": "amalia", **fields}, timeout=30)
    assert reply.status_code == 400, reply.text
    error = openai_error(reply)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


def test_completion_prompt_past_the_character_limit_gets_400_naming_prompt(served: RunningServe) -> None:
    reply = httpx.post(f"{served.base_url}/v1/completions", json={"model": "amalia", "prompt": "y" * 101},
                       timeout=30)  # fmt: skip
    assert reply.status_code == 400, reply.text
    assert (openai_error(reply)["param"], openai_error(reply)["code"]) == ("prompt", "prompt_too_long")
