"""Training and evaluation of semantic segmentation recipes (`task: segmentation`).

`train_segmentation` runs a recipe end to end on `keras_resnet.training.preflight`
(strategy, precision, optimizer and schedule, run directory, resume) and writes:

    output_dir/
      recipe.yaml               the resolved recipe
      run.json                  task, preset, head, input shape, classes, preprocessing
      best_model.keras          best validation mIoU
      last_model.keras          end of the last finished epoch
      history.csv               loss / miou / pixel_accuracy per epoch (train and val)
      training_curves.png       loss, mIoU, pixel accuracy and learning rate
      metrics.json              {"mIoU", "pixel_accuracy", "per_class_iou", ...} of the best model
      confusion_matrix.csv      pixel counts, true classes on rows
      val_predictions.png       a few validation images | truth | prediction
      logs/                     TensorBoard
      backup/                   BackupAndRestore state while a run is unfinished

With `data.sampling: crop` (training on input-size windows of images at
their own resolution) the final metrics slide the model over each full
validation image (`data.tile_overlap`), at native resolution, as
`keras-resnet predict --tile` does.

A killed run started again with the same recipe continues from its last
finished epoch. Supported strategies: auto, one_device, mirrored.
"""

import os
import time

import numpy as np
import tensorflow as tf

from keras_resnet.atomic_files import atomic_output, write_json
from keras_resnet.data.segmentation import IGNORE_INDEX, build_segmentation_datasets
from keras_resnet.models.segmentation.losses import make_segmentation_loss
from keras_resnet.models.segmentation.metrics import (
    PixelAccuracy,
    SegmentationMeanIoU,
    confusion_to_iou,
)
from keras_resnet.models.segmentation.segmenter import ResNetSegmenter
from keras_resnet.tiling import (
    DEFAULT_TILE_BATCH,
    keras_segment_function,
    model_tile,
    segment_tiled,
)
from keras_resnet.training import devices, fit, preflight, run_files
from keras_resnet.training.backbones import (
    build_model_from_config,
    check_recipe_args,
    preprocessing_info,
)
from keras_resnet.training.plots import SEGMENTATION_PANELS, plt, save_figure
from keras_resnet.visualize import overlay_mask
from keras_resnet_settings.errors import ConfigError, DataError

NUM_PREDICTION_EXAMPLES = 4
# Recipe keys of classification training that segmentation does not implement: key -> neutral value.
_CLASSIFICATION_ONLY = {
    ("train", "label_smoothing"): 0.0,
    ("model", "dropout"): 0.0,
    ("train", "time_budget_minutes"): None,
}


def _check_segmentation_recipe(cfg):
    preflight.check_task_settings(cfg, _CLASSIFICATION_ONLY,
                        "applies to classification only; set {key}={neutral} for task=segmentation")


def _datasets(cfg):
    return build_segmentation_datasets(cfg, seed=cfg.train.seed)


def build_segmenter(cfg, info):
    """The recipe's `ResNetSegmenter` (logits), taking raw pixels 0..255.

    `model.head_args` passes `head_width`, `decoder_width`, `aspp_rates`, `decoder_level` and `separable`
    to the segmenter. Normalisation by the training set's mean/std is a layer inside the
    model; `model.weights` (a `.keras` model or keras.applications `.h5`)
    initialises the backbone; `model.freeze_stages` freezes its first stages.
    """
    model_cfg = cfg.model
    check_recipe_args("head_args", model_cfg.head_args, ResNetSegmenter)
    return build_model_from_config(
        cfg, info, ResNetSegmenter, model_cfg.head,
        "model.head_args: {error}; allowed: head_width, decoder_width, aspp_rates, decoder_level, separable",
        head=model_cfg.head, **model_cfg.head_args,
    )


# ----------------------------------------------------------------------------
# Plots and reports
# ----------------------------------------------------------------------------
def plot_predictions(images, masks, predictions, num_classes, path):
    """Rows of image | truth overlay | prediction overlay (ignored pixels white)."""
    rows = len(images)
    fig, axes = plt.subplots(rows, 3, figsize=(9, 3 * rows), squeeze=False)
    for row in range(rows):
        image = np.clip(images[row], 0, 255)
        shown = image[..., 0] if image.shape[-1] == 1 else image.astype(np.uint8)
        panels = (shown, overlay_mask(image, masks[row], num_classes), overlay_mask(image, predictions[row], num_classes))
        for column, (panel, title) in enumerate(zip(panels, ("image", "truth", "prediction"))):
            ax = axes[row][column]
            ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def print_iou_table(per_class_iou, mean_iou, pixel_accuracy, title):
    """A rich table of per-class IoU ("-" for classes absent from truth and prediction)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("class")
    table.add_column("IoU", justify="right")
    for name, iou in per_class_iou.items():
        table.add_row(name, "-" if iou is None else f"{iou:.4f}")
    table.add_section()
    table.add_row("mean IoU", f"{mean_iou:.4f}")
    table.add_row("pixel accuracy", f"{pixel_accuracy:.4f}")
    Console().print(table)


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------
def _predicted_batches(model, val_ds, tile_overlap, tile_batch_size):
    """`(images, masks, predicted masks)` NumPy batches of `model` over `val_ds` (see `evaluate_segmenter`)."""
    if tile_overlap is None:
        predict = tf.function(
            lambda images: tf.argmax(model(images, training=False), axis=-1, output_type=tf.int32)
        )
        for images, masks in val_ds:
            yield images.numpy(), masks.numpy(), predict(images).numpy()
        return
    probabilities = keras_segment_function(model)
    tile_shape = model_tile(model)
    for image, mask in val_ds:
        image = np.asarray(image, np.float32)
        stitched = segment_tiled(probabilities, image, tile_shape, tile_overlap, tile_batch_size)
        yield image[None], np.asarray(mask)[None], stitched.argmax(axis=-1).astype(np.int32)[None]


def evaluate_segmenter(model, val_ds, class_names, output_dir, title="validation", tile_overlap=None,
                       tile_batch_size=DEFAULT_TILE_BATCH):
    """mIoU, pixel accuracy and per-class IoU of `model` on `val_ds`.

    Writes metrics.json, confusion_matrix.csv and val_predictions.png into
    `output_dir` and prints the per-class IoU table. Pixels labelled 255
    are ignored.

    Args:
        model: the segmenter (raw pixels in, per-pixel scores out).
        val_ds: batches of `(images, masks)` at the model input size; with
            `tile_overlap`, unbatched `(image (h, w, C), mask (h, w))` pairs
            at their own size (`info["val_full"]` of crop-sampled data).
        class_names: the class names (their count is the number of classes).
        output_dir: where the files go.
        title: title of the printed table.
        tile_overlap: None (each batch is segmented whole), or the overlap
            of the model-input windows that slide over each full image
            (`keras_resnet.tiling.segment_tiled`): metrics at native
            resolution, as `keras-resnet predict --tile` segments.
        tile_batch_size: windows run at a time when tiling.

    Returns:
        `{"mIoU", "pixel_accuracy", "per_class_iou": {name: IoU or None}, "num_examples"}`;
        None marks a class absent from both truth and predictions (left out of mIoU).

    Example:
    >>> evaluate_segmenter(model, info["val_full"], info["class_names"], "runs/x", tile_overlap=0.25)
    """
    num_classes = len(class_names)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    examples, shown = 0, ([], [], [])
    for images, masks, predictions in _predicted_batches(model, val_ds, tile_overlap, tile_batch_size):
        valid = masks != IGNORE_INDEX
        confusion += np.bincount(
            masks[valid].astype(np.int64) * num_classes + predictions[valid], minlength=num_classes**2
        ).reshape(num_classes, num_classes)
        count = NUM_PREDICTION_EXAMPLES - len(shown[0])
        for kept, batch in zip(shown, (images, masks, predictions)):
            kept.extend(batch[:count])
        examples += len(masks)
    if examples == 0:
        raise DataError("the validation set is empty; check data.val / data.limit_val")
    per_class, mean_iou = confusion_to_iou(confusion)
    metrics = {
        "mIoU": mean_iou,
        "pixel_accuracy": float(np.trace(confusion) / max(confusion.sum(), 1)),
        "per_class_iou": {
            name: None if np.isnan(iou) else float(iou) for name, iou in zip(class_names, per_class)
        },
        "num_examples": examples,
    }
    if tile_overlap is not None:
        metrics["tile_overlap"] = float(tile_overlap)
    write_json(os.path.join(output_dir, "metrics.json"), metrics)
    with atomic_output(os.path.join(output_dir, "confusion_matrix.csv")) as temporary:
        np.savetxt(temporary, confusion, fmt="%d", delimiter=",")
    plot_predictions(*shown, num_classes, os.path.join(output_dir, "val_predictions.png"))
    print_iou_table(metrics["per_class_iou"], mean_iou, metrics["pixel_accuracy"], f"per-class IoU ({title})")
    return metrics


def evaluation_data(cfg, val_ds, info):
    """`(dataset, tile_overlap)` the final evaluation runs on.

    `data.sampling: resize`: the validation batches, untiled (None). `crop`:
    the full validation images (`info["val_full"]`) and `data.tile_overlap`.
    """
    data_cfg = cfg.data
    if data_cfg.sampling != "crop":
        return val_ds, None
    return info["val_full"], float(data_cfg.tile_overlap)


def sampling_info(cfg) -> dict:
    """The run.json entries of the recipe's sampling: "sampling" and "tile_overlap" (read by `predict --tile auto`)."""
    data_cfg = cfg.data
    return {"sampling": data_cfg.sampling,
            "tile_overlap": data_cfg.tile_overlap}


# ----------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------
def train_segmentation(cfg):
    """Trains a `task: segmentation` recipe (a `load_config` dict) and evaluates its best model.

    Returns its validation metrics (also in metrics.json) with `run_summary`'s epochs and speed, e.g.
    >>> train_segmentation(load_config("tasks/segmentation/mosaic_deeplabv3plus_resnet18.yaml"))
    """
    _check_segmentation_recipe(cfg)
    train_cfg, data_cfg = cfg.train, cfg.data
    strategy, paths, is_chief = devices.start_run(cfg)
    output_dir = paths.root

    backup_dir = os.path.join(paths.backup_root, "main")
    start_epoch = fit.backup_epoch(backup_dir)
    if start_epoch:
        print(f"resuming from the backup in {backup_dir} at epoch {start_epoch + 1}")
    train_ds, val_ds, info = build_segmentation_datasets(cfg, seed=train_cfg.seed, start_epoch=start_epoch)
    preflight.check_num_classes(cfg, info)
    model_name = f"{cfg.model.backbone} + {cfg.model.head}"
    steps_per_epoch = preflight.announce_run(cfg, info, strategy, paths, model_name)
    with strategy.scope():
        model = build_segmenter(cfg, info)
        try:
            loss = make_segmentation_loss(train_cfg.loss, IGNORE_INDEX, train_cfg.class_weights)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def compile_segmenter(target, optimizer):
        target.compile(optimizer=optimizer, loss=loss, jit_compile=train_cfg.jit_compile,
                       metrics=[SegmentationMeanIoU(cfg.model.num_classes, IGNORE_INDEX), PixelAccuracy(IGNORE_INDEX)])

    run_files.write_run_files(cfg, paths, {
        "task": "segmentation",
        "preset": cfg.model.backbone,
        "head": cfg.model.head,
        "output_stride": model.backbone.output_stride,
        "input_shape": list(cfg.model.input_shape),
        "num_classes": cfg.model.num_classes,
        "class_names": info["class_names"],
        "ignore_index": IGNORE_INDEX,
        "preprocessing": preprocessing_info(info),
        "num_train": info["num_train"],
        "num_val": info["num_val"],
        **sampling_info(cfg),
    }, info)
    start = time.time()
    with strategy.scope():
        fit.fit_in_phases(model, cfg, train_ds, val_ds, paths, compile_model=compile_segmenter,
                          steps_per_epoch=steps_per_epoch, monitor="val_miou",
                          title=f"{cfg.model.backbone} {cfg.model.head}", panels=SEGMENTATION_PANELS, best_key="miou")
    train_seconds = time.time() - start
    if devices.leave_run(paths, is_chief):
        return None
    eval_ds, tile_overlap = evaluation_data(cfg, val_ds, info)
    metrics = run_files.finish_run(
        paths, lambda best: evaluate_segmenter(best, eval_ds, info["class_names"], output_dir, title="best model",
                                               tile_overlap=tile_overlap, tile_batch_size=data_cfg.batch_size),
        steps_per_epoch, data_cfg.batch_size, train_seconds,
    )
    print(
        f"done: {cfg.model.backbone} {cfg.model.head} mIoU={metrics['mIoU']:.4f} "
        f"pixel_accuracy={metrics['pixel_accuracy']:.4f} " + run_files.finished_text(metrics, train_seconds, output_dir)
    )
    return metrics


def evaluate_segmentation(cfg):
    """Evaluates the best model of a segmentation recipe's output_dir on its validation set.

    Rewrites metrics.json (mIoU, pixel accuracy, per-class IoU),
    confusion_matrix.csv and val_predictions.png, and returns the metrics.
    """
    model_path, model, val_ds, info = run_files.load_trained_run(cfg, _datasets)
    eval_ds, tile_overlap = evaluation_data(cfg, val_ds, info)
    metrics = run_files.keep_run_summary(cfg.output_dir, lambda: evaluate_segmenter(
        model, eval_ds, info["class_names"], cfg.output_dir, title=model_path, tile_overlap=tile_overlap,
        tile_batch_size=cfg.data.batch_size))
    print(
        f"evaluate: {model_path} mIoU={metrics['mIoU']:.4f} pixel_accuracy={metrics['pixel_accuracy']:.4f} "
        f"on {metrics['num_examples']} val images"
    )
    return metrics
