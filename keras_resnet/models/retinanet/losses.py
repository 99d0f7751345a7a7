"""RetinaNet losses: sigmoid focal loss plus smooth-L1 or GIoU box regression.

`RetinaNetLoss` takes the label encoder's targets `y_true (B, N, 5)` =
`[dx, dy, dw, dh, class]` (class -1 background, -2 ignore) and the
detector's raw output `y_pred (B, N, 4 + num_classes)` = box deltas then
class logits. As in the paper (and keras-cv's RetinaNet):

- classification: sigmoid focal loss (alpha 0.25, gamma 2) summed over
  every class of every non-ignored anchor (positives have a one-hot target,
  background all zeros);
- box regression: only positive anchors; smooth-L1 on the variance-scaled
  deltas (`delta=1.0` as keras-cv's `SmoothL1Loss(l1_cutoff=1.0)`;
  Detectron's beta 0.1 on unscaled deltas is about the same), or
  `1 - GIoU` of the decoded boxes;
- both are divided by the number of positive anchors in the batch (at
  least 1), Detectron's normalisation. The per-image values `call` returns
  are scaled by the batch size so that Keras' "sum_over_batch_size"
  reduction gives exactly `(sum of losses) / (positives in the batch)`.
  Under tf.distribute the count is the global batch's (the mean over the
  replicas, `mean_over_replicas`), so several replicas train as one device.

GIoU is invariant to translating and to scaling each axis of both boxes, so
it is computed in the anchor's own frame (centre 0, size 1): the decoded
boxes are `[v0 * dx, v1 * dy, exp(v2 * dw), exp(v3 * dh)]` in centre form.
The loss therefore needs only the box variance, not the anchors.

Everything is computed in float32, whatever the model's dtype policy.
"""

import keras
from keras import ops

from keras_resnet.layers.core import mean_over_replicas
from keras_resnet.models.retinanet.boxes import (
    BOX_VARIANCE,
    MAX_LOG_SCALE,
    convert_format,
    generalized_iou,
)
from keras_resnet_settings.errors import ConfigError

PACKAGE = "keras_resnet"
BOX_LOSSES = ("smooth_l1", "giou")


def sigmoid_focal_loss(labels, logits, alpha=0.25, gamma=2.0):
    """Element-wise focal loss of Lin et al. (2017) on sigmoid logits.

    `FL = -alpha_t * (1 - p_t) ** gamma * log(p_t)`, computed from the
    stable sigmoid cross-entropy. `alpha=None` disables the weighting.
    """
    labels = ops.cast(labels, "float32")
    logits = ops.cast(logits, "float32")
    probabilities = ops.sigmoid(logits)
    cross_entropy = ops.maximum(logits, 0.0) - logits * labels + ops.log1p(ops.exp(-ops.abs(logits)))
    p_t = probabilities * labels + (1.0 - probabilities) * (1.0 - labels)
    loss = ops.power(1.0 - p_t, gamma) * cross_entropy
    if alpha is not None:
        loss = (alpha * labels + (1.0 - alpha) * (1.0 - labels)) * loss
    return loss


def smooth_l1_loss(y_true, y_pred, delta=1.0):
    """Element-wise smooth-L1: `0.5 x**2 / delta` if `|x| < delta`, else `|x| - 0.5 delta`."""
    difference = ops.abs(ops.cast(y_pred, "float32") - ops.cast(y_true, "float32"))
    return ops.where(difference < delta, 0.5 * difference * difference / delta, difference - 0.5 * delta)


def _deltas_to_unit_boxes(deltas, variance):
    deltas = ops.cast(deltas, "float32") * ops.convert_to_tensor(variance, "float32")
    sizes = ops.exp(ops.minimum(deltas[..., 2:], MAX_LOG_SCALE))
    return convert_format(ops.concatenate([deltas[..., :2], sizes], axis=-1), "center_xywh", "xyxy")


def giou_loss_from_deltas(target_deltas, predicted_deltas, variance=BOX_VARIANCE):
    """`1 - GIoU` of two sets of encoded boxes `(..., 4)` relative to the same anchors."""
    return 1.0 - generalized_iou(
        _deltas_to_unit_boxes(target_deltas, variance), _deltas_to_unit_boxes(predicted_deltas, variance)
    )


@keras.saving.register_keras_serializable(package=PACKAGE)
class RetinaNetLoss(keras.losses.Loss):
    """Focal classification loss plus box regression on positive anchors.

    Args:
        num_classes: number of object classes (the logits after 4 deltas).
        box_loss: "smooth_l1" or "giou".
        alpha, gamma: focal loss parameters.
        smooth_l1_delta: smooth-L1 transition point (on scaled deltas).
        box_loss_weight: weight of the box loss against the focal loss.
        box_variance: the encoder's variance (used by "giou").
        name: loss name.

    Example:
    >>> loss = RetinaNetLoss(num_classes=3)
    >>> y_true = np.zeros((2, 10, 5), "float32"); y_true[..., 4] = -1.0; y_true[0, 0, 4] = 2.0
    >>> float(loss(y_true, np.zeros((2, 10, 7), "float32"))) > 0
    True
    """

    def __init__(
        self,
        num_classes,
        box_loss="smooth_l1",
        alpha=0.25,
        gamma=2.0,
        smooth_l1_delta=1.0,
        box_loss_weight=1.0,
        box_variance=BOX_VARIANCE,
        name="retinanet_loss",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        if int(num_classes) < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}.")
        if box_loss not in BOX_LOSSES:
            raise ConfigError(f"box_loss={box_loss!r} is not supported; allowed values: {BOX_LOSSES}.")
        if smooth_l1_delta <= 0:
            raise ConfigError(f"smooth_l1_delta must be > 0, got {smooth_l1_delta}.")
        self.num_classes = int(num_classes)
        self.box_loss = box_loss
        self.alpha = alpha
        self.gamma = float(gamma)
        self.smooth_l1_delta = float(smooth_l1_delta)
        self.box_loss_weight = float(box_loss_weight)
        self.box_variance = tuple(float(v) for v in box_variance)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        box_targets, class_targets = y_true[..., :4], y_true[..., 4]
        box_predictions, logits = y_pred[..., :4], y_pred[..., 4:]
        positive = ops.cast(class_targets >= 0.0, "float32")  # (B, N)
        not_ignored = ops.cast(class_targets > -1.5, "float32")
        labels = ops.one_hot(ops.cast(ops.maximum(class_targets, 0.0), "int32"), self.num_classes)
        labels = labels * positive[..., None]
        focal = sigmoid_focal_loss(labels, logits, self.alpha, self.gamma)
        classification = ops.sum(ops.sum(focal, axis=-1) * not_ignored, axis=-1)
        if self.box_loss == "smooth_l1":
            box = ops.sum(smooth_l1_loss(box_targets, box_predictions, self.smooth_l1_delta), axis=-1)
        else:
            box = giou_loss_from_deltas(box_targets, box_predictions, self.box_variance)
        box = ops.sum(box * positive, axis=-1)
        batch_size = ops.cast(ops.shape(y_true)[0], "float32")
        # Positives per replica's batch, averaged over the replicas: the global batch's normalisation.
        normalizer = ops.maximum(mean_over_replicas(ops.sum(positive)), 1.0) / batch_size
        return (classification + self.box_loss_weight * box) / normalizer

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "box_loss": self.box_loss,
            "alpha": self.alpha,
            "gamma": self.gamma,
            "smooth_l1_delta": self.smooth_l1_delta,
            "box_loss_weight": self.box_loss_weight,
            "box_variance": list(self.box_variance),
        }


__all__ = ["RetinaNetLoss", "BOX_LOSSES", "giou_loss_from_deltas", "sigmoid_focal_loss", "smooth_l1_loss"]
