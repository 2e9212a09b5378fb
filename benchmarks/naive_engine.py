"""The naive baseline: `model.generate` on one request at a time, behind the same Engine interface and API.

Selected in a replica with AMALIA_ENGINE_CLS=benchmarks.naive_engine:NaiveGenerateEngine.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import torch

from amalia_serve.engine import Engine, EngineOutput
from amalia_serve.sampling import SamplingParams


class NaiveGenerateEngine(Engine):
    """Requests wait for one lock; each runs `generate` to the end and is answered in one piece."""

    _gate = threading.Lock()

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[EngineOutput]:
        max_tokens = self._resolve_max_tokens(len(prompt_ids), params.max_tokens)
        output = await asyncio.to_thread(self._generate_blocking, prompt_ids, params, max_tokens)
        text = self.tokenizer.decode(output, skip_special_tokens=True)
        finish = "length" if len(output) >= max_tokens else "stop"
        yield EngineOutput(request_id or "naive", text, len(output), len(prompt_ids), len(output), finish, 0.0)

    def _generate_blocking(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int) -> list[int]:
        with self._gate, torch.inference_mode():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            sampling = {"do_sample": False} if params.greedy else {
                "do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
            out = self.model.generate(
                torch.tensor([prompt_ids], device=self.device),
                attention_mask=torch.ones((1, len(prompt_ids)), dtype=torch.long, device=self.device),
                max_new_tokens=max_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                **sampling,
            )
        ids: list[int] = out[0, len(prompt_ids):].tolist()
        while ids and ids[-1] in self._eos_ids:
            ids.pop()
        return ids
