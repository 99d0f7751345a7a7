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


def _random_erase(image: tf.Tensor, seed: tf.Tensor, probability: float) -> tf.Tensor:
    """With ``probability``, fill one random rectangle (2-40% of the area) with uniform noise.

    The rectangle and its noise are drawn only for the images that get one
    (a `tf.cond`; 1.3-3.7 ms CPU per batch of 128 saved in two runs,
    `benchmarks/erase_cost.py`). The draws are stateless in ``seed``, so an
    erased image is the same either way.
    """
    seeds = tf.random.experimental.stateless_split(seed, num=5)
    apply = tf.random.stateless_uniform([], seeds[0]) < probability
    return tf.cond(apply, lambda: _erase_rectangle(image, seeds), lambda: image)


def _erase_rectangle(image: tf.Tensor, seeds: tf.Tensor) -> tf.Tensor:
    """``image`` with one rectangle of uniform noise, drawn from ``seeds[1:5]`` (see `_random_erase`)."""
    height, width, channels = image.shape
    area = tf.random.stateless_uniform([], seeds[1], *ERASE_AREA_RANGE) * (height * width)
    log_aspect = tf.random.stateless_uniform([], seeds[2], *np.log(ERASE_ASPECT_RANGE))
    aspect = tf.exp(log_aspect)
    erase_h = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32), 1, height)
    erase_w = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32), 1, width)
    corner = tf.random.stateless_uniform([2], seeds[3])
    top = tf.cast(corner[0] * tf.cast(height - erase_h + 1, tf.float32), tf.int32)
    left = tf.cast(corner[1] * tf.cast(width - erase_w + 1, tf.float32), tf.int32)
    rows = tf.range(height)[:, tf.newaxis, tf.newaxis]
    cols = tf.range(width)[tf.newaxis, :, tf.newaxis]
    inside = (rows >= top) & (rows < top + erase_h) & (cols >= left) & (cols < left + erase_w)
    noise = tf.random.stateless_uniform([height, width, channels], seeds[4], 0.0, 255.0)
    return tf.where(inside, noise, image)


COLOR_SEED_FOLD = 7


def jitter_colors(image, seed, jitter: float, channels: int):
    """Random brightness (+-jitter x 255), contrast and (RGB) saturation (x [1-jitter, 1+jitter]) of 0..255 pixels."""
    brightness_seed, contrast_seed, saturation_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=3))
    image = tf.image.stateless_random_brightness(image, jitter * 255.0, brightness_seed)
    image = tf.image.stateless_random_contrast(image, 1.0 - jitter, 1.0 + jitter, contrast_seed)
    if channels == 3:
        image = tf.image.stateless_random_saturation(image, 1.0 - jitter, 1.0 + jitter, saturation_seed)
    return tf.clip_by_value(image, 0.0, 255.0)


def make_augment(augment_cfg: dict, input_shape: Sequence[int]):
    """Build ``(image, label, seed) -> (image, label)`` applying the enabled augmentations."""
    padding = augment_cfg.random_crop_padding
    flip = augment_cfg.horizontal_flip
    erase_probability = augment_cfg.random_erasing
    jitter = augment_cfg.color_jitter

    def augment(image, label, seed):
        crop_seed, flip_seed, erase_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=3))
        if jitter > 0:  # its own seeds, folded from `seed`: the other augmentations draw as without it
            image = jitter_colors(image, tf.random.experimental.stateless_fold_in(seed, COLOR_SEED_FOLD), jitter,
                                  int(input_shape[-1]))
        if padding > 0:
            padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
            image = tf.image.stateless_random_crop(padded, list(input_shape), seed=crop_seed)
        if flip:
            image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
        if erase_probability > 0:
            image = _random_erase(image, erase_seed, erase_probability)
        return image, label

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
