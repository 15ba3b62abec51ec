# Two entry points, each self-contained on a fresh machine:
#   make demo   - the main job: `mirrorgate demo` on its embedded default
#   make test   - lint, type-check, import layers and the whole test suite (what CI runs)
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: venv demo test lint services

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Pin torch first: this machine holds the CPU build on disk; an unpinned torch
	# resolves to a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,torch,onnx,postgres,parquet]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/mirrorgate demo

services:
	bash scripts/ensure_services.sh

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: venv services lint
	source scripts/test_env.sh && $(BIN)/python -m pytest -q
