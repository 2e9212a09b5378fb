"""The naive baseline: transformers' `model.generate` on one request at a time, behind the same Engine interface.

Selected in a replica with AMALIA_ENGINE_CLS=benchmarks.naive_engine:NaiveGenerateEngine (and PYTHONPATH at the
repository root). It is what a first "put the model behind an API" server does: no batching, no KV-cache sharing;
`make bench` reports how far vLLM's continuous batching is ahead of it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

from amalia_serve.checkpoint import inspect_checkpoint
from amalia_serve.config import VariantConfig
from amalia_serve.engine import (
    ChatMessages,
    ContextLengthExceeded,
    Engine,
    EngineOutput,
    EngineStats,
)
from amalia_serve.metrics import VariantMetrics
from amalia_serve.sampling import SamplingParams


class _TokenQueue:
    """transformers' streamer protocol (put/end), handing token ids to the event loop as they are sampled."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[list[int] | None]) -> None:
        self._loop, self._queue, self._prompt_seen = loop, queue, False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first echoes the prompt
            self._prompt_seen = True
            return
        self._loop.call_soon_threadsafe(self._queue.put_nowait, value.reshape(-1).tolist())

    def end(self) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, None)


class NaiveGenerateEngine(Engine):
    """Requests wait for one lock; each runs `generate` to its end while its tokens stream out."""

    def __init__(self, variant: VariantConfig, model: Any, tokenizer: Any, max_model_len: int) -> None:
        self._config = variant.engine
        self._model, self._tokenizer, self._max_model_len = model, tokenizer, max_model_len
        self._gate = threading.Lock()
        self._waiting = 0
        self._running = 0

    @classmethod
    async def start(cls, variant: VariantConfig, metrics: VariantMetrics | None = None) -> NaiveGenerateEngine:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        info = inspect_checkpoint(variant.model_path)
        model = AutoModelForCausalLM.from_pretrained(info.path, dtype="auto", local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(info.path, local_files_only=True)
        return cls(variant, model, tokenizer, variant.engine.max_model_len or info.max_position_embeddings or 2048)

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def _encode(self, prompt: ChatMessages | str) -> list[int]:
        if isinstance(prompt, str):
            return list(self._tokenizer(prompt)["input_ids"])
        system = self._config.system_prompt
        if system and not any(m["role"] == "system" for m in prompt):
            prompt = [{"role": "system", "content": system}, *prompt]
        encoded = self._tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    async def generate(
        self, prompt: ChatMessages | str, sampling: SamplingParams, request_id: str
    ) -> AsyncIterator[EngineOutput]:
        ids = self._encode(prompt)
        max_tokens = sampling.max_tokens or self._config.default_max_tokens
        if len(ids) + max_tokens > self._max_model_len:
            raise ContextLengthExceeded(len(ids), max_tokens, self._max_model_len)
        queue: asyncio.Queue[list[int] | None] = asyncio.Queue()
        worker = asyncio.create_task(asyncio.to_thread(
            self._generate_blocking, ids, sampling, max_tokens, _TokenQueue(asyncio.get_running_loop(), queue)
        ))  # fmt: skip
        produced: list[int] = []
        text_so_far = ""
        while (new := await queue.get()) is not None:
            produced += new
            text = self._tokenizer.decode(produced, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # half a character: wait for the rest
                continue
            yield EngineOutput(request_id, text[len(text_so_far):], len(new), len(ids), len(produced))
            text_so_far = text
        await worker
        reason = "length" if len(produced) >= max_tokens else "stop"
        yield EngineOutput(request_id, "", 0, len(ids), len(produced), reason)  # type: ignore[arg-type]

    def _generate_blocking(
        self, ids: list[int], sampling: SamplingParams, max_tokens: int, streamer: _TokenQueue
    ) -> None:
        import torch

        self._waiting += 1
        with self._gate, torch.inference_mode():
            self._waiting -= 1
            self._running = 1
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            options: dict[str, Any] = {"do_sample": False} if sampling.greedy else {
                "do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
            if sampling.ignore_eos:
                options["min_new_tokens"] = max_tokens
            try:
                self._model.generate(
                    torch.tensor([ids]), attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                    max_new_tokens=max_tokens, pad_token_id=self._tokenizer.eos_token_id, streamer=streamer,
                    **options,
                )  # fmt: skip
            except BaseException:
                streamer.end()  # the consumer must not wait for tokens that will never come
                raise
            finally:
                self._running = 0

    async def abort(self, request_id: str) -> None:
        """A running `generate` call cannot be stopped; it ends at max_tokens."""

    async def check_health(self) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats(self._running, self._waiting, 0.0, self._running + self._waiting, 0, max_num_seqs=1)

    async def shutdown(self) -> None:
        pass
