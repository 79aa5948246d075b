# Two commands for a fresh machine: `make demo` (set up + default benchmark), `make test` (set up + tests).
PY ?= python3
export PYTHON := $(PY)

.PHONY: setup demo test test-slow lint

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m dfq_bench

test: setup
	$(PY) -m ruff check src methods tests scripts
	$(PY) -m pytest -q -n 2

test-slow: setup  # the full suite: the default tests and the long ones marked slow
	$(PY) -m pytest -q -m "slow or not slow"

lint:
	$(PY) -m ruff check src methods tests scripts
