"""`amalia-serve plan`: the capacity arithmetic of `amalia_serve.capacity` as a table, JSON, and the
engine block and chart values to paste; also the chart's generated capacity tables.

Like the arithmetic it renders, it imports neither Ray, torch nor vLLM.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Any

import yaml

from amalia_serve.capacity import (
    CHECKPOINT_METHODS,
    DEFAULT_GPU_MEMORY_UTILIZATION,
    GPUS,
    KV_CACHE_DTYPE_BYTES,
    ONLINE_FP8_METHODS,
    PRESETS,
    RESERVE_FIXED_BYTES,
    VLLM_MAX_NUM_BATCHED_TOKENS,
    VLLM_MAX_NUM_SEQS,
    WEIGHT_FORMATS,
    CapacityError,
    EngineSettings,
    Fit,
    Gpu,
    ModelShape,
    WeightFormat,
    engine_quantization,
    find_gpu,
    gib,
    gpu_of_size,
    load_model,
    preset_name,
    suggest,
)

# The chart's default variant and worker group, so the values printed are complete list entries.
CHART_VARIANT = {"name": "amalia-sft", "modelPath": "/models/AMALIA-9B-SFT"}
CHART_WORKER_GROUP = "gpu"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=preset_name("bf16"),
        help=f"checkpoint directory, its config.json, or a built-in one ({', '.join(PRESETS)})",
    )
    card = parser.add_mutually_exclusive_group()
    card.add_argument(
        "--gpu", help=f"card or MIG slice ({', '.join(GPUS)}); omit to compare them all"
    )
    card.add_argument(
        "--gpu-memory-gib", type=float, help="a card given by its memory size instead"
    )
    parser.add_argument(
        "--context",
        type=int,
        help="tokens per conversation = max_model_len (default: the checkpoint's maximum)",
    )
    parser.add_argument(
        "--quantization",
        "--dtype",
        choices=WEIGHT_FORMATS,
        dest="weights",
        help="weights in GPU memory (default: as the checkpoint stores them)",
    )
    parser.add_argument("--kv-cache-dtype", default="auto", choices=sorted(KV_CACHE_DTYPE_BYTES))
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=DEFAULT_GPU_MEMORY_UTILIZATION
    )
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--users", type=int, help="conversations at full context at the same time")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def run(args: argparse.Namespace) -> int:
    """The `plan` subcommand: print the report; a bad input is one line on stderr, status 1."""
    try:
        report = build_report(args)
    except CapacityError as exc:
        raise SystemExit(f"amalia-serve plan: {exc}") from None
    print(json.dumps(report, indent=2) if args.json else render_text(report))
    return 0


def plan_text(argv: list[str]) -> str:
    """The text `amalia-serve plan ARGV` prints (docs/capacity.md quotes it)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return render_text(build_report(parser.parse_args(argv)))


# --- the report as data (what --json prints)
# ------------------------------------------------------------


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    model = load_model(args.config)
    if args.users is not None and args.users < 1:
        raise CapacityError(f"--users must be >= 1, got {args.users}")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise CapacityError(
            f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}"
        )
    weights: WeightFormat = args.weights or model.checkpoint_format
    settings = EngineSettings(
        max_model_len=args.context,
        kv_cache_dtype=args.kv_cache_dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    report: dict[str, Any] = {
        "model": model_facts(model),
        "settings": {
            "weights": weights,
            "kv_cache_dtype": args.kv_cache_dtype,
            "max_model_len": args.context or model.max_context,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "tensor_parallel_size": args.tensor_parallel_size,
            "users": args.users,
        },
    }
    if args.gpu is None and args.gpu_memory_gib is None:
        report["cards"] = [
            card_fit(model, gpu, weights, settings, args.users) for gpu in GPUS.values()
        ]
        return report
    gpu = find_gpu(args.gpu) if args.gpu is not None else gpu_of_size(args.gpu_memory_gib)
    report["gpu"] = gpu_facts(gpu)
    report["choices"] = [
        {
            "weights": fmt,
            "how": how_to_serve(model, fmt),
            "support": gpu.support(fmt),
            **{
                f"sequences_kv_{kv}": plan_fit(
                    model, gpu, fmt, replace(settings, kv_cache_dtype=kv)
                ).max_sequences
                for kv in ("auto", "fp8")
            },
        }
        for fmt in WEIGHT_FORMATS
    ]
    report["plan"] = card_fit(model, gpu, weights, settings, args.users)
    return report


def model_facts(model: ModelShape) -> dict[str, Any]:
    return {
        "name": model.name,
        "architecture": model.architecture,
        "layers": model.num_layers,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.intermediate_size,
        "attention_heads": model.num_heads,
        "kv_heads": model.num_kv_heads,
        "head_dim": model.head_dim,
        "vocab_size": model.vocab_size,
        "max_context": model.max_context,
        "tie_word_embeddings": model.tie_word_embeddings,
        "stored_as": model.checkpoint_format,
        "params": model.params,
        "params_decoder_linear": model.linear_params,
        "params_embeddings": model.embedding_params,
        "params_lm_head": model.lm_head_params,
        "params_other_16bit": model.sixteen_bit_params
        - model.embedding_params
        - model.lm_head_params,
        "weight_bytes": {fmt: model.weight_bytes(fmt) for fmt in WEIGHT_FORMATS},
        "kv_bytes_per_token": {kv: model.kv_bytes_per_token(kv) for kv in ("auto", "fp8")},
    }


def gpu_facts(gpu: Gpu) -> dict[str, Any]:
    return {
        "name": gpu.name,
        "memory_bytes": gpu.memory_bytes,
        "compute_capability": gpu.compute_capability_text,
        "support": {fmt: gpu.support(fmt) for fmt in WEIGHT_FORMATS},
    }


def how_to_serve(model: ModelShape, fmt: WeightFormat) -> str:
    """How an engine gets `fmt` weights from this checkpoint: `quantization` or a new one."""
    try:
        method = engine_quantization(model, fmt)
    except CapacityError:
        return f"checkpoint quantized offline to {fmt}"
    return "as stored" if method is None else f"quantization: {method}"


def plan_fit(model: ModelShape, gpu: Gpu, fmt: WeightFormat, settings: EngineSettings) -> Fit:
    """`suggest` for `fmt` weights: quantized while loading where vLLM can, else made offline."""
    try:
        method = engine_quantization(model, fmt)
    except CapacityError:
        model, method = replace(model, checkpoint_format=fmt, quant_method=None), None
    return suggest(model, gpu, replace(settings, quantization=method))


def card_fit(
    model: ModelShape, gpu: Gpu, fmt: WeightFormat, settings: EngineSettings, users: int | None
) -> dict[str, Any]:
    result = plan_fit(model, gpu, fmt, settings)
    replicas = result.replicas_for(users) if users and result.fits else None
    return {
        "gpu": gpu_facts(gpu),
        "how": how_to_serve(model, fmt),
        "fits": result.fits,
        "problems": list(result.problems),
        "budget_bytes": result.budget_bytes,
        "weight_bytes": result.weight_bytes,
        "reserve_bytes": result.reserve_bytes,
        "kv_cache_bytes": result.kv_cache_bytes,
        "kv_bytes_per_token": result.kv_bytes_per_token,
        "kv_tokens": result.kv_tokens,
        "max_sequences": result.max_sequences,
        "concurrency": result.concurrency,
        "replicas": replicas,
        "gpus": None if replicas is None else replicas * result.tensor_parallel_size,
        "engine": engine_block(result),
        "chart_values": chart_values(model, result, replicas),
    }


def engine_block(result: Fit) -> dict[str, Any]:
    """The variant's `engine:` (vLLM engine arguments) for this fit."""
    block: dict[str, Any] = {
        "max_model_len": result.max_model_len,
        "max_num_seqs": result.max_num_seqs,
        "max_num_batched_tokens": result.max_num_batched_tokens,
        "gpu_memory_utilization": result.gpu_memory_utilization,
        "quantization": engine_quantization(result.model, result.weights),
        "kv_cache_dtype": result.kv_cache_dtype,
    }
    if result.tensor_parallel_size > 1:
        block["tensor_parallel_size"] = result.tensor_parallel_size
    return block


def chart_values(model: ModelShape, result: Fit, replicas: int | None) -> dict[str, Any]:
    """A variant and a worker group of charts/amalia values that serve this fit."""
    variant: dict[str, Any] = {**CHART_VARIANT}
    # The install-time check knows built-in checkpoints by name (charts/amalia/files/capacity.yaml)
    # and skips a `custom` one, which only the Serve config can check (it reads config.json).
    builtin = model.name in PRESETS
    variant["checkpoint"] = preset_name(result.model.checkpoint_format) if builtin else "custom"
    variant["gpus"] = result.tensor_parallel_size
    variant["replicas"] = replicas or 1
    variant["engine"] = engine_block(result)
    card, _, profile = result.gpu.name.partition(":")
    group: dict[str, Any] = {"name": CHART_WORKER_GROUP}
    if result.gpu.compute_capability is not None:
        group["gpu"] = card
    group["gpuResourceName"] = f"nvidia.com/mig-{profile}" if profile else "nvidia.com/gpu"
    group["gpusPerWorker"] = result.tensor_parallel_size
    group["minReplicas"] = 1
    group["maxReplicas"] = replicas or 1
    return {"variants": [variant], "workerGroups": [group]}


# --- the report as text
# ---------------------------------------------------------------------------------


def render_text(report: dict[str, Any]) -> str:
    lines = [*model_lines(report["model"]), settings_line(report["settings"]), ""]
    if "cards" in report:
        return "\n".join(lines + cards_table(report["cards"], report["settings"]))
    g = report["gpu"]
    lines.append(
        f"Card {g['name']}: {gib(g['memory_bytes'])} GiB, "
        f"compute capability {g['compute_capability']}"
    )
    rows = [
        [c["weights"], c["how"], c["support"], c["sequences_kv_auto"], c["sequences_kv_fp8"]]
        for c in report["choices"]
    ]
    lines += ["", *table(["weights", "how", "on this card", "seqs kv auto", "seqs kv fp8"], rows)]
    return "\n".join([*lines, "", *plan_lines(report["plan"], report["settings"])])


def model_lines(m: dict[str, Any]) -> list[str]:
    shape = (
        f"{m['layers']} layers, hidden {m['hidden_size']}, intermediate {m['intermediate_size']}, "
        f"{m['attention_heads']} heads / {m['kv_heads']} KV heads x {m['head_dim']}, "
        f"vocab {m['vocab_size']}"
    )
    params = (
        f"decoder linear layers {m['params_decoder_linear']:,} "
        f"+ embeddings {m['params_embeddings']:,} "
        f"+ lm_head {m['params_lm_head']:,} + norms and biases {m['params_other_16bit']:,}"
    )
    weights = ", ".join(f"{fmt} {gib(b)} GiB" for fmt, b in m["weight_bytes"].items())
    kv = ", ".join(f"{dtype} {b / 1024:.1f} KiB" for dtype, b in m["kv_bytes_per_token"].items())
    return [
        (
            f"Checkpoint {m['name']}: {m['architecture']}, {shape}; "
            f"max context {m['max_context']}, "
            f"stored {m['stored_as']}"
        ),
        f"Parameters {m['params']:,} = {params}",
        f"Weights in GPU memory: {weights}",
        f"KV cache per token: {kv}",
    ]


def settings_line(s: dict[str, Any]) -> str:
    users = f", {s['users']} users" if s["users"] else ""
    return (
        f"Settings: {s['weights']} weights, kv_cache_dtype {s['kv_cache_dtype']}, context "
        f"{s['max_model_len']} tokens, gpu_memory_utilization {s['gpu_memory_utilization']:g}, "
        f"tensor_parallel_size {s['tensor_parallel_size']}{users}"
    )


def plan_lines(plan: dict[str, Any], s: dict[str, Any]) -> list[str]:
    reserve_why = f"estimated: profiling activations + {gib(RESERVE_FIXED_BYTES)} GiB fixed"
    kv_cache = gib(max(0, plan["kv_cache_bytes"]))
    lines = [
        (
            f"Plan: {s['weights']} weights, kv_cache_dtype {s['kv_cache_dtype']}, "
            f"max_model_len {s['max_model_len']}"
        ),
        f"  vLLM may use  {gib(plan['budget_bytes']):>7} GiB  (gpu_memory_utilization x memory)",
        f"  weights       {gib(plan['weight_bytes']):>7} GiB",
        f"  reserve       {gib(plan['reserve_bytes']):>7} GiB  ({reserve_why})",
        f"  KV cache      {kv_cache:>7} GiB  = {plan['kv_tokens']:,} tokens",
        (
            f"  full {s['max_model_len']}-token conversations at once: "
            f"{plan['concurrency']} per replica "
            f"(the KV cache holds {plan['max_sequences']})"
        ),
    ]
    if not plan["fits"]:
        return [*lines, "", "Does not fit:", *(f"  - {p}" for p in plan["problems"])]
    if plan["replicas"] is not None:
        lines.append(f"  for {s['users']} users: {plan['replicas']} replicas = {plan['gpus']} GPUs")
    return [
        *lines,
        "",
        "Engine block (`engine:` of the variant's Serve config args):",
        dump_yaml({"engine": plan["engine"]}),
        "",
        "Chart values (charts/amalia):",
        dump_yaml(plan["chart_values"]),
    ]


def dump_yaml(data: dict[str, Any]) -> str:
    text: str = yaml.safe_dump(data, sort_keys=False, width=100)
    return text.rstrip()


def cards_table(cards: list[dict[str, Any]], s: dict[str, Any]) -> list[str]:
    rows = []
    for c in cards:
        g = c["gpu"]
        rows.append(
            [
                g["name"],
                gib(g["memory_bytes"]),
                g["support"][s["weights"]],
                c["concurrency"] if c["fits"] else "does not fit",
                "-" if c["replicas"] is None else c["replicas"],
                "-" if c["gpus"] is None else c["gpus"],
            ]
        )
    users = f" for {s['users']} users" if s["users"] else ""
    header = [
        "card",
        "GiB",
        f"{s['weights']} runs",
        f"conversations @{s['max_model_len']}",
        f"replicas{users}",
        "GPUs",
    ]
    return [
        *table(header, rows),
        "",
        "`--gpu NAME` prints the engine block and chart values for one card.",
    ]


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [header, *[[str(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]


# --- charts/amalia/files/capacity.yaml
# ------------------------------------------------------------------


def chart_capacity_yaml() -> str:
    """The tables templates/_capacity.tpl checks variants with (`make manifests` writes them)."""
    checkpoints = {}
    for name, model in PRESETS.items():
        formats = (
            ("bf16", "fp8") if model.checkpoint_format == "bf16" else (model.checkpoint_format,)
        )
        checkpoints[name] = {
            "maxModelLen": model.max_context,
            "storedAs": model.checkpoint_format,
            # By weight format in memory: as stored, or fp8 quantized while loading a 16-bit
            # checkpoint.
            "weightBytes": {fmt: model.weight_bytes(fmt) for fmt in formats},
            "kvBytesPerToken": {kv: model.kv_bytes_per_token(kv) for kv in ("auto", "fp8")},
            # Tensor parallelism splits the KV heads: ceil(kvHeads / tensor_parallel_size) per GPU.
            "kvHeads": model.num_kv_heads,
            "activationBytesPerBatchedToken": model.activation_bytes_per_batched_token,
            "samplerBytesPerSequence": model.sampler_bytes_per_sequence,
        }
    data = {
        "defaults": {
            "gpuMemoryUtilization": DEFAULT_GPU_MEMORY_UTILIZATION,
            "maxNumSeqs": VLLM_MAX_NUM_SEQS,
            "maxNumBatchedTokens": VLLM_MAX_NUM_BATCHED_TOKENS,
            "reserveFixedBytes": RESERVE_FIXED_BYTES,
        },
        "checkpoints": checkpoints,
        # Engine `quantization` values that quantize a 16-bit checkpoint while loading it, and those
        # that read an offline-quantized one (`fp8` does either, by the checkpoint).
        "quantization": {
            "online": sorted(ONLINE_FP8_METHODS),
            "checkpoint": sorted(CHECKPOINT_METHODS - {"fp8"}),
        },
        "gpus": {name: {"memoryMiB": gpu.memory_mib} for name, gpu in GPUS.items()},
        # A MIG resource without the worker group's `gpu`: the smallest card slice of that profile
        # name.
        "migProfiles": smallest_slices(),
    }
    header = (
        "# Generated by `make manifests` from amalia_serve.capacity (`amalia-serve plan`). Do not\n"
        "# edit. templates/_capacity.tpl refuses variants that cannot fit their GPUs with it.\n"
    )
    body: str = yaml.safe_dump(data, sort_keys=True, width=100)
    return header + body


def smallest_slices() -> dict[str, str]:
    slices: dict[str, Gpu] = {}
    for gpu in GPUS.values():
        profile = gpu.name.partition(":")[2]
        if profile and (profile not in slices or gpu.memory_mib < slices[profile].memory_mib):
            slices[profile] = gpu
    return {profile: gpu.name for profile, gpu in sorted(slices.items())}
