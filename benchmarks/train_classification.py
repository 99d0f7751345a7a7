"""Accuracy and speed of a classification recipe (default: Fashion-MNIST ResNet-20).

Trains the recipe from scratch into a fresh output_dir, then prints a
markdown row for BENCHMARKS.md: test top-1/top-5, wall-clock, time per
epoch and training images/s (from history.csv and the run's timings).

    python benchmarks/train_classification.py \
        tasks/classification/fashion_mnist_resnet20.yaml --set train.epochs=15

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
from keras_resnet.training.runner import train_from_config


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", default="tasks/classification/fashion_mnist_resnet20.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output-dir", default="runs/benchmark_classification")
    args = parser.parse_args()
    overrides = [*args.set, f"output_dir={args.output_dir}"]
    cfg = load_config(args.recipe, overrides)
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    start = time.time()
    metrics = train_from_config(args.recipe, overrides)
    wall = time.time() - start
    epochs = metrics["epochs"]
    result = {
        "recipe": args.recipe,
        "overrides": args.set,
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "epochs": epochs,
        "wall_minutes": round(wall / 60, 2),
        "seconds_per_epoch": round(metrics["train_seconds_this_session"] / epochs, 1),
        "train_images_per_second": metrics["train_images_per_second"],
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "tensorflow": tf.__version__,
    }
    with open(os.path.join(cfg.output_dir, "benchmark.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    print(
        f"| {cfg.model.backbone} | {cfg.train.mixed_precision} | {epochs} | {result['top1']:.4f} | "
        f"{result['top5']:.4f} | {result['wall_minutes']:.1f} | {result['seconds_per_epoch']:.0f} | "
        f"{result['train_images_per_second']:.0f} |"
    )


if __name__ == "__main__":
    main()
