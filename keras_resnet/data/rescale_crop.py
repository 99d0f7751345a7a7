"""The random rescale-pad-crop training window of the segmentation and detection augmentations.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf


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
