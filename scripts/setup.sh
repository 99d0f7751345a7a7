#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with keras_resnet
# and its test/export extras, and (where apt is available) the Debian
# Fashion-MNIST package so the default recipe needs no download.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "note: Debian dataset-fashion-mnist not installed; keras.datasets will download Fashion-MNIST if needed"
fi
.venv/bin/python -c "import keras, tensorflow as tf, keras_resnet; print(f'keras {keras.__version__}, tensorflow {tf.__version__}, keras_resnet {keras_resnet.__version__}')"
