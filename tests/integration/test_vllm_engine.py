"""The vLLM engine in-process (vLLM's CPU build) on the AMALIA-shaped demo checkpoint: one engine per module."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest
from transformers import AutoTokenizer

from amalia_serve.config import VariantConfig
from amalia_serve.constants import DEFAULT_SYSTEM_PROMPT
from amalia_serve.engine import (
    ContextLengthExceeded,
    EngineError,
    EngineOutput,
    EngineOverloaded,
    EngineUnavailable,
)
from amalia_serve.sampling import SamplingParams
from amalia_serve.vllm_engine import VLLMEngine

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CHAT = [{"role": "user", "content": "Olá! Fala-me de Lisboa."}]
# Small enough for a 2-core CI machine; the same settings the Serve tests use (tests/serve_harness.py).
CPU_ENGINE = {"max_num_seqs": 4, "max_pending_requests": 6, "kv_cache_memory_bytes": 64 << 20,
              "enforce_eager": True, "stream_interval_ms": 0}  # fmt: skip


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for the module: the engine's output handler lives on the loop that first used it."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engine(demo_checkpoints: tuple[Path, Path], loop: asyncio.AbstractEventLoop) -> Iterator[VLLMEngine]:
    variant = VariantConfig.model_validate(
        {"name": "amalia-sft", "model_path": str(demo_checkpoints[0]), "engine": CPU_ENGINE}
    )
    engine = loop.run_until_complete(VLLMEngine.start(variant))
    yield engine
    loop.run_until_complete(engine.shutdown())


async def collect(stream: AsyncIterator[EngineOutput]) -> list[EngineOutput]:
    return [out async for out in stream]


def run(loop: asyncio.AbstractEventLoop, stream: AsyncIterator[EngineOutput]) -> list[EngineOutput]:
    return loop.run_until_complete(collect(stream))


def test_engine_renders_chat_with_template_and_default_system_prompt(
    engine: VLLMEngine, loop: asyncio.AbstractEventLoop, demo_checkpoints: tuple[Path, Path]
) -> None:
    outs = run(loop, engine.generate(CHAT, SamplingParams(max_tokens=5, temperature=0), "chat-1"))
    tokenizer = AutoTokenizer.from_pretrained(demo_checkpoints[0])
    full = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *CHAT]
    expected = len(tokenizer.apply_chat_template(full, add_generation_prompt=True, tokenize=True)["input_ids"])
    assert {o.prompt_tokens for o in outs} == {expected}
    assert outs[-1].output_tokens == 5 == sum(o.new_tokens for o in outs)
    assert [o.finish_reason for o in outs] == [None] * (len(outs) - 1) + ["length"]


def test_engine_reproduces_seeded_sampling_and_differs_across_seeds(
    engine: VLLMEngine, loop: asyncio.AbstractEventLoop
) -> None:
    def text(seed: int, rid: str) -> str:
        outs = run(loop, engine.generate(CHAT, SamplingParams(max_tokens=24, temperature=0.9, seed=seed), rid))
        return "".join(o.text for o in outs)

    assert text(7, "seed-a") == text(7, "seed-b")
    assert text(7, "seed-c") != text(8, "seed-d")


def test_engine_ends_completion_before_stop_string(engine: VLLMEngine, loop: asyncio.AbstractEventLoop) -> None:
    params = SamplingParams(max_tokens=40, temperature=0)
    whole = "".join(o.text for o in run(loop, engine.generate("Portugal é", params, "stop-a")))
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    outs = run(loop, engine.generate("Portugal é", SamplingParams(max_tokens=40, temperature=0, stop=(stop,)),
                                     "stop-b"))  # fmt: skip
    assert "".join(o.text for o in outs) == whole[: whole.index(stop)]
    assert outs[-1].finish_reason == "stop"


def test_engine_refuses_context_overflow_naming_prompt_and_limit(
    engine: VLLMEngine, loop: asyncio.AbstractEventLoop
) -> None:
    with pytest.raises(ContextLengthExceeded, match=r"maximum context length is 2048 tokens.*4000 for the"):
        run(loop, engine.generate("Olá", SamplingParams(max_tokens=4000), "overflow"))


def test_engine_refuses_what_vllm_refuses_as_a_400(
    engine: VLLMEngine, loop: asyncio.AbstractEventLoop
) -> None:
    """vLLM refuses an empty stop string (the ingress refuses it first; the fuzzer found it as a 503): the caller's
    error, not a failed variant."""
    with pytest.raises(EngineError, match="empty string") as refused:
        run(loop, engine.generate("Olá", SamplingParams(max_tokens=4, stop=("",)), "empty-stop"))
    assert (refused.value.status, refused.value.error_type) == (400, "invalid_request_error")
    assert engine.stats().unfinished == 0


def test_engine_tokenizes_off_the_event_loop_thread(engine: VLLMEngine, loop: asyncio.AbstractEventLoop) -> None:
    threads: list[int] = []
    encode = engine._encode

    def recording_encode(prompt: object) -> list[int]:
        threads.append(threading.get_ident())
        return encode(prompt)  # type: ignore[arg-type]

    engine._encode = recording_encode  # type: ignore[method-assign]
    try:
        run(loop, engine.generate(CHAT, SamplingParams(max_tokens=1), "thread"))
    finally:
        del engine._encode
    assert threads and threads[0] != threading.get_ident()  # run_until_complete runs the loop on this thread


def test_engine_frees_the_slot_when_the_caller_closes_the_stream(
    engine: VLLMEngine, loop: asyncio.AbstractEventLoop
) -> None:
    async def read_two_then_leave() -> None:
        stream = engine.generate(CHAT, SamplingParams(max_tokens=1500, temperature=0), "leaver")
        await anext(stream)
        await anext(stream)
        assert engine.stats().unfinished == 1
        await stream.aclose()

    aborted = engine.stats().aborted
    loop.run_until_complete(read_two_then_leave())
    assert engine.stats().unfinished == 0
    assert engine.stats().aborted == aborted + 1


def test_engine_answers_429_past_its_pending_limit(engine: VLLMEngine, loop: asyncio.AbstractEventLoop) -> None:
    async def overfill() -> None:
        streams = [engine.generate(CHAT, SamplingParams(max_tokens=1500), f"fill-{i}") for i in range(6)]
        firsts = [asyncio.ensure_future(anext(s)) for s in streams]  # 4 run (max_num_seqs), 2 wait
        async with asyncio.timeout(30):
            while engine.stats().unfinished < 6:
                await asyncio.sleep(0.01)
        with pytest.raises(EngineOverloaded, match="limit"):
            await anext(engine.generate(CHAT, SamplingParams(max_tokens=5), "one-too-many"))
        await asyncio.gather(*firsts)
        for s in streams:
            await s.aclose()

    loop.run_until_complete(overfill())
    assert engine.stats().unfinished == 0


def test_engine_reports_load_while_it_decodes(engine: VLLMEngine, loop: asyncio.AbstractEventLoop) -> None:
    async def observe() -> tuple[int, float]:
        streams = [engine.generate(CHAT, SamplingParams(max_tokens=300), f"load-{i}") for i in range(3)]
        for s in streams:
            await anext(s)
        for _ in range(5):
            for s in streams:
                await anext(s)
        stats = engine.stats()
        for s in streams:
            await s.aclose()
        return stats.running, stats.kv_cache_usage

    running, kv_usage = loop.run_until_complete(observe())
    assert running == 3
    assert 0 < kv_usage < 1


def engine_core_pids() -> list[int]:
    me = psutil.Process(os.getpid())
    return [p.pid for p in me.children(recursive=True) if "EngineCore" in " ".join(p.cmdline() or [p.name()])
            or "EngineCore" in p.name()]  # fmt: skip


def test_engine_death_fails_requests_in_flight_and_the_health_check(
    engine: VLLMEngine, loop: asyncio.AbstractEventLoop
) -> None:
    """Last in the module: it kills the module's engine."""

    async def kill_mid_stream() -> None:
        stream = engine.generate(CHAT, SamplingParams(max_tokens=1500, temperature=0), "doomed")
        await anext(stream)
        pids = engine_core_pids()
        assert pids, "no vLLM engine-core process found"
        for pid in pids:
            os.kill(pid, 9)
        with pytest.raises(EngineUnavailable):
            async with asyncio.timeout(30):
                async for _ in stream:
                    pass
        with pytest.raises(EngineUnavailable):
            await engine.check_health()
        with pytest.raises(EngineUnavailable):
            await anext(engine.generate(CHAT, SamplingParams(max_tokens=5), "after-death"))

    loop.run_until_complete(kill_mid_stream())
