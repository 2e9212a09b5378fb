"""The continuous-batching engine on the tiny demo checkpoint, without Ray."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from amalia_serve.config import EngineConfig
from amalia_serve.engine import ContextLengthExceeded, Engine, EngineOutput, EngineOverloaded
from amalia_serve.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(demo_checkpoints: tuple[Path, Path]) -> Iterator[Engine]:
    eng = Engine.from_checkpoint(str(demo_checkpoints[0]), EngineConfig(torch_threads=1, max_batch_size=4,
                                                                        max_queue_size=4))
    yield eng
    eng.shutdown()


async def collect(engine: Engine, prompt: str, params: SamplingParams) -> tuple[str, EngineOutput]:
    text, last = "", None
    async for out in engine.generate(engine.encode_chat([{"role": "user", "content": prompt}]), params):
        text += out.text
        last = out
    assert last is not None
    return text, last


async def wait_for(condition, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def test_engine_reproduces_text_when_seed_is_fixed(engine: Engine) -> None:
    params = SamplingParams(max_tokens=40, seed=1234)
    first, _ = await collect(engine, "Olá, como estás?", params)
    second, _ = await collect(engine, "Olá, como estás?", params)
    other, _ = await collect(engine, "Olá, como estás?", SamplingParams(max_tokens=40, seed=99))
    assert first == second
    assert first != other


async def test_engine_streamed_deltas_equal_whole_text_when_seed_is_fixed(engine: Engine) -> None:
    params = SamplingParams(max_tokens=60, seed=7, temperature=0.8, top_p=0.9)
    prompt_ids = engine.encode_chat([{"role": "user", "content": "Explica a fotossíntese."}])
    deltas: list[str] = []
    async for out in engine.generate(prompt_ids, params):
        deltas.append(out.text)
    whole, last = await collect(engine, "Explica a fotossíntese.", params)
    assert "".join(deltas) == whole
    assert last.prompt_tokens == len(prompt_ids)


async def test_engine_batches_concurrent_requests_and_each_gets_its_solo_text(engine: Engine) -> None:
    prompts = ["Olá", "Portugal é um país", "Qual é a capital?", "O fado é"]
    params = [SamplingParams(max_tokens=30 + 10 * i, seed=i) for i in range(len(prompts))]
    solo = [await collect(engine, p, s) for p, s in zip(prompts, params)]
    steps_before = engine.stats().steps
    together = await asyncio.gather(*(collect(engine, p, s) for p, s in zip(prompts, params)))
    assert [t for t, _ in together] == [t for t, _ in solo]
    # 4 requests of up to 60 tokens in one batch take far fewer steps than one after another (~180).
    assert engine.stats().steps - steps_before < 100


async def test_engine_admits_new_request_into_running_batch_and_drops_finished(engine: Engine) -> None:
    long_req = asyncio.create_task(collect(engine, "Olá", SamplingParams(max_tokens=400, temperature=0.0)))
    await wait_for(lambda: engine.stats().running == 1)
    short_text, short_last = await collect(engine, "Bom dia", SamplingParams(max_tokens=5, temperature=0.0))
    joined_while_long_ran = not long_req.done()
    await wait_for(lambda: engine.stats().running <= 1)
    assert joined_while_long_ran
    assert short_last.output_tokens == 5 and short_last.finish_reason == "length"
    _, long_last = await long_req
    assert long_last.output_tokens == 400
    solo_short, _ = await collect(engine, "Bom dia", SamplingParams(max_tokens=5, temperature=0.0))
    assert short_text == solo_short
    assert engine.stats().running == 0


async def test_engine_frees_slot_when_consumer_closes_stream(engine: Engine) -> None:
    cancelled_before = engine.stats().cancelled
    # Greedy decoding of this chat runs past 1500 tokens without an end-of-turn token (checked).
    prompt = engine.encode_chat([{"role": "user", "content": "Olá"}])
    stream = engine.generate(prompt, SamplingParams(max_tokens=1500, temperature=0.0))
    await anext(stream)
    assert engine.stats().running == 1
    await stream.aclose()
    await wait_for(lambda: engine.stats().running == 0, timeout_s=2.0)
    assert engine.stats().cancelled == cancelled_before + 1


async def test_engine_stops_before_stop_string_when_one_is_given(engine: Engine) -> None:
    text, _ = await collect(engine, "Olá", SamplingParams(max_tokens=60, seed=5))
    clean = [i for i in range(4, len(text) - 3) if "\ufffd" not in text[i : i + 3]]
    stop = text[clean[len(clean) // 2] : clean[len(clean) // 2] + 3]
    stopped, last = await collect(engine, "Olá", SamplingParams(max_tokens=60, seed=5, stop=(stop, "zzzz")))
    assert stopped == text[: text.index(stop)]
    assert last.finish_reason == "stop"


async def test_engine_refuses_request_when_prompt_plus_max_tokens_exceed_context(engine: Engine) -> None:
    prompt = engine.encode_text("Olá")
    with pytest.raises(ContextLengthExceeded) as err:
        await anext(engine.generate(prompt, SamplingParams(max_tokens=engine.max_model_len)))
    message = str(err.value)
    assert str(engine.max_model_len) in message and str(len(prompt)) in message
    assert str(engine.max_model_len + len(prompt)) in message


async def test_engine_refuses_request_with_429_when_queue_is_full(engine: Engine) -> None:
    params = SamplingParams(max_tokens=300, temperature=0.0)
    streams = [engine.generate(engine.encode_text("Olá"), params) for _ in range(8)]
    started = [asyncio.ensure_future(anext(s)) for s in streams]  # 4 in the batch + 4 queued
    await wait_for(lambda: engine.stats().running + engine.stats().waiting == 8)
    with pytest.raises(EngineOverloaded) as err:
        await anext(engine.generate(engine.encode_text("Olá"), params))
    assert err.value.status == 429
    await asyncio.gather(*started)
    for s in streams:
        await s.aclose()
    await wait_for(lambda: engine.stats().running + engine.stats().waiting == 0)
