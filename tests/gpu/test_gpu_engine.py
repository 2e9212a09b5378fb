"""The vLLM engine on an NVIDIA GPU (opt-in: `pytest tests/gpu` on a GPU node with `pip install -e '.[gpu,test]'`).

Not collected by `make test`: CI has no GPU. Each test skips, saying why, where no CUDA build of vLLM or no GPU is.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from pathlib import Path

import pytest

from amalia_serve.config import VariantConfig
from amalia_serve.sampling import SamplingParams


def _gpu_missing() -> str | None:
    try:
        importlib.metadata.distribution("vllm")
    except importlib.metadata.PackageNotFoundError:
        return "vLLM's CUDA build (the `gpu` extra) is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no NVIDIA GPU is visible (torch.cuda.is_available() is False)"
    return None


pytestmark = pytest.mark.skipif(_gpu_missing() is not None, reason=_gpu_missing() or "")


def test_engine_streams_bf16_on_the_gpu_with_cuda_graphs(demo_checkpoints: tuple[Path, Path]) -> None:
    from amalia_serve.vllm_engine import VLLMEngine

    variant = VariantConfig.model_validate({"name": "amalia-sft", "model_path": str(demo_checkpoints[0]),
                                            "engine": {"gpu_memory_utilization": 0.3}})  # fmt: skip

    async def run() -> tuple[int, float]:
        engine = await VLLMEngine.start(variant)
        try:
            outs = [o async for o in engine.generate("Portugal é", SamplingParams(max_tokens=32, temperature=0),
                                                     "gpu-1")]  # fmt: skip
            return outs[-1].output_tokens, engine.stats().kv_cache_usage
        finally:
            await engine.shutdown()

    tokens, kv_usage = asyncio.run(run())
    assert tokens == 32
    assert 0 <= kv_usage < 1
