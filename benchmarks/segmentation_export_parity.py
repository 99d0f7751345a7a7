"""Parity and mIoU of every export of a trained segmenter on its whole validation set.

Exports a segmentation training run to SavedModel, ONNX and TFLite
fp32/float16/dynamic/int8 through `keras_resnet.export.export_model`, then
runs the Keras model and each artefact on the full validation split of the
run's recipe and prints one markdown row per format: relative max
difference of the per-pixel probabilities, pixel agreement of the masks
with Keras, mIoU of the export's masks against Keras' masks, mIoU and
pixel accuracy against the ground truth (ignore label 255) with the
difference from Keras, and latency per image.

    python benchmarks/segmentation_export_parity.py runs/mosaic_deeplabv3plus_resnet18
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from keras_resnet.config import load_config
from keras_resnet.data.segmentation import IGNORE_INDEX, build_segmentation_datasets
from keras_resnet.export import export_model, load_exported_model
from keras_resnet.export.parity import segmentation_parity_figures
from keras_resnet.models.segmentation.metrics import confusion_to_iou

EXPORTS = [("saved_model", "none"), ("onnx", "none"), ("tflite", "none"), ("tflite", "float16"),
           ("tflite", "dynamic"), ("tflite", "int8")]


def validation_set(run_dir):
    recipe = Path(run_dir) / "recipe.yaml"
    cfg = load_config(str(recipe), ["data.cache=false", "data.batch_size=1", "data.mosaic_train_size=1"])
    _, val, _ = build_segmentation_datasets(cfg, seed=cfg.train.seed)
    images, masks = zip(*[(x.numpy(), y.numpy()) for x, y in val])
    return np.concatenate(images).astype(np.float32), np.concatenate(masks), str(recipe)


def truth_figures(masks, predictions, num_classes):
    valid = masks != IGNORE_INDEX
    confusion = np.bincount(
        masks[valid].astype(np.int64) * num_classes + predictions[valid], minlength=num_classes**2
    ).reshape(num_classes, num_classes)
    return confusion_to_iou(confusion)[1], float(np.trace(confusion) / max(confusion.sum(), 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--output", default=None, help="export folder (default saved_models/<run name>)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    images, masks, recipe = validation_set(args.run_dir)
    keras_model = load_exported_model(args.run_dir)
    start = time.perf_counter()
    reference = keras_model.predict_outputs(images)
    keras_ms = (time.perf_counter() - start) * 1000 / len(images)
    num_classes = reference["probabilities"].shape[-1]
    keras_miou, keras_accuracy = truth_figures(masks, reference["mask"], num_classes)
    rows = [{"format": "keras", "quantize": "none", "miou": keras_miou, "pixel_accuracy": keras_accuracy,
             "ms_per_image": keras_ms}]
    for format, quantize in EXPORTS:
        result = export_model(args.run_dir, format=format, quantize=quantize, calibration=recipe,
                              batch_size="dynamic" if format != "tflite" else 1, output=args.output,
                              parity_samples=100)
        exported = load_exported_model(result["path"])
        start = time.perf_counter()
        outputs = exported.predict_outputs(images)
        ms = (time.perf_counter() - start) * 1000 / len(images)
        figures = segmentation_parity_figures(
            reference["probabilities"], outputs["probabilities"], reference["mask"], outputs["mask"]
        )
        miou, accuracy = truth_figures(masks, outputs["mask"], num_classes)
        rows.append({"format": format, "quantize": quantize, "path": result["path"], "ms_per_image": ms,
                     "relative_max_diff": figures["relative_max_diff"],
                     "pixel_agreement": figures["pixel_agreement"], "mask_miou": figures["mask_miou"],
                     "miou": miou, "pixel_accuracy": accuracy})
    print(f"\n{len(images)} validation images of {recipe}\n")
    print("| format | quantization | rel. max diff | pixel agreement | mIoU vs Keras masks | mIoU | Δ mIoU (points) "
          "| pixel acc. | ms/image |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        diff, agreement, mask_miou = (row.get(k) for k in ("relative_max_diff", "pixel_agreement", "mask_miou"))
        print(f"| {row['format']} | {row['quantize']} | {'' if diff is None else f'{diff:.2e}'} | "
              f"{'' if agreement is None else f'{agreement:.4f}'} | "
              f"{'' if mask_miou is None else f'{mask_miou:.4f}'} | {row['miou']:.4f} | "
              f"{(row['miou'] - keras_miou) * 100:+.2f} | {row['pixel_accuracy']:.4f} | {row['ms_per_image']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
