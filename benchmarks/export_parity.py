"""Parity and accuracy of every export of a trained classifier on its whole validation set.

Exports a training run (default: the Fashion-MNIST default recipe's run) to
SavedModel, ONNX and TFLite fp32/float16/dynamic/int8 through
`keras_resnet.export.export_model`, then runs the Keras model and each
artefact on the full validation split of the run's recipe and prints one
markdown row per format: relative max difference, top-1 agreement with
Keras, top-1 accuracy and its difference from Keras, and latency per image.

    python benchmarks/export_parity.py runs/fashion_mnist_resnet20
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from keras_resnet.config import load_config
from keras_resnet.data.classification import build_classification_datasets
from keras_resnet.export import export_model, load_exported_model
from keras_resnet.export.parity import parity_figures

EXPORTS = [("saved_model", "none"), ("onnx", "none"), ("tflite", "none"), ("tflite", "float16"),
           ("tflite", "dynamic"), ("tflite", "int8")]


def validation_set(run_dir):
    recipe = Path(run_dir) / "recipe.yaml"
    cfg = load_config(str(recipe), ["data.cache=false", "data.batch_size=256"])
    _, val, _ = build_classification_datasets(cfg, seed=cfg.train.seed)
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in val])
    return np.concatenate(images).astype(np.float32), np.concatenate(labels), str(recipe)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", default="runs/fashion_mnist_resnet20")
    parser.add_argument("--output", default=None, help="export folder (default saved_models/<run name>)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    images, labels, recipe = validation_set(args.run_dir)
    keras_model = load_exported_model(args.run_dir)
    start = time.perf_counter()
    reference = keras_model.predict(images)
    keras_ms = (time.perf_counter() - start) * 1000 / len(images)
    keras_top1 = float((reference.argmax(1) == labels).mean())
    rows = [{"format": "keras", "quantize": "none", "top1": keras_top1, "ms_per_image": keras_ms}]
    for format, quantize in EXPORTS:
        result = export_model(args.run_dir, format=format, quantize=quantize, calibration=recipe,
                              batch_size="dynamic" if format != "tflite" else 1, output=args.output,
                              parity_samples=200)
        exported = load_exported_model(result["path"])
        start = time.perf_counter()
        outputs = exported.predict(images)
        ms = (time.perf_counter() - start) * 1000 / len(images)
        figures = parity_figures(reference, outputs)
        rows.append({"format": format, "quantize": quantize, "path": result["path"], "ms_per_image": ms,
                     "relative_max_diff": figures["relative_max_diff"],
                     "top1_agreement": figures["top1_agreement"],
                     "top1": float((outputs.argmax(1) == labels).mean())})
    print(f"\n{len(images)} validation images of {recipe}\n")
    print("| format | quantization | rel. max diff | top-1 agreement | top-1 | Δ top-1 (points) | ms/image |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        diff = row.get("relative_max_diff")
        agreement = row.get("top1_agreement")
        print(f"| {row['format']} | {row['quantize']} | {'' if diff is None else f'{diff:.2e}'} | "
              f"{'' if agreement is None else f'{agreement:.4f}'} | {row['top1']:.4f} | "
              f"{(row['top1'] - keras_top1) * 100:+.2f} | {row['ms_per_image']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
