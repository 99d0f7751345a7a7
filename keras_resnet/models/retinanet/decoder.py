"""`DetectionDecoder`: raw RetinaNet outputs to boxes, scores and classes.

Per image, on the raw output `(N, 4 + C)` (box deltas, class logits):

1. pre-selection: the `pre_nms_top_k` best (anchor, class) pairs over all
   `N * C` logits (`top_k`; the sigmoid is monotonic, so it is applied to
   the selected logits only). Every pair is a candidate, not just each
   anchor's best class, as in the RetinaNet paper, Detectron and
   torchvision: an anchor may yield boxes of two classes. (Detectron takes
   the top 1000 per level; one top-k over all levels is simpler to export
   and differs only when a level would be left out.) `top_k_per_level=True`
   takes the `pre_nms_top_k` best of each pyramid level instead, as
   torchvision's RetinaNet (`topk_candidates`) and Detectron do;
2. the selected deltas are decoded against their anchors and clipped to
   the image; boxes left with no area (outside the image) are dropped;
3. class-wise NMS in one call: each box is shifted by `class_id *
   (max(H, W) + 1)` pixels so boxes of different classes never overlap,
   then one `NonMaxSuppressionV5` (score threshold, IoU threshold,
   padded to `max_detections`) keeps the best of each cluster. NMS is
   given each candidate's rank in the sorted top-k instead of its score
   (same order; equal scores, common with int8 logits, are ranked by the
   lower anchor/class index), so TensorFlow, TFLite and ONNX, whose NMS
   kernels order score ties differently, suppress the same boxes. Top-k,
   gather, floor-div/mod and NonMaxSuppressionV5 are TFLite builtins
   (`NON_MAX_SUPPRESSION_V5`) and tf2onnx maps NMS to ONNX
   `NonMaxSuppression`, so the decoder exports with the model.

A batch with a static size is decoded by a Python loop over its images (no
control flow in the exported graph); a dynamic batch uses `tf.map_fn`.

keras-cv's `NonMaxSuppression` layer differs: it is class-agnostic (the
max class score per anchor, one NMS over all classes) and runs
`tf.image.non_max_suppression_padded` on the batch.
"""

import keras
import tensorflow as tf

from keras_resnet.models.retinanet.anchors import AnchorGenerator
from keras_resnet.models.retinanet.boxes import BOX_VARIANCE, clip_boxes, decode_boxes
from keras_resnet_settings.errors import ConfigError

PACKAGE = "keras_resnet"
OUTPUT_KEYS = ("boxes", "scores", "classes", "num_detections")


@keras.saving.register_keras_serializable(package=PACKAGE)
class DetectionDecoder(keras.layers.Layer):
    """Decodes `(B, N, 4 + num_classes)` raw outputs into padded detections.

    Returns a dict: "boxes" `(B, max_detections, 4)` xyxy pixels clipped to
    the image, "scores" `(B, max_detections)` sigmoid scores, "classes"
    `(B, max_detections)` int32 (-1 for padding; padding boxes and scores
    are 0) and "num_detections" `(B,)` int32. Detections are sorted by
    score.

    Args:
        num_classes: number of object classes.
        image_shape: static `(height, width)` of the model input.
        anchor_generator: the detector's `AnchorGenerator` (or its config
            dict); None for the default one.
        box_variance: the deltas' divisors, as in the label encoder.
        score_threshold: minimum sigmoid score of a detection.
        iou_threshold: boxes of one class overlapping more than this are
            suppressed.
        max_detections: detections per image after NMS.
        pre_nms_top_k: (anchor, class) candidates per image before NMS
            (per pyramid level with `top_k_per_level`).
        top_k_per_level: take the `pre_nms_top_k` candidates of each
            level (torchvision's and Detectron's rule) instead of over all
            levels at once.

    Example:
    >>> decoder = DetectionDecoder(num_classes=2, image_shape=(64, 64))
    >>> out = decoder(np.zeros((1, 774, 6), "float32") - 10.0)
    >>> int(out["num_detections"][0]), tuple(out["boxes"].shape)
    (0, (1, 100, 4))
    """

    def __init__(
        self,
        num_classes,
        image_shape,
        anchor_generator=None,
        box_variance=BOX_VARIANCE,
        score_threshold=0.05,
        iou_threshold=0.5,
        max_detections=100,
        pre_nms_top_k=1000,
        top_k_per_level=False,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if isinstance(anchor_generator, dict):
            anchor_generator = AnchorGenerator.from_config(anchor_generator)
        self.anchor_generator = anchor_generator if anchor_generator is not None else AnchorGenerator()
        self.num_classes = int(num_classes)
        self.image_shape = tuple(int(d) for d in image_shape[:2])
        self.box_variance = tuple(float(v) for v in box_variance)
        self.score_threshold = float(score_threshold)
        self.iou_threshold = float(iou_threshold)
        self.max_detections = int(max_detections)
        self.pre_nms_top_k = int(pre_nms_top_k)
        self.top_k_per_level = bool(top_k_per_level)
        if self.num_classes < 1 or self.max_detections < 1 or self.pre_nms_top_k < 1:
            raise ConfigError(
                "num_classes, max_detections and pre_nms_top_k must be >= 1, got "
                f"{num_classes}, {max_detections}, {pre_nms_top_k}."
            )
        if not 0.0 <= self.iou_threshold <= 1.0:
            raise ConfigError(f"iou_threshold must be in [0, 1], got {iou_threshold}.")
        self.anchors = self.anchor_generator(self.image_shape)
        per_cell = self.anchor_generator.num_anchors_per_location
        self.level_counts = [h * w * per_cell for h, w in self.anchor_generator.feature_sizes(self.image_shape)]

    def _top_k(self, raw):
        """The best `pre_nms_top_k` logits (over all levels or per level) and their flat indices."""
        num_classes = self.num_classes
        if not self.top_k_per_level:
            logits = tf.reshape(raw[:, 4:], [-1])
            return tf.math.top_k(logits, k=min(self.pre_nms_top_k, self.anchors.shape[0] * num_classes))
        logits, indices, start = [], [], 0
        for count in self.level_counts:
            level_logits = tf.reshape(raw[start:start + count, 4:], [-1])
            top_logits, top_indices = tf.math.top_k(level_logits, k=min(self.pre_nms_top_k, count * num_classes))
            logits.append(top_logits)
            indices.append(top_indices + start * num_classes)
            start += count
        logits, indices = tf.concat(logits, axis=0), tf.concat(indices, axis=0)
        order = tf.math.top_k(logits, k=logits.shape[0]).indices  # all levels by score (ties: lower level first)
        return tf.gather(logits, order), tf.gather(indices, order)

    def _decode_image(self, raw, anchors):
        num_classes = self.num_classes
        top_logits, top_indices = self._top_k(raw)
        anchor_indices = top_indices // num_classes
        classes = top_indices % num_classes
        scores = tf.sigmoid(top_logits)
        boxes = decode_boxes(
            tf.gather(raw[:, :4], anchor_indices), tf.gather(anchors, anchor_indices),
            self.box_variance,
        )
        boxes = clip_boxes(boxes, self.image_shape)
        offsets = tf.cast(classes, tf.float32) * float(max(self.image_shape) + 1)
        # NMS ranks the candidates by their place in the sorted top-k (ties: the lower anchor/class index
        # first) instead of by score: equal scores -- common once logits are int8 -- then suppress in the
        # same order in TensorFlow, TFLite and ONNX, whose NMS kernels break score ties differently.
        count = tf.shape(scores)[0]
        # A box clipped to nothing (it lay outside the image) is no detection: NMS cannot suppress zero-area
        # duplicates (IoU 0/0), and TFLite returned one such box 100 times.
        nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        rank_scores = tf.where(
            (scores > self.score_threshold) & nonempty,
            1.0 - tf.cast(tf.range(count), tf.float32) / tf.cast(count, tf.float32), 0.0,
        )
        selected, _, num_detections = tf.raw_ops.NonMaxSuppressionV5(
            boxes=boxes + offsets[:, None],
            scores=rank_scores,
            max_output_size=self.max_detections,
            iou_threshold=self.iou_threshold,
            score_threshold=0.0,
            soft_nms_sigma=0.0,
            pad_to_max_output_size=True,
        )
        valid = tf.range(self.max_detections) < num_detections
        return {
            "boxes": tf.where(valid[:, None], tf.gather(boxes, selected), 0.0),
            "scores": tf.where(valid, tf.gather(scores, selected), 0.0),
            "classes": tf.where(valid, tf.gather(classes, selected), -1),
            "num_detections": num_detections,
        }

    def call(self, inputs):
        raw = tf.cast(inputs, tf.float32)
        expected = (self.anchors.shape[0], 4 + self.num_classes)
        if tuple(raw.shape[1:]) != expected:
            raise ConfigError(
                f"DetectionDecoder expects raw outputs (batch, {expected[0]}, {expected[1]}) for image_shape="
                f"{self.image_shape} and num_classes={self.num_classes}, got {tuple(raw.shape)}."
            )
        anchors = tf.constant(self.anchors)
        if raw.shape[0] is not None:
            images = [self._decode_image(raw[index], anchors) for index in range(raw.shape[0])]
            return {key: tf.stack([image[key] for image in images]) for key in OUTPUT_KEYS}
        signature = {
            "boxes": tf.TensorSpec([self.max_detections, 4], tf.float32),
            "scores": tf.TensorSpec([self.max_detections], tf.float32),
            "classes": tf.TensorSpec([self.max_detections], tf.int32),
            "num_detections": tf.TensorSpec([], tf.int32),
        }
        return tf.map_fn(lambda image: self._decode_image(image, anchors), raw, fn_output_signature=signature)

    def compute_output_spec(self, inputs):
        batch = inputs.shape[0]
        return {
            "boxes": keras.KerasTensor((batch, self.max_detections, 4), "float32"),
            "scores": keras.KerasTensor((batch, self.max_detections), "float32"),
            "classes": keras.KerasTensor((batch, self.max_detections), "int32"),
            "num_detections": keras.KerasTensor((batch,), "int32"),
        }

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "anchor_generator": self.anchor_generator.get_config(),
            "box_variance": list(self.box_variance),
            "score_threshold": self.score_threshold,
            "iou_threshold": self.iou_threshold,
            "max_detections": self.max_detections,
            "pre_nms_top_k": self.pre_nms_top_k,
            "top_k_per_level": self.top_k_per_level,
        }


def decoder_from_config(config: dict) -> DetectionDecoder:
    """A `DetectionDecoder` from its config without the layer entries (an export's metadata "decoder")."""
    config = {key: value for key, value in config.items() if key not in ("name", "trainable", "dtype")}
    return DetectionDecoder(**config)


__all__ = ["DetectionDecoder", "OUTPUT_KEYS", "decoder_from_config"]
