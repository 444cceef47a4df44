# Every target bootstraps .venv on first use, so a fresh machine needs one command.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch. On a CUDA machine: make TORCH_SPEC='torch==2.13.0' with your CUDA index configured.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test layout compile-check bench bench-smoke lint format clean

$(VENV)/.installed: setup.py pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/papo-fast demo --out runs/demo

# One worker per core (at most 4), each taking whole files; the tests that start processes of their
# own (torchrun, accelerate) run after them, alone.
JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && echo 4 || echo $$n)
test: $(VENV)/.installed
	$(BIN)/pytest -n $(JOBS) --dist loadfile -m "not serial"
	$(BIN)/pytest -m serial

# No import cycles (lazy imports included), kernels/ importing nothing from the rest of papo_fast,
# no file over 450 lines. Part of `make test` too.
layout: $(VENV)/.installed
	$(BIN)/pytest -q tests/test_layout.py

# Every Triton kernel compiled for sm_80, sm_90 and sm_100 (no GPU needed) at the launches its
# launcher can make: fails on a compile error, spills over budget, shared memory or registers over
# the architecture's limits. One worker process per core.
compile-check: $(VENV)/.installed
	$(BIN)/python benchmarks/compile_check.py

bench: $(VENV)/.installed
	$(BIN)/pytest benchmarks/ --benchmark-only

bench-smoke: $(VENV)/.installed
	$(BIN)/pytest benchmarks/ --benchmark-disable -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
