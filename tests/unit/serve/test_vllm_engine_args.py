"""A variant's engine block becomes exactly the vLLM engine arguments it says, and bad ones fail at config time."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
from pydantic import ValidationError

from amalia_serve.capacity import CHECKPOINT_QUANTIZATION, load_model, quantization_conflict
from amalia_serve.config import EngineConfig, Quantization, VariantConfig
from amalia_serve.vllm_engine import (
    check_engine_args,
    cpu_build_refusal,
    engine_kwargs,
    prepare_environment,
)
from benchmarks.servers import vllm_serve_argv


def test_engine_kwargs_carry_typed_fields_pass_through_and_the_offline_loading_path() -> None:
    config = EngineConfig(max_num_seqs=32, kv_cache_dtype="fp8", engine_args={"block_size": 32})
    kwargs = engine_kwargs(config, "/models/sft", "amalia-sft")
    assert kwargs["max_num_seqs"] == 32 and kwargs["kv_cache_dtype"] == "fp8" and kwargs["block_size"] == 32
    assert kwargs["enable_prefix_caching"] is True  # on by default
    assert (kwargs["model"], kwargs["tokenizer"], kwargs["served_model_name"]) == (
        "/models/sft", "/models/sft", ["amalia-sft"],
    )  # fmt: skip
    assert kwargs["trust_remote_code"] is False and kwargs["load_format"] == "safetensors"
    assert "max_num_batched_tokens" not in kwargs  # unset fields leave vLLM's own default


def test_engine_kwargs_are_all_vllm_engine_arguments() -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    every_field = EngineConfig(max_model_len=4096, kv_cache_memory_bytes=1 << 30, max_num_seqs=8,
                               max_num_batched_tokens=2048, enable_chunked_prefill=True, quantization="fp8")  # fmt: skip
    assert set(engine_kwargs(every_field, "/m", "v")) <= known


def test_quantization_choices_are_methods_vllm_knows() -> None:
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    assert set(typing.get_args(Quantization)) <= set(QUANTIZATION_METHODS)


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        ({"max_batch_size": 16}, "Extra inputs are not permitted"),
        ({"gpu_memory_utilization": 1.5}, "less than or equal to 1"),
        ({"quantization": "gguf-magic"}, "Input should be"),
        ({"engine_args": {"max_num_seqs": 8}}, "set these as engine fields of their own"),
        ({"engine_args": {"trust_remote_code": True}}, "amalia-serve sets these itself"),
    ],
    ids=["typo", "out of range", "unknown quantization", "typed key passed through", "owned key"],
)
def test_variant_config_refuses_bad_engine_block_with_its_reason(engine: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        VariantConfig.model_validate({"name": "amalia-sft", "model_path": "/models/sft", "engine": engine})


def test_pass_through_typo_is_refused_naming_the_closest_vllm_argument() -> None:
    with pytest.raises(ValueError, match=r"'blok_size' \(did you mean block_size"):
        check_engine_args(EngineConfig(engine_args={"blok_size": 4}))
    check_engine_args(EngineConfig(engine_args={"block_size": 32}))


def test_bare_vllm_serve_gets_the_same_engine_arguments() -> None:
    config = EngineConfig(max_num_seqs=16, enable_prefix_caching=False, kv_cache_memory_bytes=1 << 30)
    argv = vllm_serve_argv(config, "/m", "smollm2", 8001)
    assert argv[argv.index("--max-num-seqs") + 1] == "16"
    assert "--no-enable-prefix-caching" in argv and "--no-trust-remote-code" in argv
    assert argv[argv.index("--served-model-name") + 1] == "smollm2"
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(1 << 30)


# A quantization_config of each checkpoint method the planner knows, as their tools write them.
CHECKPOINT_CONFIGS = {
    "compressed-tensors": {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                       "strategy": "group", "group_size": 128}}}},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3"},
}  # fmt: skip
TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
              "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 128, "vocab_size": 1024, "max_position_embeddings": 2048, "dtype": "bfloat16"}  # fmt: skip


@pytest.mark.parametrize("quant_method", sorted(CHECKPOINT_QUANTIZATION))
def test_planner_refuses_exactly_the_quantization_vllm_refuses_for_a_quantized_checkpoint(
    tmp_path: Path, quant_method: str
) -> None:
    """The Serve config refuses at load what vLLM's ModelConfig would refuse only in the replica, and nothing
    else; the one exception is a GPU kernel vLLM's CPU build cannot override to (awq_marlin)."""
    prepare_environment()  # vLLM's CPU platform, as in a replica here
    from vllm.config import ModelConfig

    config = {**TINY_LLAMA, "quantization_config": CHECKPOINT_CONFIGS[quant_method]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_model(str(tmp_path))
    for quantization in [None, *typing.get_args(Quantization)]:
        try:
            ModelConfig(model=str(tmp_path), quantization=quantization)
            vllm_accepts = True
        except ValueError:  # pydantic's ValidationError is one
            vllm_accepts = False
        ours = quantization_conflict(model, quantization)
        if (quant_method, quantization) == ("awq", "awq_marlin"):
            assert not vllm_accepts and ours is None  # accepted on GPUs, where the Marlin kernel runs
            continue
        assert vllm_accepts == (ours is None), (quantization, ours)


@pytest.mark.parametrize(
    ("quantization_config", "quantization", "refused"),
    [
        (None, None, False),
        (None, "fp8_per_tensor", True),
        (None, "fp8", True),  # vLLM 0.32's older spelling of fp8_per_tensor on a 16-bit checkpoint
        (CHECKPOINT_CONFIGS["compressed-tensors"], None, False),  # int4 W4A16: the CPU build runs it
        (CHECKPOINT_CONFIGS["fp8"], None, False),  # already fp8: vLLM's torch fallback kernels run it
        (None, "torchao", False),  # not the planner's to judge: vLLM does
    ],
)
def test_cpu_build_refuses_fp8_only_when_16_bit_weights_would_be_quantized_while_loading(
    tmp_path: Path, quantization_config: dict[str, object] | None, quantization: str | None, refused: bool
) -> None:
    config = {**TINY_LLAMA, **({"quantization_config": quantization_config} if quantization_config else {})}
    (tmp_path / "config.json").write_text(json.dumps(config))
    refusal = cpu_build_refusal(EngineConfig(quantization=quantization), str(tmp_path))
    assert (refusal is not None) == refused
    if refusal:
        assert f"quantization {quantization} quantizes weights to fp8 while loading" in refusal
        assert "int8 (W8A8) or int4 (W4A16)" in refusal
