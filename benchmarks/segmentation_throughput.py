"""Training throughput (images/s) of segmenter variants on synthetic data, measured side by side.

Each variant is trained with `fit` on random 0..255 images and random masks
for a few warm-up steps, then timed; variants are interleaved round-robin
(`--rounds`) so machine noise hits all of them alike, and the median
images/s per variant is printed with its ratio to the first variant.
A round times the steps between the first and the last batch of one `fit`
call (`step_timer.timed_fit`), so `fit`'s own start-up (about 0.8 s per call
on a 2-core VM, which dominated 5-10 step rounds before 2026-12-03) is not
counted. The process CPU time per step is printed too (all threads).

    python benchmarks/segmentation_throughput.py --size 64 --batch 32 --rounds 3
"""

import argparse
import statistics

import keras
import numpy as np
import tensorflow as tf
from step_timer import timed_fit

_STEM1_NARROW = {"stem_type": "cifar", "stem_width": 32, "stackwise_num_filters": [32, 64, 128, 256],
                 "stackwise_strides": [2, 2, 2, 2]}
_DEEPLAB_W64 = {"head": "deeplabv3plus", "head_width": 64, "aspp_rates": [1, 2, 3]}
_DEEPLAB_W64_DEC4 = {**_DEEPLAB_W64, "decoder_level": "C3"}  # decoder on C3 (stride 4 with the stride-1 stem)
_DEEPLAB_W64_DEC8_4 = {**_DEEPLAB_W64, "decoder_level": ["C4", "C3"]}  # fuse C4 (stride 8), then C3 (stride 4)
# name -> (policy, preset, backbone overrides, segmenter overrides)
VARIANTS = {
    "deeplab_os16_rates6-12-18_w128": ("mixed_bfloat16", "resnet18", {"output_stride": 16},
                                       {"head": "deeplabv3plus", "head_width": 128}),
    "deeplab_os16_rates6-12-18_w128_fp32": ("float32", "resnet18", {"output_stride": 16},
                                            {"head": "deeplabv3plus", "head_width": 128}),
    "deeplab_os16_rates1-2-3_w128": ("mixed_bfloat16", "resnet18", {"output_stride": 16},
                                     {"head": "deeplabv3plus", "head_width": 128, "aspp_rates": [1, 2, 3]}),
    "deeplab_os32_w128": ("mixed_bfloat16", "resnet18", {}, {"head": "deeplabv3plus", "head_width": 128}),
    "fpn_os32_w128": ("mixed_bfloat16", "resnet18", {}, {"head": "fpn", "head_width": 128}),
    "deeplab_os16_rates1-2-3_narrow_w64": ("mixed_bfloat16", "resnet18",
                                           {"output_stride": 16, "stackwise_num_filters": [32, 64, 128, 256]},
                                           {"head": "deeplabv3plus", "head_width": 64, "aspp_rates": [1, 2, 3]}),
    "deeplab_os16_rates1-2-3_narrow_w64_fp32": ("float32", "resnet18",
                                                {"output_stride": 16, "stackwise_num_filters": [32, 64, 128, 256]},
                                                {"head": "deeplabv3plus", "head_width": 64, "aspp_rates": [1, 2, 3]}),
    "deeplab_os8_rates2-4-6_narrow_w64": ("mixed_bfloat16", "resnet18",
                                          {"output_stride": 8, "stackwise_num_filters": [32, 64, 128, 256]},
                                          {"head": "deeplabv3plus", "head_width": 64, "aspp_rates": [2, 4, 6]}),
    # Stride-1 3x3 stem and a strided first stage (the narrow Fashion-MNIST classifier's layout):
    # C2..C5 at strides 2, 4, 8, 16 with no dilation; the decoder fuses C3 (stride 4) or C2 (stride 2).
    "deeplab_stem1_narrow_w64_dec4_fp32": ("float32", "resnet18", _STEM1_NARROW,
                                           _DEEPLAB_W64_DEC4),
    "deeplab_stem1_narrow_w64_dec4_bf16": ("mixed_bfloat16", "resnet18", _STEM1_NARROW,
                                           _DEEPLAB_W64_DEC4),
    "deeplab_stem1_narrow_w64_dec2_fp32": ("float32", "resnet18", _STEM1_NARROW, _DEEPLAB_W64),
    # Candidates against underfitting (2026-12-02): wider deep stages, a wider head, C5 at stride 8.
    "deeplab_stem1_wide34_w64_dec4_bf16": ("mixed_bfloat16", "resnet18",
                                           {**_STEM1_NARROW, "stackwise_num_filters": [32, 64, 192, 384]},
                                           _DEEPLAB_W64_DEC4),
    "deeplab_stem1_narrow_w128_dec4_bf16": ("mixed_bfloat16", "resnet18", _STEM1_NARROW,
                                            {**_DEEPLAB_W64_DEC4, "head_width": 128}),
    "deeplab_stem1_narrow_os8_w64_dec4_bf16": ("mixed_bfloat16", "resnet18",
                                               {**_STEM1_NARROW, "stackwise_strides": [2, 2, 2, 1]},
                                               _DEEPLAB_W64_DEC4),
    # Two-level decoder (2026-12-02, third session): ASPP -> fuse C4 (stride 8) -> fuse C3 (stride 4).
    "deeplab_stem1_narrow_w64_dec8-4_bf16": ("mixed_bfloat16", "resnet18", _STEM1_NARROW,
                                             _DEEPLAB_W64_DEC8_4),
    "deeplab_stem1_narrow_w64_dec8-4_fp32": ("float32", "resnet18", _STEM1_NARROW,
                                             _DEEPLAB_W64_DEC8_4),
    "deeplab_stem1_wide34_w64_dec8-4_bf16": ("mixed_bfloat16", "resnet18",
                                             {**_STEM1_NARROW, "stackwise_num_filters": [32, 64, 192, 384]},
                                             _DEEPLAB_W64_DEC8_4),
    # One block in the first stage (it runs at 32x32 and only feeds C3 when the decoder fuses C4, C3).
    "deeplab_stem1_narrow_blocks1222_w64_dec8-4_bf16": ("mixed_bfloat16", "resnet18",
                                                         {**_STEM1_NARROW, "stackwise_num_blocks": [1, 2, 2, 2]},
                                                         _DEEPLAB_W64_DEC8_4),
    "deeplab_stem1_narrow_blocks1222_w64_dec8-4_fp32": ("float32", "resnet18",
                                                         {**_STEM1_NARROW, "stackwise_num_blocks": [1, 2, 2, 2]},
                                                         _DEEPLAB_W64_DEC8_4),
    "backbone_only_classifier": ("mixed_bfloat16", "resnet18", {}, None),
    # The default recipe's backbone alone (as a classifier): what the head, decoder and per-pixel loss add.
    "backbone_only_stem1_narrow_fp32": ("float32", "resnet18", _STEM1_NARROW, None),
}


def build(policy, preset, backbone_args, segmenter_args, size, jit_compile=False, keras_batch_norm=False):
    keras.mixed_precision.set_global_policy(policy)
    import keras_resnet as kr
    from keras_resnet.layers import blocks
    from keras_resnet.layers import fpn as necks
    from keras_resnet.models.segmentation.segmenter import ResNetSegmenter

    # ':keras_bn' builds the variant with keras.layers.BatchNormalization (unfused) in place of
    # FusedBatchNormalization, to measure what the fused kernel buys.
    norm = keras.layers.BatchNormalization if keras_batch_norm else kr.FusedBatchNormalization
    blocks.FusedBatchNormalization = necks.FusedBatchNormalization = norm

    try:
        shape = (size, size, 1)
        if segmenter_args is None:
            model = kr.ResNetClassifier.from_preset(preset, num_classes=11, input_shape=shape, **backbone_args)
            loss = "sparse_categorical_crossentropy"
        else:
            model = ResNetSegmenter.from_preset(preset, 11, input_shape=shape, **backbone_args, **segmenter_args)
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=loss, jit_compile=jit_compile)
    finally:
        # Restore the library's layer and the default policy even if building fails.
        keras.mixed_precision.set_global_policy("float32")
        blocks.FusedBatchNormalization = necks.FusedBatchNormalization = kr.FusedBatchNormalization
    return model, segmenter_args is None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="steps per round (at least 2; the first is not timed)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS),
                        help="names from VARIANTS; append ':jit' to one to compile its train step with XLA, "
                        "':keras_bn' to build it with keras.layers.BatchNormalization instead of the fused layer")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = (rng.random((args.batch * 4, args.size, args.size, 1)) * 255).astype("float32")
    masks = rng.integers(0, 11, (args.batch * 4, args.size, args.size)).astype("int32")
    labels = rng.integers(0, 11, args.batch * 4).astype("int32")
    for name in args.variants:
        base, _, flag = name.partition(":")
        if base not in VARIANTS or flag not in ("", "jit", "keras_bn"):
            parser.error(f"--variants {name!r}: use one of {', '.join(VARIANTS)}, optionally with ':jit' or "
                         "':keras_bn'")
    models = {}
    for name in args.variants:
        base, _, flag = name.partition(":")
        model, is_classifier = build(*VARIANTS[base], args.size, jit_compile=flag == "jit",
                                     keras_batch_norm=flag == "keras_bn")
        y = labels if is_classifier else masks
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch).cache().repeat()
        model.fit(dataset, steps_per_epoch=3, epochs=1, verbose=0)
        models[name] = (model, dataset)
    rates = {name: [] for name in models}
    cpu_ms = {name: [] for name in models}  # process CPU time per step, all threads
    for _ in range(args.rounds):
        for name, (model, dataset) in models.items():
            rate, step_cpu_ms = timed_fit(model, dataset, args.steps, args.batch)
            rates[name].append(rate)
            cpu_ms[name].append(step_cpu_ms)
    first = statistics.median(rates[args.variants[0]])
    best_first = max(rates[args.variants[0]])
    print(f"| variant | params | train img/s (median of {args.rounds}) | ratio to first | best round | ratio "
          "| CPU ms/step (median) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, values in rates.items():
        median, best = statistics.median(values), max(values)
        print(f"| {name} | {models[name][0].count_params():,} | {median:.1f} | {median / first:.2f} | "
              f"{best:.1f} | {best / best_first:.2f} | {statistics.median(cpu_ms[name]):.0f} |")


if __name__ == "__main__":
    main()
