"""Quantized checkpoints against bf16: perplexity on held-out Portuguese text, measured through vLLM.

    .venv/bin/python benchmarks/bench_quantized.py              # the AMALIA-shaped demo checkpoint
    .venv/bin/python benchmarks/bench_quantized.py --realistic  # SmolLM2-135M-Instruct (make bench builds it)

Quantizes the checkpoint offline with llm-compressor (scripts/quantize_checkpoint.py, in its own venv:
`bash scripts/install-quantize-tools.sh`) to int8 W8A8 and int4 W4A16 (GPTQ, and int4 also round-to-nearest),
loads each result in vLLM's engine through amalia-serve's `VLLMEngine` (the serving path, vLLM's CPU build here),
and measures, from vLLM's prompt logprobs over every line of serve/demo_corpus/pt-heldout.txt, the perplexity and
the mean shift of each token's log-probability against bf16. That text is held out: the demo tokenizer is trained
and GPTQ is calibrated on serve/demo_corpus/pt.txt only. The demo checkpoint is untrained (random weights): its
perplexity is huge and says nothing about quality, so the demo run also measures the DPO demo (same shape, other
random weights) as the scale of an unrelated model; --realistic gives quality numbers on a trained model.
Prints a table and one JSON line; benchmarks/RESULTS.md ("Quantized checkpoints") records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from amalia_serve.capacity import load_model
from amalia_serve.config import VariantConfig
from amalia_serve.sampling import SamplingParams
from amalia_serve.vllm_engine import VLLMEngine

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

QUANTIZE_PYTHON = ROOT / ".tools" / "quantize-venv" / "bin" / "python"
QUANTIZE_SCRIPT = ROOT / "scripts" / "quantize_checkpoint.py"
# (scheme, method) of scripts/quantize_checkpoint.py, in the order measured.
VARIANTS = (("w8a8-int8", "gptq"), ("w4a16", "gptq"), ("w4a16", "rtn"))
# vLLM's CPU build sized for the demo checkpoint on a 2-core machine (as tests/serve_harness.py).
CPU_ENGINE: dict[str, Any] = {"max_num_seqs": 4, "kv_cache_memory_bytes": 64 << 20, "max_model_len": 2048,
                              "enforce_eager": True, "stream_interval_ms": 0, "system_prompt": None}  # fmt: skip


def corpus_path(name: str) -> Path:
    return Path(str(resources.files("amalia_serve").joinpath(f"demo_corpus/{name}")))


CALIBRATION_TEXT = corpus_path("pt.txt")
HELDOUT_TEXT = corpus_path("pt-heldout.txt")


def quantize(source: Path, out: Path, scheme: str, method: str, group_size: int = 128) -> dict[str, Any]:
    """Run scripts/quantize_checkpoint.py in llm-compressor's venv; its summary line as a dict."""
    if not QUANTIZE_PYTHON.exists():
        raise RuntimeError(
            f"{QUANTIZE_PYTHON} is missing: run `bash scripts/install-quantize-tools.sh` (part of `make tools`)"
        )
    argv = [str(QUANTIZE_PYTHON), str(QUANTIZE_SCRIPT), str(source), str(out), "--scheme", scheme,
            "--method", method, "--calibration", str(CALIBRATION_TEXT), "--group-size", str(group_size)]  # fmt: skip
    # One OpenMP thread unless told otherwise: on a 2-core machine beside busy vLLM engines, GPTQ's linear
    # algebra on two spinning threads took 29 s for one 256x512 layer of the demo, on one thread 0.05 s.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=900, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"quantize_checkpoint.py {scheme} {method} failed:\n{done.stderr[-3000:]}")
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return summary


def heldout_samples(tokenizer: Any) -> list[list[int]]:
    """Token ids of each held-out line, as the model sees plain text (no chat template)."""
    lines = [line for line in HELDOUT_TEXT.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [list(tokenizer(line, add_special_tokens=True)["input_ids"]) for line in lines]


async def prompt_logprobs(llm: AsyncLLM, samples: list[list[int]]) -> list[float]:
    """vLLM's log-probability of every token after the first of each sample, given the tokens before it."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.inputs import TokensPrompt

    params = VllmSamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)

    async def one(index: int, ids: list[int]) -> list[float]:
        final = None
        async for out in llm.generate(TokensPrompt(prompt_token_ids=ids), params, f"logprobs-{index}"):
            final = out
        assert final is not None and final.prompt_logprobs is not None
        # Position 0 has no logprob (nothing precedes it); each other holds the prompt token's own.
        steps = final.prompt_logprobs[1:]
        return [step[token].logprob for token, step in zip(ids[1:], steps, strict=True) if step is not None]

    return [lp for sample in await asyncio.gather(*(one(i, s) for i, s in enumerate(samples))) for lp in sample]


def perplexity(logprobs: list[float]) -> float:
    """exp of the mean negative log-likelihood per token."""
    return math.exp(-sum(logprobs) / len(logprobs))


def mean_abs_shift(logprobs: list[float], reference: list[float]) -> float:
    """Mean |change| of each token's log-probability against the reference model's, in nats: how far a
    quantized model moved, token by token, which perplexity (a mean) can hide."""
    return sum(abs(a - b) for a, b in zip(logprobs, reference, strict=True)) / len(reference)


async def measure(checkpoint: Path, name: str) -> dict[str, Any]:
    """Load `checkpoint` through VLLMEngine: its held-out prompt logprobs, and a short greedy answer."""
    variant = VariantConfig.model_validate({"name": name, "model_path": str(checkpoint), "engine": CPU_ENGINE})
    started = time.monotonic()
    engine = await VLLMEngine.start(variant)
    start_s = time.monotonic() - started
    try:
        logprobs = await prompt_logprobs(engine.async_llm, heldout_samples(engine.async_llm.get_tokenizer()))
        greedy = SamplingParams(max_tokens=16, temperature=0)
        text = "".join([out.text async for out in engine.generate("Portugal é", greedy, f"{name}-greedy")])
    finally:
        await engine.shutdown()
    return {"logprobs": logprobs, "start_s": round(start_s, 1), "greedy": text}


def planned_weight_bytes(checkpoint: Path) -> int:
    """What `amalia-serve plan` says the weights take in memory, from the checkpoint's own config.json."""
    model = load_model(str(checkpoint))
    return int(model.weight_bytes(model.checkpoint_format))


def run(source: Path, workdir: Path, group_size: int, reference: Path | None) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    checkpoints = {"bf16": source}
    for scheme, method in VARIANTS:
        label = f"{scheme}-{method}"
        summary = quantize(source, workdir / label, scheme, method, group_size)
        checkpoints[label] = workdir / label
        rows[label] = {"quantize_s": summary["seconds"]}
    if reference is not None:
        checkpoints["other-weights"] = reference  # a different model of the same shape: the scale of "far"
    base: list[float] = []
    for label, path in checkpoints.items():
        row = rows.setdefault(label, {})
        measured = asyncio.run(measure(path, label))
        logprobs = measured.pop("logprobs")
        base = base or logprobs
        row.update(measured, perplexity=round(perplexity(logprobs), 3), tokens=len(logprobs))
        row["ppl_ratio"] = round(row["perplexity"] / rows["bf16"]["perplexity"], 4)
        row["mean_abs_logprob_shift"] = round(mean_abs_shift(logprobs, base), 4)
        row["stored_as"] = load_model(str(path)).checkpoint_format
        row["file_bytes"] = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        row["planned_weight_bytes"] = planned_weight_bytes(path)
        print(f"{label:16} {row['stored_as']:5} ppl {row['perplexity']:.4g}  x{row['ppl_ratio']:.4f}  "
              f"|dlogprob| {row['mean_abs_logprob_shift']:.4f}  {row['tokens']} tokens  "
              f"file {row['file_bytes']:,} B  plan {row['planned_weight_bytes']:,} B  start {row['start_s']} s  "
              f"{row['greedy']!r}", flush=True)  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="16-bit checkpoint; default: the demo SFT checkpoint")
    parser.add_argument("--realistic", action="store_true",
                        help="SmolLM2-135M-Instruct from .models (hidden 576: int4 groups of 64)")  # fmt: skip
    parser.add_argument("--group-size", type=int, help="w4a16 group size (default 128, 64 with --realistic)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "results" / "quantized")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    reference = None
    if args.realistic:
        source = args.checkpoint or ROOT / ".models" / "smollm2-135m-instruct"
    else:
        from amalia_serve.demo_model import write_demo_models

        sft, reference = write_demo_models(args.workdir / "demo")
        source = args.checkpoint or sft
    group_size = args.group_size or (64 if args.realistic else 128)
    rows = run(source, args.workdir / source.name, group_size, reference)
    print(json.dumps({"checkpoint": str(source), "group_size": group_size, "heldout": str(HELDOUT_TEXT),
                      "results": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
