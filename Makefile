# Commands for a fresh machine: `make demo` (set up + default benchmark), `make test` (set up + tests),
# `make demo-imagenet` (set up + SQuant W4A4 on EfficientNet-Lite0's real ImageNet weights over natural_images).
PY ?= python3
export PYTHON := $(PY)

.PHONY: setup demo demo-imagenet test test-slow lint

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m dfq_bench

demo-imagenet: setup
	$(PY) -m dfq_bench method=squant model=efficientnet_lite0 dataset=natural_images wbits=4 abits=4

test: setup
	$(PY) -m ruff check src methods tests scripts
	$(PY) -m pytest -q -n 2

test-slow: setup  # the full suite: the default tests and the long ones marked slow
	$(PY) -m pytest -q -m "slow or not slow"

lint:
	$(PY) -m ruff check src methods tests scripts
