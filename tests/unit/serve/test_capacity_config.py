"""The Serve config refuses a variant vLLM could not start, when it can read the checkpoint and knows the card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from amalia_serve.capacity import AMALIA_9B_CONFIG, GPUS, EngineSettings, fit, load_model
from amalia_serve.config import AmaliaServingArgs, VariantConfig

# A 32B-parameter dense decoder (Qwen2.5-32B's shape): 61 GiB of bf16 weights.
BIG_CONFIG = {**AMALIA_9B_CONFIG, "hidden_size": 5120, "num_hidden_layers": 64, "intermediate_size": 27648,
              "num_attention_heads": 40, "vocab_size": 152064}  # fmt: skip


def checkpoint(tmp_path: Path, config: dict[str, Any]) -> str:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def variant(model_path: str, accelerator_type: str | None = None, **engine: Any) -> dict[str, Any]:
    actor: dict[str, Any] = {"num_gpus": 1}
    if accelerator_type:
        actor["accelerator_type"] = accelerator_type
    return {"name": "amalia-sft", "model_path": model_path, "engine": engine,
            "deployment": {"ray_actor_options": actor}}  # fmt: skip


def test_variant_refused_with_planner_numbers_when_weights_exceed_its_accelerator(
    tmp_path: Path,
) -> None:
    path = checkpoint(tmp_path, BIG_CONFIG)
    expected = fit(load_model(path), GPUS["L40S"], EngineSettings())
    with pytest.raises(ValidationError) as refused:
        VariantConfig.model_validate(variant(path, "L40S"))
    message = str(refused.value)
    assert "variant amalia-sft: on L40S (accelerator_type L40S): " in message
    assert (
        expected.problems[0] in message
    )  # "bf16 weights take 61.xx GiB per GPU, more than the 41.39 GiB ..."


def test_variant_refused_when_max_model_len_beyond_readable_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(
        ValidationError, match="max_model_len 65536 is beyond the checkpoint's 32768"
    ):
        VariantConfig.model_validate(
            variant(checkpoint(tmp_path, AMALIA_9B_CONFIG), max_model_len=65536)
        )


def test_serving_args_refuse_the_variant_too_when_it_is_nested(tmp_path: Path) -> None:
    args = {"variants": [variant(checkpoint(tmp_path, BIG_CONFIG), "A100")]}
    with pytest.raises(ValidationError, match="on A100-40GB \\(accelerator_type A100\\)"):
        AmaliaServingArgs.model_validate(args)


@pytest.mark.parametrize(
    ("config", "accelerator_type", "engine"),
    [
        (AMALIA_9B_CONFIG, "H100", {"max_model_len": 32768}),  # fits: ten 32k sequences
        (BIG_CONFIG, None, {}),  # card unknown to this process: only the context is checked
        (BIG_CONFIG, "H100", {"max_model_len": 4096}),
    ],
)
def test_variant_accepted_when_it_fits_or_the_card_is_unknown(
    tmp_path: Path, config: dict[str, Any], accelerator_type: str | None, engine: dict[str, Any]
) -> None:
    assert VariantConfig.model_validate(
        variant(checkpoint(tmp_path, config), accelerator_type, **engine)
    )


def test_variant_accepted_unchecked_when_checkpoint_is_not_readable_here() -> None:
    # The cluster's head parses the Serve config without the model volume mounted.
    parsed = VariantConfig.model_validate(
        variant("/models/AMALIA-9B-SFT", "L40S", max_model_len=10**6)
    )
    assert parsed.engine.max_model_len == 10**6


# The quantization_config llm-compressor 0.14.0.1 writes for an int4 W4A16 checkpoint (the fields the
# planner and vLLM read; docs/quantization.md makes one).
W4A16_CONFIG = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
    "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                       "group_size": 128}}}, "ignore": ["lm_head"]}  # fmt: skip


@pytest.mark.parametrize(
    ("config", "quantization", "message"),
    [
        ({**AMALIA_9B_CONFIG, "quantization_config": W4A16_CONFIG}, "gptq", "does not match the checkpoint"),
        ({**AMALIA_9B_CONFIG, "quantization_config": W4A16_CONFIG}, "fp8_per_tensor", "is already int4"),
        (AMALIA_9B_CONFIG, "awq", "reads an already quantized checkpoint"),
    ],
)  # fmt: skip
def test_variant_refused_at_config_load_when_quantization_contradicts_its_checkpoint(
    tmp_path: Path, config: dict[str, Any], quantization: str, message: str
) -> None:
    with pytest.raises(ValidationError, match=f"variant amalia-sft: quantization {quantization} .*{message}"):
        VariantConfig.model_validate(variant(checkpoint(tmp_path, config), quantization=quantization))


@pytest.mark.parametrize("quantization", [None, "compressed-tensors"])
def test_quantized_checkpoint_variant_accepted_and_sized_at_its_bits_when_quantization_agrees(
    tmp_path: Path, quantization: str | None
) -> None:
    path = checkpoint(tmp_path, {**AMALIA_9B_CONFIG, "quantization_config": W4A16_CONFIG})
    assert VariantConfig.model_validate(variant(path, "L40S", quantization=quantization))
    assert fit(load_model(path), GPUS["L40S"], EngineSettings(quantization=quantization)).weights == "int4"
