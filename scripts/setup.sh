#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with keras_resnet
# and its test/export extras, and (where apt is available) the Debian
# Fashion-MNIST package so the default recipe needs no download.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SECONDS=0
if [ ! -x .venv/bin/python ]; then
  echo "  setup 1/3: creating .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv .venv
else
  echo "  setup 1/3: .venv exists; updating it"
fi
echo "  setup 2/3: pip install -e '.[dev]' (TensorFlow, Keras, ONNX and TFLite tools; quiet, ~2 GB the first time)"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
if [ -d /usr/share/datasets/fashion-mnist ]; then
  echo "  setup 3/3: Fashion-MNIST found in /usr/share/datasets/fashion-mnist"
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "  setup 3/3: apt-get install dataset-fashion-mnist (Debian package, ~30 MB)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "note: Debian dataset-fashion-mnist not installed; keras.datasets will download Fashion-MNIST if needed"
else
  echo "  setup 3/3: no apt/root: keras.datasets will download Fashion-MNIST (~30 MB) on first use"
fi
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python -c "import keras, tensorflow as tf, keras_resnet; print(f'  keras {keras.__version__}, tensorflow {tf.__version__}, keras_resnet {keras_resnet.__version__}')"
echo "  setup done in ${SECONDS}s"
