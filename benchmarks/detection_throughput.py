"""Training throughput (images/s) of RetinaNet variants on synthetic data, measured side by side.

Random 0..255 images with 1-6 random boxes each, encoded by each model's
own label encoder; every variant gets a few warm-up steps of `fit`, then
variants are timed round-robin (`--rounds`) so machine noise hits all of
them alike. Prints the median images/s per variant and its ratio to the
first variant. A round times the steps after the first batch of one `fit`
call (`step_timer.timed_fit`; before 2026-12-03 `fit`'s start-up was timed
too, which dominated short rounds).

    python benchmarks/detection_throughput.py --rounds 3
"""

import argparse
import statistics

import keras
import numpy as np
import tensorflow as tf
from step_timer import timed_fit

NARROW = {"stackwise_num_filters": [32, 64, 128, 256]}
HEAD = {"fpn_width": 64, "head_depth": 2, "min_level": 3, "max_level": 5, "anchor_sizes": [24, 48, 96]}
# name -> (policy, input size, backbone overrides, detector overrides)
VARIANTS = {
    "recipe_bf16": ("mixed_bfloat16", 256, NARROW, HEAD),
    "recipe_fp32": ("float32", 256, NARROW, HEAD),
    "quarter_width_fpn32_fp32": ("float32", 256, {"stackwise_num_filters": [16, 32, 64, 128]},
                                 {**HEAD, "fpn_width": 32}),
    "recipe_192px_fp32": ("float32", 192, NARROW, {**HEAD, "anchor_sizes": [18, 36, 72]}),
    "recipe_3_anchors_fp32": ("float32", 256, NARROW, {**HEAD, "anchor_scales": [1.0, 1.5]}),
    "recipe_head_depth1_fp32": ("float32", 256, NARROW, {**HEAD, "head_depth": 1}),
    "quarter_width_fpn32_bf16": ("mixed_bfloat16", 256, {"stackwise_num_filters": [16, 32, 64, 128]},
                                 {**HEAD, "fpn_width": 32}),
    "quarter_width_fpn48_bf16": ("mixed_bfloat16", 256, {"stackwise_num_filters": [16, 32, 64, 128]},
                                 {**HEAD, "fpn_width": 48}),
    "full_width_fpn128_fp32": ("float32", 256, {}, {**HEAD, "fpn_width": 128}),
}


def build(policy, size, backbone_args, detector_args):
    from keras_resnet import ResNetBackbone
    from keras_resnet.models.retinanet import RetinaNetDetector, RetinaNetLoss

    keras.mixed_precision.set_global_policy(policy)
    backbone = ResNetBackbone.from_preset("resnet18", input_shape=(size, size, 1), **backbone_args)
    model = RetinaNetDetector(backbone, 10, **detector_args)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=RetinaNetLoss(10))
    keras.mixed_precision.set_global_policy("float32")
    return model


def synthetic_dataset(model, size, batch, rng):
    count = batch * 4
    images = (rng.random((count, size, size, 1)) * 255).astype("float32")
    corners = rng.uniform(0, size * 0.7, (count, 6, 2))
    sides = rng.uniform(size * 0.08, size * 0.3, (count, 6, 2))
    boxes = np.concatenate([corners, np.minimum(corners + sides, size)], -1).astype("float32")
    classes = rng.integers(0, 10, (count, 6)).astype("int32")
    classes[rng.random((count, 6)) < 0.4] = -1
    targets = model.make_label_encoder()(boxes, classes)
    return tf.data.Dataset.from_tensor_slices((images, targets)).batch(batch).cache().repeat()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    models = {}
    for name in args.variants:
        policy, size, backbone_args, detector_args = VARIANTS[name]
        model = build(policy, size, backbone_args, detector_args)
        dataset = synthetic_dataset(model, size, args.batch, rng)
        model.fit(dataset, steps_per_epoch=3, epochs=1, verbose=0)
        models[name] = (model, dataset)
    rates = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, (model, dataset) in models.items():
            rates[name].append(timed_fit(model, dataset, args.steps, args.batch)[0])
    first = statistics.median(rates[args.variants[0]])
    print(f"| variant | params | anchors | train img/s (median of {args.rounds}) | ratio to first |")
    print("|---|---:|---:|---:|---:|")
    for name, values in rates.items():
        model, median = models[name][0], statistics.median(values)
        print(f"| {name} | {model.count_params():,} | {model.num_anchors:,} | {median:.1f} | {median / first:.2f} |")


if __name__ == "__main__":
    main()
