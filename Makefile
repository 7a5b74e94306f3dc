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
# The directory holding google/api/*.proto and google/rpc/*.proto (imported by the API) as the
# installed googleapis-common-protos wheel ships them beside the _pb2 modules the runtime imports.
# protoc reads those; no Python is generated for them. (protos/google/ has copies for buf only.)
GOOGLEAPIS_PROTOS = $(shell $(PY) -c 'import os, google.api.field_behavior_pb2 as m; print(os.path.dirname(os.path.dirname(os.path.dirname(m.__file__))))')
# The last released API (commit f5ca0bb): `buf breaking` keeps every later change compatible with it.
PROTOS_BASELINE := f5ca0bb9b246c6a21fef497035b7730d2683567b
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
	@test -n "$(GOOGLEAPIS_PROTOS)" || { echo "googleapis-common-protos is missing from $(VENV)" >&2; exit 1; }
	$(PY) -m grpc_tools.protoc -I$(GOOGLEAPIS_PROTOS) -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch mocap/__init__.py mocap/v1/__init__.py $@

models: $(STAMP) ## download mediapipe's wheel and extract the checksummed BlazePose .tflite files
	$(PY) -m tracker_svc.model_setup

checkpoint: $(STAMP) $(GEN) ## train the learned smoother's first checkpoint (seed 1; no-op when one exists)
	$(PY) -m smoother_svc.first_checkpoint

node: node_modules/.installed ## buf (proto lint) and the glTF validator

node_modules/.installed: package.json package-lock.json
	npm install --no-audit --no-fund --loglevel=error
	touch $@

# Breaking changes are looked for against the release commit in this repository's own history
# (a full clone has it; buf reads it from .git without the network).
lint-protos: node ## buf lint (STANDARD + COMMENTS) and buf breaking (FILE rules) against the last release
	npx --no-install buf lint
	@if git cat-file -e '$(PROTOS_BASELINE)^{commit}' 2>/dev/null; then \
	  echo "buf breaking against $(PROTOS_BASELINE)"; \
	  npx --no-install buf breaking --against '.git#ref=$(PROTOS_BASELINE),subdir=protos'; \
	else \
	  echo "buf breaking skipped: the release $(PROTOS_BASELINE) is not in this clone's history (shallow clone?)"; \
	fi

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
