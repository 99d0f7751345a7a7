"""`RetinaNetLabelEncoder`: ground-truth boxes to per-anchor training targets.

Semantics follow keras-cv's `RetinaNetLabelEncoder` (and the RetinaNet
paper): an anchor whose best IoU with a ground-truth box is >=
`positive_iou` is positive and takes that box and its class; below
`negative_iou` it is background (class target -1); in between it is
ignored (class target -2, excluded from the classification loss). Box
targets are `encode_boxes` deltas with variance `(0.1, 0.1, 0.2, 0.2)`, in
`[dx, dy, dw, dh]` order (keras-cv: `[dy, dx, dh, dw]`), and zeros for
non-positive anchors.

Unlike keras-cv (whose matcher has `force_match_for_each_col=False`), every
ground-truth box also gets its best anchors as positives, as Detectron's
`allow_low_quality_matches`: the anchors of highest IoU with a box (ties
included, IoU > 0) are positive whatever the threshold. Detectron keeps
such an anchor's original argmax box; here it is assigned to the box it is
the best anchor for (of those, the one of highest IoU), so a box whose best
anchor has a higher IoU with a neighbour still gets a positive. Two boxes
share their only best anchor only if they are (nearly) identical; then the
box of higher IoU keeps it.
"""

import tensorflow as tf

from keras_resnet.models.retinanet.anchors import AnchorGenerator
from keras_resnet.models.retinanet.boxes import BOX_VARIANCE, encode_boxes, pairwise_iou
from keras_resnet_settings.errors import ConfigError

BACKGROUND = -1.0
IGNORE = -2.0


class RetinaNetLabelEncoder:
    """Encodes xyxy boxes and int classes into RetinaNet targets `(..., N, 5)`.

    The last axis is `[dx, dy, dw, dh, class]` with class -1.0 for
    background and -2.0 for ignored anchors. Boxes and classes may be one
    image (`(M, 4)`, `(M,)`) or a padded batch (`(B, M, 4)`, `(B, M)`);
    rows with class < 0 are padding. Built from TensorFlow ops, it runs
    eagerly and inside `tf.data.Dataset.map`.

    Args:
        anchor_generator: an `AnchorGenerator` (None: the default one).
        image_shape: static `(height, width)` of the model input; may
            instead be given per call.
        positive_iou: IoU at or above which an anchor is positive.
        negative_iou: IoU below which an anchor is background.
        allow_low_quality_matches: make each box's best anchors positive.
        box_variance: the deltas' divisors, as in the detector and decoder.

    Example:
    >>> encoder = RetinaNetLabelEncoder(AnchorGenerator(), image_shape=(64, 64))
    >>> targets = encoder(np.array([[8.0, 8.0, 40.0, 40.0]]), np.array([3]))
    >>> targets.shape, int(np.sum(targets[:, 4] == 3) > 0)
    (TensorShape([774, 5]), 1)
    """

    def __init__(
        self,
        anchor_generator=None,
        image_shape=None,
        positive_iou=0.5,
        negative_iou=0.4,
        allow_low_quality_matches=True,
        box_variance=BOX_VARIANCE,
    ):
        if not 0.0 < negative_iou <= positive_iou <= 1.0:
            raise ConfigError(
                f"Need 0 < negative_iou <= positive_iou <= 1, got negative_iou={negative_iou}, "
                f"positive_iou={positive_iou}."
            )
        if len(box_variance) != 4:
            raise ConfigError(f"box_variance must have 4 values, got {box_variance}.")
        self.anchor_generator = anchor_generator if anchor_generator is not None else AnchorGenerator()
        self.image_shape = tuple(int(d) for d in image_shape[:2]) if image_shape is not None else None
        self.positive_iou = float(positive_iou)
        self.negative_iou = float(negative_iou)
        self.allow_low_quality_matches = bool(allow_low_quality_matches)
        self.box_variance = tuple(float(v) for v in box_variance)

    def anchors(self, image_shape=None):
        image_shape = image_shape if image_shape is not None else self.image_shape
        if image_shape is None:
            raise ConfigError("RetinaNetLabelEncoder needs image_shape=(height, width), in the constructor or the call.")
        return self.anchor_generator(image_shape)

    def __call__(self, boxes, classes, image_shape=None):
        """Targets for xyxy `boxes` `(..., M, 4)` and int `classes` `(..., M)`."""
        anchors = tf.constant(self.anchors(image_shape))
        boxes = tf.cast(boxes, tf.float32)
        classes = tf.cast(classes, tf.int32)
        single = boxes.shape.rank == 2
        if single:
            boxes, classes = boxes[None], classes[None]
        targets = self._encode_batch(boxes, classes, anchors)
        return targets[0] if single else targets

    def _encode_batch(self, boxes, classes, anchors):
        # One padding row keeps M >= 1, so arg-max over boxes is defined for images without boxes.
        batch = tf.shape(boxes)[0]
        boxes = tf.concat([tf.reshape(boxes, [batch, -1, 4]), tf.zeros([batch, 1, 4])], axis=1)
        classes = tf.concat([tf.reshape(classes, [batch, -1]), -tf.ones([batch, 1], tf.int32)], axis=1)
        valid = (classes >= 0)[:, None, :]  # (B, 1, M)
        iou = tf.where(valid, pairwise_iou(anchors, boxes), -1.0)  # (B, N, M)
        best_iou = tf.reduce_max(iou, axis=2)
        matched = tf.argmax(iou, axis=2, output_type=tf.int32)
        positive = best_iou >= self.positive_iou
        negative = best_iou < self.negative_iou
        if self.allow_low_quality_matches:
            best_per_box = tf.reduce_max(iou, axis=1, keepdims=True)  # (B, 1, M)
            is_best = (iou >= best_per_box) & (best_per_box > 0.0) & valid
            low_quality = tf.reduce_any(is_best, axis=2)
            low_quality_match = tf.argmax(tf.where(is_best, iou, -1.0), axis=2, output_type=tf.int32)
            matched = tf.where(low_quality, low_quality_match, matched)
            positive = positive | low_quality
        box_targets = encode_boxes(tf.gather(boxes, matched, batch_dims=1), anchors, self.box_variance)
        box_targets = tf.where(positive[..., None], box_targets, 0.0)
        matched_classes = tf.cast(tf.gather(classes, matched, batch_dims=1), tf.float32)
        class_targets = tf.where(positive, matched_classes, tf.where(negative, BACKGROUND, IGNORE))
        return tf.concat([box_targets, class_targets[..., None]], axis=-1)

    def get_config(self):
        return {
            "anchor_generator": self.anchor_generator.get_config(),
            "image_shape": list(self.image_shape) if self.image_shape is not None else None,
            "positive_iou": self.positive_iou,
            "negative_iou": self.negative_iou,
            "allow_low_quality_matches": self.allow_low_quality_matches,
            "box_variance": list(self.box_variance),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["anchor_generator"] = AnchorGenerator.from_config(config["anchor_generator"])
        return cls(**config)


__all__ = ["RetinaNetLabelEncoder", "BACKGROUND", "IGNORE"]
