#!/usr/bin/env bash
# The main job: set up, train the default recipe (narrow ResNet-18 on Fashion-MNIST),
# evaluate it, and export it for deployment. Extra arguments go to `train` and
# `evaluate`, e.g. `bash scripts/main.sh --set train.time_budget_minutes=10`.
#
# Training stops at the recipe's time budget (train.time_budget_minutes: 20): it
# measures an epoch on this machine first and trains the epochs that fit. Expect
# about 22-25 minutes in all on 2 CPU cores (22.0 measured; BENCHMARKS.md); the time
# of each step and the total are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=tasks/classification/fashion_mnist_resnet18_narrow.yaml
SECONDS=0
step() { printf '\n[%s] %s (%dm%02ds so far)\n' "$1" "$2" $((SECONDS / 60)) $((SECONDS % 60)); }

step 1/4 "setting up .venv (pip install of TensorFlow, Keras and the export tools: ~2 GB and a few minutes the first time)"
bash scripts/setup.sh
step 2/4 "training $RECIPE (20-minute budget unless overridden; one line per epoch)"
.venv/bin/keras-resnet train "$RECIPE" "$@"
step 3/4 "evaluating the best model on the 10,000 test images"
.venv/bin/keras-resnet evaluate "$RECIPE" "$@"
RUN_DIR=$(TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python -c "import sys; from keras_resnet_settings import load_config; print(load_config(sys.argv[1], sys.argv[2:]).output_dir)" "$RECIPE" $(printf '%s\n' "$@" | grep '=' || true))
# Each export checks itself against the Keras model and fails on a parity miss.
step 4/4 "exporting $RUN_DIR: SavedModel, ONNX, TFLite float32, TFLite int8 (each checked against the Keras model)"
.venv/bin/keras-resnet export "$RUN_DIR" --format saved_model
.venv/bin/keras-resnet export "$RUN_DIR" --format onnx
.venv/bin/keras-resnet export "$RUN_DIR" --format tflite
.venv/bin/keras-resnet export "$RUN_DIR" --format tflite --quantize int8 --calibration "$RECIPE" \
  --calibration-samples 1000 --parity-samples 1000
# A plain statement (not inside echo "$(...)"), so a failure here fails the script.
.venv/bin/python -c 'import json, sys; m = json.load(open(sys.argv[1])); print("metrics: top1=%.4f top5=%.4f" % (m["top1"], m["top5"]))' "$RUN_DIR/metrics.json"
printf '\ndone in %dm%02ds: model, metrics and plots in %s, exports in saved_models/%s/\n' \
  $((SECONDS / 60)) $((SECONDS % 60)) "$RUN_DIR" "$(basename "$RUN_DIR")"
