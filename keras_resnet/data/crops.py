"""Native-resolution training windows (``data.sampling: crop``) and validation tiles.

With ``data.sampling: crop`` the segmentation and detection pipelines keep
every image at its own size (no resize, no letterbox) and train on random
windows of the model input size ``(H, W)``: large images with small objects
(aerial photos, microscopy, inspection) keep their detail. This module holds
the window logic both tasks share; the detection boxes follow in
:func:`keras_resnet.data.detection.geometry.make_detection_crop`.

A window is ``(top, left, window_h, window_w)`` in source pixels. Its size is
the input size divided by a random scale ``s`` from
``data.augment.scale_range`` (``window = round(H / s) x round(W / s)``, then
resized to ``H x W``: bilinear for images, nearest for masks). Offsets are
integers; where the image is smaller than the window the offset ranges over
``[size - window, 0]`` (negative: the image sits inside the window) and the
rest is padded (image 0, mask 255 = ignore). Every draw is stateless
(``tf.random.stateless_*``) from the per-window seed the pipeline gives, so a
run is reproducible.

Empty windows: a uniformly placed window that holds no object is kept with
probability ``data.empty_crop_rate``; otherwise it is replaced by a window
placed uniformly among the offsets that contain one randomly chosen object
(:func:`offset_containing`): a whole box when it fits, else its centre; a
foreground pixel for masks. Images without objects always give uniform
windows. The epoch length never changes (no ``tf.data`` filter).

Validation cuts each image into a grid of non-overlapping input-size tiles
(`keras_resnet.tiling.grid_tiles`: overlap 0, padding "pad"), row by row, the
last row and column padded.

Example:
>>> crop = make_mask_crop((256, 256, 3), scale_range=(0.75, 1.25), horizontal_flip=True,
...                       empty_crop_rate=0.1, ignore_index=255)
>>> image, mask = crop(image, mask, foreground_rows(mask, 255), tf.constant([1, 2], tf.int64))
"""

from __future__ import annotations

from typing import Callable, Sequence

import tensorflow as tf

from keras_resnet.tiling.grid import grid_origins, grid_tiles
from keras_resnet_settings import check_setting


def check_crop_args(sampling: str, crops_per_image: int, empty_crop_rate: float) -> None:
    """A ConfigError unless the arguments hold as their recipe keys' declarations say (data.sampling, ...)."""
    for key, value in (("sampling", sampling), ("crops_per_image", crops_per_image),
                       ("empty_crop_rate", empty_crop_rate)):
        check_setting(f"data.{key}", value)


# ----------------------------------------------------------------------------
# Window size and placement
# ----------------------------------------------------------------------------
def window_size(seed, height: int, width: int, scale_range: Sequence[float]):
    """`(window_h, window_w)` int32 source pixels: the input size over a random scale in `scale_range`.

    With `scale_range` (1, 1) the window is the input size itself (no draw).
    """
    low, high = (float(v) for v in scale_range)
    if low == high == 1.0:
        return tf.constant(height, tf.int32), tf.constant(width, tf.int32)
    scale = tf.random.stateless_uniform([], seed, low, high)
    window_h = tf.maximum(1, tf.cast(tf.round(height / scale), tf.int32))
    window_w = tf.maximum(1, tf.cast(tf.round(width / scale), tf.int32))
    return window_h, window_w


def offset_bounds(size, window):
    """Smallest and largest window offset along one axis: `[0, size - window]`, or `[size - window, 0]`
    when the image is smaller than the window."""
    return tf.minimum(0, size - window), tf.maximum(0, size - window)


def _uniform_int(seed, low, high):
    """A stateless uniform int32 in `[low, high]` (both included)."""
    return tf.random.stateless_uniform([], seed, minval=low, maxval=high + 1, dtype=tf.int32)


def uniform_offset(seed, size, window):
    """A window offset along one axis, uniform over :func:`offset_bounds`."""
    low, high = offset_bounds(size, window)
    return _uniform_int(seed, low, high)


def offset_containing(seed, start, end, size, window):
    """A window offset along one axis, uniform among those whose window holds the span `[start, end]`.

    The whole span when it fits in the window (`offset <= start`,
    `offset + window >= end`), else its centre; always within
    :func:`offset_bounds`, where such offsets always exist for a span
    inside the image (rounding to whole pixels may shift it by under one).

    Args:
        seed: `[2]` int seed.
        start, end: the object's extent in source pixels (float; a pixel
            `p` is `[p, p + 1]`).
        size: the image's extent (int32).
        window: the window's extent (int32).
    """
    start, end = tf.cast(start, tf.float32), tf.cast(end, tf.float32)
    extent = tf.cast(window, tf.float32)
    centre = (start + end) / 2.0
    fits = end - start <= extent
    low = tf.where(fits, end - extent, centre - extent)
    high = tf.where(fits, start, centre)
    bound_low, bound_high = offset_bounds(size, window)
    low = tf.clip_by_value(tf.cast(tf.math.ceil(low), tf.int32), bound_low, bound_high)
    high = tf.clip_by_value(tf.cast(tf.math.floor(high), tf.int32), low, bound_high)
    return _uniform_int(seed, low, high)


def random_offsets(seed, image_h, image_w, window_h, window_w):
    """`(top, left)` of a uniformly placed window."""
    top_seed, left_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    return uniform_offset(top_seed, image_h, window_h), uniform_offset(left_seed, image_w, window_w)


def keep_or_replace(seed, is_empty, has_objects, empty_crop_rate: float):
    """True when a window moves onto an object: it is empty, the image has objects, and it is not kept
    (kept with probability `empty_crop_rate`)."""
    kept = tf.random.stateless_uniform([], seed) < empty_crop_rate
    return is_empty & has_objects & tf.logical_not(kept)


# ----------------------------------------------------------------------------
# Cutting windows and tiles
# ----------------------------------------------------------------------------
def cut_window(image, top, left, window_h, window_w, fill=0):
    """The `(window_h, window_w, ...)` region of `image` at `(top, left)`, padded with `fill` outside it.

    Only the part inside the image is sliced (large images are never copied
    whole); offsets may be negative or run past the image's end.
    """
    image = tf.convert_to_tensor(image)
    shape = tf.shape(image)
    image_h, image_w = shape[0], shape[1]
    y0, x0 = tf.clip_by_value(top, 0, image_h), tf.clip_by_value(left, 0, image_w)
    y1 = tf.clip_by_value(top + window_h, 0, image_h)
    x1 = tf.clip_by_value(left + window_w, 0, image_w)
    inside = image[y0:y1, x0:x1]
    before_h, before_w = y0 - top, x0 - left
    after_h, after_w = window_h - before_h - (y1 - y0), window_w - before_w - (x1 - x0)
    paddings = tf.stack([[before_h, after_h], [before_w, after_w]])
    if image.shape.rank == 3:
        paddings = tf.concat([paddings, tf.zeros([1, 2], tf.int32)], axis=0)
    return tf.pad(inside, paddings, constant_values=tf.cast(fill, image.dtype))


def resize_window(window, height: int, width: int, method: str, resized: bool):
    """`window` resized to `(height, width)` with `method` (images bilinear to float32, masks nearest, dtype kept).

    Nearest samples source pixel `floor((i + 0.5) * size / output)` (half-pixel
    centres, as ``tf.image.resize``), with two gathers: several times faster
    than ``tf.image.resize`` there.
    """
    if not resized:
        return window
    if method == "nearest":
        shape = tf.shape(window)
        return tf.gather(tf.gather(window, _nearest_indices(shape[0], height), axis=0),
                         _nearest_indices(shape[1], width), axis=1)
    return tf.image.resize(tf.cast(window, tf.float32), [height, width], method=method)


def _nearest_indices(size, output: int):
    """int32 `(output,)`: the source index of each output pixel, half-pixel centres."""
    scale = tf.cast(size, tf.float32) / float(output)
    index = tf.cast(tf.floor((tf.range(output, dtype=tf.float32) + 0.5) * scale), tf.int32)
    return tf.minimum(index, size - 1)


def random_flip(seed, image, *others):
    """`image` and `others` (images or masks, width on axis 1) flipped left-right together with probability 1/2.

    Returns `(flipped, image, *others)`, `flipped` the bool draw (boxes follow it).
    """
    flipped = tf.random.stateless_uniform([], seed) < 0.5
    tensors = [tf.cond(flipped, lambda t=t: tf.reverse(t, [1]), lambda t=t: t) for t in (image, *others)]
    return (flipped, *tensors)


# ----------------------------------------------------------------------------
# Segmentation: masks
# ----------------------------------------------------------------------------
def foreground(mask, ignore_index: int):
    """bool: pixels of a class >= 1 that are not `ignore_index`."""
    return (mask >= 1) & (mask != tf.cast(ignore_index, mask.dtype))


def foreground_rows(mask, ignore_index: int):
    """int32 `(h,)`: the foreground pixels of each mask row (computed once per image, cached with it)."""
    return tf.reduce_sum(tf.cast(foreground(mask, ignore_index), tf.int32), axis=1)


def random_foreground_pixel(seed, mask, rows, ignore_index: int):
    """`(y, x)` of a foreground pixel of `mask` drawn uniformly, from its cached row counts `rows` (needs one)."""
    cumulative = tf.cumsum(rows)
    index = _uniform_int(seed, 0, tf.maximum(cumulative[-1], 1) - 1)
    y = tf.searchsorted(cumulative, index[None], side="right")[0]
    within = index - (cumulative[y] - rows[y])
    columns = tf.cumsum(tf.cast(foreground(mask[y], ignore_index), tf.int32))
    x = tf.searchsorted(columns, within[None], side="right")[0]
    return y, x


def make_mask_crop(
    input_shape: Sequence[int],
    scale_range: Sequence[float] = (1.0, 1.0),
    horizontal_flip: bool = True,
    empty_crop_rate: float = 0.1,
    ignore_index: int = 255,
) -> Callable:
    """Build the segmentation window sampler `(image, mask, rows, seed) -> (image, mask)`.

    Args:
        input_shape: `(H, W, C)` of the model input: every window's size.
        scale_range: `(low, high)`: a window covers `H / s x W / s` source
            pixels, `s` uniform in it, resized to `H x W`.
        horizontal_flip: flip the window left-right with probability 1/2.
        empty_crop_rate: probability of keeping a uniform window without
            foreground (no pixel of class >= 1 other than `ignore_index`);
            otherwise the window is placed over a random foreground pixel.
        ignore_index: the mask value of padding and "ignore".

    Returns:
        The sampler: `image` `(h, w, C)` any dtype 0..255 at native size,
        `mask` `(h, w)` ints, `rows` its :func:`foreground_rows`, `seed` a
        `[2]` int tensor; returns float32 `(H, W, C)` pixels and an int32
        `(H, W)` mask (padding 0 / `ignore_index`).

    Example:
    >>> crop = make_mask_crop((64, 64, 3), empty_crop_rate=0.0)
    >>> image, mask = crop(image, mask, foreground_rows(mask, 255), tf.constant([0, 1], tf.int64))
    """
    height, width, channels = input_shape
    resized = tuple(float(v) for v in scale_range) != (1.0, 1.0)

    def mask_window(mask, top, left, window_h, window_w):
        window = cut_window(mask[..., None], top, left, window_h, window_w, ignore_index)
        return resize_window(window, height, width, "nearest", resized)[..., 0]

    def crop(image, mask, rows, seed):
        image, mask, rows = tf.convert_to_tensor(image), tf.convert_to_tensor(mask), tf.convert_to_tensor(rows)
        scale_seed, place_seed, keep_seed, pick_seed, object_seed, flip_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, 6))
        image_h, image_w = tf.shape(mask)[0], tf.shape(mask)[1]
        window_h, window_w = window_size(scale_seed, height, width, scale_range)
        top, left = random_offsets(place_seed, image_h, image_w, window_h, window_w)
        window = mask_window(mask, top, left, window_h, window_w)
        is_empty = tf.logical_not(tf.reduce_any(foreground(window, ignore_index)))
        replace = keep_or_replace(keep_seed, is_empty, tf.reduce_sum(rows) > 0, empty_crop_rate)

        def on_object():
            y, x = random_foreground_pixel(pick_seed, mask, rows, ignore_index)
            top_seed, left_seed = tf.unstack(tf.random.experimental.stateless_split(object_seed, 2))
            new_top = offset_containing(top_seed, y, y + 1, image_h, window_h)
            new_left = offset_containing(left_seed, x, x + 1, image_w, window_w)
            return new_top, new_left, mask_window(mask, new_top, new_left, window_h, window_w)

        top, left, window = tf.cond(replace, on_object, lambda: (top, left, window))
        pixels = resize_window(cut_window(image, top, left, window_h, window_w, 0), height, width, "bilinear", resized)
        pixels, window = tf.cast(pixels, tf.float32), tf.cast(window, tf.int32)
        if horizontal_flip:
            _, pixels, window = random_flip(flip_seed, pixels, window)
        return tf.ensure_shape(pixels, [height, width, channels]), tf.ensure_shape(window, [height, width])

    return crop


# ----------------------------------------------------------------------------
# The training and validation datasets
# ----------------------------------------------------------------------------
def crop_training_dataset(
    sources: tf.data.Dataset,
    decode: Callable,
    crop: Callable,
    *,
    num_images: int,
    crops_per_image: int,
    repeat: int,
    batch_size: int,
    shuffle_buffer: int,
    seed: int,
    cache: bool,
) -> tf.data.Dataset:
    """Batches of training windows: `num_images x repeat x crops_per_image` windows per epoch.

    Images are shuffled (before decoding when not cached, so the buffer
    holds file names, not native-size pixels), each yields
    `crops_per_image` windows with their own seeds, and the windows are
    shuffled again (they would otherwise come in runs of one image).

    Args:
        sources: unbatched tuples `decode` takes (file names, targets).
        decode: `(*source) -> example` at native size (tf ops).
        crop: `(*example, seed) -> window example`, `seed` a `[2]` int64 tensor.
        num_images, crops_per_image, repeat: the epoch is their product.
        batch_size: whole batches (`drop_remainder=True`).
        shuffle_buffer: shuffle buffer cap (`data.shuffle_buffer`).
        seed: shuffle and crop seed.
        cache: cache the decoded native-size examples in memory.

    Returns:
        The batched, prefetched dataset, of known cardinality.
    """
    passes = num_images * repeat
    if cache:
        images = sources.map(decode, num_parallel_calls=tf.data.AUTOTUNE).cache()
        images = images.repeat(repeat) if repeat > 1 else images
        images = images.shuffle(min(shuffle_buffer, passes), seed=seed, reshuffle_each_iteration=True)
    else:
        images = sources.repeat(repeat) if repeat > 1 else sources
        images = images.shuffle(min(shuffle_buffer, passes), seed=seed, reshuffle_each_iteration=True)
        images = images.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    if crops_per_image > 1:
        images = images.flat_map(lambda *example: tf.data.Dataset.from_tensors(example).repeat(crops_per_image))
    crop_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    windows = tf.data.Dataset.zip((images, crop_seeds)).map(
        lambda example, crop_seed: crop(*example, crop_seed), num_parallel_calls=tf.data.AUTOTUNE
    )
    total = passes * crops_per_image
    if crops_per_image > 1:
        windows = windows.shuffle(min(shuffle_buffer, total), seed=seed + 1, reshuffle_each_iteration=True)
    windows = windows.apply(tf.data.experimental.assert_cardinality(total))
    return windows.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def tile_dataset(examples: tf.data.Dataset, tiles: Callable, finish: Callable, batch_size: int,
                 num_tiles: int) -> tf.data.Dataset:
    """Batches of validation tiles, in image order, row by row.

    Args:
        examples: unbatched native-size examples.
        tiles: `(*example) -> tuple of (n, ...) tensors`: the `n` tiles of one example.
        finish: `(*tile) -> element` applied to each tile.
        batch_size: batch size (the last batch may be partial).
        num_tiles: the tiles of all examples (:func:`count_tiles` of the
            image sizes): Keras validates a dataset of known length without
            an "input ran out of data" warning.
    """
    tiled = examples.flat_map(lambda *example: tf.data.Dataset.from_tensor_slices(tiles(*example)))
    tiled = tiled.map(finish, num_parallel_calls=tf.data.AUTOTUNE)
    tiled = tiled.apply(tf.data.experimental.assert_cardinality(num_tiles))
    return tiled.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def mask_tiles(image, mask, height: int, width: int, ignore_index: int = 255):
    """Float32 image and int32 mask tiles of one validation image (padding 0 / `ignore_index`)."""
    return (tf.cast(grid_tiles(image, height, width, 0), tf.float32),
            tf.cast(grid_tiles(mask, height, width, ignore_index), tf.int32))


def count_tiles(sizes, height: int, width: int) -> int:
    """Validation tiles of images of `(h, w)` `sizes` (`keras_resnet.tiling.grid_origins`, overlap 0, "pad")."""
    return int(sum(int(tf.shape(grid_origins(h, w, height, width, 0.0, "pad"))[0]) for h, w in sizes))
