"""A variant's engine block becomes exactly the vLLM engine arguments it says, and bad ones fail at config time."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from pydantic import ValidationError

from amalia_serve.config import EngineConfig, Quantization, VariantConfig
from amalia_serve.vllm_engine import check_engine_args, engine_kwargs
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
