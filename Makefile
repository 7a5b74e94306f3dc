# mocap mesh — build, run and test. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard protos/mocap/v1/*.proto)
GEN    := mocap/v1/.generated
VIDEO  ?= mocap_common/demo/runner_1080p.mp4
OUT    ?= out

.PHONY: help setup venv protos models checkpoint node lint lint-protos run demo test test-all bench clean

help: ## list targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: $(STAMP) $(GEN) models checkpoint node ## everything: venv + deps, generated code, model weights, node tools

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip==25.3
	$(PIP) install -q -e ".[all]" --config-settings editable_mode=compat
	touch $@

venv: $(STAMP)

protos: $(GEN) ## generate Python code from protos/ (never committed)

$(GEN): $(PROTOS) $(STAMP)
	mkdir -p mocap/v1
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch mocap/__init__.py mocap/v1/__init__.py $@

models: $(STAMP) ## download mediapipe's wheel and extract the checksummed BlazePose .tflite files
	$(PY) -m tracker_svc.model_setup

checkpoint: $(STAMP) $(GEN) ## train the learned smoother's first checkpoint (seed 1; no-op when one exists)
	$(PY) -m smoother_svc.first_checkpoint

node: node_modules/.installed ## buf (proto lint) and the glTF validator

node_modules/.installed: package.json package-lock.json
	npm install --no-audit --no-fund --loglevel=error
	touch $@

lint-protos: node ## buf lint (STANDARD + COMMENTS rules)
	npx --no-install buf lint

lint: lint-protos ## all linters

run: setup ## start all five services locally (Ctrl-C stops them all)
	$(PY) -m mocap_common.launcher

demo: setup ## set up, start the mesh, run the main job on VIDEO, write results to OUT
	$(PY) -m mocap_common.launcher --demo "$(VIDEO)" --out "$(OUT)"

test: setup ## the default test suite (slow tests excluded)
	$(PY) -m pytest -m "not slow"

test-all: setup ## every test, slow ones included
	$(PY) -m pytest

bench: setup ## benchmarks; JSON results under bench/results/
	$(PY) -m bench

clean: ## remove generated code and caches (keeps the venv and data/)
	rm -rf mocap .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
