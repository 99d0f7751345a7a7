"""Detection geometry in TensorFlow: letterboxing with boxes, box padding, the training augmentation.

Also the box side of native-resolution windows (``data.sampling: crop``,
:mod:`keras_resnet.data.crops`): :func:`make_detection_crop` (training
windows) and :func:`tile_boxes` (validation tiles). Every path moving boxes
into a window clips them with one rule, :func:`clip_to_window`.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from keras_resnet.data import crops
from keras_resnet.data.images import letterbox_images
from keras_resnet.data.rescale_crop import RescaleCrop
from keras_resnet.tiling.grid import grid_origins, grid_tiles

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
        boxes, classes, keep = clip_to_window(boxes, classes, height, width, min_visible)
        if horizontal_flip:
            flipped, image = crops.random_flip(flip_seed, image)
            boxes = _mirror_boxes(boxes, keep, flipped, width)
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        return tf.ensure_shape(image, [height, width, channels]), boxes, classes

    return augment


def clip_to_window(boxes, classes, height: int, width: int, min_visible: float):
    """Clip window-pixel boxes to the `(height, width)` window and drop the ones mostly outside it.

    The one box rule of every window (augmentation, crops, tiles): a box is
    dropped (class -1, box zeros) when less than `min_visible` of its area
    stays inside, or when the clipped box is under 2 px (``MIN_BOX_SIDE``)
    wide or high. Rows are not compacted (see :func:`pad_boxes`).

    Args:
        boxes: float32 `(..., N, 4)` xyxy in window pixels (may extend past it).
        classes: int32 `(..., N)`, -1 for padding rows.
        height, width: the window size.
        min_visible: fraction of a box's area that must stay inside.

    Returns:
        `(boxes, classes, keep)`: clipped boxes, classes, and the bool kept rows.
    """
    clipped = tf.clip_by_value(boxes, 0.0, tf.constant([width, height, width, height], tf.float32))
    area = tf.reduce_prod(boxes[..., 2:] - boxes[..., :2], axis=-1)
    sides = clipped[..., 2:] - clipped[..., :2]
    keep = (
        (classes >= 0)
        & (tf.reduce_prod(sides, axis=-1) >= min_visible * area)
        & tf.reduce_all(sides >= MIN_BOX_SIDE, axis=-1)
    )
    return tf.where(keep[..., None], clipped, 0.0), tf.where(keep, classes, -1), keep


def _mirror_boxes(boxes, keep, flipped, width: int):
    """The kept boxes mirrored left-right in a `width`-wide image when `flipped`."""
    mirrored = tf.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=-1)
    return tf.where(flipped & keep[:, None], mirrored, boxes)


def window_boxes(boxes, classes, top, left, window_h, window_w, height: int, width: int, min_visible: float):
    """Source-pixel boxes moved into a window: `window_h x window_w` source pixels at `(top, left)`, resized to `(height, width)`.

    Boxes are shifted by the offset, scaled by `height / window_h` and
    `width / window_w`, then clipped and dropped by :func:`clip_to_window`.
    Works on `(N, 4)` boxes or a stack of windows (`top`, `left` of shape
    `(T, 1)`, boxes `(1, N, 4)`).

    Returns:
        `(boxes, classes, keep)` as :func:`clip_to_window`.
    """
    offset = tf.cast(tf.stack([left, top, left, top], axis=-1), tf.float32)
    factors = tf.cast(tf.stack([width / window_w, height / window_h] * 2, axis=-1), tf.float32)
    return clip_to_window((boxes - offset) * factors, classes, height, width, min_visible)


def tile_boxes(image, boxes, classes, height: int, width: int, min_visible: float = 0.25):
    """The validation tiles of one native-size image: `(uint8 (T, H, W, C) tiles, (T, N, 4) boxes, (T, N) classes)`.

    A grid of non-overlapping input-size tiles row by row
    (:func:`keras_resnet.tiling.grid_tiles`; the last row and column
    padded with 0), each with the boxes moved into it by the training rule
    (:func:`clip_to_window`).
    """
    image = tf.convert_to_tensor(image)
    offsets = grid_origins(tf.shape(image)[0], tf.shape(image)[1], height, width, 0.0, "pad")
    tops, lefts = offsets[:, :1], offsets[:, 1:]
    count = tf.shape(offsets)[0]
    tiled_boxes, tiled_classes, _ = window_boxes(
        boxes[None], tf.tile(classes[None], [count, 1]), tops, lefts, height, width, height, width, min_visible
    )
    return grid_tiles(image, height, width, 0), tiled_boxes, tiled_classes


def make_detection_crop(
    input_shape: Sequence[int],
    horizontal_flip: bool = True,
    scale_range: Sequence[float] = (1.0, 1.0),
    min_visible: float = 0.25,
    empty_crop_rate: float = 0.1,
):
    """Build the native-resolution window sampler ``(image, boxes, classes, seed) -> (image, boxes, classes)``.

    A window of the input size (over a random scale in ``scale_range``, see
    :func:`keras_resnet.data.crops.window_size`) is placed uniformly on the
    native-size image; when no box survives in it (:func:`clip_to_window`)
    it is kept with probability ``empty_crop_rate``, else replaced by a
    window holding a random box (whole when it fits, else its centre). The
    window is cut (padded with 0 past the image), resized to the input size
    and flipped left-right with probability 0.5 when ``horizontal_flip``.

    Args:
        input_shape: ``(H, W, C)`` of the model input.
        horizontal_flip: random left-right flip.
        scale_range: ``(low, high)``; a window covers ``H / s x W / s``
            source pixels.
        min_visible: fraction of a box's area that must stay in the window.
        empty_crop_rate: probability of keeping a window without boxes.

    Returns:
        The sampler: uint8 ``(h, w, C)`` image, float32 ``(N, 4)`` boxes in
        image pixels, int32 ``(N,)`` classes (-1 padding), ``[2]`` int seed;
        returns the uint8 ``(H, W, C)`` window, its boxes and classes (rows
        not compacted, see :func:`pad_boxes`).

    Example:
    >>> crop = make_detection_crop((256, 256, 3), empty_crop_rate=0.0)
    >>> image, boxes, classes = crop(image, boxes, classes, tf.constant([1, 2], tf.int64))
    """
    height, width, channels = input_shape
    resized = tuple(float(v) for v in scale_range) != (1.0, 1.0)

    def crop(image, boxes, classes, seed):
        image, boxes, classes = (tf.convert_to_tensor(t) for t in (image, boxes, classes))
        scale_seed, place_seed, keep_seed, pick_seed, object_seed, flip_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, 6))
        image_h, image_w = tf.shape(image)[0], tf.shape(image)[1]
        window_h, window_w = crops.window_size(scale_seed, height, width, scale_range)
        top, left = crops.random_offsets(place_seed, image_h, image_w, window_h, window_w)
        args = (height, width, min_visible)
        _, _, keep = window_boxes(boxes, classes, top, left, window_h, window_w, *args)
        valid = tf.where(classes >= 0)[:, 0]
        replace = crops.keep_or_replace(keep_seed, tf.logical_not(tf.reduce_any(keep)), tf.size(valid) > 0,
                                        empty_crop_rate)

        def on_object():
            pick = tf.random.stateless_uniform([], pick_seed, 0, tf.maximum(tf.size(valid), 1), dtype=tf.int32)
            box = boxes[valid[pick]]
            top_seed, left_seed = tf.unstack(tf.random.experimental.stateless_split(object_seed, 2))
            return (crops.offset_containing(top_seed, box[1], box[3], image_h, window_h),
                    crops.offset_containing(left_seed, box[0], box[2], image_w, window_w))

        top, left = tf.cond(replace, on_object, lambda: (top, left))
        boxes, classes, keep = window_boxes(boxes, classes, top, left, window_h, window_w, *args)
        image = crops.resize_window(crops.cut_window(image, top, left, window_h, window_w, 0), height, width,
                                    "bilinear", resized)
        if resized:
            image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        if horizontal_flip:
            flipped, image = crops.random_flip(flip_seed, image)
            boxes = _mirror_boxes(boxes, keep, flipped, width)
        return tf.ensure_shape(image, [height, width, channels]), boxes, classes

    return crop
