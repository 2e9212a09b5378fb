"""The demo checkpoint quantized offline with llm-compressor (int8 W8A8, int4 W4A16 GPTQ), served by vLLM's CPU
build through VLLMEngine, and its held-out perplexity measured against bf16 (benchmarks/bench_quantized.py).

llm-compressor runs in its own venv (.tools/quantize-venv, `make tools`); the checkpoints it writes load in the
serving venv's vLLM 0.32, whose compressed-tensors is two minor versions older.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from amalia_serve.capacity import load_model
from amalia_serve.config import VariantConfig
from amalia_serve.sampling import SamplingParams
from amalia_serve.vllm_engine import VLLMEngine
from benchmarks.bench_quantized import (
    CALIBRATION_TEXT,
    CPU_ENGINE,
    HELDOUT_TEXT,
    heldout_samples,
    mean_abs_shift,
    perplexity,
    prompt_logprobs,
    quantize,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SCHEMES = {"int8": "w8a8-int8", "int4": "w4a16"}
# Bounds from benchmarks/bench_quantized.py on the demo (benchmarks/RESULTS.md, "Quantized checkpoints"), with
# margin. The demo's weights are random, so its perplexity (~4e11) says nothing about quality and moves either way
# under quantization: int8 x0.99-1.003, int4 GPTQ x0.68-0.74 over two runs (GPTQ shuffles its calibration), and the
# demo DPO checkpoint (other random weights) scores x0.60. The ratio bands catch a checkpoint that loads with
# wrong scales; the mean shift of each token's log-probability against bf16 is what separates a faithful
# quantization from other weights: int8 0.17 nats, int4 1.86, the DPO checkpoint 9.86.
PPL_RATIO_BAND = {"int8": (0.95, 1.05), "int4": (0.5, 1.5)}
MAX_LOGPROB_SHIFT = {"int8": 0.35, "int4": 3.0}
CHAT = [{"role": "user", "content": "Olá! Fala-me de Lisboa."}]


@pytest.fixture(scope="module")
def quantizing(
    demo_checkpoints: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[Path]]]:
    """The int8 and int4 checkpoints llm-compressor makes from the demo SFT (GPTQ on pt.txt), both started at
    once in the background, so its start-up overlaps the bf16 engine's."""
    out = tmp_path_factory.mktemp("quantized")

    def make(fmt: str) -> Path:
        quantize(demo_checkpoints[0], out / fmt, SCHEMES[fmt], "gptq")
        return out / fmt

    with ThreadPoolExecutor(max_workers=len(SCHEMES)) as pool:
        yield {fmt: pool.submit(make, fmt) for fmt in SCHEMES}


@pytest.fixture(scope="module")
def checkpoints(quantizing: dict[str, Future[Path]]) -> dict[str, Path]:
    return {fmt: future.result() for fmt, future in quantizing.items()}


@pytest.fixture(scope="module")
def served(
    demo_checkpoints: tuple[Path, Path], quantizing: dict[str, Future[Path]]
) -> dict[str, dict[str, Any]]:
    """bf16, then each quantized checkpoint, loaded through VLLMEngine in turn: held-out prompt logprobs and a
    greedy chat answer."""

    async def serve(name: str, path: Path) -> dict[str, Any]:
        variant = VariantConfig.model_validate({"name": name, "model_path": str(path), "engine": CPU_ENGINE})
        engine = await VLLMEngine.start(variant)
        try:
            samples = heldout_samples(engine.async_llm.get_tokenizer())
            logprobs = await prompt_logprobs(engine.async_llm, samples)
            outs = [o async for o in engine.generate(CHAT, SamplingParams(max_tokens=8, temperature=0), name)]
            return {"logprobs": logprobs, "outs": outs}
        finally:
            await engine.shutdown()

    results = {"bf16": asyncio.run(serve("demo-bf16", demo_checkpoints[0]))}
    for fmt, future in quantizing.items():
        results[fmt] = asyncio.run(serve(f"demo-{fmt}", future.result()))
    return results


def test_vllm_cpu_build_refuses_fp8_quantization_while_loading_before_starting_an_engine(demo_checkpoints: tuple[Path, Path]) -> None:
    variant = VariantConfig.model_validate({"name": "demo-fp8", "model_path": str(demo_checkpoints[0]),
                                            "engine": {**CPU_ENGINE, "quantization": "fp8_per_tensor"}})  # fmt: skip
    with pytest.raises(ValueError, match=r"variant demo-fp8: quantization fp8_per_tensor quantizes weights to fp8 "
                       r"while loading, which vLLM's CPU build cannot do.*int8 \(W8A8\) or int4 \(W4A16\)"):  # fmt: skip
        asyncio.run(VLLMEngine.start(variant))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_checkpoint_generates_through_vllm_engine_on_cpu(
    served: dict[str, dict[str, Any]], fmt: str
) -> None:
    outs = served[fmt]["outs"]
    assert outs[-1].output_tokens == 8 and outs[-1].finish_reason == "length"
    assert "".join(o.text for o in outs)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_perplexity_and_token_logprobs_stay_within_their_bounds_of_bf16_on_held_out_text(
    served: dict[str, dict[str, Any]], fmt: str
) -> None:
    bf16, quantized = served["bf16"]["logprobs"], served[fmt]["logprobs"]
    assert len(quantized) == len(bf16) > 700  # every held-out token after each line's first
    low, high = PPL_RATIO_BAND[fmt]
    assert low <= perplexity(quantized) / perplexity(bf16) <= high, (perplexity(quantized), perplexity(bf16))
    assert mean_abs_shift(quantized, bf16) <= MAX_LOGPROB_SHIFT[fmt]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_checkpoint_is_a_compressed_tensors_checkpoint_the_planner_sizes_at_its_bits(
    checkpoints: dict[str, Path], fmt: str
) -> None:
    path = checkpoints[fmt]
    model = load_model(str(path))
    assert (model.checkpoint_format, model.quant_method) == (fmt, "compressed-tensors")
    # Safetensors only, with the tokenizer and chat template the serving path renders chats with.
    assert {p.name for p in path.iterdir()} >= {"model.safetensors", "tokenizer.json", "chat_template.jinja"}
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))
    # The planner's weight bytes against what is on disk: the same up to the safetensors header and the
    # scales' dtype (bf16 on disk; the planner counts vLLM's fp32 int8 scales, 10 KiB more for the demo).
    on_disk = (path / "model.safetensors").stat().st_size
    assert abs(model.weight_bytes(fmt) - on_disk) < 0.01 * on_disk


def test_held_out_text_shares_no_line_with_the_tokenizer_and_calibration_text() -> None:
    calibration = set(CALIBRATION_TEXT.read_text(encoding="utf-8").splitlines())
    assert not calibration & set(HELDOUT_TEXT.read_text(encoding="utf-8").splitlines())


def test_variant_refused_at_config_load_when_quantization_contradicts_the_real_checkpoint(
    checkpoints: dict[str, Path],
) -> None:
    with pytest.raises(ValidationError, match="quantization gptq does not match the checkpoint .*compressed-tensors"):
        VariantConfig.model_validate(
            {"name": "demo-int4", "model_path": str(checkpoints["int4"]), "engine": {"quantization": "gptq"}}
        )
