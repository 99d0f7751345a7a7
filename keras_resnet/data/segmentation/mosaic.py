"""The synthetic segmentation source ``mosaic``.

A seeded synthetic set; Fashion-MNIST items pasted at random scales and
positions on blank canvases, each pixel labelled with its item's class + 1
(0 = background), 11 classes. Training items come from the Fashion-MNIST
training split, validation items from its test split. With
``data.mosaic_fresh_each_epoch`` every epoch trains on
``data.mosaic_train_size`` new canvases (built while the model trains)
instead of the same ones again.
"""

from __future__ import annotations

import itertools

import numpy as np
import tensorflow as tf
from PIL import Image

from keras_resnet.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist

MOSAIC_CLASSES = ("background",) + FASHION_MNIST_CLASSES
# Items span 25%-62.5% of the canvas side (16-40 px on 64x64 canvases).
MOSAIC_ITEM_SCALE = (0.25, 0.625)
MOSAIC_ITEMS_PER_CANVAS = (2, 4)
MOSAIC_THRESHOLD = 48  # item pixels brighter than this are labelled with the item's class
MOSAIC_VAL_SEED = 1  # the validation mosaic is the same whatever train.seed is
MOSAIC_FRESH_CHUNK = 1000  # canvases built at a time when data.mosaic_fresh_each_epoch is on


def make_mosaic(items: np.ndarray, labels: np.ndarray, count: int, height: int, width: int, seed: int):
    """Paste Fashion-MNIST items on blank canvases; label pixels with class + 1.

    Each canvas gets 2-4 items at random square sizes (25%-62.5% of the
    shorter side) and random positions, later items on top. An item pixel
    brighter than 48 is painted and labelled with the item's class + 1;
    everything else is background (0, black).

    Args:
        items: uint8 `(M, 28, 28)` images.
        labels: `(M,)` class ids 0..9.
        count: number of canvases.
        height, width: canvas size.
        seed: generator seed, an int or a sequence of ints (same seed, same
            canvases).

    Returns:
        `(images uint8 (count, height, width), masks uint8 (count, height, width))`.
    """
    rng = np.random.default_rng(seed)
    side = min(height, width)
    low, high = (max(4, int(round(f * side))) for f in MOSAIC_ITEM_SCALE)
    images = np.zeros((count, height, width), np.uint8)
    masks = np.zeros((count, height, width), np.uint8)
    per_canvas = rng.integers(MOSAIC_ITEMS_PER_CANVAS[0], MOSAIC_ITEMS_PER_CANVAS[1] + 1, count)
    total = int(per_canvas.sum())
    chosen = rng.integers(0, len(items), total)
    sizes = rng.integers(low, high + 1, total)
    corners = rng.random((total, 2))
    resized = {}
    item = 0
    for canvas, n in enumerate(per_canvas):
        for _ in range(n):
            index, size = int(chosen[item]), int(sizes[item])
            key = (index, size)
            if key not in resized:
                resized[key] = np.asarray(Image.fromarray(items[index]).resize((size, size), Image.BILINEAR))
            patch = resized[key]
            top = int(corners[item, 0] * (height - size + 1))
            left = int(corners[item, 1] * (width - size + 1))
            painted = patch > MOSAIC_THRESHOLD
            region = (slice(top, top + size), slice(left, left + size))
            images[canvas][region][painted] = patch[painted]
            masks[canvas][region][painted] = int(labels[index]) + 1
            item += 1
    return images, masks


def _mosaic_example(image, mask, channels):
    """uint8 canvas and mask -> (float32 (H, W, C) image, int32 mask)."""
    image = tf.repeat(tf.cast(image, tf.float32)[..., None], channels, axis=-1)
    return image, tf.cast(mask, tf.int32)


def _fresh_mosaic_dataset(items, labels, count: int, height: int, width: int, seed: int, start_epoch: int = 0):
    """A dataset of `count` training canvases that are new on every pass over it.

    Pass `p` builds its canvases in chunks of `MOSAIC_FRESH_CHUNK` with seeds
    `(seed, p, chunk)`, so a run is reproducible. The first pass in a process
    is pass 0 (the statistics sample of :func:`build_segmentation_datasets`);
    the passes after it are `start_epoch + 1`, `start_epoch + 2`, ..., one per
    training epoch, so a run resumed at epoch `start_epoch` trains on the same
    canvases as an uninterrupted run instead of repeating its first epochs'.
    """
    passes = itertools.chain([0], itertools.count(start_epoch + 1))

    def generate():
        epoch = next(passes)
        for chunk, start in enumerate(range(0, count, MOSAIC_FRESH_CHUNK)):
            size = min(MOSAIC_FRESH_CHUNK, count - start)
            yield make_mosaic(items, labels, size, height, width, seed=[seed, epoch, chunk])

    spec = tf.TensorSpec((None, height, width), tf.uint8)
    dataset = tf.data.Dataset.from_generator(generate, output_signature=(spec, spec)).unbatch()
    return dataset.apply(tf.data.experimental.assert_cardinality(count))


def mosaic_datasets(cfg: dict, seed: int, start_epoch: int = 0):
    """Unbatched train and validation ``(image, mask)`` examples of a mosaic recipe, and the class names."""
    height, width, channels = cfg.model.input_shape
    data_cfg = cfg.data
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    if data_cfg.mosaic_fresh_each_epoch:
        train = _fresh_mosaic_dataset(
            x_train, y_train, data_cfg.mosaic_train_size, height, width, seed, start_epoch
        )
    else:
        train = tf.data.Dataset.from_tensor_slices(
            make_mosaic(x_train, y_train, data_cfg.mosaic_train_size, height, width, seed)
        )
    val = tf.data.Dataset.from_tensor_slices(
        make_mosaic(x_test, y_test, data_cfg.mosaic_val_size, height, width, MOSAIC_VAL_SEED)
    )

    def to_examples(dataset):
        return dataset.map(lambda image, mask: _mosaic_example(image, mask, channels))

    return to_examples(train), to_examples(val), list(MOSAIC_CLASSES)
