# One entry point. Every target installs what is missing first (uv, the locked Python deps,
# Debian chromium for the browser test), then acts.
SHELL := /bin/bash
# Every process of the platform points itself at MLOPS_HOME and switches telemetry off
# (mlops.core.environment); `mlops ui` and `mlops serve` start Dagster and BentoML that way.
export MLOPS_HOME ?= $(CURDIR)/.mlops
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
RUN := $(UV) run --frozen

.PHONY: install gpu-extras chromium demo demo-headless build test lint ui serve bentos clean

install:
	@command -v uv >/dev/null 2>&1 || test -x $(UV) || python3 -m pip install --quiet --user uv || python3 -m pip install --quiet uv
	@$(UV) sync --frozen --inexact --compile-bytecode --quiet
	@# This image sets PYTHONDONTWRITEBYTECODE: without compiled bytecode every process would
	@# compile the whole stack again on import (definitions.py: ~12 s of CPU instead of ~4 s).
	@.venv/bin/python -m compileall -q -j 0 assets resources bentos benchmarks tests definitions.py >/dev/null

# PyTorch + Hummingbird, for the GPU image and its CPU-side equivalence test only. pip takes the
# CPU build of torch that this machine image carries; uv would download a multi-GB CUDA build.
gpu-extras: install
	@.venv/bin/python -c "import torch, hummingbird" 2>/dev/null || \
	  python3 -m pip --python .venv/bin/python install --quiet -r bentos/gpu-extras.txt

chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi; }

## make demo: the closed loop from an empty MLOPS_HOME (reset first): build every tenant, start the
## Dagster UI + daemon and the service, replay days with concept drift for acme (churn and fraud)
## until the platform has retrained, promoted and restored both on its own; the UI stays up until Ctrl-C
demo: install
	$(RUN) mlops demo --reset

## make demo-headless: the same without the UI, on two small tenants; exits with the timeline
demo-headless: install
	$(RUN) mlops demo --reset --headless --small

## make build: data, features and a validated champion for every default tenant (no replay)
build: install
	$(RUN) mlops build

## make test: the whole test suite
test: install chromium gpu-extras
	$(RUN) pytest

lint: install
	$(RUN) ruff check .
	$(RUN) lint-imports

## make ui: the Dagster web UI (asset graph, checks, runs, sensors) on http://127.0.0.1:3000
ui: install
	$(RUN) mlops ui --host 127.0.0.1 --port 3000

## make serve: the BentoML churn service (OpenAPI docs at http://127.0.0.1:3001/)
serve: install
	$(RUN) mlops serve --host 127.0.0.1 --port 3001

## make bentos: build the CPU and GPU bentos with the current serving bundle packaged inside
bentos: install
	@test -f $(MLOPS_HOME)/serving/manifest.json || { echo "no serving bundle: run make demo or make build first"; exit 1; }
	@if [ "$(MLOPS_HOME)" != "$(CURDIR)/.mlops" ]; then rm -rf .mlops/serving && mkdir -p .mlops && cp -r $(MLOPS_HOME)/serving .mlops/serving; fi
	env $$($(RUN) mlops env) $(RUN) bentoml build -f bentos/bentofile.cpu.yaml .
	env $$($(RUN) mlops env) $(RUN) bentoml build -f bentos/bentofile.gpu.yaml .

clean:
	rm -rf $(MLOPS_HOME)
