"""Accuracy and speed of a segmentation or detection recipe, trained from scratch.

Trains the recipe into a fresh output_dir, then prints a markdown row for
BENCHMARKS.md: validation mIoU and pixel accuracy (segmentation) or COCO
mAP, AP50 and AP75 by pycocotools (detection), wall-clock, time per epoch
and training images/s.

    python benchmarks/train_task.py tasks/segmentation/mosaic_deeplabv3plus_resnet18.yaml
    python benchmarks/train_task.py tasks/detection/mosaic_retinanet_resnet18.yaml --output-dir runs/bench_det
    python benchmarks/train_task.py --set train.epochs=1 data.mosaic_train_size=64 data.mosaic_val_size=16

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

DEFAULT_RECIPE = "tasks/segmentation/mosaic_deeplabv3plus_resnet18.yaml"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output-dir", default="runs/benchmark_task")
    args = parser.parse_args()
    overrides = [*args.set, f"output_dir={args.output_dir}"]
    cfg = load_config(args.recipe, overrides)
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    start = time.time()
    metrics = train_from_config(args.recipe, overrides)
    wall = time.time() - start
    epochs = metrics["epochs"]
    task = cfg.task
    scores = ("mIoU", "pixel_accuracy") if task == "segmentation" else ("mAP", "AP50", "AP75")
    result = {
        "recipe": args.recipe,
        "overrides": args.set,
        **{key: metrics[key] for key in scores},
        "epochs": epochs,
        "wall_minutes": round(wall / 60, 2),
        "seconds_per_epoch": round(metrics["train_seconds_this_session"] / epochs, 1),
        "train_images_per_second": metrics["train_images_per_second"],
        "cpu_count": os.cpu_count(),
        "gpus": len(tf.config.list_logical_devices("GPU")),
        "machine": platform.processor() or platform.machine(),
        "tensorflow": tf.__version__,
    }
    with open(os.path.join(cfg.output_dir, "benchmark.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    precision = cfg.train.mixed_precision
    shape = "x".join(map(str, cfg.model.input_shape))
    print(f"| recipe | backbone | head | input | precision | epochs | {' | '.join(scores)} | wall (min) "
          "| s/epoch | train img/s |")
    print(
        f"| `{os.path.basename(args.recipe)}` | {cfg.model.backbone} | {cfg.model.head} | {shape} | "
        f"{precision} | {epochs} | {' | '.join(f'{result[key]:.4f}' for key in scores)} | "
        f"{result['wall_minutes']:.1f} | {result['seconds_per_epoch']:.0f} | {result['train_images_per_second']:.0f} |"
    )


if __name__ == "__main__":
    main()
