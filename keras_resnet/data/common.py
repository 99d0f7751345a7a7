"""What the input pipelines of every task share.

A progress bar for long file checks, the seeded subset of `data.limit_*`,
the shuffle / augment / batch tail of every training pipeline, the random
rescale-pad-crop window of the segmentation and detection augmentations, and
the Keras dataset cache folder. Native-resolution windows (``data.sampling:
crop``) have their own module, :mod:`keras_resnet.data.crops`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import tensorflow as tf

from keras_resnet_settings.errors import DataError

PROGRESS_BAR_MIN_FILES = 2000


def progress(items: Sequence, description: str):
    """`items`, wrapped in a rich progress bar when there are more than 2000 of them."""
    if len(items) <= PROGRESS_BAR_MIN_FILES:
        return items
    from rich.progress import track

    return track(items, description=description, total=len(items))


def seeded_subset(count: int, limit: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded permutation of ``range(count)``, truncated to ``limit``."""
    order = np.random.default_rng(seed).permutation(count)
    return order if limit is None else order[:limit]


def keras_datasets_dir() -> Path:
    """``$KERAS_HOME`` (or ``~/.keras``) ``/datasets``: where Keras caches downloaded datasets."""
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(keras_home) / "datasets"


def check_batch_fits(batch_size, num_train, repeat=1, what="training examples", error=DataError, crops_per_image=1):
    """`error` (a DataError) when one training batch needs more than the `num_train` examples x `repeat` x `crops_per_image` of an epoch."""
    if batch_size <= num_train * repeat * crops_per_image:
        return
    times = f" x data.repeat={repeat}" if repeat > 1 else ""
    if crops_per_image > 1:
        times += f" x data.crops_per_image={crops_per_image}"
    raise error(
        f"data.batch_size={batch_size} is larger than the {num_train} {what}{times}; lower data.batch_size, add "
        f"data, or set data.repeat={math.ceil(batch_size / (num_train * crops_per_image))} (every training example "
        "that many times per epoch, each time augmented anew)"
    )


def shuffle_augment_batch(train, val, augment, num_train, seed, *, batch_size, shuffle_buffer, repeat=1):
    """The tail of every training pipeline: shuffle, seeded augmentation, batching.

    Args:
        train, val: unbatched (and possibly cached) datasets of examples.
        augment: `(*example, seed) -> example`, tf ops only; the seed is a
            per-example `[2]` int64 tensor that changes every epoch.
        num_train: training examples (caps the shuffle buffer).
        seed: shuffle and augmentation seed.
        batch_size, shuffle_buffer: `data.batch_size`, `data.shuffle_buffer`.
        repeat: each example this many times per epoch (`data.repeat`).

    Returns:
        `(train, val)`: train shuffled, augmented and batched with
        `drop_remainder=True`; val batched; both prefetched.
    """
    if repeat > 1:
        train = train.repeat(repeat)
    train = train.shuffle(min(shuffle_buffer, num_train * repeat), seed=seed,
                          reshuffle_each_iteration=True)
    augment_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    train = tf.data.Dataset.zip((train, augment_seeds)).map(
        lambda example, augment_seed: augment(*example, augment_seed),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    train = train.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return train, val.batch(batch_size).prefetch(tf.data.AUTOTUNE)


class RescaleCrop(NamedTuple):
    """A random training window: rescale, pad up to the input size, crop back to it.

    The input-size image is resized to `(scaled_h, scaled_w)`, padded at
    `(pad_top, pad_left)` to `(padded_h, padded_w)` (at least the input
    size), and cropped to `(height, width)` at `(top, left)`. Build one with
    :meth:`random`; :meth:`apply` moves pixels, and callers move their labels
    (masks, boxes) with the same fields.
    """

    height: int
    width: int
    scaled_h: tf.Tensor
    scaled_w: tf.Tensor
    pad_top: tf.Tensor
    pad_left: tf.Tensor
    padded_h: tf.Tensor
    padded_w: tf.Tensor
    top: tf.Tensor
    left: tf.Tensor

    @classmethod
    def random(cls, scale_seed, pad_seed, crop_seed, height: int, width: int, scale_range) -> RescaleCrop:
        """Draw the window: scale uniform in `scale_range`, pad and crop offsets uniform."""
        low, high = scale_range
        scale = tf.random.stateless_uniform([], scale_seed, low, high)
        scaled_h = tf.maximum(1, tf.cast(tf.round(height * scale), tf.int32))
        scaled_w = tf.maximum(1, tf.cast(tf.round(width * scale), tf.int32))
        padded_h, padded_w = tf.maximum(scaled_h, height), tf.maximum(scaled_w, width)
        pad_fraction = tf.random.stateless_uniform([2], pad_seed)
        pad_top = tf.cast(pad_fraction[0] * tf.cast(padded_h - scaled_h + 1, tf.float32), tf.int32)
        pad_left = tf.cast(pad_fraction[1] * tf.cast(padded_w - scaled_w + 1, tf.float32), tf.int32)
        crop_fraction = tf.random.stateless_uniform([2], crop_seed)
        top = tf.cast(crop_fraction[0] * tf.cast(padded_h - height + 1, tf.float32), tf.int32)
        left = tf.cast(crop_fraction[1] * tf.cast(padded_w - width + 1, tf.float32), tf.int32)
        return cls(height, width, scaled_h, scaled_w, pad_top, pad_left, padded_h, padded_w, top, left)

    def apply(self, image: tf.Tensor, method: str = "bilinear", fill=0) -> tf.Tensor:
        """Resize `(h, w, C)` `image` with `method`, pad it with `fill`, crop it to the input size."""
        image = tf.image.resize(image, [self.scaled_h, self.scaled_w], method=method)
        if fill:
            image = image - fill
        image = tf.image.pad_to_bounding_box(image, self.pad_top, self.pad_left, self.padded_h, self.padded_w)
        if fill:
            image = image + fill
        return image[self.top : self.top + self.height, self.left : self.left + self.width]
