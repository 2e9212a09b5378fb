"""A bounded load generator for any OpenAI-compatible server: streaming chat requests at a fixed concurrency.

It measures what a caller sees: time to the first content chunk, output tokens (from the usage chunk, so the
server's own count), and output tokens per second over the whole run. The same client drives amalia-serve, bare
`vllm serve` and the naive baseline, so their numbers compare.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

PROMPTS = [
    "Escreve uma história longa sobre um faroleiro em Portugal.",
    "Explica em detalhe como funciona a fotossíntese.",
    "Descreve a história de Lisboa desde os romanos até hoje.",
    "Lista vinte ideias para um fim de semana no Algarve e explica cada uma.",
    "Escreve um guia detalhado para fazer pão em casa.",
    "Explica passo a passo como um modelo de linguagem gera texto.",
    "Descreve o ciclo da água a uma criança de dez anos, com exemplos.",
    "Escreve uma carta longa a um amigo sobre uma viagem aos Açores.",
]


@dataclass(frozen=True)
class Completion:
    ttft_s: float
    output_tokens: int


@dataclass
class RequestResult:
    """One streamed chat completion as a client saw it, whatever happened to it."""

    model: str
    started: float
    user: str | None = None
    ended: float = 0.0
    first_token: float | None = None
    status: int = 0  # HTTP status; 0 when no answer came
    variant: str | None = None  # the x-amalia-variant header
    tokens: int = 0  # completion tokens from the usage chunk
    finish_reason: str | None = None
    done: bool = False  # the stream ended with [DONE]
    failure: str | None = (
        None  # "http", "event" (an SSE error event) or the transport error's class name
    )
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.status == 200 and self.failure is None and self.finish_reason in ("stop", "length")
        )

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started


async def record_chat(
    client: httpx.AsyncClient,
    model: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    *,
    user: str | None = None,
    **extra: Any,
) -> RequestResult:
    """One streaming chat completion read to its end; every failure is recorded, none raised.
    `user` is OpenAI's end-user id, the ingress's sticky key."""
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
                            "stream_options": {"include_usage": True}, **extra}  # fmt: skip
    if user is not None:
        body["user"] = user
    result = RequestResult(model=model, started=time.monotonic(), user=user)
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            result.status = response.status_code
            result.variant = response.headers.get("x-amalia-variant")
            if response.status_code != 200:
                result.failure = "http"
                result.error = (await response.aread()).decode(errors="replace")[:300]
                return result
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    result.done = True
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.failure, result.error = "event", json.dumps(chunk["error"])[:300]
                    continue
                if chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content") and result.first_token is None:
                        result.first_token = time.monotonic()
                    result.finish_reason = choice.get("finish_reason") or result.finish_reason
    except httpx.HTTPError as exc:
        result.failure, result.error = type(exc).__name__, str(exc)[:300]
    finally:
        result.ended = time.monotonic()
    return result


@dataclass(frozen=True)
class LevelResult:
    """One concurrency level of one server."""

    concurrency: int
    requests: int
    output_tokens: int
    seconds: float
    ttfts_s: tuple[float, ...]

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def ttft_p50_ms(self) -> float:
        return statistics.median(self.ttfts_s) * 1000

    @property
    def ttft_p99_ms(self) -> float:
        ordered = sorted(self.ttfts_s)
        return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1000


async def stream_chat(
    client: httpx.AsyncClient,
    model: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    **extra: Any,
) -> Completion:
    """One streaming chat completion at the benchmarks' sampling settings; raises unless it was answered."""
    result = await record_chat(
        client, model, messages, max_tokens, temperature=0.7, seed=1, **extra
    )
    if not result.ok or result.ttft_s is None:
        raise RuntimeError(f"{model}: HTTP {result.status}, {result.failure}: {result.error}")
    return Completion(result.ttft_s, result.tokens)


async def run_level(
    base_url: str,
    model: str,
    concurrency: int,
    requests: int,
    max_tokens: int,
    *,
    ignore_eos: bool = True,
    on_done: Callable[[], None] | None = None,
) -> LevelResult:
    """`requests` chats, `concurrency` at a time (each worker sends the next when its last one ends)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    done: list[Completion] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
                done.append(
                    await stream_chat(client, model, messages, max_tokens, ignore_eos=ignore_eos)
                )
                if on_done is not None:
                    on_done()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return LevelResult(concurrency, len(done), sum(c.output_tokens for c in done), seconds,
                       tuple(c.ttft_s for c in done))  # fmt: skip


def conversation(
    system_prompt: str, turns: Sequence[tuple[str, str]], question: str
) -> list[dict[str, str]]:
    """A chat that repeats earlier turns, as chat clients send them: the prefix grows turn by turn."""
    messages = [{"role": "system", "content": system_prompt}]
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return [*messages, {"role": "user", "content": question}]


async def third_turn_ttft_ms(base_url: str, model: str, system_prompt: str, users: int) -> float:
    """Median TTFT of the 3rd turn of `users` conversations sharing one long system prompt.

    Each conversation sends its 1st and 2nd turns first, as a user would; with prefix caching the 3rd turn
    recomputes only its new tokens.
    """
    questions = [
        "Qual é a capital de Portugal?",
        "E quantos habitantes tem?",
        "Resume a conversa numa frase.",
    ]
    ttfts = []
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        for user in range(users):
            turns: list[tuple[str, str]] = []
            for turn, question in enumerate(questions):
                asked = f"{question} (utilizador {user})"
                done = await stream_chat(
                    client, model, conversation(system_prompt, turns, asked), 16
                )
                turns.append((asked, "Lisboa é a capital de Portugal e a sua maior cidade."))
                if turn == 2:
                    ttfts.append(done.ttft_s)
    return statistics.median(ttfts) * 1000


async def http_p50_ms(base_url: str, path: str, samples: int) -> float:
    """p50 of a bodyless POST: Ray Serve's own floor when `path` is a no-op deployment."""
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        seconds = []
        for i in range(samples + 5):
            started = time.perf_counter()
            (await client.post(path)).raise_for_status()
            if i >= 5:  # warm-up
                seconds.append(time.perf_counter() - started)
    return statistics.median(seconds) * 1000
