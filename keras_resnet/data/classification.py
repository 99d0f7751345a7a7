"""Classification input pipelines: Fashion-MNIST and class-per-folder image trees.

:func:`build_classification_datasets` turns a recipe (see ``keras_resnet.config``)
into batched ``tf.data`` pipelines of ``(float32 images in 0..255, int32 labels)``
plus an ``info`` dict with class names, sizes and per-channel statistics.
Normalisation is left to the model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf

from keras_resnet.data.batching import (
    check_batch_fits,
    seeded_subset,
    shuffle_augment_batch,
    split_record,
    validation_split,
)
from keras_resnet.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from keras_resnet.data.images import (
    BIT_DEPTH_KEY,
    MIN_PIXEL_STD,
    TRAINING_IMAGE_EXTENSIONS,
    dataset_bit_depth,
    decode_image_file,
    encoded_paths,
    image_problem,
)
from keras_resnet.data.scanning import progress
from keras_resnet_settings.errors import DataError

logger = logging.getLogger(__name__)

STATS_SAMPLE_SIZE = 5000
# Random erasing: rectangle area fraction and aspect-ratio ranges.
ERASE_AREA_RANGE = (0.02, 0.4)
ERASE_ASPECT_RANGE = (0.3, 3.3)


# --------------------------------------------------------------------------- image folders


def scan_image_folder(
    root: str | os.PathLike,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    skip_corrupt: bool = False,
    *,
    config_key: str = "data.train",
) -> tuple[list[str], list[int], list[str]]:
    """List the images of a class-per-subfolder tree and validate every one up front.

    Args:
        root: folder with one subfolder per class (sorted names give label ids).
            Images are .png/.jpg/.jpeg/.bmp/.gif/.tif/.tiff (any case); hidden entries are ignored.
        num_classes: if given, the number of class folders must equal it.
        class_names: if given (the training classes), the folder names must match them.
        skip_corrupt: drop unreadable images with a logged warning instead of failing.
        config_key: recipe key named in error messages (``data.train`` or ``data.val``).

    Returns:
        ``(paths, labels, class_names)``.

    Raises:
        DataError: missing root, no class folders, an empty class folder, class
            count or names mismatch, or a corrupt image (unless ``skip_corrupt``).
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{config_key} folder {root} does not exist; set {config_key} to a folder of class subfolders")
    if not root.is_dir():
        raise DataError(f"{config_key} path {root} is not a folder; set {config_key} to a folder of class subfolders")
    found_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found_names:
        raise DataError(
            f"{config_key} folder {root} has no class subfolders; put each class's images in "
            f"{root}/<class_name>/"
        )
    if num_classes is not None and len(found_names) != num_classes:
        raise DataError(
            f"{config_key} has {len(found_names)} class folders ({', '.join(found_names)}) "
            f"but model.num_classes is {num_classes}; make them agree"
        )
    if class_names is not None and list(class_names) != found_names:
        missing = sorted(set(class_names) - set(found_names))
        extra = sorted(set(found_names) - set(class_names))
        raise DataError(
            f"{config_key} class folders ({', '.join(found_names)}) differ from the training classes "
            f"({', '.join(class_names)}): missing {', '.join(missing) or 'none'}, "
            f"extra {', '.join(extra) or 'none'}; use the same class folder names"
        )
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(found_names):
        class_dir = root / name
        files = sorted(
            str(p)
            for p in class_dir.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in TRAINING_IMAGE_EXTENSIONS
        )
        if not files:
            raise DataError(
                f"{config_key} class folder {class_dir} has no images "
                f"({', '.join(TRAINING_IMAGE_EXTENSIONS)}); add images or remove the folder"
            )
        paths.extend(files)
        labels.extend([label] * len(files))
    kept_paths: list[str] = []
    kept_labels: list[int] = []
    for path, label in zip(progress(paths, f"checking {len(paths)} images in {root}"), labels):
        problem = image_problem(path)
        if problem is None:
            kept_paths.append(path)
            kept_labels.append(label)
        elif skip_corrupt:
            logger.warning("skipping unreadable image %s (%s)", path, problem)
        else:
            raise DataError(
                f"unreadable image {path} ({problem}); delete or replace it, or set data.skip_corrupt=true to skip it"
            )
    if not kept_paths:
        raise DataError(f"{config_key} folder {root} has no readable images")
    return kept_paths, kept_labels, found_names


def _fashion_to_input(images: tf.Tensor, height: int, width: int, channels: int) -> tf.Tensor:
    """uint8 ``[..., 28, 28]`` -> float32 ``[..., H, W, C]`` in 0..255 (works batched or single)."""
    images = tf.cast(images, tf.float32)[..., tf.newaxis]
    if (height, width) != (28, 28):
        images = tf.image.resize(images, [height, width], method="bilinear")
    if channels == 3:
        images = tf.image.grayscale_to_rgb(images)
    return images


# --------------------------------------------------------------------------- augmentation
# Every augmentation works on a whole batch `[B, H, W, C]` (0..255 floats) with one seed per batch, drawing each
# image's parameters as a vector: one op per batch instead of a dozen per image, so the input pipeline costs
# 4.6-5x less CPU than image by image (benchmarks/augment_cost.py), which on 2 cores is CPU the train step gets.


def _per_image(images: tf.Tensor, seed: tf.Tensor, low: float, high: float) -> tf.Tensor:
    """One uniform draw in [low, high) per image of the batch, shaped `[B, 1, 1, 1]` to broadcast."""
    return tf.random.stateless_uniform([tf.shape(images)[0], 1, 1, 1], seed, low, high)


def random_erase(images: tf.Tensor, seed: tf.Tensor, probability: float) -> tf.Tensor:
    """Fill one random rectangle (2-40% of the area) of each image with uniform noise, with ``probability``.

    Only the images that get a rectangle are drawn for and touched (gathered,
    erased, scattered back), so the cost follows the erased count, not the batch.
    """
    _, height, width, channels = images.shape
    seeds = tf.random.experimental.stateless_split(seed, num=5)
    erased = tf.where(tf.random.stateless_uniform([tf.shape(images)[0]], seeds[0]) < probability)  # [n, 1]
    count = tf.shape(erased)[:1]
    area = tf.random.stateless_uniform(count, seeds[1], *ERASE_AREA_RANGE) * (height * width)
    aspect = tf.exp(tf.random.stateless_uniform(count, seeds[2], *np.log(ERASE_ASPECT_RANGE)))
    erase_h = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32), 1, height)
    erase_w = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32), 1, width)
    corner = tf.random.stateless_uniform(tf.concat([count, [2]], 0), seeds[3])
    top = tf.cast(corner[:, 0] * tf.cast(height - erase_h + 1, tf.float32), tf.int32)
    left = tf.cast(corner[:, 1] * tf.cast(width - erase_w + 1, tf.float32), tf.int32)

    def column(values):  # [n] -> [n, 1, 1, 1]
        return values[:, tf.newaxis, tf.newaxis, tf.newaxis]

    rows = tf.range(height)[tf.newaxis, :, tf.newaxis, tf.newaxis]
    cols = tf.range(width)[tf.newaxis, tf.newaxis, :, tf.newaxis]
    inside = ((rows >= column(top)) & (rows < column(top + erase_h))
              & (cols >= column(left)) & (cols < column(left + erase_w)))
    noise = tf.random.stateless_uniform(tf.concat([count, [height, width, channels]], 0), seeds[4], 0.0, 255.0)
    return tf.tensor_scatter_nd_update(images, erased, tf.where(inside, noise, tf.gather_nd(images, erased)))


def random_crop(images: tf.Tensor, seed: tf.Tensor, padding: int) -> tf.Tensor:
    """Zero-pad each image by ``padding`` pixels and crop it back at a random offset (its own per image)."""
    _, height, width, _ = images.shape
    padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
    offsets = tf.random.stateless_uniform([tf.shape(images)[0], 2], seed, 0, 2 * padding + 1, dtype=tf.int32)
    rows = offsets[:, :1] + tf.range(height)[tf.newaxis]
    cols = offsets[:, 1:] + tf.range(width)[tf.newaxis]
    return tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)


def random_flip(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Flip each image left-right with probability 1/2."""
    return tf.where(_per_image(images, seed, 0.0, 1.0) < 0.5, tf.reverse(images, axis=[2]), images)


COLOR_SEED_FOLD = 7


def jitter_colors(images: tf.Tensor, seed: tf.Tensor, jitter: float, channels: int) -> tf.Tensor:
    """Random brightness (+-jitter x 255), contrast and (RGB) saturation (x [1-jitter, 1+jitter]) per image.

    Args:
        images: a batch `[B, H, W, C]` of 0..255 pixels.
        seed: a `[2]` integer seed for the batch.
        jitter: the strength, in [0, 1).
        channels: C; saturation only for 3.
    """
    brightness_seed, contrast_seed, saturation_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=3))
    images = images + _per_image(images, brightness_seed, -jitter * 255.0, jitter * 255.0)
    mean = tf.reduce_mean(images, axis=[1, 2], keepdims=True)  # per image and channel, as tf.image's contrast
    images = tf.clip_by_value((images - mean) * _per_image(images, contrast_seed, 1.0 - jitter, 1.0 + jitter) + mean,
                              0.0, 255.0)
    if channels == 3:
        hue, saturation, value = tf.unstack(tf.image.rgb_to_hsv(images), axis=-1)  # scale-free hue and saturation
        factor = _per_image(images, saturation_seed, 1.0 - jitter, 1.0 + jitter)[..., 0]
        saturation = tf.clip_by_value(saturation * factor, 0.0, 1.0)
        images = tf.image.hsv_to_rgb(tf.stack([hue, saturation, value], axis=-1))
    return tf.clip_by_value(images, 0.0, 255.0)


def make_augment(augment_cfg, input_shape: Sequence[int]):
    """Build ``(images, labels, seed) -> (images, labels)``: the enabled augmentations of one batch.

    Args:
        augment_cfg: `data.augment` (`AugmentSettings`).
        input_shape: `model.input_shape` `(H, W, C)`.

    Returns:
        A function of a batch `[B, H, W, C]` of 0..255 floats, its labels and
        a `[2]` integer seed (`shuffle_augment_batch` gives each batch its own,
        new every epoch): colour jitter, random crop, flip, random erasing in
        that order, each image drawing its own parameters.
    """
    padding = augment_cfg.random_crop_padding
    flip = augment_cfg.horizontal_flip
    erase_probability = augment_cfg.random_erasing
    jitter = augment_cfg.color_jitter

    def augment(images, labels, seed):
        crop_seed, flip_seed, erase_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=3))
        if jitter > 0:  # its own seeds, folded from `seed`: the other augmentations draw as without it
            images = jitter_colors(images, tf.random.experimental.stateless_fold_in(seed, COLOR_SEED_FOLD), jitter,
                                   int(input_shape[-1]))
        if padding > 0:
            images = random_crop(images, crop_seed, padding)
        if flip:
            images = random_flip(images, flip_seed)
        if erase_probability > 0:
            images = random_erase(images, erase_seed, erase_probability)
        return images, labels

    return augment


# --------------------------------------------------------------------------- datasets


def _channel_stats(images: tf.data.Dataset, channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..255) over a dataset of (H, W, C) images."""
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    pixels = 0
    for batch in images.batch(256):
        values = batch.numpy().reshape(-1, channels).astype(np.float64)
        total += values.sum(axis=0)
        total_sq += np.square(values).sum(axis=0)
        pixels += len(values)
    mean = total / pixels
    std = np.maximum(np.sqrt(np.maximum(total_sq / pixels - np.square(mean), 0.0)), MIN_PIXEL_STD)
    return mean.tolist(), std.tolist()


def _fashion_mnist_sources(cfg: dict, seed: int):
    height, width, channels = cfg.model.input_shape
    data_cfg = cfg.data
    (x_train, y_train), (x_val, y_val) = load_fashion_mnist()
    train_index = seeded_subset(len(x_train), data_cfg.limit_train, seed)
    val_index = seeded_subset(len(x_val), data_cfg.limit_val, seed + 1)
    x_train, y_train = x_train[train_index], y_train[train_index].astype(np.int32)
    x_val, y_val = x_val[val_index], y_val[val_index].astype(np.int32)

    def to_input(image, label):
        return _fashion_to_input(image, height, width, channels), label

    train = tf.data.Dataset.from_tensor_slices((x_train, y_train))
    val = tf.data.Dataset.from_tensor_slices((x_val, y_val))
    stats_sample = tf.data.Dataset.from_tensor_slices(x_train[:STATS_SAMPLE_SIZE]).map(
        lambda image: _fashion_to_input(image, height, width, channels)
    )
    return (
        train.map(to_input, num_parallel_calls=tf.data.AUTOTUNE),
        val.map(to_input, num_parallel_calls=tf.data.AUTOTUNE),
        len(x_train),
        len(x_val),
        list(FASHION_MNIST_CLASSES),
        stats_sample,
        None,
        None,
    )


def _image_folder_sources(cfg: dict, seed: int):
    height, width, channels = cfg.model.input_shape
    data_cfg = cfg.data
    train_paths, train_labels, class_names = scan_image_folder(
        data_cfg.train,
        num_classes=cfg.model.num_classes,
        skip_corrupt=data_cfg.skip_corrupt,
        config_key="data.train",
    )
    held_out = None
    if data_cfg.val is None:  # data.val_split: a stratified, seeded part of data.train
        # seeded by train.seed, not `seed`: export's calibration and parity samples see the same split
        keep, hold = validation_split(len(train_paths), data_cfg.val_split, cfg.train.seed, labels=train_labels)
        val_paths, val_labels = [train_paths[i] for i in hold], [train_labels[i] for i in hold]
        train_paths, train_labels = [train_paths[i] for i in keep], [train_labels[i] for i in keep]
        held_out = split_record(data_cfg.val_split, cfg.train.seed, val_paths, stratified=True)
    else:
        val_paths, val_labels, _ = scan_image_folder(
            data_cfg.val,
            class_names=class_names,
            skip_corrupt=data_cfg.skip_corrupt,
            config_key="data.val",
        )
    train_index = seeded_subset(len(train_paths), data_cfg.limit_train, seed)
    val_index = seeded_subset(len(val_paths), data_cfg.limit_val, seed + 1)
    train_paths = np.asarray(train_paths)[train_index]
    train_labels = np.asarray(train_labels, np.int32)[train_index]
    val_paths = np.asarray(val_paths)[val_index]
    val_labels = np.asarray(val_labels, np.int32)[val_index]
    bit_depth = dataset_bit_depth(train_paths)  # one scale of 16-bit images for training, validation and predict

    def decode(path, label):
        return decode_image_file(path, height, width, channels, bit_depth), label

    def decoded(paths, labels):
        dataset = tf.data.Dataset.from_tensor_slices((encoded_paths(paths), labels)).map(
            decode, num_parallel_calls=tf.data.AUTOTUNE
        )
        if not data_cfg.skip_corrupt:
            return dataset
        # The scan already dropped the files that do not decode; a file that fails later (changed on disk) is
        # skipped too, and the pass is topped up from the next one, so the dataset keeps its known length (a
        # plain ignore_errors makes it unknown: Keras then warned "Your input ran out of data" every run).
        return dataset.ignore_errors(log_warning=True).repeat().take(len(paths))

    stats_count = min(STATS_SAMPLE_SIZE, len(train_paths))
    stats_sample = decoded(train_paths[:stats_count], train_labels[:stats_count]).map(lambda image, _: image)
    return (
        decoded(train_paths, train_labels),
        decoded(val_paths, val_labels),
        len(train_paths),
        len(val_paths),
        class_names,
        stats_sample,
        held_out,
        bit_depth,
    )


def build_classification_datasets(cfg: dict, seed: int = 0) -> tuple[tf.data.Dataset, tf.data.Dataset, dict]:
    """Build the batched train and validation pipelines of a classification recipe.

    Images are float32 in the raw 0..255 range with shape ``model.input_shape``;
    labels are int32 class ids. The train pipeline is cached (if ``data.cache``)
    before augmentation, shuffled, augmented (random crop with zero padding,
    horizontal flip, random erasing, all seeded) and batched with
    ``drop_remainder=True``; validation is cached and batched without dropping.

    Args:
        cfg: full recipe dict from :func:`keras_resnet.config.load_config`.
        seed: seed for the file-list shuffle, the shuffle buffer and augmentation.

    Returns:
        ``(train_ds, val_ds, info)`` where ``info`` has ``class_names``,
        ``num_train``, ``num_val`` and per-channel ``mean`` / ``std`` (0..255) of
        up to 5000 training images after resizing and channel conversion, and
        with 16/32-bit integer images ``bit_depth``: the one depth all of them
        are read at (``keras_resnet.data.images.dataset_bit_depth``).

    Raises:
        DataError: bad or missing data, or ``data.batch_size`` larger than the training set.
    """
    data_cfg = cfg.data
    input_shape = list(cfg.model.input_shape)
    batch_size = data_cfg.batch_size
    if data_cfg.source == "fashion_mnist":
        sources = _fashion_mnist_sources(cfg, seed)
    elif data_cfg.source == "image_folder":
        sources = _image_folder_sources(cfg, seed)
    else:
        raise DataError(f"data.source {data_cfg.source!r} is not one of fashion_mnist, image_folder")
    train, val, num_train, num_val, class_names, stats_sample, held_out, bit_depth = sources
    check_batch_fits(batch_size, num_train, data_cfg.repeat)
    mean, std = _channel_stats(stats_sample, input_shape[-1])
    if data_cfg.cache:
        train, val = train.cache(), val.cache()
    train, val = shuffle_augment_batch(
        train, val, make_augment(data_cfg.augment, input_shape), num_train, seed,
        batch_size=data_cfg.batch_size, shuffle_buffer=data_cfg.shuffle_buffer, repeat=data_cfg.repeat,
        augment_batches=True,
    )
    info = {
        "class_names": list(class_names),
        "num_train": num_train,
        "num_val": num_val,
        "mean": mean,
        "std": std,
    }
    if held_out is not None:
        info["val_split"] = held_out
    if bit_depth is not None:
        info[BIT_DEPTH_KEY] = bit_depth
    return train, val, info
