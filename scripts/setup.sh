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
.venv/bin/python -m pip install --quiet --upgrade pip
# TensorFlow: the CUDA build where an NVIDIA GPU answers nvidia-smi, else the CPU-only wheel
# (274 MB instead of 572 MB, no CUDA start-up messages). KERAS_RESNET_TENSORFLOW=gpu|cpu overrides.
choice=${KERAS_RESNET_TENSORFLOW:-auto}
gpus=""
if [ "$choice" = auto ] && command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${gpus:-0}" -gt 0 ] && choice=gpu
fi
[ "$choice" = auto ] && choice=cpu
case "$choice" in
  gpu)
    echo "  setup 2/3: ${gpus:+$gpus NVIDIA GPU(s) found: }pip install -e '.[dev,gpu]' (tensorflow[and-cuda]: CUDA and cuDNN as wheels; quiet, ~5 GB the first time)"
    if .venv/bin/python -m pip show tensorflow-cpu >/dev/null 2>&1; then
      .venv/bin/python -m pip uninstall --quiet -y tensorflow-cpu
    fi
    .venv/bin/python -m pip install --quiet -e ".[dev,gpu]"
    ;;
  cpu)
    echo "  setup 2/3: no NVIDIA GPU found: tensorflow-cpu in place of tensorflow, then keras_resnet[dev] (quiet, ~2 GB the first time)"
    .venv/bin/python -c "import tomllib" 2>/dev/null || .venv/bin/python -m pip install --quiet tomli
    requirements=$(mktemp)
    .venv/bin/python scripts/requirements.py dev --tensorflow tensorflow-cpu > "$requirements"
    # Both wheels provide the `tensorflow` module: never keep the GPU one beside the CPU one.
    if .venv/bin/python -m pip show tensorflow >/dev/null 2>&1; then
      .venv/bin/python -m pip uninstall --quiet -y tensorflow
    fi
    .venv/bin/python -m pip install --quiet -r "$requirements"
    .venv/bin/python -m pip install --quiet --no-deps -e .
    rm -f "$requirements"
    ;;
  *)
    echo "KERAS_RESNET_TENSORFLOW must be auto, cpu or gpu, got '$choice'" >&2
    exit 2
    ;;
esac
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
