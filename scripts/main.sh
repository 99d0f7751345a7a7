#!/usr/bin/env bash
# The main job: set up, train the default recipe (narrow ResNet-18 on Fashion-MNIST),
# evaluate it, and export it for deployment. Extra arguments go to `train`,
# e.g. `bash scripts/main.sh --set train.epochs=2`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RECIPE=tasks/classification/fashion_mnist_resnet18_narrow.yaml
.venv/bin/keras-resnet train "$RECIPE" "$@"
.venv/bin/keras-resnet evaluate "$RECIPE" "$@"
RUN_DIR=$(.venv/bin/python -c "import sys; from keras_resnet.config import load_config; print(load_config(sys.argv[1], sys.argv[2:])['output_dir'])" "$RECIPE" $(printf '%s\n' "$@" | grep '=' || true))
# Each export checks itself against the Keras model and fails on a parity miss.
.venv/bin/keras-resnet export "$RUN_DIR" --format saved_model
.venv/bin/keras-resnet export "$RUN_DIR" --format onnx
.venv/bin/keras-resnet export "$RUN_DIR" --format tflite
.venv/bin/keras-resnet export "$RUN_DIR" --format tflite --quantize int8 --calibration "$RECIPE" --parity-samples 1000
# A plain statement (not inside echo "$(...)"), so a failure here fails the script.
.venv/bin/python -c 'import json, sys; m = json.load(open(sys.argv[1])); print("metrics: top1=%.4f top5=%.4f" % (m["top1"], m["top5"]))' "$RUN_DIR/metrics.json"
