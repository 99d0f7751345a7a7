"""Streaming segmentation metrics with an ignore label, and IoU from a confusion matrix."""

import keras
import numpy as np
from keras import ops

PACKAGE = "keras_resnet"


def confusion_to_iou(confusion):
    """Per-class IoU and mIoU of a confusion matrix (true classes on rows).

    `IoU_c = TP / (TP + FP + FN)`. A class absent from both the truth and
    the predictions has IoU NaN and is left out of the mean.

    Args:
        confusion: `(num_classes, num_classes)` counts.

    Returns:
        `(per_class_iou, mean_iou)`: a float64 array with NaN for absent
        classes, and the mean over the others (NaN if all are absent).

    Example:
    >>> confusion_to_iou(np.array([[3, 1], [0, 0]]))
    (array([0.75, 0.  ]), 0.375)
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positives = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - true_positives
    with np.errstate(divide="ignore", invalid="ignore"):
        per_class = np.where(union > 0, true_positives / np.where(union > 0, union, 1), np.nan)
    present = ~np.isnan(per_class)
    mean_iou = float(per_class[present].mean()) if present.any() else float("nan")
    return per_class, mean_iou


def _flat_labels_and_predictions(y_true, y_pred, ignore_index, num_classes=None, sample_weight=None):
    """Flattened int32 truth and prediction, and each pixel's weight (0 where ignored).

    `y_pred` may be scores (argmax is taken) or indices; `sample_weight`
    may be per image `(N,)` or per pixel `(N, H, W)`.
    """
    y_true = ops.convert_to_tensor(y_true)
    y_pred = ops.convert_to_tensor(y_pred)
    if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == 1:
        y_true = ops.squeeze(y_true, axis=-1)
    if len(y_pred.shape) == len(y_true.shape) + 1:
        y_pred = ops.argmax(y_pred, axis=-1)
    labels = ops.cast(y_true, "int32")
    valid = ops.greater_equal(labels, 0)
    if num_classes is not None:
        valid = ops.logical_and(valid, ops.less(labels, num_classes))
    if ignore_index is not None:
        valid = ops.logical_and(valid, ops.not_equal(labels, ignore_index))
    weights = ops.cast(valid, "float32")
    if sample_weight is not None:
        sample_weight = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
        if len(sample_weight.shape) == 1:
            sample_weight = ops.reshape(sample_weight, (-1,) + (1,) * (len(labels.shape) - 1))
        weights = weights * ops.broadcast_to(sample_weight, ops.shape(weights))
    labels = ops.reshape(ops.where(valid, labels, 0), (-1,))
    return labels, ops.reshape(ops.cast(y_pred, "int32"), (-1,)), ops.reshape(weights, (-1,))


@keras.saving.register_keras_serializable(package=PACKAGE)
class SegmentationMeanIoU(keras.metrics.Metric):
    """Mean IoU accumulated in a confusion matrix, with ignored pixels.

    `update_state(y_true, y_pred)` takes integer targets `(N, H, W)` (or
    `(N, H, W, 1)`) and either scores `(N, H, W, num_classes)` (argmax is
    taken) or predicted indices `(N, H, W)`. Pixels whose target is
    `ignore_index`, or outside `[0, num_classes)`, are not counted.
    `result()` is the mean IoU over classes present in the truth or the
    predictions (0 before any pixel is counted).

    Args:
        num_classes: number of classes.
        ignore_index: ignored target value (None: none).
        name: metric name.

    Example:
    >>> metric = SegmentationMeanIoU(num_classes=3)
    >>> metric.update_state(masks, logits); float(metric.result())
    """

    def __init__(self, num_classes, ignore_index=255, name="miou", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.confusion = self.add_variable(
            shape=(self.num_classes, self.num_classes), initializer="zeros", dtype="float64", name="confusion"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels, predictions, weights = _flat_labels_and_predictions(
            y_true, y_pred, self.ignore_index, self.num_classes, sample_weight
        )
        counts = ops.bincount(
            labels * self.num_classes + predictions, weights=weights, minlength=self.num_classes**2
        )
        self.confusion.assign_add(ops.reshape(ops.cast(counts, "float64"), (self.num_classes, self.num_classes)))

    def result(self):
        confusion = self.confusion
        true_positives = ops.diagonal(confusion)
        union = ops.sum(confusion, axis=0) + ops.sum(confusion, axis=1) - true_positives
        present = ops.cast(union > 0, "float64")
        iou = true_positives / ops.maximum(union, 1.0)
        return ops.cast(ops.sum(iou * present) / ops.maximum(ops.sum(present), 1.0), "float32")

    def reset_state(self):
        self.confusion.assign(ops.zeros((self.num_classes, self.num_classes), dtype="float64"))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "ignore_index": self.ignore_index}


@keras.saving.register_keras_serializable(package=PACKAGE)
class PixelAccuracy(keras.metrics.Metric):
    """Fraction of non-ignored pixels whose predicted class is right.

    Args:
        ignore_index: ignored target value (None: none).
        name: metric name.
    """

    def __init__(self, ignore_index=255, name="pixel_accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.correct = self.add_variable(shape=(), initializer="zeros", dtype="float64", name="correct")
        self.total = self.add_variable(shape=(), initializer="zeros", dtype="float64", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels, predictions, weights = _flat_labels_and_predictions(
            y_true, y_pred, self.ignore_index, sample_weight=sample_weight
        )
        weights = ops.cast(weights, "float64")
        self.correct.assign_add(ops.sum(ops.cast(ops.equal(labels, predictions), "float64") * weights))
        self.total.assign_add(ops.sum(weights))

    def result(self):
        return ops.cast(self.correct / ops.maximum(self.total, 1.0), "float32")

    def reset_state(self):
        self.correct.assign(0.0)
        self.total.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "ignore_index": self.ignore_index}
