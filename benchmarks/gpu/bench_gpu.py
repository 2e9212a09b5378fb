"""GPU benchmark: an AMALIA-9B-shaped checkpoint through amalia-serve and through bare `vllm serve`.

For a machine with one NVIDIA GPU, no network, and the serving image's packages (vllm 0.33 with its CUDA torch,
ray[serve] 2.60, amalia-serve: `pip install -e '.[gpu]'`). From the repository root:

    python benchmarks/gpu/bench_gpu.py            # bf16, then fp8 weights (Hopper/Ada); about 8 minutes on an H200

1. Writes a random-weight checkpoint with AMALIA-9B's exact shape (serve/capacity.py AMALIA_9B_CONFIG:
   LlamaForCausalLM, 42 layers, hidden 4096, FFN 12288, 32 heads, 8 KV heads, head_dim 128, vocab 128000, bf16,
   ~18.3 GB) and the demo tokenizer; random weights decode as fast as trained ones, and `ignore_eos` fixes lengths.
2. Serves it through amalia-serve (a local Ray: ingress -> variant replica on the GPU) and through bare
   `vllm serve` with the same engine arguments, one after the other.
3. Prints decode tok/s at 1 stream next to the HBM roofline (memory bandwidth / weight bytes), output tok/s at 1,
   16 and 64 streams, TTFT p50/p99, the KV-cache capacity vLLM logged next to `amalia-serve plan`'s prediction,
   and, with fp8 weights, the same on bare vLLM. The last line is one JSON object; record it in
   benchmarks/RESULTS.md with the card, the date and the command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from benchmarks.load import LevelResult, run_level
from benchmarks.servers import bare_vllm

# Peak HBM bandwidth by product name (vendor data sheets, bytes/s); the measured copy bandwidth is printed too.
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12,
                   "A100-SXM4-80GB": 2.04e12, "A100 80GB PCIe": 1.94e12, "L40S": 0.864e12}  # fmt: skip
LEVELS = (1, 16, 64)
KV_CACHE_LINE = re.compile(r"GPU KV cache size: ([\d,]+) tokens")
CONCURRENCY_LINE = re.compile(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x")


def write_checkpoint(out: Path) -> int:
    """AMALIA-9B's shape with random bf16 weights, built on the GPU; returns the weight bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from amalia_serve.capacity import AMALIA_9B_CONFIG
    from amalia_serve.demo_model import write_demo_models

    with tempfile.TemporaryDirectory() as tmp:
        sft, _ = write_demo_models(tmp)
        for f in sft.iterdir():
            if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
                shutil.copy(f, out / f.name)
    shape = {k: v for k, v in AMALIA_9B_CONFIG.items() if k not in ("architectures", "torch_dtype")}
    config = LlamaConfig(**shape, bos_token_id=None, eos_token_id=2, pad_token_id=0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return weight_bytes


def measured_copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy (read + write), the achievable side of the roofline."""
    import torch

    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / 10
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (2 << 30) / seconds


def engine(max_model_len: int, quantization: str | None = None) -> dict[str, Any]:
    block: dict[str, Any] = {"max_model_len": max_model_len, "max_num_seqs": max(LEVELS),
                             "gpu_memory_utilization": 0.9, "system_prompt": None}  # fmt: skip
    if quantization:
        block["quantization"] = quantization
    return block


def sweep(url: str, model: str, args: argparse.Namespace) -> dict[int, LevelResult]:
    asyncio.run(run_level(url, model, 2, 4, 16))  # warm-up
    out = {}
    for level in LEVELS:
        out[level] = asyncio.run(run_level(url, model, level, max(4, level * args.rounds), args.max_tokens))
        r = out[level]
        print(f"{model:<10} {level:>4} streams  {r.tok_s:>9.1f} tok/s  TTFT p50 {r.ttft_p50_ms:>8.1f} ms  "
              f"p99 {r.ttft_p99_ms:>8.1f} ms", flush=True)  # fmt: skip
    return out


def through_amalia(checkpoint: Path, args: argparse.Namespace) -> dict[int, LevelResult]:
    import ray
    from ray import serve
    from serve_harness import free_port

    from amalia_serve.local_run import (
        deploy_config,
        local_serve_config,
        start_local_ray,
        variant_app_config,
        wait_until_running,
    )

    port = free_port()
    deployment = {"num_replicas": 1, "max_ongoing_requests": 512, "ray_actor_options": {"num_gpus": 1}}
    variant = variant_app_config("amalia-9b", checkpoint, engine(args.max_model_len), deployment)
    front = {"ingress": {"deployment": {"num_replicas": 1, "max_ongoing_requests": 1024}}}
    start_local_ray(dashboard=False)
    try:
        deploy_config(local_serve_config(port, {"amalia-9b": 1}, [variant], front))
        wait_until_running(["amalia", "amalia-9b"], timeout_s=600)
        return sweep(f"http://127.0.0.1:{port}", "amalia-9b", args)
    finally:
        serve.shutdown()
        ray.shutdown()


def through_vllm(
    checkpoint: Path, args: argparse.Namespace, log: Path, quantization: str | None = None
) -> tuple[dict[int, LevelResult], dict[str, float]]:
    from serve_harness import free_port

    from amalia_serve.config import EngineConfig

    config = EngineConfig.model_validate(engine(args.max_model_len, quantization))
    with bare_vllm(config, str(checkpoint), "amalia-9b", free_port(), log, timeout_s=600) as url:
        levels = sweep(url, "amalia-9b", args)
    text = log.read_text(errors="replace")
    kv = KV_CACHE_LINE.search(text)
    conc = CONCURRENCY_LINE.search(text)
    logged = {"kv_cache_tokens": float(kv.group(1).replace(",", "")) if kv else float("nan"),
              "max_concurrency": float(conc.group(2)) if conc else float("nan")}  # fmt: skip
    return levels, logged


def planned(gpu_name: str, gpu_bytes: int, args: argparse.Namespace, quantization: str | None) -> dict[str, int]:
    from amalia_serve.capacity import EngineSettings, find_gpu, fit, gpu_of_size, load_model

    try:
        gpu = find_gpu(gpu_name)
    except ValueError:
        gpu = gpu_of_size(gpu_bytes / 2**30)
    settings = EngineSettings(max_model_len=args.max_model_len, quantization=quantization,
                              max_num_seqs=max(LEVELS), gpu_memory_utilization=0.9)  # fmt: skip
    plan = fit(load_model("amalia-9b"), gpu, settings)
    return {"kv_cache_tokens": plan.kv_tokens, "max_sequences": plan.max_sequences}


def rounded(levels: dict[int, LevelResult]) -> dict[str, Any]:
    return {str(k): {"tok_s": round(v.tok_s, 1), "ttft_ms_p50": round(v.ttft_p50_ms, 1),
                     "ttft_ms_p99": round(v.ttft_p99_ms, 1)} for k, v in levels.items()}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2, help="requests per stream at each level")
    parser.add_argument("--no-fp8", action="store_true", help="skip the fp8-weights run on bare vLLM")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no NVIDIA GPU visible (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    from amalia_serve.vllm_engine import prepare_environment

    prepare_environment()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    name = torch.cuda.get_device_name()
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    spec_bw = next((bw for key, bw in HBM_BYTES_PER_S.items() if key in name), float("nan"))
    copy_bw = measured_copy_bandwidth()
    checkpoint = Path(tempfile.mkdtemp(prefix="amalia-9b-random-", dir=out))
    weight_bytes = write_checkpoint(checkpoint)
    print(f"{name}: checkpoint {weight_bytes / 1e9:.1f} GB in {time.monotonic() - started:.0f} s", flush=True)

    ours = through_amalia(checkpoint, args)
    bare, bare_logged = through_vllm(checkpoint, args, out / "vllm-serve-bf16.log")
    results: dict[str, Any] = {
        "gpu": name,
        "date": time.strftime("%Y-%m-%d"),
        "weight_gb": round(weight_bytes / 1e9, 2),
        "roofline_tok_s_spec": round(spec_bw / weight_bytes, 1),
        "roofline_tok_s_measured_copy": round(copy_bw / weight_bytes, 1),
        "amalia": rounded(ours),
        "vllm_serve": rounded(bare),
        "one_stream_vs_roofline": round(ours[1].tok_s / (spec_bw / weight_bytes), 3),
        "vs_vllm_serve_64": round(ours[64].tok_s / bare[64].tok_s, 3),
        "kv_cache_bf16": {"vllm_logged": bare_logged, "planned": planned(name, gpu_bytes, args, None)},
    }
    if not args.no_fp8:
        fp8, fp8_logged = through_vllm(checkpoint, args, out / "vllm-serve-fp8.log", "fp8_per_tensor")
        results["vllm_serve_fp8"] = rounded(fp8)
        results["kv_cache_fp8"] = {"vllm_logged": fp8_logged,
                                   "planned": planned(name, gpu_bytes, args, "fp8_per_tensor")}  # fmt: skip
    shutil.rmtree(checkpoint, ignore_errors=True)
    results["seconds"] = round(time.monotonic() - started)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
