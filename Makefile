# One entry point. Every target installs what is missing first (uv, the locked Python deps,
# Debian chromium for the browser test), then acts.
SHELL := /bin/bash
export MLOPS_HOME ?= $(CURDIR)/.mlops
export DAGSTER_HOME := $(MLOPS_HOME)/dagster
export NML_DISABLE_USAGE_LOGGING := 1
export BENTOML_DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export DAGSTER_DISABLE_TELEMETRY := 1
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
RUN := $(UV) run --frozen

.PHONY: install chromium demo test lint ui serve clean

install:
	@command -v uv >/dev/null 2>&1 || test -x $(UV) || python3 -m pip install --quiet --user uv || python3 -m pip install --quiet uv
	@$(UV) sync --frozen --quiet

chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi; }

## make demo: build data, features and a validated champion for every default tenant
demo: install
	$(RUN) python -m resources.cli demo

## make test: the whole test suite
test: install chromium
	$(RUN) pytest

lint: install
	$(RUN) ruff check .

## make ui: the Dagster web UI (asset graph, checks, runs, sensors) on http://127.0.0.1:3000
ui: install
	$(RUN) python -m resources.cli init
	$(RUN) dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

## make serve: the BentoML churn service (OpenAPI docs at http://127.0.0.1:3001/)
serve: install
	$(RUN) bentoml serve bentos.service:ChurnService --host 127.0.0.1 --port 3001

clean:
	rm -rf $(MLOPS_HOME)
