"""FLOP utilisation of training: images/s and GFLOP/s of the train step against a dense matmul (issue 31).

For each model, the compiled `fit` train step (the task's loss, SGD) is timed
on synthetic data from a cached tf.data pipeline with `step_timer.timed_fit`
(from the end of the first batch of a `fit` call to the end of its last).
Achieved GFLOP/s = MACs per image x 2 (FLOPs) x 3 (forward + backward) x
images/s. In the same process, a dense `tf.matmul` of the policy's compute
dtype (`--matmul-size` square, in a `tf.function`, about 0.6 s of repeats) is
timed between model timings, round after round (`--rounds`), so machine noise
hits both alike: each model timing is compared with the mean of the matmul
timings just before and just after it, and the ratio printed is the median
over rounds of model GFLOP/s / that matmul GFLOP/s.

MACs: `count_macs` (Conv2D and Dense layers, each counted once at its first
call) is printed, but the GFLOP/s are computed from the MACs of every Conv2D,
depthwise conv and MatMul op of the traced forward graph at batch 1
(`graph_macs`): the two agree on the classifiers, while `count_macs` misses
the convs inside custom layers (our `FPN`, keras-hub's heads and ASPP) and
counts RetinaNet's level-shared head convs at P3 only.

Models (`--models`, default: all that are installed):

* recipe: the default recipe's network (tasks/classification/
  fashion_mnist_resnet18_narrow.yaml) built and compiled exactly as training
  does (`classification.build_classifier` and `classification._compile`:
  label-smoothed categorical cross-entropy, top-1/top-5 metrics, SGD Nesterov
  with weight decay over the warm-up cosine schedule), batch 128, 28x28x1,
  one-hot labels from a fixed cached batch. Not included: the run's callbacks
  (NaN check, checkpoints, CSV log) and the real input pipeline.
* recipe_data: the same network and compile fed by the recipe's own training
  pipeline (`classification._datasets`: Fashion-MNIST from local files,
  shuffle, random crop, flip and erasing on the same cores, one-hot), so the
  difference from `recipe` is what the input pipeline costs.
* fallback, fallback_data: the same two for the network the time budget
  trains instead on a slow machine (the recipe's `train.time_budget_fallback`:
  ResNet-10 at quarter width, 3.6 M MACs per image).
* resnet50_224, resnet50_160: `ResNetClassifier.from_preset("resnet50")`,
  1000 classes, batch 16.
* retinanet_512: `RetinaNetDetector.from_preset("resnet50", num_classes=20)`
  with `RetinaNetLoss` (the default box loss), batch 2, targets encoded in the
  input pipeline by its label encoder (as training does).
* deeplabv3plus_512: `ResNetSegmenter.from_preset("resnet50", 21,
  head="deeplabv3plus")` (output stride 32) with the default segmentation
  loss, batch 2.
* deeplabv3plus_separable_512: the same with `separable=True`
  (depthwise-separable 3x3 convs in the ASPP and the decoder).
* keras_apps_resnet50_224/_160: `keras.applications.ResNet50(weights=None)`
  (stride in the first 1x1 conv of a block: 3.86 GMACs at 224 against our
  4.09), sparse categorical cross-entropy.
* hub_resnet50_224/_160, hub_retinanet_512, hub_deeplabv3plus_512: keras-hub's
  ResNet-50 v1 classifier, RetinaNet (P3-P7, P6 from C5, 4-conv heads without
  norm, 9 anchors: our defaults) and DeepLabV3+ (ASPP on P5 at output stride
  32, rates 6/12/18, decoder on P2: the example of its backbone's docstring), built
  from their configurations (no download), with their own default losses
  (its RetinaNet encodes the boxes inside the train step), except DeepLabV3+'s
  one-hot cross-entropy: sparse cross-entropy from logits on integer masks.

"time ours/theirs" on a keras-hub or keras.applications row is our train
step time over theirs for the same task and input (the convention of issue
31: below 1 is ours faster), from the medians of the same run.

`--profile` instead profiles the train step of the recipe (or of
`--profile-model`, any model above) with TensorFlow's
profiler for `--profile-steps` steps and prints op time by type from the
`.xplane.pb` (read with the `xplane_pb2` protobuf that TensorFlow ships):
summed op time per category on the executor threads, the wall time during
which no op runs inside the train function, and the host time between steps.

    python benchmarks/utilisation.py --quick --models recipe resnet50_160
    python benchmarks/utilisation.py --models recipe resnet50_160 keras_apps_resnet50_160 hub_resnet50_160
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/utilisation.py --models recipe resnet50_160
    python benchmarks/utilisation.py --profile --profile-steps 5
"""

import argparse
import collections
import glob
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from step_timer import timed_fit

from keras_resnet.models.resnet.analysis import count_macs

tf.get_logger().setLevel("ERROR")  # retracing warnings of the many tf.functions built here

RECIPE = Path(__file__).resolve().parents[1] / "tasks/classification/fashion_mnist_resnet18_narrow.yaml"
# Fashion-MNIST training set pixel statistics (0..255); only the normalisation layer's constants, not the speed.
FASHION_MNIST_INFO = {"mean": [72.94], "std": [90.02]}
DETECTION_CLASSES, SEGMENTATION_CLASSES = 20, 21
BOXES_PER_IMAGE = 6


# ----------------------------------------------------------------------------
# Machine
# ----------------------------------------------------------------------------
def machine_line():
    """CPU model and flags, cores, the oneDNN cap, TF/Keras(-hub) versions."""
    model, flags = None, None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model is None:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and flags is None:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    model, flags = model or platform.processor() or "unknown CPU", flags or set()
    from keras_resnet.training.devices import cpu_has_native_bfloat16

    present = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in ("avx2", "avx512f", "avx512_bf16"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or "unset"
    hub = _keras_hub()
    return (f"{model}; {present}; {cores} cores (os.cpu_count {os.cpu_count()}); ONEDNN_MAX_CPU_ISA={cap} "
            f"(native bf16 for oneDNN: {'yes' if cpu_has_native_bfloat16() else 'no'}); TensorFlow {tf.__version__}, "
            f"Keras {keras.__version__}, keras-hub {hub.__version__ if hub else 'not installed'}; "
            f"threads intra/inter {tf.config.threading.get_intra_op_parallelism_threads()}/"
            f"{tf.config.threading.get_inter_op_parallelism_threads()} (0 = TensorFlow's default)")


def load_average():
    return "/".join(f"{value:.2f}" for value in os.getloadavg())


_HUB = []


def _keras_hub():
    """keras_hub or None (cached; the reason it is missing is printed once by `main`)."""
    if not _HUB:
        try:
            import keras_hub
        except Exception as error:  # noqa: BLE001 - any import failure means: skip its rows
            keras_hub = None
            _HUB.append(None)
            _HUB.append(f"{type(error).__name__}: {error}")
            return None
        _HUB.extend([keras_hub, None])
    return _HUB[0]


# ----------------------------------------------------------------------------
# MACs and the matmul reference
# ----------------------------------------------------------------------------
def graph_macs(model):
    """Multiply-accumulates per image of every Conv2D / depthwise conv / MatMul op of the forward graph (batch 1)."""
    shape = [1, *model.inputs[0].shape[1:]]
    forward = tf.function(lambda x: model(x, training=False))
    graph = forward.get_concrete_function(tf.TensorSpec(shape, "float32")).graph
    total = 0
    for op in graph.get_operations():
        if op.type == "Conv2D":  # output N,H,W,Cout x kernel kh,kw,Cin
            out, kernel = op.outputs[0].shape, op.inputs[1].shape
            total += int(np.prod(out)) * kernel[0] * kernel[1] * kernel[2]
        elif op.type == "DepthwiseConv2dNative":
            out, kernel = op.outputs[0].shape, op.inputs[1].shape
            total += int(np.prod(out)) * kernel[0] * kernel[1]
        elif op.type in ("MatMul", "BatchMatMulV2", "BatchMatMulV3"):
            a = op.inputs[0].shape
            adjoint = op.get_attr("transpose_a" if op.type == "MatMul" else "adj_x")
            total += int(np.prod(op.outputs[0].shape)) * (a[-2] if adjoint else a[-1])
    return int(total)


class Matmul:
    """A dense `size` x `size` matmul of `dtype` in a `tf.function`; `gflops()` times about `seconds` of repeats."""

    def __init__(self, size, dtype, seconds):
        self.size = size
        self.a = tf.cast(tf.random.normal((size, size), seed=1), dtype)
        self.b = tf.cast(tf.random.normal((size, size), seed=2), dtype)
        self.matmul = tf.function(tf.matmul)
        self.matmul(self.a, self.b).numpy()
        start = time.perf_counter()
        self.matmul(self.a, self.b).numpy()
        self.repeats = max(2, round(seconds / (time.perf_counter() - start)))

    def gflops(self):
        start = time.perf_counter()
        for _ in range(self.repeats):
            result = self.matmul(self.a, self.b)
        result[0, 0].numpy()
        return 2 * self.size**3 * self.repeats / (time.perf_counter() - start) / 1e9


# ----------------------------------------------------------------------------
# Models: name -> builder(batch, rng) -> (model, dataset)
# ----------------------------------------------------------------------------
def _sgd():
    return keras.optimizers.SGD(0.01, momentum=0.9)


def _images(rng, count, size, channels=3):
    return (rng.random((count, size, size, channels)) * 255).astype("float32")


def _pipeline(x, y, batch):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True).cache().repeat()


def _boxes(rng, count, size):
    """Random xyxy boxes (absolute pixels) and classes, all valid."""
    corners = rng.uniform(0, size * 0.7, (count, BOXES_PER_IMAGE, 2))
    sides = rng.uniform(size * 0.08, size * 0.3, (count, BOXES_PER_IMAGE, 2))
    boxes = np.concatenate([corners, np.minimum(corners + sides, size)], -1).astype("float32")
    return boxes, rng.integers(0, DETECTION_CLASSES, (count, BOXES_PER_IMAGE)).astype("int32")


def build_recipe(batch, rng, overrides=()):
    """The default recipe's network (with `overrides`, as `--set` takes them) compiled as training does, on a
    cached synthetic batch of `batch` one-hot labelled images."""
    from keras_resnet.training import classification, optimizers
    from keras_resnet_settings.loading import load_config

    cfg = load_config(RECIPE, overrides)
    model = classification.build_classifier(cfg, dict(FASHION_MNIST_INFO))
    steps_per_epoch = 60000 // cfg.data.batch_size
    classification._compile(model, cfg.train, optimizers.make_optimizer(cfg.train, steps_per_epoch, cfg.train.epochs))
    size, _, channels = cfg.model.input_shape
    labels = np.eye(cfg.model.num_classes, dtype="float32")[rng.integers(0, cfg.model.num_classes, batch * 2)]
    return model, _pipeline(_images(rng, batch * 2, size, channels), labels, batch)


def fallback_overrides():
    """The recipe's `train.time_budget_fallback` as `--set` strings: the cheaper network the budget trains."""
    from keras_resnet.training.time_budget import fallback_overrides as overrides
    from keras_resnet_settings.loading import load_config

    return overrides(load_config(RECIPE).train)


def build_fallback(batch, rng):
    """`build_recipe` of the budget's fallback network (ResNet-10 at quarter width)."""
    return build_recipe(batch, rng, fallback_overrides())


def build_recipe_data(batch, rng, overrides=()):
    """The recipe's network fed by the recipe's own training pipeline (Fashion-MNIST, augmentation on the same cores)."""
    from keras_resnet.training import classification, optimizers
    from keras_resnet_settings.loading import load_config

    cfg = load_config(RECIPE, overrides)
    train_ds, _, info = classification._datasets(cfg)
    model = classification.build_classifier(cfg, info)
    steps_per_epoch = info["num_train"] // cfg.data.batch_size
    classification._compile(model, cfg.train, optimizers.make_optimizer(cfg.train, steps_per_epoch, cfg.train.epochs))
    return model, classification._one_hot(train_ds, cfg.model.num_classes).repeat()


def build_fallback_data(batch, rng):
    """`build_recipe_data` of the budget's fallback network."""
    return build_recipe_data(batch, rng, fallback_overrides())


def _classifier_data(model, batch, rng, size):
    return _pipeline(_images(rng, batch * 2, size), rng.integers(0, 1000, batch * 2).astype("int32"), batch)


def build_resnet50(size):
    def build(batch, rng):
        from keras_resnet import ResNetClassifier

        model = ResNetClassifier.from_preset("resnet50", num_classes=1000, input_shape=(size, size, 3))
        model.compile(optimizer=_sgd(), loss="sparse_categorical_crossentropy")
        return model, _classifier_data(model, batch, rng, size)
    return build


def build_keras_apps_resnet50(size):
    def build(batch, rng):
        model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3), classes=1000)
        model.compile(optimizer=_sgd(), loss="sparse_categorical_crossentropy")
        return model, _classifier_data(model, batch, rng, size)
    return build


def build_retinanet(batch, rng, size=512):
    from keras_resnet.models.retinanet import RetinaNetDetector, RetinaNetLoss
    from keras_resnet_settings.loading import load_config

    defaults = load_config(None).train
    model = RetinaNetDetector.from_preset("resnet50", num_classes=DETECTION_CLASSES, input_shape=(size, size, 3))
    model.compile(optimizer=_sgd(), loss=RetinaNetLoss(DETECTION_CLASSES, box_loss=defaults.box_loss,
                                                       box_variance=model.box_variance))
    boxes, classes = _boxes(rng, batch * 2, size)
    return model, _pipeline(_images(rng, batch * 2, size), model.make_label_encoder()(boxes, classes), batch)


def build_deeplab(batch, rng, size=512, separable=False):
    from keras_resnet.data.segmentation import IGNORE_INDEX
    from keras_resnet.models.segmentation.losses import make_segmentation_loss
    from keras_resnet.models.segmentation.segmenter import ResNetSegmenter
    from keras_resnet_settings.loading import load_config

    model = ResNetSegmenter.from_preset("resnet50", SEGMENTATION_CLASSES, head="deeplabv3plus",
                                        input_shape=(size, size, 3), separable=separable)
    model.compile(optimizer=_sgd(), loss=make_segmentation_loss(load_config(None).train.loss, IGNORE_INDEX))
    masks = rng.integers(0, SEGMENTATION_CLASSES, (batch * 2, size, size)).astype("int32")
    return model, _pipeline(_images(rng, batch * 2, size), masks, batch)


def _hub_resnet50(size):
    keras_hub = _keras_hub()
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 128, 256, 512],
        stackwise_num_blocks=[3, 4, 6, 3], stackwise_num_strides=[1, 2, 2, 2], block_type="bottleneck_block",
        use_pre_activation=False, image_shape=(size, size, 3))


def build_deeplab_separable(batch, rng, size=512):
    """Our DeepLabV3+ with depthwise-separable ASPP and decoder convs (`separable=True`)."""
    return build_deeplab(batch, rng, size, separable=True)


def build_hub_resnet50(size):
    def build(batch, rng):
        keras_hub = _keras_hub()
        model = keras_hub.models.ResNetImageClassifier(_hub_resnet50(size), num_classes=1000)
        model.compile(optimizer=_sgd(), metrics=[])  # its default loss: sparse CE from logits
        return model, _classifier_data(model, batch, rng, size)
    return build


def build_hub_retinanet(batch, rng, size=512):
    keras_hub = _keras_hub()
    backbone = keras_hub.models.RetinaNetBackbone(image_encoder=_hub_resnet50(size), min_level=3, max_level=7,
                                                  use_p5=False, image_shape=(size, size, 3))
    model = keras_hub.models.RetinaNetObjectDetector(backbone, num_classes=DETECTION_CLASSES,
                                                     bounding_box_format="xyxy")
    model.compile(optimizer=_sgd())  # its default losses: Huber boxes, focal classes
    boxes, classes = _boxes(rng, batch * 2, size)
    return model, _pipeline(_images(rng, batch * 2, size), {"boxes": boxes, "labels": classes}, batch)


def build_hub_deeplab(batch, rng, size=512):
    keras_hub = _keras_hub()
    backbone = keras_hub.models.DeepLabV3Backbone(
        image_encoder=_hub_resnet50(size), spatial_pyramid_pooling_key="P5", upsampling_size=8,
        dilation_rates=[6, 12, 18], low_level_feature_key="P2", projection_filters=48, image_shape=(size, size, 3))
    model = keras_hub.models.DeepLabV3ImageSegmenter(backbone, num_classes=SEGMENTATION_CLASSES)
    # Its default loss is the one-hot categorical cross-entropy; integer masks like ours need the sparse one.
    model.compile(optimizer=_sgd(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=[])
    masks = rng.integers(0, SEGMENTATION_CLASSES, (batch * 2, size, size)).astype("int32")
    return model, _pipeline(_images(rng, batch * 2, size), masks, batch)


# name -> (builder, input, batch, default steps per round, library, our model for "ours/theirs")
MODELS = {
    "recipe": (build_recipe, "28x28x1", 128, 12, "ours", None),
    "recipe_data": (build_recipe_data, "28x28x1", 128, 12, "ours", None),
    "fallback": (build_fallback, "28x28x1", 128, 24, "ours", None),
    "fallback_data": (build_fallback_data, "28x28x1", 128, 24, "ours", None),
    "resnet50_224": (build_resnet50(224), "224x224x3", 16, 4, "ours", None),
    "resnet50_160": (build_resnet50(160), "160x160x3", 16, 4, "ours", None),
    "retinanet_512": (build_retinanet, "512x512x3", 2, 4, "ours", None),
    "deeplabv3plus_512": (build_deeplab, "512x512x3", 2, 4, "ours", None),
    "deeplabv3plus_separable_512": (build_deeplab_separable, "512x512x3", 2, 4, "ours", None),
    "keras_apps_resnet50_224": (build_keras_apps_resnet50(224), "224x224x3", 16, 4, "keras.applications",
                                "resnet50_224"),
    "keras_apps_resnet50_160": (build_keras_apps_resnet50(160), "160x160x3", 16, 4, "keras.applications",
                                "resnet50_160"),
    "hub_resnet50_224": (build_hub_resnet50(224), "224x224x3", 16, 4, "keras-hub", "resnet50_224"),
    "hub_resnet50_160": (build_hub_resnet50(160), "160x160x3", 16, 4, "keras-hub", "resnet50_160"),
    "hub_retinanet_512": (build_hub_retinanet, "512x512x3", 2, 4, "keras-hub", "retinanet_512"),
    "hub_deeplabv3plus_512": (build_hub_deeplab, "512x512x3", 2, 4, "keras-hub",
                              ("deeplabv3plus_512", "deeplabv3plus_separable_512")),
}


# ----------------------------------------------------------------------------
# Utilisation run
# ----------------------------------------------------------------------------
def run_utilisation(args):
    rng = np.random.default_rng(0)
    names = []
    for name in args.models:
        if MODELS[name][4] == "keras-hub" and _keras_hub() is None:
            print(f"skipping {name}: keras-hub is not importable ({_HUB[1]})", flush=True)
        else:
            names.append(name)
    compute_dtype = keras.mixed_precision.Policy(args.dtype).compute_dtype
    matmul = Matmul(args.matmul_size, compute_dtype, 0.1 if args.quick else 0.6)
    benches = {}
    for name in names:
        builder, _, batch, steps, _, _ = MODELS[name]
        batch = args.batch or batch
        start = time.perf_counter()
        model, dataset = builder(batch, rng)
        macs, counted = graph_macs(model), count_macs(model)
        warmup = 1 if args.quick else 2
        bench = {"model": model, "dataset": dataset, "macs": macs, "count_macs": counted, "batch": batch,
                 "steps": args.steps or (2 if args.quick else steps), "rates": [], "cpu_ms": [], "matmul": [],
                 "ratios": []}
        if args.inference:
            bench["images"] = next(iter(dataset))[0]
            bench["forward"] = tf.function(lambda x, model=model: model(x, training=False))
            for _ in range(warmup):  # traces the forward pass
                tf.nest.map_structure(lambda t: t.numpy(), bench["forward"](bench["images"]))
        else:
            model.fit(dataset, steps_per_epoch=warmup, epochs=1, verbose=0)  # traces the train step
        benches[name] = bench
        print(f"built {name}: {macs / 1e9:.3f} GMACs/image (count_macs {counted / 1e9:.3f}), "
              f"{model.count_params():,} params, {time.perf_counter() - start:.0f} s with warm-up", flush=True)
    before = matmul.gflops()
    for round_index in range(args.rounds):
        for name, bench in benches.items():
            batch = bench["batch"]
            if args.inference:
                rate, cpu_ms = timed_forward(bench["forward"], bench["images"], bench["steps"], batch)
            else:
                rate, cpu_ms = timed_fit(bench["model"], bench["dataset"], bench["steps"], batch)
            after = matmul.gflops()
            reference, before = (before + after) / 2, after  # the matmul timings just before and just after
            achieved = bench["macs"] * flops_per_mac(args) * rate / 1e9
            bench["rates"].append(rate)
            bench["cpu_ms"].append(cpu_ms)
            bench["matmul"].append(reference)
            bench["ratios"].append(achieved / reference)
            print(f"round {round_index + 1} {name}: {rate:.2f} img/s, {achieved:.1f} GFLOP/s, matmul "
                  f"{reference:.1f} GFLOP/s, ratio {achieved / reference:.3f}", flush=True)
    return benches, compute_dtype


def flops_per_mac(args):
    """2 FLOPs per multiply-accumulate, x3 for a train step (forward + backward), x1 for inference."""
    return 2 if args.inference else 6


def timed_forward(forward, images, steps, batch):
    """(images/s, CPU ms per call) of `steps - 1` timed calls of `forward` after one untimed call."""
    tf.nest.map_structure(lambda t: t.numpy(), forward(images))
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps - 1):
        outputs = forward(images)
    tf.nest.map_structure(lambda t: t.numpy(), outputs)
    seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
    return (steps - 1) * batch / seconds, cpu_seconds / (steps - 1) * 1000


def print_table(benches, args, compute_dtype, machine, load_before, load_after, seconds):
    print()
    print(f"| model | library | input | batch | dtype | GMACs/image (count_macs) | images/s | GFLOP/s | "
          f"{compute_dtype} matmul {args.matmul_size}^2 GFLOP/s | ratio | CPU s / wall s | time ours/theirs |")
    print("|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, bench in benches.items():
        _, size, _, _, library, ours = MODELS[name]
        batch = bench["batch"]
        rate = statistics.median(bench["rates"])
        step_ms = batch / rate * 1000
        busy = statistics.median(bench["cpu_ms"]) / step_ms
        # our step time / theirs = their images/s / ours
        ours = (ours,) if isinstance(ours, str) else ours or ()
        versus = " / ".join(f"{rate / statistics.median(benches[our]['rates']):.2f} ({our})"
                            for our in ours if our in benches)
        print(f"| {name} | {library} | {size} | {batch} | {args.dtype} | {bench['macs'] / 1e9:.3f} "
              f"({bench['count_macs'] / 1e9:.3f}) | {rate:.2f} | "
              f"{bench['macs'] * flops_per_mac(args) * rate / 1e9:.1f} | "
              f"{statistics.median(bench['matmul']):.1f} | {statistics.median(bench['ratios']):.3f} | {busy:.2f} | "
              f"{versus} |")
    print()
    print(f"machine: {machine}")
    print(f"load average (1/5/15 min) before {load_before}, after {load_after}; {seconds / 60:.1f} min")
    print(f"medians of {args.rounds} interleaved rounds; steps per round (first untimed): "
          + ", ".join(f"{name} {bench['steps']}" for name, bench in benches.items()))
    what = "forward pass (inference)" if args.inference else "train step"
    print(f"timed: the {what}; GFLOP/s = graph MACs x {flops_per_mac(args)} x images/s; ratio = median over "
          "rounds of model GFLOP/s / mean of the matmul GFLOP/s timed just before and after; CPU s / wall s = "
          "process CPU time (all threads) per wall second of the timed steps (at most the core count); "
          "time ours/theirs = our step time / theirs (<1: ours faster)")


# ----------------------------------------------------------------------------
# Profile
# ----------------------------------------------------------------------------
# Op type -> category (the first pattern contained in the type wins; the types are oneDNN's `_MklNative*`).
CATEGORIES = [
    ("Conv2DBackpropFilter", "conv backprop filter"),
    ("Conv2DBackpropInput", "conv backprop input"),
    ("Conv2D", "conv2d forward"),
    ("BatchNormGrad", "batchnorm backward"),
    ("BatchNorm", "batchnorm forward"),
    ("Relu", "relu / relu grad"),
    ("MatMul", "matmul (dense)"),
    ("AddN", "add / addn"),
    ("AddV2", "add / addn"),
    ("Pad", "pad / slice / transpose"),
    ("Slice", "pad / slice / transpose"),
    ("Transpose", "pad / slice / transpose"),
    ("MklToTf", "layout conversion"),
    ("ToMkl", "layout conversion"),
    ("Variable", "variable read / assign"),
    ("ResourceApply", "optimizer update"),
    ("Cast", "cast"),
    ("Mul", "elementwise mul / sub / div"),
    ("Sub", "elementwise mul / sub / div"),
    ("Div", "elementwise mul / sub / div"),
]
STEP_EVENTS = ("multi_step_on_iterator", "one_step_on_iterator", "one_step_on_data_distributed")


def categorise(op_type):
    return next((category for pattern, category in CATEGORIES if pattern in op_type), "other")


def summarise_xplane(path):
    """Op time by category, op-free wall time inside the train function and host time between steps."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    plane = next(p for p in space.planes if p.name == "/host:CPU")
    steps, ops, by_category, by_type = [], [], collections.Counter(), collections.Counter()
    for line in plane.lines:
        origin = line.timestamp_ns * 1000
        for event in line.events:
            meta = plane.event_metadata[event.metadata_id]
            start, end = origin + event.offset_ps, origin + event.offset_ps + event.duration_ps
            if line.name == "python":
                if meta.name in STEP_EVENTS:
                    steps.append((start, end))
            elif meta.display_name and ":" in meta.name and not line.name.startswith("tf_data"):
                ops.append((start, end))
                by_category[categorise(meta.display_name)] += event.duration_ps
                by_type[meta.display_name] += event.duration_ps
    if not steps:
        raise RuntimeError(f"no train-function events ({', '.join(STEP_EVENTS)}) in {path}")
    steps.sort()
    busy = 0  # union of op intervals inside the train function calls
    merged = []
    for start, end in sorted(ops):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    for step_start, step_end in steps:
        busy += sum(max(0, min(end, step_end) - max(start, step_start)) for start, end in merged)
    function_ps = sum(end - start for start, end in steps)
    gaps_ps = sum(steps[i + 1][0] - steps[i][1] for i in range(len(steps) - 1))
    return {"steps": len(steps), "function_ps": function_ps, "busy_ps": busy, "gaps_ps": gaps_ps,
            "by_category": by_category, "by_type": by_type}


def run_profile(args):
    rng = np.random.default_rng(0)
    builder, _, batch, _, _, _ = MODELS[args.profile_model]
    batch = args.batch or batch
    model, dataset = builder(batch, rng)
    model.fit(dataset, steps_per_epoch=3, epochs=1, verbose=0)
    log_dir = tempfile.mkdtemp(prefix="utilisation_profile_")
    tf.profiler.experimental.start(log_dir)
    start = time.perf_counter()
    model.fit(dataset, steps_per_epoch=args.profile_steps, epochs=1, verbose=0)
    seconds = time.perf_counter() - start
    tf.profiler.experimental.stop()
    paths = sorted(glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        raise RuntimeError(f"the profiler wrote no .xplane.pb under {log_dir}")
    summary = summarise_xplane(paths[-1])
    steps = summary["steps"]
    total_ops = sum(summary["by_category"].values())
    per_step = lambda ps: ps / 1e9 / steps
    print(f"\nprofile of {args.profile_model}'s train step ({args.dtype}, batch {batch}): {args.profile_steps} steps in "
          f"{seconds:.2f} s with the profiler on; trace {paths[-1]}")
    print("| op category | ms per step (summed over executor threads) | share of op time |")
    print("|---|---:|---:|")
    for category, ps in summary["by_category"].most_common():
        print(f"| {category} | {per_step(ps):.1f} | {ps / total_ops:.1%} |")
    print(f"| **all ops** | {per_step(total_ops):.1f} | 100% |")
    function_ms = per_step(summary["function_ps"])
    idle_ms = per_step(summary["function_ps"] - summary["busy_ps"])
    print(f"\ntrain function: {function_ms:.1f} ms per step wall; no op running for {idle_ms:.1f} ms of it "
          f"({idle_ms / function_ms:.1%}); ops overlap on the executor threads {per_step(total_ops) / function_ms:.2f}x "
          f"on average; host time between train-function calls {per_step(summary['gaps_ps']):.1f} ms per step "
          f"(over {steps - 1} gaps, counted per step of {steps})")
    conv_gflop = graph_macs(model) * 2 * batch / 1e9  # per direction per step (backprop input skips the stem)
    rates = ", ".join(f"{category} {conv_gflop / (per_step(summary['by_category'][category]) / 1000):.0f}"
                      for category in ("conv2d forward", "conv backprop input", "conv backprop filter")
                      if summary["by_category"][category])
    print(f"conv FLOPs per step and direction {conv_gflop:.2f} GFLOP; GFLOP per second of op time (summed over "
          f"threads, so concurrent ops share the cores and these are lower bounds): {rates}")
    print("top op types: " + ", ".join(f"{op_type} {ps / total_ops:.1%}"
                                       for op_type, ps in summary["by_type"].most_common(8)))


# ----------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per round (at least 2, the first untimed); default per model (recipe 12, "
                        "others 4), 2 with --quick")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "mixed_bfloat16"], default="float32")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="1 round of 2 steps, 1 warm-up step: a smoke check")
    parser.add_argument("--inference", action="store_true",
                        help="time the forward pass (training=False, a tf.function) instead of the train step; "
                        "GFLOP/s then counts MACs x 2")
    parser.add_argument("--batch", type=int, default=None, help="batch size for every model (default: per model)")
    parser.add_argument("--profile", action="store_true", help="profile the recipe's train step instead")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--profile-model", choices=list(MODELS), default="recipe",
                        help="the model --profile profiles (fallback: the time budget's cheaper network)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 1
    if args.steps is not None and args.steps < 2:
        parser.error("--steps must be at least 2 (the first step of a round is not timed)")
    return args


def main(argv=None):
    args = parse_args(argv)
    keras.mixed_precision.set_global_policy(args.dtype)
    machine, load_before, start = machine_line(), load_average(), time.perf_counter()
    print(f"machine: {machine}\nload average before: {load_before}\ncommand: {' '.join(sys.argv)}", flush=True)
    if _keras_hub() is None:
        print(f"keras-hub rows skipped: {_HUB[1]}", flush=True)
    if args.profile:
        run_profile(args)
        print(f"load average after: {load_average()}")
        return
    benches, compute_dtype = run_utilisation(args)
    print_table(benches, args, compute_dtype, machine, load_before, load_average(), time.perf_counter() - start)


if __name__ == "__main__":
    main()
