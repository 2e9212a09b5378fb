"""The capacity arithmetic against numbers derived by hand from AMALIA-9B's config.

AMALIA-9B: 42 layers, hidden H = 4096, intermediate I = 12288, 32 heads and 8 KV heads of 128,
vocab V = 128000, untied embeddings, 32768 positions. Linear weights of a block (input x output):
  q 4096x4096 = 16,777,216   k 4096x1024 = 4,194,304   v 4096x1024 = 4,194,304
  o 4096x4096 = 16,777,216   gate, up, down 3 x 4096x12288 = 150,994,944   -> 192,937,984
  output channels: 4096 + 1024 + 1024 + 4096 + 12288 + 12288 + 4096 = 38,912
All blocks: 42 x 192,937,984 = 8,103,395,328 linear weights; 42 x 38,912 = 1,634,304 channels.
16-bit rest: embeddings V x H = 524,288,000, lm_head the same, norms (2 x 42 + 1) x 4096 = 348,160
  -> 1,048,924,160. Total 9,152,319,488 (EuroLLM-9B, the same shape, publishes 9.154B).
KV per token: 2 (K, V) x 42 layers x 8 heads x 128 x 2 bytes = 172,032 bytes (168 KiB); fp8 86,016.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from amalia_serve import capacity
from amalia_serve.capacity import (
    AMALIA_9B_CONFIG,
    GIB,
    GPUS,
    PRESETS,
    CapacityError,
    EngineSettings,
    ModelShape,
    check_variant,
    find_gpu,
    fit,
    suggest,
)

AMALIA = PRESETS["amalia-9b"]
RESERVE_FIXED = 1_610_612_736  # 1.5 GiB
# vLLM's defaults (max_num_batched_tokens 2048, max_num_seqs 128): forward pass 2048 x 2 x (3 x
# 12288 + 4 x 4096) = 218,103,808 bytes; sampler 128 x 128000 x 16 = 262,144,000 bytes; the larger
# one counts.
RESERVE_AT_VLLM_DEFAULTS = RESERVE_FIXED + 262_144_000


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        ("embedding_params", 524_288_000),
        ("lm_head_params", 524_288_000),
        ("linear_params", 8_103_395_328),
        ("sixteen_bit_params", 1_048_924_160),
        ("params", 9_152_319_488),
        ("max_context", 32_768),
        ("activation_bytes_per_batched_token", 106_496),  # 2 x (3 x 12288 + 4 x 4096)
        ("sampler_bytes_per_sequence", 2_048_000),  # 128000 x 16
    ],
)
def test_amalia_shape_matches_hand_count_when_read_from_builtin_config(
    quantity: str, expected: int
) -> None:
    assert getattr(AMALIA, quantity) == expected


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        # 2 bytes x 9,152,319,488
        ("bf16", 18_304_638_976),
        # 8,103,395,328 x 1 byte + 1,634,304 channels x 4-byte scale (6,537,216) + 1,048,924,160 x 2
        # bytes
        ("fp8", 10_207_780_864),
        ("int8", 10_207_780_864),
        # 8,103,395,328 / 2 + (8,103,395,328 / 128 groups) x 2-byte scale (126,615,552) +
        # 2,097,848,320
        ("int4", 6_276_161_536),
    ],
)
def test_weight_bytes_match_hand_count_when_stored_in_each_format(
    fmt: capacity.WeightFormat, expected: int
) -> None:
    assert AMALIA.weight_bytes(fmt) == expected


@pytest.mark.parametrize(
    ("kv_cache_dtype", "tensor_parallel_size", "expected"),
    [
        ("auto", 1, 172_032),
        ("bfloat16", 1, 172_032),
        ("fp8", 1, 86_016),
        ("fp8_e5m2", 1, 86_016),
        ("auto", 2, 86_016),  # 4 of the 8 KV heads on each rank
        ("fp8", 4, 21_504),  # 2 x 42 x 2 heads x 128 x 1 byte
    ],
)
def test_kv_bytes_per_token_match_hand_count_when_dtype_or_parallelism_varies(
    kv_cache_dtype: str, tensor_parallel_size: int, expected: int
) -> None:
    assert AMALIA.kv_bytes_per_token(kv_cache_dtype, tensor_parallel_size) == expected


def test_kv_bytes_per_token_refused_when_dtype_unknown() -> None:
    with pytest.raises(CapacityError, match="kv_cache_dtype 'int3'"):
        AMALIA.kv_bytes_per_token("int3")


# Each row: card, engine settings, (memory vLLM may use, KV tokens, full-context sequences), derived
# by hand. KV tokens = whole 16-token blocks of (budget - weights - reserve) // (16 x bytes per
# token).
FIT_CASES = [
    # H100 80GB: 81559 MiB x 0.9 = 76,968,728,985; - 18,304,638,976 - 1,872,756,736 =
    # 56,791,333,273; // 2,752,512 bytes per block = 20,632 blocks = 330,112 tokens; // 32768 = 10.
    ("H100-80GB", EngineSettings(), (76_968_728_985, 330_112, 10)),
    # L40S at 8192: 46068 MiB x 0.9 = 43,475,219,251; - 18,304,638,976 - 1,872,756,736 =
    # 23,297,823,539; // 2,752,512 = 8,464 blocks = 135,424 tokens; // 8192 = 16.
    ("L40S", EngineSettings(max_model_len=8192), (43_475_219_251, 135_424, 16)),
    # H100 MIG 3g.40gb (39.50 GiB = 40448 MiB), fp8 weights and KV: x 0.9 = 38,171,521,843;
    # - 10,207,780,864 - 1,872,756,736 = 26,090,984,243; // (16 x 86,016) = 18,957 blocks
    # = 303,312 tokens; // 32768 = 9.
    (
        "H100-80GB:3g.40gb",
        EngineSettings(quantization="fp8_per_tensor", kv_cache_dtype="fp8"),
        (38_171_521_843, 303_312, 9),
    ),
    # H200 at half its memory with tensor parallelism 2: 143771 MiB x 0.5 = 75,377,410,048; weights
    # per GPU 18,304,638,976 / 2 = 9,152,319,488; - 1,872,756,736 = 64,352,333,824; // (16 x 86,016)
    # = 46,758 blocks = 748,128 tokens; // 32768 = 22.
    (
        "H200",
        EngineSettings(gpu_memory_utilization=0.5, tensor_parallel_size=2),
        (75_377_410_048, 748_128, 22),
    ),
]


@pytest.mark.parametrize(("gpu", "settings", "expected"), FIT_CASES, ids=[c[0] for c in FIT_CASES])
def test_fit_matches_hand_derivation_when_card_and_engine_vary(
    gpu: str, settings: EngineSettings, expected: tuple[int, int, int]
) -> None:
    result = fit(AMALIA, GPUS[gpu], settings)
    assert (result.budget_bytes, result.kv_tokens, result.max_sequences) == expected
    assert result.reserve_bytes == RESERVE_AT_VLLM_DEFAULTS
    assert result.fits, result.problems


def test_int4_checkpoint_fits_h200_smallest_slice_when_kv_cache_is_fp8() -> None:
    # 16384 MiB x 0.9 = 15,461,882,265; - 6,276,161,536 - 1,872,756,736 = 7,312,963,993;
    # // (16 x 86,016) = 5,313 blocks = 85,008 tokens: two full 32768-token sequences.
    int4, slice_ = PRESETS["amalia-9b-int4"], GPUS["H200:1g.18gb"]
    result = fit(int4, slice_, EngineSettings(kv_cache_dtype="fp8"))
    assert (result.weights, result.kv_tokens, result.max_sequences) == ("int4", 85_008, 2)
    assert result.fits


@pytest.mark.parametrize(
    ("model", "gpu", "settings", "message"),
    [
        (AMALIA, "H100-80GB", EngineSettings(max_model_len=65536),
         "max_model_len 65536 is beyond the checkpoint's 32768 (amalia-9b)"),
        # 18,304,638,976 bytes = 17.05 GiB; 16384 MiB x 0.9 = 14.40 GiB
        (AMALIA, "H200:1g.18gb", EngineSettings(),
         ("bf16 weights take 17.05 GiB per GPU, more than the 14.40 GiB vLLM may use "
          "(gpu_memory_utilization 0.9 x 16.00 GiB H200:1g.18gb)")),
        # fp8 weights 9.51 GiB + reserve 1.74 GiB + 32768 x 172,032 bytes (5.25 GiB) = 16.50 GiB
        (AMALIA, "H200:1g.18gb", EngineSettings(quantization="fp8_per_tensor"),
         ("one 32768-token sequence does not fit: fp8 weights 9.51 GiB + reserve 1.74 GiB + its KV "
          "cache 5.25 GiB = 16.50 GiB > 14.40 GiB")),
        (AMALIA, "H100-80GB", EngineSettings(tensor_parallel_size=3),
         "tensor_parallel_size 3 does not divide 32 attention heads"),
    ],
)  # fmt: skip
def test_fit_names_the_problem_with_planner_numbers_when_engine_block_cannot_start(
    model: ModelShape, gpu: str, settings: EngineSettings, message: str
) -> None:
    result = fit(model, GPUS[gpu], settings)
    assert not result.fits
    assert any(message in problem for problem in result.problems), result.problems


def test_suggest_picks_the_largest_max_num_seqs_the_kv_cache_holds_when_context_is_short() -> None:
    # The sampler's reserve grows by 2,048,000 bytes per sequence, so the answer is a fixed point.
    settings = EngineSettings(max_model_len=1024)
    chosen = suggest(AMALIA, GPUS["A100-40GB"], settings)
    assert chosen.max_sequences >= chosen.max_num_seqs
    one_more = fit(AMALIA, GPUS["A100-40GB"], replace(settings, max_num_seqs=chosen.max_num_seqs + 1,
                                                       max_num_batched_tokens=2048))  # fmt: skip
    assert one_more.max_sequences < chosen.max_num_seqs + 1
    assert chosen.concurrency == chosen.max_num_seqs


def test_suggest_caps_max_num_seqs_at_vllm_largest_default_when_kv_cache_holds_more() -> None:
    chosen = suggest(AMALIA, GPUS["H200"], EngineSettings(max_model_len=256))
    assert chosen.max_num_seqs == 1024
    assert chosen.max_sequences > 1024


@pytest.mark.parametrize(
    ("gpu", "tokens"),
    [("H200", 8192), ("H100-80GB", 8192), ("H100-80GB:7g.80gb", 8192), ("A100-80GB", 2048),
     ("H100-80GB:3g.40gb", 2048), ("L40S", 2048)],
)  # fmt: skip
def test_suggest_uses_vllm_server_batch_rule_when_max_num_batched_tokens_unset(
    gpu: str, tokens: int
) -> None:
    assert suggest(AMALIA, GPUS[gpu], EngineSettings()).max_num_batched_tokens == tokens


def test_replicas_cover_users_with_concurrency_capped_by_max_num_seqs_when_users_given() -> None:
    # KV holds 10 full-context sequences on an H100 (above); max_num_seqs 8 caps a replica at 8.
    result = fit(AMALIA, GPUS["H100-80GB"], EngineSettings(max_num_seqs=8))
    assert (result.max_sequences, result.concurrency) == (10, 8)
    assert result.replicas_for(100) == 13  # ceil(100 / 8)


def write_config(tmp_path: Path, **overrides: Any) -> Path:
    config = {**AMALIA_9B_CONFIG, **overrides}
    (tmp_path / "config.json").write_text(
        json.dumps({k: v for k, v in config.items() if v is not None})
    )
    return tmp_path


@pytest.mark.parametrize(
    ("overrides", "attribute", "expected"),
    [
        ({"num_key_value_heads": None}, "num_kv_heads", 32),  # absent: one KV head per query head
        ({"head_dim": None, "hidden_size": 2048}, "head_dim", 64),  # absent: hidden / heads
        ({"tie_word_embeddings": True}, "params", 9_152_319_488 - 524_288_000),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "max_context", 131_072),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "max_context", 32_768),
        ({"quantization_config": {"quant_method": "fp8"}}, "checkpoint_format", "fp8"),
        ({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 64}}, "int4_group_size", 64),
        ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "checkpoint_format", "int4"),
        ({"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {
            "group_0": {"weights": {"num_bits": 8, "type": "int"}}}}}, "checkpoint_format", "int8"),
        ({"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {
            "group_0": {"weights": {"num_bits": 8, "type": "float"}}}}}, "checkpoint_format", "fp8"),
        ({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": -1}}, "int4_group_size", None),
        ({"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
            "weights": {"num_bits": 4, "type": "int", "strategy": "channel"}}}}}, "int4_group_size", None),
        ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "quant_method", "awq"),
        ({}, "quant_method", None),
    ],
)  # fmt: skip
def test_model_read_from_config_json_when_fields_vary(
    tmp_path: Path, overrides: dict[str, Any], attribute: str, expected: object
) -> None:
    model = capacity.load_model(str(write_config(tmp_path, **overrides)))
    assert getattr(model, attribute) == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_local_experts": 8}, "dense decoders"),
        ({"vocab_size": None}, "lacks 'vocab_size'"),
        ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quant_method 'bitsandbytes'"),
        ({"quantization_config": {"quant_method": "gptq", "bits": 3}}, "3-bit int weights"),
    ],
)
def test_model_refused_with_reason_when_config_json_is_outside_the_planner(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(CapacityError, match=message):
        capacity.load_model(str(write_config(tmp_path, **overrides)))


def test_load_model_refuses_path_without_config_when_not_a_builtin_name(tmp_path: Path) -> None:
    with pytest.raises(CapacityError, match="neither a built-in checkpoint"):
        capacity.load_model(str(tmp_path))


@pytest.mark.parametrize(
    ("model", "quantization", "expected"),
    [
        ("amalia-9b", None, "bf16"),
        ("amalia-9b", "fp8_per_tensor", "fp8"),
        ("amalia-9b", "fp8_per_channel", "fp8"),
        ("amalia-9b", "fp8", "fp8"),  # vLLM 0.32: deprecated spelling of fp8_per_tensor here
        ("amalia-9b-fp8", "fp8", "fp8"),
        ("amalia-9b-int4", None, "int4"),
        ("amalia-9b-int4", "gptq_marlin", "int4"),
        ("amalia-9b-int8", "compressed-tensors", "int8"),
    ],
)
def test_weights_in_memory_follow_quantization_when_checkpoint_allows_it(
    model: str, quantization: str | None, expected: str
) -> None:
    assert capacity.weights_in_memory(PRESETS[model], quantization) == expected


@pytest.mark.parametrize(
    ("model", "quantization", "message"),
    [
        ("amalia-9b-int4", "fp8_per_tensor", "already int4"),
        ("amalia-9b", "gptq", "has no quantization_config"),
        ("amalia-9b", "bitsandbytes", "the planner knows"),
    ],
)
def test_weights_in_memory_refused_when_quantization_does_not_match_checkpoint(
    model: str, quantization: str, message: str
) -> None:
    with pytest.raises(CapacityError, match=message):
        capacity.weights_in_memory(PRESETS[model], quantization)


def test_int4_scales_count_one_per_output_channel_when_not_grouped() -> None:
    # 8,103,395,328 / 2 + 1,634,304 channels x 2-byte scale + 2,097,848,320 16-bit bytes
    per_channel = replace(PRESETS["amalia-9b-int4"], int4_group_size=None)
    assert per_channel.weight_bytes("int4") == 4_051_697_664 + 3_268_608 + 2_097_848_320


def quantized(method: str, fmt: capacity.WeightFormat) -> ModelShape:
    """AMALIA as a checkpoint whose config.json names `method` and stores `fmt` weights."""
    return replace(AMALIA, name="/models/q", checkpoint_format=fmt, quant_method=method)


@pytest.mark.parametrize(
    ("model", "quantization", "conflict"),
    [
        (AMALIA, None, None),
        (AMALIA, "fp8", None),  # quantized while loading, as fp8_per_tensor
        (AMALIA, "torchao", None),  # not the planner's to judge on a 16-bit checkpoint
        (AMALIA, "compressed-tensors", "reads an already quantized checkpoint; amalia-9b has no"),
        (quantized("compressed-tensors", "int4"), None, None),
        (quantized("compressed-tensors", "int4"), "compressed-tensors", None),
        (quantized("compressed-tensors", "int4"), "gptq", ("quantization gptq does not match the checkpoint "
         "/models/q (quant_method compressed-tensors, int4 weights): vLLM reads the format from its "
         "config.json; leave quantization null or set compressed-tensors")),
        (quantized("compressed-tensors", "int8"), "fp8_per_tensor", "/models/q is already int8"),
        (quantized("compressed-tensors", "fp8"), "fp8", "set compressed-tensors"),
        (quantized("compressed-tensors", "int8"), "torchao", "set compressed-tensors"),
        (quantized("gptq", "int4"), "gptq_marlin", None),  # vLLM runs it as auto_gptq
        (quantized("awq", "int4"), "gptq", "set auto_awq or awq or awq_marlin"),
        (quantized("fp8", "fp8"), "fp8", None),
        (PRESETS["amalia-9b-int4"], "gptq", None),  # a built-in preset stands for any method
        (PRESETS["amalia-9b-int4"], "fp8", "amalia-9b-int4 is already int4"),
    ],
)  # fmt: skip
def test_quantization_conflict_named_when_checkpoint_config_contradicts_engine(
    model: ModelShape, quantization: str | None, conflict: str | None
) -> None:
    found = capacity.quantization_conflict(model, quantization)
    assert (found is None) == (conflict is None), found
    if conflict:
        assert conflict in str(found)


def test_engine_quantization_names_online_fp8_or_offline_checkpoint_when_format_differs() -> None:
    assert capacity.engine_quantization(AMALIA, "bf16") is None
    assert capacity.engine_quantization(AMALIA, "fp8") == "fp8_per_tensor"
    assert capacity.engine_quantization(PRESETS["amalia-9b-int4"], "int4") is None
    with pytest.raises(CapacityError, match="quantized offline"):
        capacity.engine_quantization(AMALIA, "int4")


@pytest.mark.parametrize(
    ("name", "expected", "gib"),
    [("h100-80gb", "H100-80GB", 79.65), ("1g.18gb", "H200:1g.18gb", 16.00), ("L40S", "L40S", 44.99),
     ("a100-80gb:3g.40gb", "A100-80GB:3g.40gb", 39.25), ("RTX-6000-Ada", "RTX-6000-Ada", 47.99)],
)  # fmt: skip
def test_find_gpu_returns_table_card_when_name_or_unique_profile_given(
    name: str, expected: str, gib: float
) -> None:
    gpu = find_gpu(name)
    assert (gpu.name, round(gpu.memory_gib, 2)) == (expected, gib)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("3g.40gb", "several cards; say which: H100-80GB:3g.40gb, A100-80GB:3g.40gb"),
        ("T4", "unknown GPU 'T4'"),
    ],
)
def test_find_gpu_refused_with_choices_when_name_is_ambiguous_or_unknown(
    name: str, message: str
) -> None:
    with pytest.raises(CapacityError, match=message):
        find_gpu(name)


@pytest.mark.parametrize(
    ("gpu", "fmt", "expected"),
    [("H100-80GB", "fp8", "native"), ("L40S", "fp8", "native"), ("RTX-6000-Ada", "fp8", "native"),
     ("A100-80GB", "fp8", "weight-only"), ("A100-80GB:3g.40gb", "fp8", "weight-only"),
     ("A100-40GB", "int4", "native"), ("A100-40GB", "int8", "native")],
)  # fmt: skip
def test_gpu_support_follows_compute_capability_when_format_varies(
    gpu: str, fmt: capacity.WeightFormat, expected: str
) -> None:
    assert GPUS[gpu].support(fmt) == expected


def test_gpu_by_memory_size_has_unknown_support_when_card_unnamed() -> None:
    gpu = capacity.gpu_of_size(24)
    assert (gpu.memory_mib, gpu.support("fp8")) == (24 * 1024, "unknown")


# A Qwen2.5-32B-shaped dense decoder: about 32.8B parameters, 61 GiB in bf16 -- too big for a 40-48
# GB card.
BIG = {"hidden_size": 5120, "num_hidden_layers": 64, "intermediate_size": 27648, "num_attention_heads": 40,
       "vocab_size": 152064, "max_position_embeddings": 32768}  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "accelerator_type", "max_model_len", "message"),
    [
        ({}, "H100", None, None),
        ({}, "A100", 32768, None),  # A100 may be the 40 GB card: 3 sequences still fit
        ({}, None, 65536, "max_model_len 65536 is beyond the checkpoint's 32768"),
        # A card the planner does not know: only the context is checked.
        ({}, "T4", 65536, "max_model_len 65536 is beyond the checkpoint's 32768"),
        (BIG, "L40S", 4096, "on L40S (accelerator_type L40S): bf16 weights take 61."),
        (BIG, "A100", 4096, "on A100-40GB (accelerator_type A100): bf16 weights take 61."),
        (BIG, "H100", 4096, None),
        # Not a model the planner covers: vLLM judges it when the engine starts.
        ({"num_local_experts": 8}, "L40S", None, None),
    ],
)
def test_check_variant_reports_problems_when_checkpoint_readable_and_card_known(
    tmp_path: Path,
    overrides: dict[str, Any],
    accelerator_type: str | None,
    max_model_len: int | None,
    message: str | None,
) -> None:
    path = write_config(tmp_path, **overrides)
    problems = check_variant(
        str(path), accelerator_type, EngineSettings(max_model_len=max_model_len)
    )
    if message is None:
        assert problems == []
    else:
        assert len(problems) == 1 and message in problems[0], problems


def test_check_variant_reports_quantization_conflict_when_card_unknown(tmp_path: Path) -> None:
    config = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    path = str(write_config(tmp_path, quantization_config=config))
    problems = check_variant(path, None, EngineSettings(quantization="compressed-tensors"))
    assert problems == [
        (
            f"quantization compressed-tensors does not match the checkpoint {path} (quant_method "
            "gptq, int4 weights): vLLM reads the format from its config.json; leave quantization "
            "null or set auto_gptq or gptq or gptq_marlin"
        )
    ]
    assert check_variant(path, "H100", EngineSettings(quantization="gptq")) == []


def test_check_variant_judges_nothing_when_checkpoint_is_not_readable(tmp_path: Path) -> None:
    assert (
        check_variant(str(tmp_path / "absent"), "L40S", EngineSettings(max_model_len=10**6)) == []
    )


def test_gpu_table_holds_the_cards_the_issue_names_when_listed() -> None:
    whole = {"H200", "H100-80GB", "A100-80GB", "A100-40GB", "L40S", "RTX-6000-Ada"}
    mig = {"H100-80GB:1g.10gb", "H100-80GB:2g.20gb", "H100-80GB:3g.40gb", "H100-80GB:4g.40gb",
           "H100-80GB:7g.80gb", "H200:1g.18gb"}  # fmt: skip
    assert whole | mig <= set(GPUS)
    assert all(0 < gpu.memory_bytes < 150 * GIB for gpu in GPUS.values())
