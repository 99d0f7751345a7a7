"""Segmentation losses with an ignore label: cross-entropy, Dice, and both.

Targets are integer class maps `(N, H, W)` (or `(N, H, W, 1)`); pixels equal
to `ignore_index` (255, the VOC convention for borders and padding) add
nothing to the loss. Predictions are `(N, H, W, num_classes)` logits
(`from_logits=True`, the default) or probabilities. Every loss returns one
value per image, and Keras' default "sum_over_batch_size" reduction turns
them into the batch loss. Cross-entropy's pixel count is the global batch's
under tf.distribute (`mean_over_replicas`), as on one device.
"""

import keras
from keras import ops

from keras_resnet.layers.core import mean_over_replicas
from keras_resnet_settings.errors import ConfigError

PACKAGE = "keras_resnet"


def _labels_and_valid(y_true, ignore_index):
    """int32 labels `(N, H, W)` with ignored pixels set to 0, and the float32 valid mask."""
    y_true = ops.convert_to_tensor(y_true)
    if len(y_true.shape) == 4:
        y_true = ops.squeeze(y_true, axis=-1)
    labels = ops.cast(y_true, "int32")
    valid = ops.not_equal(labels, ignore_index)
    return ops.where(valid, labels, 0), ops.cast(valid, "float32")


@keras.saving.register_keras_serializable(package=PACKAGE)
class SegmentationCrossEntropy(keras.losses.Loss):
    """Per-pixel softmax cross-entropy averaged over the non-ignored pixels.

    With `class_weights`, each pixel is weighted by its true class's weight
    and the batch loss is `sum(w * ce) / sum(w)` over non-ignored pixels
    (as `torch.nn.CrossEntropyLoss(weight=..., ignore_index=...)`).

    Args:
        ignore_index: label value that is ignored (None: none is).
        class_weights: None or one weight per class.
        from_logits: whether predictions are logits (else probabilities).
        name: loss name.

    Example:
    >>> loss = SegmentationCrossEntropy(ignore_index=255)
    >>> loss(np.array([[[0, 255]]]), np.array([[[[2.0, 0.0], [0.0, 9.0]]]]))  # only pixel 0 counts
    """

    def __init__(self, ignore_index=255, class_weights=None, from_logits=True, name="segmentation_cross_entropy",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        self.from_logits = bool(from_logits)

    def call(self, y_true, y_pred):
        ignore = -1 if self.ignore_index is None else self.ignore_index
        labels, weights = _labels_and_valid(y_true, ignore)
        y_pred = ops.cast(y_pred, "float32")
        per_pixel = ops.sparse_categorical_crossentropy(labels, y_pred, from_logits=self.from_logits)
        if self.class_weights is not None:
            weights = weights * ops.take(ops.convert_to_tensor(self.class_weights, "float32"), labels)
        # Scaled so that the mean over all pixels equals sum(w * ce) / sum(w).
        # Under tf.distribute sum(w) is the global batch's (per replica, averaged over the replicas).
        scale = ops.cast(ops.size(weights), "float32") / ops.maximum(mean_over_replicas(ops.sum(weights)), 1e-6)
        return ops.mean(per_pixel * weights * scale, axis=(1, 2))

    def get_config(self):
        return {
            **super().get_config(),
            "ignore_index": self.ignore_index,
            "class_weights": self.class_weights,
            "from_logits": self.from_logits,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class DiceLoss(keras.losses.Loss):
    """Soft Dice loss per image, averaged over classes: `1 - mean_c dice_c`.

    `dice_c = (2 * sum(p_c * t_c) + smooth) / (sum(p_c) + sum(t_c) + smooth)`
    over the image's non-ignored pixels, with `p` the softmax probabilities
    and `t` the one-hot target; a class absent from both scores 1.

    Args:
        ignore_index: label value that is ignored (None: none is).
        from_logits: whether predictions are logits (else probabilities).
        smooth: additive smoothing of numerator and denominator.
        name: loss name.
    """

    def __init__(self, ignore_index=255, from_logits=True, smooth=1.0, name="dice_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.from_logits = bool(from_logits)
        self.smooth = float(smooth)

    def call(self, y_true, y_pred):
        ignore = -1 if self.ignore_index is None else self.ignore_index
        labels, valid = _labels_and_valid(y_true, ignore)
        y_pred = ops.cast(y_pred, "float32")
        probabilities = ops.softmax(y_pred, axis=-1) if self.from_logits else y_pred
        valid = valid[..., None]
        target = ops.one_hot(labels, ops.shape(y_pred)[-1], dtype="float32") * valid
        probabilities = probabilities * valid
        intersection = ops.sum(probabilities * target, axis=(1, 2))
        total = ops.sum(probabilities, axis=(1, 2)) + ops.sum(target, axis=(1, 2))
        dice = (2.0 * intersection + self.smooth) / (total + self.smooth)
        return 1.0 - ops.mean(dice, axis=-1)

    def get_config(self):
        return {
            **super().get_config(),
            "ignore_index": self.ignore_index,
            "from_logits": self.from_logits,
            "smooth": self.smooth,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class CombinedSegmentationLoss(keras.losses.Loss):
    """`ce_weight * SegmentationCrossEntropy + dice_weight * DiceLoss`.

    Args:
        ce_weight, dice_weight: weights of the two terms.
        ignore_index: label value ignored by both.
        class_weights: per-class weights of the cross-entropy term.
        from_logits: whether predictions are logits.
        name: loss name.
    """

    def __init__(self, ce_weight=1.0, dice_weight=1.0, ignore_index=255, class_weights=None, from_logits=True,
                 name="ce_dice_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.cross_entropy = SegmentationCrossEntropy(ignore_index, class_weights, from_logits)
        self.dice = DiceLoss(ignore_index, from_logits)

    def call(self, y_true, y_pred):
        return self.ce_weight * self.cross_entropy.call(y_true, y_pred) + self.dice_weight * self.dice.call(
            y_true, y_pred
        )

    def get_config(self):
        return {
            **super().get_config(),
            "ce_weight": self.ce_weight,
            "dice_weight": self.dice_weight,
            "ignore_index": self.cross_entropy.ignore_index,
            "class_weights": self.cross_entropy.class_weights,
            "from_logits": self.cross_entropy.from_logits,
        }


def make_segmentation_loss(kind, ignore_index=255, class_weights=None):
    """The loss of recipe key `train.loss`: "ce", "dice" or "ce+dice" (on logits)."""
    if kind == "ce":
        return SegmentationCrossEntropy(ignore_index, class_weights)
    if kind == "dice":
        if class_weights is not None:
            raise ConfigError("train.class_weights applies to the cross-entropy; use train.loss=ce or ce+dice.")
        return DiceLoss(ignore_index)
    if kind == "ce+dice":
        return CombinedSegmentationLoss(ignore_index=ignore_index, class_weights=class_weights)
    raise ConfigError(f"train.loss={kind!r}; allowed: 'ce', 'dice', 'ce+dice'.")
