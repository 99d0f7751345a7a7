"""Classification input pipelines: Fashion-MNIST and class-per-folder image trees.

:func:`build_classification_datasets` turns a recipe (see ``keras_resnet.config``)
into batched ``tf.data`` pipelines of ``(float32 images in 0..255, int32 labels)``
plus an ``info`` dict with class names, sizes and per-channel statistics.
Normalisation is left to the model.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf

from keras_resnet.data.images import (
    TRAINING_IMAGE_EXTENSIONS,
    decode_image_file,
    image_problem,
)
from keras_resnet.errors import DataError

logger = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train_labels": "train-labels-idx1-ubyte.gz",
    "train_images": "train-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
}
FASHION_MNIST_DIR_ENV = "KERAS_RESNET_FASHION_MNIST_DIR"
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

STATS_SAMPLE_SIZE = 5000
PROGRESS_BAR_MIN_FILES = 2000
# Random erasing: rectangle area fraction and aspect-ratio ranges.
ERASE_AREA_RANGE = (0.02, 0.4)
ERASE_ASPECT_RANGE = (0.3, 3.3)


# --------------------------------------------------------------------------- Fashion-MNIST


def _keras_fashion_mnist_dir() -> Path:
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(keras_home) / "datasets" / "fashion-mnist"


def _complete_file_set(directory: Path) -> dict[str, Path] | None:
    paths = {key: directory / name for key, name in FASHION_MNIST_FILES.items()}
    return paths if all(p.is_file() for p in paths.values()) else None


def find_fashion_mnist() -> dict[str, Path]:
    """Locate local Fashion-MNIST idx ``.gz`` files without downloading anything.

    Search order: ``$KERAS_RESNET_FASHION_MNIST_DIR`` (if set it must hold all four
    files), the Keras cache (``$KERAS_HOME`` or ``~/.keras``, under
    ``datasets/fashion-mnist``), then the Debian ``dataset-fashion-mnist`` package
    directory ``/usr/share/datasets/fashion-mnist``.

    Returns:
        Dict with keys ``train_images``, ``train_labels``, ``test_images``,
        ``test_labels`` mapping to file paths.

    Raises:
        DataError: the env-var directory is incomplete, or no directory has the files.
    """
    override = os.environ.get(FASHION_MNIST_DIR_ENV)
    if override:
        found = _complete_file_set(Path(override))
        if found is None:
            raise DataError(
                f"{FASHION_MNIST_DIR_ENV}={override} does not contain all of "
                f"{', '.join(FASHION_MNIST_FILES.values())}; point it at a complete copy or unset it"
            )
        return found
    searched = [_keras_fashion_mnist_dir(), DEBIAN_FASHION_MNIST_DIR]
    for directory in searched:
        found = _complete_file_set(directory)
        if found is not None:
            return found
    raise DataError(
        f"Fashion-MNIST not found in {', '.join(map(str, searched))}; install the Debian package "
        f"dataset-fashion-mnist, set {FASHION_MNIST_DIR_ENV}, or let Keras download it"
    )


def read_idx_gz(path: str | os.PathLike) -> np.ndarray:
    """Read a gzip-compressed idx file of unsigned bytes (the MNIST format).

    Args:
        path: ``*-idx1-ubyte.gz`` (labels) or ``*-idx3-ubyte.gz`` (images) file.

    Returns:
        uint8 array with the shape stored in the header.

    Raises:
        DataError: unreadable gzip, bad magic number, or truncated payload.
    """
    try:
        with gzip.open(path, "rb") as stream:
            raw = stream.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"corrupt Fashion-MNIST file {path}: {error}; delete it and re-download") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise DataError(
            f"corrupt Fashion-MNIST file {path}: bad idx magic number {raw[:4].hex() or '(empty)'} "
            "(expected 0000080N for unsigned bytes); delete it and re-download"
        )
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"corrupt Fashion-MNIST file {path}: truncated header; delete it and re-download")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header_size + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(
            f"corrupt Fashion-MNIST file {path}: {len(raw)} bytes but header shape {shape} "
            f"needs {expected}; delete it and re-download"
        )
    return np.frombuffer(raw, np.uint8, offset=header_size).reshape(shape)


def load_fashion_mnist() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Load Fashion-MNIST from local files (see :func:`find_fashion_mnist`), else download.

    Returns:
        ``((x_train, y_train), (x_test, y_test))``: uint8 arrays of shapes
        ``(N, 28, 28)`` and ``(N,)``.

    Raises:
        DataError: a local file is corrupt or image/label counts disagree.
    """
    try:
        paths = find_fashion_mnist()
    except DataError:
        if os.environ.get(FASHION_MNIST_DIR_ENV):
            raise
        logger.info("Fashion-MNIST not found locally; downloading with keras.datasets")
        import keras

        return keras.datasets.fashion_mnist.load_data()
    splits = []
    for split in ("train", "test"):
        images = read_idx_gz(paths[f"{split}_images"])
        labels = read_idx_gz(paths[f"{split}_labels"])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"Fashion-MNIST {split} files disagree: images {images.shape} in "
                f"{paths[f'{split}_images']}, labels {labels.shape} in {paths[f'{split}_labels']}"
            )
        splits.append((images, labels))
    return splits[0], splits[1]


# --------------------------------------------------------------------------- image folders


def _progress(items: Sequence, description: str):
    if len(items) <= PROGRESS_BAR_MIN_FILES:
        return items
    from rich.progress import track

    return track(items, description=description, total=len(items))


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
            Images are .png/.jpg/.jpeg/.bmp/.gif (any case); hidden entries are ignored.
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
    for path, label in zip(_progress(paths, f"checking {len(paths)} images in {root}"), labels):
        problem = image_problem(path)
        if problem is None:
            kept_paths.append(path)
            kept_labels.append(label)
        elif skip_corrupt:
            logger.warning("skipping unreadable image %s (%s)", path, problem)
        else:
            raise DataError(
                f"unreadable image {path} ({problem}); fix or delete it, or set data.skip_corrupt=true to skip it"
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
    """With ``probability``, fill one random rectangle (2-40% of the area) with uniform noise."""
    height, width, channels = image.shape
    seeds = tf.random.experimental.stateless_split(seed, num=5)
    apply = tf.random.stateless_uniform([], seeds[0]) < probability
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
    return tf.where(inside & apply, noise, image)


def _make_augment(augment_cfg: dict, input_shape: Sequence[int]):
    """Build ``(image, label, seed) -> (image, label)`` applying the enabled augmentations."""
    padding = augment_cfg["random_crop_padding"]
    flip = augment_cfg["horizontal_flip"]
    erase_probability = augment_cfg["random_erasing"]

    def augment(image, label, seed):
        crop_seed, flip_seed, erase_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=3))
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


def _seeded_subset(count: int, limit: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded permutation of ``range(count)``, truncated to ``limit``."""
    order = np.random.default_rng(seed).permutation(count)
    return order if limit is None else order[:limit]


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
    std = np.sqrt(np.maximum(total_sq / pixels - np.square(mean), 0.0))
    return mean.tolist(), std.tolist()


def _fashion_mnist_sources(cfg: dict, seed: int):
    height, width, channels = cfg["model"]["input_shape"]
    data_cfg = cfg["data"]
    (x_train, y_train), (x_val, y_val) = load_fashion_mnist()
    train_index = _seeded_subset(len(x_train), data_cfg["limit_train"], seed)
    val_index = _seeded_subset(len(x_val), data_cfg["limit_val"], seed + 1)
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
    )


def _image_folder_sources(cfg: dict, seed: int):
    height, width, channels = cfg["model"]["input_shape"]
    data_cfg = cfg["data"]
    for key in ("train", "val"):
        if not data_cfg[key]:
            raise DataError(
                f"data.{key} is required when data.source is image_folder; "
                f"set data.{key} to a folder of class subfolders"
            )
    train_paths, train_labels, class_names = scan_image_folder(
        data_cfg["train"],
        num_classes=cfg["model"]["num_classes"],
        skip_corrupt=data_cfg["skip_corrupt"],
        config_key="data.train",
    )
    val_paths, val_labels, _ = scan_image_folder(
        data_cfg["val"],
        class_names=class_names,
        skip_corrupt=data_cfg["skip_corrupt"],
        config_key="data.val",
    )
    train_index = _seeded_subset(len(train_paths), data_cfg["limit_train"], seed)
    val_index = _seeded_subset(len(val_paths), data_cfg["limit_val"], seed + 1)
    train_paths = np.asarray(train_paths)[train_index]
    train_labels = np.asarray(train_labels, np.int32)[train_index]
    val_paths = np.asarray(val_paths)[val_index]
    val_labels = np.asarray(val_labels, np.int32)[val_index]

    def decode(path, label):
        return decode_image_file(path, height, width, channels), label

    def decoded(paths, labels):
        dataset = tf.data.Dataset.from_tensor_slices((paths, labels)).map(
            decode, num_parallel_calls=tf.data.AUTOTUNE
        )
        return dataset.ignore_errors(log_warning=True) if data_cfg["skip_corrupt"] else dataset

    stats_count = min(STATS_SAMPLE_SIZE, len(train_paths))
    stats_sample = decoded(train_paths[:stats_count], train_labels[:stats_count]).map(lambda image, _: image)
    return (
        decoded(train_paths, train_labels),
        decoded(val_paths, val_labels),
        len(train_paths),
        len(val_paths),
        class_names,
        stats_sample,
    )


def shuffle_augment_batch(train, val, augment, data_cfg, num_train, seed):
    """The tail of every training pipeline: shuffle, seeded augmentation, batching.

    Args:
        train, val: unbatched (and possibly cached) datasets of examples.
        augment: `(*example, seed) -> example`, tf ops only; the seed is a
            per-example `[2]` int64 tensor that changes every epoch.
        data_cfg: the recipe's `data` section (`shuffle_buffer`, `batch_size`).
        num_train: training examples (caps the shuffle buffer).
        seed: shuffle and augmentation seed.

    Returns:
        `(train, val)`: train shuffled, augmented and batched with
        `drop_remainder=True`; val batched; both prefetched.
    """
    batch_size = data_cfg["batch_size"]
    train = train.shuffle(min(data_cfg["shuffle_buffer"], num_train), seed=seed, reshuffle_each_iteration=True)
    augment_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    train = tf.data.Dataset.zip((train, augment_seeds)).map(
        lambda example, augment_seed: augment(*example, augment_seed),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    train = train.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return train, val.batch(batch_size).prefetch(tf.data.AUTOTUNE)


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
        up to 5000 training images after resizing and channel conversion.

    Raises:
        DataError: bad or missing data, or ``data.batch_size`` larger than the training set.
    """
    data_cfg = cfg["data"]
    input_shape = list(cfg["model"]["input_shape"])
    batch_size = data_cfg["batch_size"]
    if data_cfg["source"] == "fashion_mnist":
        sources = _fashion_mnist_sources(cfg, seed)
    elif data_cfg["source"] == "image_folder":
        sources = _image_folder_sources(cfg, seed)
    else:
        raise DataError(f"data.source {data_cfg['source']!r} is not one of fashion_mnist, image_folder")
    train, val, num_train, num_val, class_names, stats_sample = sources
    if batch_size > num_train:
        raise DataError(
            f"data.batch_size={batch_size} is larger than the {num_train} training examples; "
            "lower data.batch_size or raise data.limit_train"
        )
    mean, std = _channel_stats(stats_sample, input_shape[-1])
    if data_cfg["cache"]:
        train, val = train.cache(), val.cache()
    train, val = shuffle_augment_batch(
        train, val, _make_augment(data_cfg["augment"], input_shape), data_cfg, num_train, seed
    )
    info = {
        "class_names": list(class_names),
        "num_train": num_train,
        "num_val": num_val,
        "mean": mean,
        "std": std,
    }
    return train, val, info
