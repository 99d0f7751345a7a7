"""Training and evaluation of object detection recipes (`task: detection`).

`train_detection` runs a recipe end to end on `keras_resnet.training.preflight`
(strategy, precision, optimizer and schedule, run directory, resume) and writes:

    output_dir/
      recipe.yaml               the resolved recipe
      run.json                  task, preset, head, input shape, classes, preprocessing, decoder
      best_model.keras          best validation mAP (the raw RetinaNetDetector)
      last_model.keras          end of the last finished epoch
      history.csv               loss and val_loss per epoch, val_mAP / val_AP50 every epoch
      training_curves.png       loss, mAP and learning rate
      metrics.json              {"mAP", "AP50", "AP75", "per_class", ...} of the best model (pycocotools)
      val_predictions.png       a few validation images with predicted boxes
      logs/                     TensorBoard
      backup/                   BackupAndRestore state while a run is unfinished

Targets are encoded inside the tf.data pipeline (`RetinaNetLabelEncoder`),
so `fit` sees `(images, (B, N, 5) targets)` and the model's raw
`(B, N, 4 + num_classes)` output. mAP is computed by pycocotools on the
decoded, NMS-ed detections mapped back to original image pixels. A run
with `data.sampling: crop` trains on input-size windows of images at their
own resolution; its mAP (per epoch, val_mAP, and final) slides the model
over each full validation image instead (`data.tile_overlap`), merging the
windows' boxes by class-wise NMS (`keras_resnet.tiling.detect_tiled`).
"""

import os
import time

import keras
import numpy as np
import tensorflow as tf

from keras_resnet.atomic_files import atomic_output, write_json
from keras_resnet.data import build_detection_datasets
from keras_resnet.data.detection import recipe_dataset_args
from keras_resnet.models.retinanet.decoder import DetectionDecoder
from keras_resnet.models.retinanet.detector import (
    DECODER_DEFAULT_ARGS,
    RetinaNetDetector,
)
from keras_resnet.models.retinanet.evaluation import (
    SUMMARY_STATS,
    coco_evaluate,
    detections_to_original,
)
from keras_resnet.models.retinanet.losses import RetinaNetLoss
from keras_resnet.tiling import DEFAULT_TILE_BATCH, detect_tiled
from keras_resnet.training import devices, fit, preflight, run_files
from keras_resnet.training.backbones import (
    build_model_from_config,
    check_recipe_args,
    preprocessing_info,
)
from keras_resnet.training.plots import DETECTION_PANELS
from keras_resnet.visualize import plot_detections
from keras_resnet_settings.errors import ConfigError, DataError

NUM_PREDICTION_EXAMPLES = 4
NORMALIZATION_SAMPLE_BATCHES = 16
HEAD_ARGS = ("fpn_width", "min_level", "max_level", "head_depth", "head_width", "head_norm", "anchor_sizes",
             "aspect_ratios", "anchor_scales", "extra_levels_from", "prior_probability")
DECODER_ARGS = DECODER_DEFAULT_ARGS  # the DetectionDecoder arguments a detector or recipe may set
# Recipe keys that detection does not implement: key -> neutral value.
_NOT_FOR_DETECTION = {
    ("train", "label_smoothing"): 0.0,
    ("train", "class_weights"): None,
    ("model", "dropout"): 0.0,
    ("train", "time_budget_minutes"): None,
}


def _check_detection_recipe(cfg):
    preflight.check_task_settings(cfg, _NOT_FOR_DETECTION, "does not apply to task=detection; set {key}={neutral}")
    check_recipe_args("head_args", cfg.model.head_args, RetinaNetDetector, HEAD_ARGS)
    check_recipe_args("decoder_args", cfg.model.decoder_args, DetectionDecoder, DECODER_ARGS)


def _datasets(cfg):
    return build_detection_datasets(**recipe_dataset_args(cfg))


def pixel_statistics(dataset, batches=NORMALIZATION_SAMPLE_BATCHES):
    """Per-channel mean and std of the first `batches` batches of `(images, targets)` (0..255 pixels)."""
    total, total_sq, count = 0.0, 0.0, 0
    for images, _ in dataset.take(batches):
        images = tf.cast(images, tf.float64)
        total += tf.reduce_sum(images, axis=[0, 1, 2]).numpy()
        total_sq += tf.reduce_sum(tf.square(images), axis=[0, 1, 2]).numpy()
        count += int(np.prod(images.shape[:3]))
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-6))
    return [float(v) for v in np.atleast_1d(mean)], [float(v) for v in np.atleast_1d(std)]


def build_detector(cfg, info):
    """The recipe's `RetinaNetDetector` (raw outputs), taking raw pixels 0..255.

    `model.head_args` passes FPN, head and anchor arguments (see
    `RetinaNetDetector`). Normalisation by the training set's mean/std is
    a layer inside the model; `model.weights` (a `.keras` model or
    keras.applications `.h5`) initialises the backbone;
    `model.freeze_stages` freezes its first stages.
    """
    return build_model_from_config(cfg, info, RetinaNetDetector, "retinanet",
                                   "model.head_args / model.backbone_args: {error}", **cfg.model.head_args)


def _encode_targets(dataset, encoder):
    def encode(images, targets):
        return images, encoder(targets["boxes"], targets["classes"])

    return dataset.map(encode, num_parallel_calls=tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------
def detection_function(model, decoder_args):
    """A traced `images -> decoded detections` function of `model` (reuse it: each one traces anew)."""
    decoder = model.make_decoder(**decoder_args)

    @tf.function(reduce_retracing=True)
    def detect(images):
        return decoder(model(images, training=False))

    return detect


def predict_detections(model, dataset, decoder_args, detect=None):
    """Decoded detections of `model` over a `(images, targets)` dataset.

    `detect`: a `detection_function(model, decoder_args)` to reuse (made here when None).

    Returns:
        `(images, outputs)` of the first batch (for plots) and a list of
        per-batch dicts of NumPy arrays (boxes, scores, classes, num_detections).
    """
    detect = detect or detection_function(model, decoder_args)
    batches, first = [], None
    for images, _ in dataset:
        outputs = {key: value.numpy() for key, value in detect(images).items()}
        if first is None:
            first = (images.numpy(), outputs)
        batches.append(outputs)
    return first, batches


def tiled_detections(model, info, decoder_args, tile_overlap, detect=None, batch_size=DEFAULT_TILE_BATCH):
    """Detections of `model` sliding over each full validation image (`info["val_full"]`).

    Each image's model-input windows (overlap `tile_overlap`) are detected
    and merged by class-wise NMS at the decoder's IoU threshold and
    `max_detections` (`keras_resnet.tiling.detect_tiled`).

    Returns:
        `(rows, examples)`: float64 `(K, 7)` rows `(image_id, x_min, y_min,
        x_max, y_max, score, class_id)` in original pixels, and the first
        `NUM_PREDICTION_EXAMPLES` `(image, {"boxes", "scores", "classes",
        "num_detections"})` pairs for plots.
    """
    decoder = model.make_decoder(**decoder_args)
    detect = detect or detection_function(model, decoder_args)
    tile_shape = tuple(model.input_shape[1:3])
    rows, examples, count = [], [], 0
    for image, meta in zip(info["val_full"], info["val_images"]):
        image = np.asarray(image)
        if image.shape[:2] != (meta["height"], meta["width"]):
            raise DataError(
                f"validation image {meta.get('file_name', meta['image_id'])} is {image.shape[1]}x{image.shape[0]} in "
                f"val_full but {meta['width']}x{meta['height']} in its ground truth"
            )
        found = detect_tiled(
            lambda windows: {key: value.numpy() for key, value in detect(tf.constant(windows)).items()},
            image, tile_shape, tile_overlap, batch_size, iou_threshold=decoder.iou_threshold,
            max_detections=decoder.max_detections, progress=False,
        )
        block = np.empty((len(found["scores"]), 7))
        block[:, 0] = meta["image_id"]
        block[:, 1:5] = found["boxes"]
        block[:, 5] = found["scores"]
        block[:, 6] = found["classes"]
        rows.append(block)
        if len(examples) < NUM_PREDICTION_EXAMPLES:
            examples.append((image, {key: value[None] for key, value in found.items()}
                             | {"num_detections": np.asarray([len(found["scores"])])}))
        count += 1
    if count != len(info["val_images"]):
        raise DataError(f"val_full holds {count} images but the ground truth {len(info['val_images'])}")
    return (np.concatenate(rows) if rows else np.zeros((0, 7))), examples


def _untiled_detections(model, val_ds, info, decoder_args, detect):
    """`tiled_detections`' `(rows, examples)` of the letterboxed validation batches, and the image count."""
    first, batches = predict_detections(model, val_ds, decoder_args, detect)
    if first is None:
        return np.zeros((0, 7)), [], 0
    rows, start = [], 0
    for outputs in batches:
        size = len(outputs["num_detections"])
        rows.append(detections_to_original(outputs["boxes"], outputs["scores"], outputs["classes"],
                                           info["val_images"][start:start + size], outputs["num_detections"]))
        start += size
    images, outputs = first
    examples = [(images[i], {key: value[i:i + 1] for key, value in outputs.items()})
                for i in range(min(NUM_PREDICTION_EXAMPLES, len(images)))]
    return np.concatenate(rows), examples, start


def evaluate_detector(model, val_ds, info, decoder_args, output_dir=None, title="validation", verbose=True,
                      detect=None, tile_overlap=None):
    """COCO box AP of `model` on `val_ds` by pycocotools, in original image pixels.

    Args:
        model: a `RetinaNetDetector`.
        val_ds: batched `(images, {"boxes", "classes"})`, in `info["val_images"]` order.
        info: the `info` of `build_detection_datasets`.
        decoder_args: `DetectionDecoder` arguments (thresholds, max_detections).
        output_dir: where to write metrics.json and val_predictions.png (None: nowhere).
        title: title of the printed per-class table.
        verbose: print the per-class table.
        detect: a `detection_function` of `model` to reuse (the per-epoch evaluation traces it once).
        tile_overlap: None (the letterboxed `val_ds` batches), or the overlap
            of the model-input windows that slide over each full validation
            image (`info["val_full"]`, crop-sampled data; `val_ds` unused):
            boxes merged across windows by class-wise NMS, at native resolution.

    Returns:
        `{"mAP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "per_class", "num_examples"}`.

    Example:
    >>> evaluate_detector(model, val_ds, info, {"score_threshold": 0.05}, tile_overlap=0.25)
    """
    if tile_overlap is None:
        rows, examples, count = _untiled_detections(model, val_ds, info, decoder_args, detect)
    else:
        rows, examples = tiled_detections(model, info, decoder_args, tile_overlap, detect)
        count = len(info["val_images"])
    if not examples:
        raise DataError("the validation set is empty; check data.val / data.limit_val")
    metrics = coco_evaluate(info["val_coco"], rows, info["class_names"])
    metrics["num_examples"] = count
    if tile_overlap is not None:
        metrics["tile_overlap"] = float(tile_overlap)
    if output_dir is not None:
        write_json(os.path.join(output_dir, "metrics.json"), metrics)
        images = [image for image, _ in examples]
        outputs = {key: [found[key][0] for _, found in examples] for key in examples[0][1]}
        with atomic_output(os.path.join(output_dir, "val_predictions.png")) as temporary:
            plot_detections(images, outputs, info["class_names"], temporary)
    if verbose:
        print_detection_table(metrics, title=f"COCO box AP ({title})")
    return metrics


def evaluation_overlap(cfg):
    """The tile overlap of the recipe's evaluation: `data.tile_overlap` with `data.sampling: crop`, else None."""
    data_cfg = cfg.data
    return float(data_cfg.tile_overlap) if data_cfg.sampling == "crop" else None


class _COCOEvaluation(keras.callbacks.Callback):
    """Adds val_mAP / val_AP50 / val_AP75 to the epoch logs (pycocotools on the validation set, tiled with
    `tile_overlap` over the full images of a crop-sampled run).

    In a multi-worker run the chief alone evaluates (`is_chief`), over the
    whole validation set, and every worker receives its figures
    (`devices.share_from_chief`): all of them then save the best model at
    the same epochs.
    """

    KEYS = ("mAP", "AP50", "AP75")

    def __init__(self, val_ds, info, decoder_args, tile_overlap=None, is_chief=True):
        super().__init__()
        self.val_ds, self.info, self.decoder_args = val_ds, info, decoder_args
        self.tile_overlap = tile_overlap  # crop-sampled runs: tiled over the full validation images
        self.is_chief = is_chief
        self.detect = None  # traced once, at the first epoch end, then reused

    def on_epoch_end(self, epoch, logs=None):
        figures = [0.0] * len(self.KEYS)
        if self.is_chief:
            self.detect = self.detect or detection_function(self.model, self.decoder_args)
            metrics = evaluate_detector(self.model, self.val_ds, self.info, self.decoder_args, verbose=False,
                                        detect=self.detect, tile_overlap=self.tile_overlap)
            figures = [metrics[key] for key in self.KEYS]
        figures = devices.share_from_chief(self.model.distribute_strategy, figures, self.is_chief)
        if logs is not None:
            for key, value in zip(self.KEYS, figures):
                logs[f"val_{key}"] = value


# ----------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------
def train_detection(cfg):
    """Trains a `task: detection` recipe (a `load_config` dict) and evaluates its best model with pycocotools.

    Returns its validation metrics (also in metrics.json) with `run_summary`'s epochs and speed, e.g.
    >>> train_detection(load_config("tasks/detection/mosaic_retinanet_resnet18.yaml"))
    """
    _check_detection_recipe(cfg)
    train_cfg, data_cfg, model_cfg = cfg.train, cfg.data, cfg.model
    strategy, paths, is_chief = devices.start_run(cfg)
    output_dir = paths.root

    train_ds, val_ds, info = _datasets(cfg)
    preflight.check_num_classes(cfg, info)
    info["mean"], info["std"] = pixel_statistics(train_ds)
    boxes = f" ({info['num_train_boxes']} / {info['num_val_boxes']} boxes)"
    steps_per_epoch = preflight.announce_run(cfg, info, strategy, paths, f"{model_cfg.backbone} + RetinaNet", boxes)
    with strategy.scope():
        model = build_detector(cfg, info)
        try:
            model.make_decoder(**model_cfg.decoder_args)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"model.decoder_args: {error}") from None

    def compile_detector(target, optimizer):
        target.compile(optimizer=optimizer, loss=RetinaNetLoss(model_cfg.num_classes, box_loss=train_cfg.box_loss,
                                                               box_variance=target.box_variance),
                       jit_compile=train_cfg.jit_compile)

    encoder = model.make_label_encoder()
    tile_overlap = evaluation_overlap(cfg)
    run_files.write_run_files(cfg, paths, {
        "task": "detection",
        "preset": model_cfg.backbone,
        "head": "retinanet",
        "input_shape": list(model_cfg.input_shape),
        "num_classes": model_cfg.num_classes,
        "class_names": info["class_names"],
        "num_anchors": int(model.num_anchors),
        "decoder": dict(model_cfg.decoder_args),
        "preprocessing": preprocessing_info(info),
        "resize": "letterbox: scale to fit keeping the aspect ratio, pad bottom/right with 0" if tile_overlap is None
        else "none: input-size windows at native resolution (training crops, tiled evaluation and prediction)",
        "num_train": info["num_train"],
        "num_val": info["num_val"],
        "sampling": data_cfg.sampling,
        "tile_overlap": data_cfg.tile_overlap,
    }, info)
    start = time.time()
    evaluation = [_COCOEvaluation(val_ds, info, model_cfg.decoder_args, tile_overlap, is_chief)]
    with strategy.scope():
        fit.fit_in_phases(model, cfg, _encode_targets(train_ds, encoder), _encode_targets(val_ds, encoder), paths,
                          compile_model=compile_detector, steps_per_epoch=steps_per_epoch, monitor="val_mAP",
                          title=f"{model_cfg.backbone} RetinaNet", panels=DETECTION_PANELS, best_key="mAP",
                          extra_callbacks=evaluation)
    train_seconds = time.time() - start
    if devices.leave_run(paths, is_chief):
        return None
    metrics = run_files.finish_run(
        paths, lambda best: evaluate_detector(best, val_ds, info, model_cfg.decoder_args, output_dir,
                                              title="best model", tile_overlap=tile_overlap),
        steps_per_epoch, data_cfg.batch_size, train_seconds,
    )
    print(
        f"done: {model_cfg.backbone} RetinaNet mAP={metrics['mAP']:.4f} AP50={metrics['AP50']:.4f} "
        f"AP75={metrics['AP75']:.4f} " + run_files.finished_text(metrics, train_seconds, output_dir)
    )
    return metrics


def evaluate_detection(cfg):
    """Evaluates the best model of a detection recipe's output_dir on its validation set.

    Rewrites metrics.json (COCO AP) and val_predictions.png and returns the metrics.
    """
    _check_detection_recipe(cfg)
    model_path, model, val_ds, info = run_files.load_trained_run(cfg, _datasets)
    metrics = run_files.keep_run_summary(cfg.output_dir, lambda: evaluate_detector(
        model, val_ds, info, cfg.model.decoder_args, cfg.output_dir, title=model_path,
        tile_overlap=evaluation_overlap(cfg)))
    print(
        f"evaluate: {model_path} mAP={metrics['mAP']:.4f} AP50={metrics['AP50']:.4f} AP75={metrics['AP75']:.4f} "
        f"on {metrics['num_examples']} val images"
    )
    return metrics


def print_detection_table(metrics: dict, title: str = "COCO box AP", console=None) -> None:
    """Print the summary numbers and the per-class AP of :func:`coco_evaluate` as a rich table.

    Args:
        metrics: the dict returned by :func:`coco_evaluate`.
        title: table title.
        console: a ``rich.console.Console``; default a new one on stdout.
    """
    from rich.console import Console
    from rich.table import Table

    def show(value):
        return "-" if value is None else f"{100 * value:.1f}"

    table = Table(title=title)
    table.add_column("class")
    table.add_column("AP@[.5:.95] (%)", justify="right")
    for name, value in metrics["per_class"].items():
        table.add_row(name, show(value))
    table.add_section()
    for key in SUMMARY_STATS:
        table.add_row(key, show(metrics.get(key)), style="bold" if key == "mAP" else None)
    (console or Console()).print(table)

