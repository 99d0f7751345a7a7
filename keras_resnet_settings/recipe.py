"""Every recipe setting, declared once: type, default, allowed values or range, one-line help.

A recipe (YAML) loads into a frozen :class:`Recipe` (`keras_resnet_settings.loading`),
one dataclass per section, nested where the YAML nests::

    task: ...           Recipe.task
    model: {...}        Recipe.model        ModelSettings
    data: {...}         Recipe.data         DataSettings
      augment: {...}    Recipe.data.augment AugmentSettings
    train: {...}        Recipe.train        TrainSettings
    qat: {...}          Recipe.qat          QatSettings
    output_dir: ...     Recipe.output_dir

The `keras-resnet export` options are declared here too (:class:`ExportSettings`),
so the CLI, `export_model` and the reference share one list of allowed values.
`keras-resnet recipe --explain [SECTION]` prints these declarations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from keras_resnet_settings.fields import Settings, setting
from keras_resnet_settings.registry import (
    DETECTION,
    DETECTION_HEADS,
    SEGMENTATION,
    SEGMENTATION_HEADS,
    SOURCES_BY_TASK,
    TASKS,
)

DATA_SOURCES = tuple(dict.fromkeys(source for sources in SOURCES_BY_TASK.values() for source in sources))
# data.sampling=crop: the tasks and sources with images at their own size (not classification, not mosaics).
CROP_TASKS = (SEGMENTATION, DETECTION)
CROP_SOURCES = ("mask_folder", "voc", "coco")
# Sources read from the user's files (data.train and data.val or data.val_split); the others are generated.
FILE_SOURCES = ("image_folder", "mask_folder", "voc", "coco")


def _scale_range(value: list) -> str | None:
    ok = len(value) == 2 and all(v > 0 for v in value) and value[0] <= value[1]
    return None if ok else "must be [low, high] with 0 < low <= high"


def _class_weights(value: list) -> str | None:
    return None if value and all(v >= 0 for v in value) else "must be a non-empty list of numbers >= 0 (one per class)"


def _input_shape(value: list) -> str | None:
    if len(value) != 3 or not all(v > 0 for v in value):
        return "must be a list of 3 positive ints [height, width, channels]"
    if value[2] not in (1, 3):
        return "must have 1 or 3 channels (last entry)"
    return None


@dataclass(frozen=True)
class ModelSettings(Settings):
    """`model:` the network: backbone preset, classes, input, head, weights."""

    backbone: str = setting("resnet20_cifar", "backbone preset (`keras-resnet models` lists them)")
    num_classes: int = setting(
        10, "classes; detection: object classes (>= 1, no background); classification, segmentation: >= 2",
        minimum=1)
    input_shape: list[int] = setting(
        [28, 28, 1], "[height, width, channels] of the model input; channels 1 or 3",
        check=_input_shape, check_text="3 positive ints, channels 1 or 3")
    weights: str | None = setting(
        None, "initial weights: imagenet (the backbone preset's default ImageNet weights, downloaded once and cached) "
        "or a catalogue tag such as torchvision:IMAGENET1K_V1 (`keras-resnet weights` lists them), a .keras model, a "
        "torchvision/timm state dict or a keras.applications .h5")
    freeze_stages: int = setting(-1, "backbone stages kept frozen (-1: none, 0: the stem, k: stem + k stages)",
                                 minimum=-1)
    dropout: float = setting(0.0, "dropout before the classifier", minimum=0, below=1)
    backbone_args: dict = setting({}, "extra ResNetBackbone arguments (e.g. output_stride, drop_path_rate)")
    head: str | None = setting(
        None, "segmentation or detection head (null: the task's default: deeplabv3plus, retinanet)",
        allowed=SEGMENTATION_HEADS + DETECTION_HEADS)
    head_args: dict = setting({}, "extra arguments of the head")
    decoder_args: dict = setting(
        {}, "detection: post-processing (score_threshold, iou_threshold, max_detections, pre_nms_top_k, "
        "top_k_per_level)")


@dataclass(frozen=True)
class AugmentSettings(Settings):
    """`data.augment:` training augmentation."""

    random_crop_padding: int = setting(4, "classification: pad by this many pixels, then crop back", minimum=0)
    horizontal_flip: bool = setting(True, "random left-right flips")
    random_erasing: float = setting(0.0, "classification: probability of erasing a random rectangle",
                                    minimum=0, maximum=1)
    color_jitter: float = setting(
        0.0, "classification: random brightness (+-j x 255), contrast and, for RGB, saturation (x [1-j, 1+j]) "
        "per image; 0: off. Photos from other days, sites or cameras than the training ones want ~0.2",
        minimum=0, below=1)
    scale_range: list[float] = setting(
        [0.75, 1.25], "segmentation, detection: random scale range [low, high]",
        check=_scale_range, check_text="[low, high], 0 < low <= high")


@dataclass(frozen=True)
class DataSettings(Settings):
    """`data:` where the images come from and how batches are made."""

    source: str = setting("fashion_mnist", "data source (must serve the task)", allowed=DATA_SOURCES)
    train: str | None = setting(None, "training data: a folder, VOC root or COCO JSON")
    val: str | None = setting(None, "validation data: a folder, VOC root or COCO JSON (or null with data.val_split)")
    val_split: float | None = setting(
        None, "without data.val: the fraction of data.train held out for validation (stratified by class for "
        "classification, seeded by train.seed; recorded in run.json)", above=0, below=1)
    batch_size: int = setting(128, "global batch size", minimum=1)
    cache: bool = setting(True, "cache decoded images in memory")
    shuffle_buffer: int = setting(10000, "shuffle buffer size", minimum=1)
    limit_train: int | None = setting(None, "use only the first N training images", minimum=1)
    limit_val: int | None = setting(None, "use only the first N validation images", minimum=1)
    repeat: int = setting(1, "each training example this many times per epoch (a handful of images)", minimum=1)
    skip_corrupt: bool = setting(False, "skip unreadable images with a warning instead of stopping")
    sampling: str = setting(
        "resize", "segmentation, detection: resize whole images to the input, or train on random input-size "
        "windows at native resolution (crop; validated on a grid of tiles)", allowed=("resize", "crop"))
    crops_per_image: int = setting(1, "sampling=crop: windows per training image per pass", minimum=1)
    empty_crop_rate: float = setting(
        0.1, "sampling=crop: probability of keeping a window without objects", minimum=0, maximum=1)
    tile_overlap: float = setting(
        0.25, "fraction of the input size neighbouring tiles share in tiled evaluation and prediction",
        minimum=0, maximum=0.9)
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    mosaic_train_size: int = setting(4000, "mosaic: training canvases", minimum=1)
    mosaic_val_size: int = setting(500, "mosaic: validation canvases", minimum=1)
    mosaic_fresh_each_epoch: bool = setting(
        False, "segmentation mosaic: new training canvases every epoch (validation stays fixed)")
    class_names: list[str] | None = setting(None, "detection: class names (default: read from the annotations)")
    train_images: str | None = setting(None, "COCO: training image folder (default: the JSON's folder)")
    val_images: str | None = setting(None, "COCO: validation image folder (default: the JSON's folder)")
    max_boxes: int = setting(100, "detection: boxes kept per image", minimum=1)
    clip_boxes: bool = setting(False, "detection: clip boxes that leave the image instead of refusing them")


@dataclass(frozen=True)
class TrainSettings(Settings):
    """`train:` optimisation, schedule, devices, precision, losses."""

    epochs: int = setting(30, "passes over the training set", minimum=1)
    optimizer: str = setting("sgd", "optimizer", allowed=("sgd", "adamw"))
    learning_rate: float = setting(0.1, "peak learning rate", above=0)
    learning_rate_batch_size: int | None = setting(
        None, "the global batch size learning_rate (and fine_tune_learning_rate) were chosen for: the rates are "
        "scaled linearly to data.batch_size (x data.batch_size / this, Goyal et al. 2017); null: used as given",
        minimum=1)
    momentum: float = setting(0.9, "SGD momentum", minimum=0, below=1)
    nesterov: bool = setting(True, "SGD Nesterov momentum")
    weight_decay: float = setting(5.0e-4, "decoupled weight decay (0: off)", minimum=0)
    schedule: str = setting("cosine", "learning-rate schedule after warm-up",
                            allowed=("cosine", "onecycle", "constant"))
    warmup_epochs: float = setting(1.0, "linear warm-up length in epochs", minimum=0)
    label_smoothing: float = setting(0.0, "classification: label smoothing", minimum=0, below=1)
    ema_momentum: float | None = setting(
        None, "exponential moving average of the weights (validated and saved), e.g. 0.999; null: off",
        minimum=0, below=1)
    strategy: str = setting("auto", "tf.distribute strategy (multi_worker reads TF_CONFIG)",
                            allowed=("auto", "one_device", "mirrored", "multi_worker"))
    worker_wait_minutes: float = setting(
        10.0, "multi_worker: how long a worker waits for every worker of TF_CONFIG (at the start and after a "
        "restart) before it stops with an error", above=0)
    worker_restarts: int = setting(
        3, "multi_worker: how often a worker whose peer was lost restarts itself to rejoin the cluster and "
        "resume from the last finished epoch (0: it stops with an error)", minimum=0)
    sync_batch_norm: bool = setting(
        False, "mirrored/multi_worker: BatchNorm statistics over the global batch (all replicas) instead of "
        "each replica's share: small per-replica batches (detection, segmentation), and the same result as "
        "one device")
    mixed_precision: bool | str = setting(
        False, "compute dtype policy (auto: bfloat16/float16 where the hardware is fast at it)",
        allowed=(False, True, "auto", "mixed_float16", "mixed_bfloat16", "float32"))
    jit_compile: bool | str = setting(False, "XLA-compile the train step", allowed=(False, True, "auto"))
    seed: int = setting(0, "random seed of weights, shuffling and augmentation")
    head_epochs: int = setting(0, "epochs training the head alone (backbone frozen) before fine-tuning",
                               minimum=0)
    fine_tune_learning_rate: float | None = setting(
        None, "learning rate after head_epochs (null: learning_rate)", above=0)
    steps_per_epoch: int | None = setting(None, "training steps per epoch (null: one pass over the data)",
                                          minimum=1)
    time_budget_minutes: float | None = setting(
        None, "classification: train the epochs (at most `epochs`) that fit in this many minutes, measured "
        "on the machine before training", above=0)
    time_budget_fallback: dict = setting(
        {}, "classification with time_budget_minutes: recipe overrides ({dotted key: value}, as --set takes them) "
        "for a cheaper network, trained instead when less than time_budget_fallback_below of the epochs fit")
    time_budget_fallback_below: float = setting(
        0.5, "use time_budget_fallback when the budget fits less than this fraction of `epochs`", above=0)
    loss: str = setting("ce", "segmentation loss", allowed=("ce", "dice", "ce+dice"))
    class_weights: list[float] | None = setting(
        None, "segmentation: per-class loss weights (one per class)",
        check=_class_weights, check_text="one number >= 0 per class")
    box_loss: str = setting("smooth_l1", "detection box regression loss", allowed=("smooth_l1", "giou"))


@dataclass(frozen=True)
class QatSettings(Settings):
    """`qat:` quantization-aware fine-tuning (`keras-resnet qat RUN_DIR` sets these)."""

    source_run: str | None = setting(None, "the finished float run whose best model is fine-tuned")
    momentum: float = setting(0.99, "moving-average momentum of the int8 ranges", minimum=0, below=1)


@dataclass(frozen=True)
class Recipe(Settings):
    """A whole recipe: the task, its sections and the run folder."""

    task: str = setting("classification", "what the model does", allowed=TASKS)
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    qat: QatSettings = field(default_factory=QatSettings)
    output_dir: str = setting("runs/fashion_mnist_resnet20", "the run folder (models, logs, metrics)")


@dataclass(frozen=True)
class ExportSettings(Settings):
    """`keras-resnet export` options (also `keras_resnet.export.export_model` arguments)."""

    format: str = setting("saved_model", "export format", allowed=("saved_model", "tflite", "onnx"))
    quantize: str = setting(
        "none", "TFLite quantization (int8: full integer, calibrated unless the model is quantization-aware)",
        allowed=("none", "float16", "dynamic", "int8"))
    io: str = setting(
        "float", "int8 TFLite input/output types: float (quantize/dequantize inside), uint8 (raw pixels, uint8 "
        "outputs) or int8 (pixels - 128, int8 outputs) for integer-only accelerators; detectors keep float outputs",
        allowed=("float", "uint8", "int8"))
    parity_samples: int = setting(100, "images compared with the Keras model", minimum=1)
    calibration_samples: int = setting(200, "int8: images whose activations set the quantization ranges",
                                       minimum=1)
    calibration_method: str = setting(
        "mean_range", "int8 calibration: mean_range (each activation's range is the mean over batches of 8 "
        "calibration images of their min and max: more images steady the ranges) or minmax (the TFLite converter's "
        "min and max over all images: one unusual image widens a range for all)",
        allowed=("mean_range", "minmax"))
    int8_min_agreement: float | None = setting(
        None, "minimum int8 agreement with Keras (null: 0.99 top-1, 0.98 pixels, 0.9 detections)",
        minimum=0, maximum=1)
    detection_outputs: str = setting(
        "decoded", "detectors, TFLite/ONNX: decoded (boxes, scores, classes, num_detections; NMS inside) or raw "
        "(anchor deltas and logits; decode with the decoder in the metadata JSON)",
        allowed=("decoded", "raw"))


SECTIONS = {"model": ModelSettings, "data": DataSettings, "data.augment": AugmentSettings,
            "train": TrainSettings, "qat": QatSettings}
