"""Capacity arithmetic for serving a dense decoder (AMALIA-9B) on vLLM: memory, and what fits.

`amalia-serve plan`, the Serve config check and the chart's generated tables
(charts/amalia/files/capacity.yaml) all read their numbers from here. It reads a config.json at
most and imports neither Ray, torch nor vLLM.

Memory model of one vLLM 0.32 engine on one GPU (`Worker.determine_available_memory` in
vllm/v1/worker/gpu_worker.py): KV cache = total x gpu_memory_utilization - weights - peak
activations of a profiling forward pass and sampler run - memory outside torch (workspaces, NCCL)
- CUDA graphs. Weights and KV bytes per token follow from config.json exactly; the other three
terms are estimated together as the reserve (`Fit.reserve_bytes`), to be compared with vLLM's
"Available KV cache memory" log line on a GPU.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

GIB = 1 << 30
MIB = 1 << 20

WeightFormat = Literal["bf16", "fp8", "int8", "int4"]
WEIGHT_FORMATS: tuple[WeightFormat, ...] = get_args(WeightFormat)

# gpu_memory_utilization a variant's engine runs with when its block sets none: amalia-serve's
# EngineConfig default with the vLLM engine (0.9; vLLM 0.32's own default is 0.92).
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
# vLLM 0.32 defaults: CacheConfig's block size; SchedulerConfig's max_num_seqs and
# max_num_batched_tokens, which AsyncLLM.from_engine_args (usage context ENGINE_CONTEXT) keeps when
# the engine block sets none.
VLLM_BLOCK_SIZE = 16
VLLM_MAX_NUM_SEQS = 128
VLLM_MAX_NUM_BATCHED_TOKENS = 2048
# The largest max_num_seqs vLLM picks by itself (get_batch_defaults for H100/H200-class cards).
MAX_SUGGESTED_SEQS = 1024

# Estimated memory vLLM keeps out of the KV cache besides weights and activations: CUDA's view of a
# whole card is about 0.5 GiB below nvidia-smi's (H100 80GB: 79.65 GiB listed, 79.11-79.33 GiB in
# PyTorch's out-of-memory messages), plus about 0.5 GiB of non-torch workspaces and 0.5 GiB of CUDA
# graph pools. Applied to MIG slices too, though their `nvidia-smi mig -lgip` size is already close
# to CUDA's view.
RESERVE_FIXED_BYTES = 3 * GIB // 2
# Peak activations of the profiling forward pass, per batched token: the MLP's gate_up output (2 x
# intermediate) and its activated half (intermediate) alive together, plus about four hidden-sized
# buffers (residual, normed input, attention input and output), all 16-bit.
ACTIVATION_INTERMEDIATE_BUFFERS = 3
ACTIVATION_HIDDEN_BUFFERS = 4
# Peak of the profiling sampler run, per logit (max_num_seqs x vocab): fp32 logits plus about three
# vocabulary-sized fp32 working copies in top-k/top-p sampling.
SAMPLER_BYTES_PER_LOGIT = 16

# Weight formats vLLM keeps in memory. 8-bit: one byte per weight plus an fp32 scale per output
# channel (the compressed-tensors W8A8 layout; vLLM's online fp8_per_tensor keeps one per matrix, a
# few MiB less). int4: the W4A16 layout of GPTQ and compressed-tensors, half a byte per weight plus
# a 16-bit scale per group of input channels (AWQ's 4-bit zero points add half a byte per group: 30
# MiB for AMALIA). Embeddings, lm_head, norms and biases stay 16-bit in every format: vLLM quantizes
# only the linear layers of the decoder blocks.
SCALE_BYTES_8BIT = 4
SCALE_BYTES_INT4 = 2
DEFAULT_INT4_GROUP_SIZE = 128

# vLLM kv_cache_dtype values and their bytes per element ("auto" is the 16-bit model dtype).
KV_CACHE_DTYPE_BYTES = {
    "auto": 2,
    "bfloat16": 2,
    "float16": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
}

# vLLM `quantization` values that quantize a 16-bit checkpoint to fp8 while loading it. vLLM 0.32
# still takes `fp8` there too, but warns that it is deprecated for this and uses fp8_per_tensor
# (get_quant_config in vllm/model_executor/model_loader/weight_utils.py).
ONLINE_FP8_METHODS = frozenset({"fp8_per_tensor", "fp8_per_channel", "fp8_per_block"})
SUGGESTED_ONLINE_FP8 = "fp8_per_tensor"
# The `quant_method` a quantized checkpoint's config.json names -> the engine `quantization` values
# vLLM 0.32 starts it with (ModelConfig._verify_quantization: the method's override, or the same
# name; anything else is "Quantization method specified in the model config (...) does not match").
# vLLM's CPU build refuses awq_marlin (a GPU kernel) and accepts plain awq. tests/unit/serve/
# test_vllm_engine_args.py checks the table against vLLM's own check.
CHECKPOINT_QUANTIZATION = {
    "fp8": frozenset({"fp8"}),
    "compressed-tensors": frozenset({"compressed-tensors"}),
    "gptq": frozenset({"gptq", "gptq_marlin", "auto_gptq"}),
    "awq": frozenset({"awq", "awq_marlin", "auto_awq"}),
}
# vLLM `quantization` values that name the format of an already quantized checkpoint; vLLM reads the
# details from its config.json.
CHECKPOINT_METHODS = frozenset().union(*CHECKPOINT_QUANTIZATION.values())


class CapacityError(ValueError):
    """A checkpoint, card or engine setting the planner cannot work with; the message says why."""


# --- the model
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in a dense decoder's config.json, and how its weights are stored."""

    name: str
    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    checkpoint_format: WeightFormat
    # Input channels that share one int4 scale; None: one scale per output channel.
    int4_group_size: int | None = DEFAULT_INT4_GROUP_SIZE
    # The checkpoint's own quantization_config.quant_method; None for a 16-bit checkpoint, and for a
    # built-in quantized preset, which stands for any method.
    quant_method: str | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], name: str) -> ModelShape:
        """Read a Hugging Face config.json of a dense decoder (Llama, Mistral, Qwen2 layout)."""
        moe = [
            key for key in ("num_local_experts", "num_experts", "n_routed_experts") if key in config
        ]
        if moe or "kv_lora_rank" in config:
            raise CapacityError(
                f"{name}: the planner covers dense decoders; {moe or 'MLA'} is not one"
            )
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            quantization = config.get("quantization_config") or None
            fmt, group = _stored_format(quantization, name)
            return cls(
                name=name,
                architecture=str((config.get("architectures") or ["?"])[0]),
                num_layers=int(config["num_hidden_layers"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab_size=int(config["vocab_size"]),
                max_context=_max_context(config),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=bool(config.get("attention_bias", False)),
                mlp_bias=bool(config.get("mlp_bias", False)),
                checkpoint_format=fmt,
                int4_group_size=group,
                quant_method=quantization and str(quantization.get("quant_method")),
            )
        except KeyError as exc:
            raise CapacityError(f"{name}: config.json lacks {exc.args[0]!r}") from None

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(input, output) features of a decoder block's linears: q, k, v, o, gate, up, down."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def linear_params(self) -> int:
        return self.num_layers * sum(i * o for i, o in self.linear_shapes())

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def sixteen_bit_params(self) -> int:
        """Parameters no weight format quantizes: embeddings, lm_head, norms, biases."""
        shapes = self.linear_shapes()
        biases = 0
        if self.attention_bias:  # q, k, v, o
            biases += sum(o for _, o in shapes[:4])
        if self.mlp_bias:  # gate, up, down
            biases += sum(o for _, o in shapes[4:])
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return self.embedding_params + self.lm_head_params + norms + self.num_layers * biases

    @property
    def params(self) -> int:
        return self.linear_params + self.sixteen_bit_params

    def weight_bytes(self, fmt: WeightFormat) -> int:
        """Bytes of the weights in GPU memory when stored in `fmt`."""
        rest = 2 * self.sixteen_bit_params
        if fmt == "bf16":
            return 2 * self.linear_params + rest
        if fmt in ("fp8", "int8"):
            channels = self.num_layers * sum(o for _, o in self.linear_shapes())
            return self.linear_params + SCALE_BYTES_8BIT * channels + rest
        group = self.int4_group_size
        groups = self.num_layers * sum(
            o * (math.ceil(i / group) if group else 1) for i, o in self.linear_shapes()
        )
        return self.linear_params // 2 + SCALE_BYTES_INT4 * groups + rest

    def kv_bytes_per_token(
        self, kv_cache_dtype: str = "auto", tensor_parallel_size: int = 1
    ) -> int:
        """K and V of every layer for one token on one GPU (tensor parallelism splits KV heads)."""
        kv_heads = math.ceil(self.num_kv_heads / tensor_parallel_size)
        return 2 * self.num_layers * kv_heads * self.head_dim * kv_dtype_bytes(kv_cache_dtype)

    @property
    def activation_bytes_per_batched_token(self) -> int:
        i, h = self.intermediate_size, self.hidden_size
        return 2 * (ACTIVATION_INTERMEDIATE_BUFFERS * i + ACTIVATION_HIDDEN_BUFFERS * h)

    @property
    def sampler_bytes_per_sequence(self) -> int:
        return self.vocab_size * SAMPLER_BYTES_PER_LOGIT

    def activation_bytes(self, max_num_batched_tokens: int, max_num_seqs: int) -> int:
        """Estimated activation peak of vLLM's profiling run: its forward pass or its sampler."""
        return max(
            max_num_batched_tokens * self.activation_bytes_per_batched_token,
            max_num_seqs * self.sampler_bytes_per_sequence,
        )


def kv_dtype_bytes(kv_cache_dtype: str) -> int:
    if kv_cache_dtype not in KV_CACHE_DTYPE_BYTES:
        raise CapacityError(
            f"kv_cache_dtype {kv_cache_dtype!r}: the planner knows {sorted(KV_CACHE_DTYPE_BYTES)}"
        )
    return KV_CACHE_DTYPE_BYTES[kv_cache_dtype]


def _max_context(config: Mapping[str, Any]) -> int:
    """The longest max_model_len vLLM accepts: max_position_embeddings, times the rope_scaling
    factor for the types vLLM stretches (llama3 scaling already states the longer length)."""
    length = int(config["max_position_embeddings"])
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) in ("linear", "dynamic", "yarn"):
        length = int(length * float(scaling.get("factor", 1.0)))
    return length


def _stored_format(
    quantization: Mapping[str, Any] | None, name: str
) -> tuple[WeightFormat, int | None]:
    """The weight format (and int4 group size) a checkpoint's quantization_config describes."""
    if not quantization:
        return "bf16", DEFAULT_INT4_GROUP_SIZE
    method = quantization.get("quant_method")
    bits, kind = quantization.get("bits"), "int"
    group = _group_size(quantization.get("group_size"))
    if method == "fp8":
        bits, kind = 8, "float"
    elif method == "compressed-tensors":
        # What llm-compressor writes (docs/quantization.md): one config group for the Linear
        # layers, its weights' bits, type and strategy ("group" with group_size, or "channel").
        groups: Mapping[str, Mapping[str, Any]] = quantization.get("config_groups") or {}
        weights: Mapping[str, Any] = next(iter(groups.values()), {}).get("weights") or {}
        bits, kind = weights.get("num_bits"), weights.get("type", "int")
        per_channel = weights.get("strategy") == "channel"
        group = None if per_channel else _group_size(weights.get("group_size"))
    elif method not in CHECKPOINT_QUANTIZATION:
        raise CapacityError(
            f"{name}: quant_method {method!r} is not one the planner knows "
            f"({', '.join(sorted(CHECKPOINT_QUANTIZATION))})"
        )
    formats: dict[tuple[Any, str], WeightFormat] = {
        (8, "float"): "fp8",
        (8, "int"): "int8",
        (4, "int"): "int4",
    }
    if (bits, kind) not in formats:
        raise CapacityError(f"{name}: {bits}-bit {kind} weights are not a format the planner knows")
    return formats[(bits, kind)], group


def _group_size(value: Any) -> int | None:
    """A config.json group_size: -1 (GPTQ, AWQ) means one scale per output channel; absent, the
    common 128."""
    if value is None:
        return DEFAULT_INT4_GROUP_SIZE
    return None if int(value) <= 0 else int(value)


# AMALIA-9B as its model card and the EuroLLM-9B architecture it shares describe it. Assumed where
# no AMALIA config.json was at hand: untied embeddings (EuroLLM-9B's "tied embeddings: no"; its
# published 9.154B parameters need a separate lm_head) and bfloat16 weights.
AMALIA_9B_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "num_hidden_layers": 42,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128000,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
BASE_PRESET = "amalia-9b"


def preset_name(fmt: WeightFormat, base: str = BASE_PRESET) -> str:
    """The built-in checkpoint name of AMALIA stored in `fmt`: amalia-9b, amalia-9b-fp8, ..."""
    return base if fmt == "bf16" else f"{base}-{fmt}"


# Built-in checkpoints: the 16-bit release and the quantized checkpoints made from it offline.
PRESETS: dict[str, ModelShape] = {
    preset_name(fmt): replace(
        ModelShape.from_config(AMALIA_9B_CONFIG, preset_name(fmt)), checkpoint_format=fmt
    )
    for fmt in WEIGHT_FORMATS
}


def load_model(spec: str) -> ModelShape:
    """A built-in checkpoint by name, or the config.json at a path (the file or its directory)."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise CapacityError(
            f"{spec!r} is neither a built-in checkpoint ({', '.join(PRESETS)}) "
            "nor a checkpoint directory or config.json"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CapacityError(f"{config_file}: {exc}") from None
    return ModelShape.from_config(config, name=str(path))


# --- the cards
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gpu:
    """A card or MIG slice: memory as nvidia-smi lists it, compute capability for the kernels."""

    name: str
    memory_mib: int
    compute_capability: tuple[int, int] | None

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB

    @property
    def memory_gib(self) -> float:
        return self.memory_mib / 1024

    @property
    def compute_capability_text(self) -> str:
        cc = self.compute_capability
        return "unknown" if cc is None else f"{cc[0]}.{cc[1]}"

    def support(self, fmt: WeightFormat) -> str:
        """How vLLM runs `fmt` here (its quantization hardware table). Every card in GPUS is Ampere
        or newer, where bf16, int8 (W8A8) and int4 (W4A16, Marlin) run natively."""
        if self.compute_capability is None:
            return "unknown"
        if fmt == "fp8" and self.compute_capability < (8, 9):
            # FP8 tensor cores arrived with Ada and Hopper; Ampere dequantizes with FP8 Marlin
            # (W8A16).
            return "weight-only"
        return "native"


HOPPER, ADA, AMPERE = (9, 0), (8, 9), (8, 0)
# Whole cards: the "Total" MiB nvidia-smi lists.
CARDS = (
    Gpu("H200", 143771, HOPPER),
    Gpu("H100-80GB", 81559, HOPPER),
    Gpu("A100-80GB", 81920, AMPERE),
    Gpu("A100-40GB", 40960, AMPERE),
    Gpu("L40S", 46068, ADA),
    Gpu("RTX-6000-Ada", 49140, ADA),
)
# MIG slices: the GiB `nvidia-smi mig -lgip` lists (H100 80GB HBM3 with 132 SMs, A100-SXM4-80GB);
# the H200's 1g.18gb shows 16.00 GiB. Its other profiles' memory was not confirmed, so they are left
# out.
MIG_GIB = {
    "H100-80GB": {"1g.10gb": 9.75, "1g.20gb": 19.62, "2g.20gb": 19.62, "3g.40gb": 39.50,
                  "4g.40gb": 39.50, "7g.80gb": 79.25},
    "A100-80GB": {"1g.10gb": 9.50, "1g.20gb": 19.50, "2g.20gb": 19.50, "3g.40gb": 39.25,
                  "4g.40gb": 39.25, "7g.80gb": 79.00},
    "H200": {"1g.18gb": 16.00},
}  # fmt: skip
GPUS: dict[str, Gpu] = {card.name: card for card in CARDS} | {
    f"{card.name}:{profile}": Gpu(
        f"{card.name}:{profile}", int(gib * 1024), card.compute_capability
    )
    for card in CARDS
    for profile, gib in MIG_GIB.get(card.name, {}).items()
}

# Ray's accelerator_type of a node (its GPU name shortened, ray/_private/accelerators/nvidia_gpu.py)
# -> the smallest card it can mean. Ray names a MIG slice after its parent card, and "RTX-6000" also
# matches the 24 GB Quadro RTX 6000, so neither is mapped.
RAY_ACCELERATOR_TYPES = {
    "H200": "H200",
    "H100": "H100-80GB",
    "A100": "A100-40GB",
    "A100-40G": "A100-40GB",
    "A100-80G": "A100-80GB",
    "L40S": "L40S",
}


def find_gpu(name: str) -> Gpu:
    """A card or slice by table name, case-insensitive; a bare MIG profile if one card offers it."""
    wanted = name.strip().lower()
    matches = [
        gpu for key, gpu in GPUS.items() if wanted in (key.lower(), key.lower().partition(":")[2])
    ]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(GPUS)
    if matches:
        raise CapacityError(
            f"{name!r} is a MIG profile of several cards; say which: "
            f"{', '.join(g.name for g in matches)}"
        )
    raise CapacityError(f"unknown GPU {name!r}; known: {known} (or give --gpu-memory-gib)")


def gpu_of_size(gib: float) -> Gpu:
    if gib <= 0:
        raise CapacityError(f"GPU memory must be > 0 GiB, got {gib}")
    return Gpu(f"{gib:g} GiB GPU", int(gib * 1024), None)


def mig_profile(resource_name: str) -> str | None:
    """`3g.40gb` for the Kubernetes resource `nvidia.com/mig-3g.40gb`; None for a whole card."""
    prefix = "nvidia.com/mig-"
    return resource_name[len(prefix) :] if resource_name.startswith(prefix) else None


# --- fitting an engine block onto a card
# ----------------------------------------------------------------


@dataclass(frozen=True)
class EngineSettings:
    """The vLLM engine arguments capacity depends on; None means vLLM's own default."""

    max_model_len: int | None = None
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    tensor_parallel_size: int = 1
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None


def quantization_conflict(model: ModelShape, quantization: str | None) -> str | None:
    """Why vLLM cannot serve this checkpoint with the engine's `quantization`: a value the
    checkpoint's config.json contradicts. None when they agree, and for a method the planner does
    not know on a 16-bit checkpoint (torchao, modelopt: vLLM judges those)."""
    stored = model.checkpoint_format
    if quantization is None:
        return None
    if stored == "bf16":
        if quantization in CHECKPOINT_METHODS - {"fp8"}:
            return (
                f"quantization {quantization} reads an already quantized checkpoint; "
                f"{model.name} has no quantization_config"
            )
        return None  # quantized while loading; vLLM 0.32 takes `fp8` as fp8_per_tensor here
    if quantization in ONLINE_FP8_METHODS or (quantization == "fp8" and stored != "fp8"):
        return (
            f"quantization {quantization} quantizes a 16-bit checkpoint while loading it; "
            f"{model.name} is already {stored}"
        )
    accepted = CHECKPOINT_QUANTIZATION.get(model.quant_method or "")
    if accepted is None or quantization in accepted:
        return None  # a built-in preset stands for any method that stores its format
    return (
        f"quantization {quantization} does not match the checkpoint {model.name} (quant_method "
        f"{model.quant_method}, {stored} weights): vLLM reads the format from its config.json; "
        f"leave quantization null or set {' or '.join(sorted(accepted))}"
    )


def weights_in_memory(model: ModelShape, quantization: str | None) -> WeightFormat:
    """The format vLLM keeps the weights in, for an engine's `quantization` over this checkpoint."""
    conflict = quantization_conflict(model, quantization)
    if conflict:
        raise CapacityError(conflict)
    if quantization is None or quantization in CHECKPOINT_METHODS - {"fp8"}:
        return model.checkpoint_format
    if quantization in ONLINE_FP8_METHODS or quantization == "fp8":
        return "fp8"
    raise CapacityError(
        f"quantization {quantization!r}: the planner knows "
        f"{', '.join(sorted(ONLINE_FP8_METHODS | CHECKPOINT_METHODS))}"
    )


def engine_quantization(model: ModelShape, fmt: WeightFormat) -> str | None:
    """The engine `quantization` that serves `fmt`, or None when the checkpoint is already in `fmt`.

    Raises when `fmt` needs a checkpoint quantized offline (int8, int4; fp8 from a quantized one).
    """
    if fmt == model.checkpoint_format:
        return None
    if fmt == "fp8" and model.checkpoint_format == "bf16":
        return SUGGESTED_ONLINE_FP8
    raise CapacityError(
        f"{fmt} weights need a checkpoint quantized offline; {model.name} is "
        f"{model.checkpoint_format}"
    )


@dataclass(frozen=True)
class Fit:
    """One engine block on one card: where the memory goes and what the KV cache then holds."""

    model: ModelShape
    gpu: Gpu
    weights: WeightFormat
    kv_cache_dtype: str
    max_model_len: int
    gpu_memory_utilization: float
    tensor_parallel_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    budget_bytes: int  # memory x gpu_memory_utilization
    weight_bytes: int  # on this GPU
    reserve_bytes: int  # activations + RESERVE_FIXED_BYTES
    kv_bytes_per_token: int  # on this GPU
    kv_cache_bytes: int  # budget - weights - reserve; negative when the weights alone overflow
    kv_tokens: int  # whole vLLM blocks
    problems: tuple[str, ...]

    @property
    def blocks_per_sequence(self) -> int:
        return math.ceil(self.max_model_len / VLLM_BLOCK_SIZE)

    @property
    def max_sequences(self) -> int:
        """Sequences that hold max_model_len tokens each at once (vLLM's "maximum concurrency")."""
        return self.kv_tokens // (self.blocks_per_sequence * VLLM_BLOCK_SIZE)

    @property
    def concurrency(self) -> int:
        """Full-context conversations one replica serves at once: what the KV cache holds, capped by
        max_num_seqs."""
        return min(self.max_sequences, self.max_num_seqs)

    @property
    def fits(self) -> bool:
        return not self.problems

    def replicas_for(self, users: int) -> int:
        """Replicas (of tensor_parallel_size GPUs) for `users` full-context conversations."""
        return math.ceil(users / self.concurrency) if self.concurrency else 0


def context_problem(model: ModelShape, max_model_len: int) -> str | None:
    if max_model_len <= model.max_context:
        return None
    limit = model.max_context
    return f"max_model_len {max_model_len} is beyond the checkpoint's {limit} ({model.name})"


def fit(model: ModelShape, gpu: Gpu, settings: EngineSettings) -> Fit:
    """How an engine block uses a card; `problems` say why vLLM would refuse to start with it."""
    tp = settings.tensor_parallel_size
    weights = weights_in_memory(model, settings.quantization)
    max_len = settings.max_model_len or model.max_context
    seqs = settings.max_num_seqs or VLLM_MAX_NUM_SEQS
    batched = settings.max_num_batched_tokens or VLLM_MAX_NUM_BATCHED_TOKENS
    budget = int(gpu.memory_bytes * settings.gpu_memory_utilization)
    weight_bytes = math.ceil(model.weight_bytes(weights) / tp)
    reserve = RESERVE_FIXED_BYTES + model.activation_bytes(batched, seqs)
    per_token = model.kv_bytes_per_token(settings.kv_cache_dtype, tp)
    kv_cache = budget - weight_bytes - reserve
    kv_tokens = max(0, kv_cache) // (VLLM_BLOCK_SIZE * per_token) * VLLM_BLOCK_SIZE
    problems = [p for p in [context_problem(model, max_len)] if p]
    if model.num_heads % tp:
        problems.append(
            f"tensor_parallel_size {tp} does not divide {model.num_heads} attention heads"
        )
    if weight_bytes > budget:
        problems.append(
            f"{weights} weights take {gib(weight_bytes)} GiB per GPU, more than the "
            f"{gib(budget)} GiB vLLM may use ({_budget_words(gpu, settings)})"
        )
    elif kv_tokens < max_len:
        need = (
            weight_bytes
            + reserve
            + math.ceil(max_len / VLLM_BLOCK_SIZE) * VLLM_BLOCK_SIZE * per_token
        )
        problems.append(
            f"one {max_len}-token sequence does not fit: {weights} weights {gib(weight_bytes)} GiB "
            f"+ reserve {gib(reserve)} GiB + its KV cache {gib(need - weight_bytes - reserve)} "
            f"GiB = {gib(need)} GiB > {gib(budget)} GiB "
            f"({_budget_words(gpu, settings)})"
        )
    return Fit(
        model=model,
        gpu=gpu,
        weights=weights,
        kv_cache_dtype=settings.kv_cache_dtype,
        max_model_len=max_len,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        tensor_parallel_size=tp,
        max_num_seqs=seqs,
        max_num_batched_tokens=batched,
        budget_bytes=budget,
        weight_bytes=weight_bytes,
        reserve_bytes=reserve,
        kv_bytes_per_token=per_token,
        kv_cache_bytes=kv_cache,
        kv_tokens=kv_tokens,
        problems=tuple(problems),
    )


def suggested_batched_tokens(gpu: Gpu) -> int:
    """vLLM's own rule for its OpenAI server (EngineArgs.get_batch_defaults): 8192 prefill tokens
    per step on cards of 70 GiB or more except A100s, 2048 elsewhere."""
    return 8192 if gpu.memory_gib >= 70 and "A100" not in gpu.name else 2048


def suggest(model: ModelShape, gpu: Gpu, settings: EngineSettings) -> Fit:
    """The engine block for `settings` with max_num_seqs (unless given) set to the full-context
    sequences the KV cache holds, and max_num_batched_tokens (unless given) by vLLM's rule."""
    settings = replace(
        settings,
        max_num_batched_tokens=settings.max_num_batched_tokens or suggested_batched_tokens(gpu),
    )
    if settings.max_num_seqs is not None:
        return fit(model, gpu, settings)
    # The sampler's reserve grows with max_num_seqs and shrinks the KV cache, so the sequences that
    # fit fall as max_num_seqs rises: find the largest max_num_seqs that the KV cache still holds.
    low, high = 1, MAX_SUGGESTED_SEQS
    while low < high:
        mid = (low + high + 1) // 2
        if fit(model, gpu, replace(settings, max_num_seqs=mid)).max_sequences >= mid:
            low = mid
        else:
            high = mid - 1
    return fit(model, gpu, replace(settings, max_num_seqs=low))


def check_variant(
    model_path: str, accelerator_type: str | None, settings: EngineSettings
) -> list[str]:
    """Why a variant's engine block cannot start, for the Serve config's validation.

    Judged only when its checkpoint's config.json is readable where the config is parsed (a local
    run, not the Ray head of a cluster, which does not mount the models) and describes a model the
    planner covers; the card comes from Ray's accelerator_type, where Ray places the replica.
    Without a card only max_model_len and `quantization` are checked against the checkpoint.
    """
    if not (Path(model_path) / "config.json").is_file():
        return []
    try:
        model = load_model(model_path)
    except CapacityError:
        # A model the planner does not cover is vLLM's to judge when the engine starts.
        return []
    # vLLM refuses a contradicting `quantization` too, but only in the replica as its engine
    # starts, after the deploy was accepted.
    conflict = quantization_conflict(model, settings.quantization)
    if conflict:
        return [conflict]
    card = RAY_ACCELERATOR_TYPES.get(accelerator_type or "")
    if card is not None:
        try:
            problems = fit(model, GPUS[card], settings).problems
            return [f"on {card} (accelerator_type {accelerator_type}): {p}" for p in problems]
        except CapacityError:
            pass  # a method the planner does not size (torchao, modelopt): vLLM's to judge
    problem = context_problem(model, settings.max_model_len or model.max_context)
    return [problem] if problem else []


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _budget_words(gpu: Gpu, settings: EngineSettings) -> str:
    utilization = settings.gpu_memory_utilization
    return f"gpu_memory_utilization {utilization:g} x {gib(gpu.memory_bytes)} GiB {gpu.name}"
