"""Detection geometry in TensorFlow: letterboxing with boxes, box padding, the training augmentation."""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from keras_resnet.data.common import RescaleCrop
from keras_resnet.data.images import letterbox_images

MIN_BOX_SIDE = 2.0  # training boxes narrower or shorter than this (input pixels) are dropped


def letterbox(image: tf.Tensor, boxes: tf.Tensor, scale: tf.Tensor, input_height: int, input_width: int):
    """Resize ``image`` (any size) by ``scale`` and pad bottom/right with 0 to the input size.

    :func:`keras_resnet.data.images.letterbox_images` with the boxes and uint8 pixels.

    Args:
        image: uint8 ``(h, w, C)``.
        boxes: float32 ``(N, 4)`` xyxy in image pixels.
        scale: the factor from :func:`keras_resnet.data.images.letterbox_scale`.
        input_height, input_width: output size.

    Returns:
        ``(uint8 (input_height, input_width, C) image, boxes * scale)``.
    """
    channels = image.shape[-1]
    padded, scale = letterbox_images(image, input_height, input_width, scale)
    padded = tf.cast(padded, tf.uint8)
    return tf.ensure_shape(padded, [input_height, input_width, channels]), boxes * scale


def pad_boxes(boxes: tf.Tensor, classes: tf.Tensor, max_boxes: int):
    """Move valid rows (class >= 0) first and pad/truncate to ``max_boxes`` (class -1, box 0)."""
    valid = classes >= 0
    boxes, classes = tf.boolean_mask(boxes, valid)[:max_boxes], tf.boolean_mask(classes, valid)[:max_boxes]
    pad = max_boxes - tf.shape(classes)[0]
    boxes = tf.pad(boxes, [[0, pad], [0, 0]])
    classes = tf.pad(classes, [[0, pad]], constant_values=-1)
    return tf.ensure_shape(boxes, [max_boxes, 4]), tf.ensure_shape(classes, [max_boxes])


def make_detection_augment(
    input_shape: Sequence[int],
    horizontal_flip: bool = True,
    scale_range: Sequence[float] = (0.75, 1.25),
    min_visible: float = 0.25,
):
    """Build the training augmentation ``(image, boxes, classes, seed) -> (image, boxes, classes)``.

    The input-size image is rescaled by a random factor in ``scale_range``,
    padded with 0 at a random offset when smaller than the input size,
    randomly cropped back to it, and flipped left-right with probability
    0.5 when ``horizontal_flip``. Boxes get the same transform and are
    clipped to the image; a box is dropped (class -1) when less than
    ``min_visible`` of its rescaled area remains or when it is under 2 px
    wide or high. Rows are not compacted here (see :func:`pad_boxes`).

    Args:
        input_shape: ``(H, W, C)`` of the images.
        horizontal_flip: random left-right flip.
        scale_range: ``(low, high)`` rescale factors.
        min_visible: fraction of a box's area that must stay in the crop.

    Returns:
        The augmentation function; ``seed`` is a ``[2]`` int tensor.

    Example:
    >>> augment = make_detection_augment((256, 256, 3))
    >>> image, boxes, classes = augment(image, boxes, classes, tf.constant([1, 2]))
    """
    height, width, channels = input_shape
    low, high = scale_range

    def augment(image, boxes, classes, seed):
        scale_seed, pad_seed, crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
        window = RescaleCrop.random(scale_seed, pad_seed, crop_seed, height, width, (low, high))
        image = window.apply(image)
        factors = tf.cast(tf.stack([window.scaled_w / width, window.scaled_h / height] * 2), tf.float32)
        boxes = boxes * factors
        shift = tf.cast(tf.stack([window.pad_left - window.left, window.pad_top - window.top] * 2), tf.float32)
        boxes = boxes + shift
        clipped = tf.clip_by_value(boxes, 0.0, tf.constant([width, height, width, height], tf.float32))
        area = tf.reduce_prod(boxes[:, 2:] - boxes[:, :2], axis=-1)
        sides = clipped[:, 2:] - clipped[:, :2]
        keep = (
            (classes >= 0)
            & (tf.reduce_prod(sides, axis=-1) >= min_visible * area)
            & tf.reduce_all(sides >= MIN_BOX_SIDE, axis=-1)
        )
        boxes = tf.where(keep[:, None], clipped, 0.0)
        classes = tf.where(keep, classes, -1)
        if horizontal_flip:
            flipped = tf.random.stateless_uniform([], flip_seed) < 0.5
            image = tf.cond(flipped, lambda: tf.reverse(image, [1]), lambda: image)
            mirrored = tf.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=-1)
            boxes = tf.where(flipped & keep[:, None], mirrored, boxes)
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        return tf.ensure_shape(image, [height, width, channels]), boxes, classes

    return augment
