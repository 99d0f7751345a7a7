"""Accuracy and speed of a segmentation recipe (default: mosaic DeepLabV3+ ResNet-18).

Trains the recipe from scratch into a fresh output_dir, then prints a
markdown row for BENCHMARKS.md: validation mIoU and pixel accuracy,
wall-clock, time per epoch and training images/s.

    python benchmarks/train_segmentation.py
    python benchmarks/train_segmentation.py --set train.epochs=1 data.mosaic_train_size=64 data.mosaic_val_size=16

Long: this is a benchmark, not a test.
"""

import argparse
import json
import os
import platform
import shutil
import time

import tensorflow as tf

from keras_resnet.config import load_config
from keras_resnet.training import train_from_config

DEFAULT_RECIPE = "tasks/segmentation/mosaic_deeplabv3plus_resnet18.yaml"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output-dir", default="runs/benchmark_segmentation")
    args = parser.parse_args()
    overrides = [*args.set, f"output_dir={args.output_dir}"]
    cfg = load_config(args.recipe, overrides)
    shutil.rmtree(cfg["output_dir"], ignore_errors=True)
    start = time.time()
    metrics = train_from_config(args.recipe, overrides)
    wall = time.time() - start
    epochs = metrics["epochs"]
    result = {
        "recipe": args.recipe,
        "overrides": args.set,
        "mIoU": metrics["mIoU"],
        "pixel_accuracy": metrics["pixel_accuracy"],
        "epochs": epochs,
        "wall_minutes": round(wall / 60, 2),
        "seconds_per_epoch": round(metrics["train_seconds_this_session"] / epochs, 1),
        "train_images_per_second": metrics["train_images_per_second"],
        "cpu_count": os.cpu_count(),
        "gpus": len(tf.config.list_logical_devices("GPU")),
        "machine": platform.processor() or platform.machine(),
        "tensorflow": tf.__version__,
    }
    with open(os.path.join(cfg["output_dir"], "benchmark.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    print("| backbone | head | output stride | input | precision | epochs | mIoU | pixel acc. | wall (min) "
          "| s/epoch | train img/s |")
    print(
        f"| {cfg['model']['backbone']} | {cfg['model']['head']} | "
        f"{cfg['model']['backbone_args'].get('output_stride', 32)} | "
        f"{'x'.join(map(str, cfg['model']['input_shape']))} | {cfg['train']['mixed_precision']} | {epochs} | "
        f"{result['mIoU']:.4f} | {result['pixel_accuracy']:.4f} | {result['wall_minutes']:.1f} | "
        f"{result['seconds_per_epoch']:.0f} | {result['train_images_per_second']:.0f} |"
    )


if __name__ == "__main__":
    main()
