# The README's commands. Each one creates or refreshes the virtual environment first,
# so a fresh clone needs nothing else.
VENV    ?= .venv
PYTHON  ?= python3
# Pinned so that a CPU machine gets the CPU build instead of a multi-GB CUDA one.
TORCH   ?= torch==2.13.0
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.nibble-installed

.PHONY: setup serve chat generate test test-cluster lint bench bench-gpu

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m kernels.native
	touch $(STAMP)

serve: setup
	$(VENV)/bin/nibble serve --model smollm2-135m --quant int4

chat: setup
	$(VENV)/bin/nibble chat --model smollm2-135m --quant int4

generate: setup
	$(VENV)/bin/nibble generate --chat --model smollm2-135m --quant int4 "$(or $(PROMPT),What is the capital of France?)"

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests --ignore=tests/cluster

# `nibble serve --ray` on local Ray clusters (about 5 minutes); adds Ray Serve to the venv.
test-cluster: setup
	$(PY) -m pip install --quiet -e ".[dev,cluster]"
	$(PY) -m pytest -q tests/cluster

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/quality.py

# On a CUDA machine, with the Python that has torch with CUDA and Triton (not .venv, whose
# torch is the CPU build): make bench-gpu PYTHON=/path/to/python
bench-gpu:
	$(PYTHON) benchmarks/kernels.py
	$(PYTHON) benchmarks/decode_gpu.py
