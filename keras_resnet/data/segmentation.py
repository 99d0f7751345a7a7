"""Segmentation input pipelines: mask folders, Pascal VOC and a synthetic mosaic.

:func:`build_segmentation_datasets` turns a recipe into batched ``tf.data``
pipelines of ``(float32 images (H, W, C) in 0..255, int32 masks (H, W))``
at ``model.input_shape``, plus an ``info`` dict. Mask value 255 means
"ignore" (VOC borders, augmentation padding). Sources (``data.source``):

- ``mask_folder``: ``data.train`` and ``data.val`` are folders holding
  ``images/`` (png/jpg/...) and ``masks/`` (PNG of class indices, same file
  stem; palette "P" PNGs are read as indices). An optional ``classes.txt``
  (one name per line) beside them names the classes. Every pair is checked
  up front.
- ``voc``: a Pascal VOC root (``VOCdevkit/VOC2012``) with ``JPEGImages/``,
  ``SegmentationClass/`` and ``ImageSets/Segmentation/{train,val}.txt``;
  ``data.train`` and ``data.val`` may name the same root.
- ``mosaic``: a seeded synthetic set; Fashion-MNIST items pasted at random
  scales and positions on blank canvases, each pixel labelled with its
  item's class + 1 (0 = background), 11 classes. Training items come from
  the Fashion-MNIST training split, validation items from its test split.
  With ``data.mosaic_fresh_each_epoch`` every epoch trains on
  ``data.mosaic_train_size`` new canvases (built while the model trains)
  instead of the same ones again.

Validation images are resized to the input size (bilinear; masks nearest).
Training adds, with the same geometry for image and mask, a random rescale
by ``data.augment.scale_range``, a random crop or pad back to the input size
(images padded with 0, masks with 255) and a horizontal flip
(``data.augment.horizontal_flip``).
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from keras_resnet.data.classification import (
    FASHION_MNIST_CLASSES,
    _progress,
    _seeded_subset,
    load_fashion_mnist,
    shuffle_augment_batch,
)
from keras_resnet.data.images import TRAINING_IMAGE_EXTENSIONS, decode_image_file
from keras_resnet.errors import SegmentationDataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
MOSAIC_CLASSES = ("background",) + FASHION_MNIST_CLASSES
# Items span 25%-62.5% of the canvas side (16-40 px on 64x64 canvases).
MOSAIC_ITEM_SCALE = (0.25, 0.625)
MOSAIC_ITEMS_PER_CANVAS = (2, 4)
MOSAIC_THRESHOLD = 48  # item pixels brighter than this are labelled with the item's class
MOSAIC_VAL_SEED = 1  # the validation mosaic is the same whatever train.seed is
STATS_SAMPLE_SIZE = 500
MOSAIC_FRESH_CHUNK = 1000  # canvases built at a time when data.mosaic_fresh_each_epoch is on


# --------------------------------------------------------------------------- mask files


def _mask_problem(image_path: str, mask_path: str, num_classes: int) -> str | None:
    """Why an image/mask pair is unusable, or None. Reads the whole mask."""
    try:
        with Image.open(image_path) as image:
            image_size = image.size
    except Exception as error:  # PIL raises many exception types for bad files
        return f"unreadable image {image_path} ({type(error).__name__}: {error}); fix or delete it"
    try:
        with Image.open(mask_path) as mask:
            mode, mask_size = mask.mode, mask.size
            values = np.asarray(mask) if mode in ("P", "L", "I", "I;16") else None
    except Exception as error:
        return f"unreadable mask {mask_path} ({type(error).__name__}: {error}); fix or delete it"
    if values is None:
        return (
            f"mask {mask_path} is a {mode} image; masks must be single-channel PNGs of class indices "
            "(mode L or palette P), not colour images: convert colours to indices"
        )
    if mask_size != image_size:
        return (
            f"mask {mask_path} is {mask_size[0]}x{mask_size[1]} but its image {image_path} is "
            f"{image_size[0]}x{image_size[1]}; masks must have their image's size"
        )
    bad = np.unique(values[(values >= num_classes) & (values != IGNORE_INDEX)])
    if bad.size:
        return (
            f"mask {mask_path} has values {bad[:5].tolist()} >= model.num_classes={num_classes} "
            f"(only {IGNORE_INDEX} may exceed it, meaning ignore); fix the mask or model.num_classes"
        )
    return None


def _check_pairs(pairs: list[tuple[str, str]], num_classes: int, root) -> None:
    for image_path, mask_path in _progress(pairs, f"checking {len(pairs)} masks in {root}"):
        problem = _mask_problem(image_path, mask_path, num_classes)
        if problem:
            raise SegmentationDataError(problem)


def scan_mask_folder(root: str | os.PathLike, num_classes: int, *, config_key: str = "data.train"):
    """List and check the (image, mask) pairs of a mask folder.

    Args:
        root: folder with ``images/`` and ``masks/`` (mask = image stem + ``.png``).
        num_classes: mask values must be below it, or 255 (ignore).
        config_key: recipe key named in error messages.

    Returns:
        ``(pairs, class_names)``: sorted ``(image_path, mask_path)`` tuples, and
        the names from ``root/classes.txt`` or ``class_0..class_{K-1}``.

    Raises:
        SegmentationDataError: missing folders, an image without a mask, a
            mask whose size differs from its image, a mask value >=
            num_classes other than 255, an RGB mask, or a bad classes.txt.
    """
    root = Path(root)
    images_dir, masks_dir = root / "images", root / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise SegmentationDataError(
                f"{config_key} folder {root} has no {folder.name}/ subfolder; put images in {images_dir} "
                f"and index masks (PNG, same file names) in {masks_dir}"
            )
    images = sorted(
        p for p in images_dir.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in TRAINING_IMAGE_EXTENSIONS
    )
    if not images:
        raise SegmentationDataError(f"{config_key}: {images_dir} has no images ({', '.join(TRAINING_IMAGE_EXTENSIONS)})")
    masks = {p.stem: p for p in masks_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png"}
    pairs = []
    for image in images:
        mask = masks.pop(image.stem, None)
        if mask is None:
            raise SegmentationDataError(
                f"image {image} has no mask; add {masks_dir / (image.stem + '.png')} or remove the image"
            )
        pairs.append((str(image), str(mask)))
    if masks:
        logger.warning("%d masks in %s have no image and are ignored (e.g. %s)", len(masks), masks_dir,
                       next(iter(masks.values())))
    _check_pairs(pairs, num_classes, root)
    class_names = [f"class_{i}" for i in range(num_classes)]
    names_file = root / "classes.txt"
    if names_file.is_file():
        class_names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if len(class_names) != num_classes:
            raise SegmentationDataError(
                f"{names_file} names {len(class_names)} classes but model.num_classes is {num_classes}; "
                "make them agree"
            )
    return pairs, class_names


def scan_voc(root: str | os.PathLike, split: str, num_classes: int, *, config_key: str = "data.train"):
    """List and check the (image, mask) pairs of a Pascal VOC segmentation split.

    Args:
        root: the VOC20xx folder (with ``JPEGImages``, ``SegmentationClass``,
            ``ImageSets/Segmentation``).
        split: "train", "val", "trainval"... (``ImageSets/Segmentation/<split>.txt``).
        num_classes: must be 21.
        config_key: recipe key named in error messages.

    Returns:
        sorted-by-list ``(image_path, mask_path)`` tuples.
    """
    root = Path(root)
    if num_classes != len(VOC_CLASSES):
        raise SegmentationDataError(
            f"data.source=voc has {len(VOC_CLASSES)} classes but model.num_classes is {num_classes}; "
            f"set model.num_classes={len(VOC_CLASSES)}"
        )
    list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_file.is_file():
        raise SegmentationDataError(
            f"{config_key}={root} is not a VOC root: {list_file} is missing; point {config_key} at "
            "VOCdevkit/VOC2012 (the folder holding JPEGImages and SegmentationClass)"
        )
    ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise SegmentationDataError(f"{list_file} lists no images")
    pairs = []
    for image_id in ids:
        image = root / "JPEGImages" / f"{image_id}.jpg"
        mask = root / "SegmentationClass" / f"{image_id}.png"
        if not image.is_file():
            raise SegmentationDataError(f"{list_file} lists {image_id} but {image} is missing")
        if not mask.is_file():
            raise SegmentationDataError(f"image {image} has no mask; {mask} is missing")
        pairs.append((str(image), str(mask)))
    _check_pairs(pairs, num_classes, list_file)
    return pairs


def _read_mask(path) -> np.ndarray:
    with Image.open(path.decode() if isinstance(path, bytes) else path) as mask:
        return np.asarray(mask, dtype=np.int32)


def _decode_pair(image_path, mask_path, channels):
    """Decode an image (any size, float32 0..255) and its index mask (int32)."""
    image = tf.io.decode_image(tf.io.read_file(image_path), expand_animations=False)
    image = image[..., : tf.where(tf.shape(image)[-1] >= 3, 3, 1)]
    image = tf.cast(image, tf.float32)
    is_gray = tf.equal(tf.shape(image)[-1], 1)
    if channels == 3:
        image = tf.cond(is_gray, lambda: tf.image.grayscale_to_rgb(image), lambda: image)
    else:
        image = tf.cond(is_gray, lambda: image, lambda: tf.image.rgb_to_grayscale(image))
    image = tf.ensure_shape(image, [None, None, channels])
    # Palette PNGs must be read as indices: tf.io.decode_png would expand them to colours.
    mask = tf.numpy_function(_read_mask, [mask_path], tf.int32, stateful=False)
    return image, tf.ensure_shape(mask, [None, None])


def _file_sources(pairs_train, pairs_val, channels):
    def dataset(pairs):
        paths = np.asarray(pairs, dtype=str)
        return tf.data.Dataset.from_tensor_slices((paths[:, 0], paths[:, 1])).map(
            lambda image, mask: _decode_pair(image, mask, channels), num_parallel_calls=tf.data.AUTOTUNE
        )

    return dataset(pairs_train), dataset(pairs_val)


# --------------------------------------------------------------------------- mosaic


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


def _mosaic_sources(cfg: dict, seed: int, start_epoch: int = 0):
    height, width, channels = cfg["model"]["input_shape"]
    data_cfg = cfg["data"]
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    if data_cfg["mosaic_fresh_each_epoch"]:
        train = _fresh_mosaic_dataset(
            x_train, y_train, data_cfg["mosaic_train_size"], height, width, seed, start_epoch
        )
    else:
        train = tf.data.Dataset.from_tensor_slices(
            make_mosaic(x_train, y_train, data_cfg["mosaic_train_size"], height, width, seed)
        )
    val = tf.data.Dataset.from_tensor_slices(
        make_mosaic(x_test, y_test, data_cfg["mosaic_val_size"], height, width, MOSAIC_VAL_SEED)
    )

    def to_examples(dataset):
        return dataset.map(lambda image, mask: _mosaic_example(image, mask, channels))

    return to_examples(train), to_examples(val), list(MOSAIC_CLASSES)


# --------------------------------------------------------------------------- geometry


def resize_pair(image: tf.Tensor, mask: tf.Tensor, height: int, width: int):
    """Resize an image (bilinear) and its mask (nearest) to `(height, width)`."""
    image = tf.image.resize(image, [height, width], method="bilinear")
    mask = tf.image.resize(mask[..., None], [height, width], method="nearest")[..., 0]
    return image, mask


def _make_train_augment(augment_cfg: dict, input_shape):
    """`(image, mask, seed) -> (image, mask)`: rescale jitter, crop/pad, flip; same geometry for both."""
    height, width, channels = input_shape
    low, high = augment_cfg["scale_range"]
    flip = augment_cfg["horizontal_flip"]

    def augment(image, mask, seed):
        scale_seed, pad_seed, crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
        if low == high == 1.0 and tuple(image.shape[:2]) == (height, width):
            # No rescale and already the input size: resize, pad and crop are identities; skip their ops.
            return _random_flip(image, mask, flip_seed) if flip else (image, mask)
        scale = tf.random.stateless_uniform([], scale_seed, low, high)
        scaled_h = tf.maximum(1, tf.cast(tf.round(height * scale), tf.int32))
        scaled_w = tf.maximum(1, tf.cast(tf.round(width * scale), tf.int32))
        image, mask = resize_pair(image, mask, scaled_h, scaled_w)
        # Pad (at a random offset) up to the input size: zeros for the image, ignore for the mask.
        padded_h, padded_w = tf.maximum(scaled_h, height), tf.maximum(scaled_w, width)
        pad_fraction = tf.random.stateless_uniform([2], pad_seed)
        pad_top = tf.cast(pad_fraction[0] * tf.cast(padded_h - scaled_h + 1, tf.float32), tf.int32)
        pad_left = tf.cast(pad_fraction[1] * tf.cast(padded_w - scaled_w + 1, tf.float32), tf.int32)
        image = tf.image.pad_to_bounding_box(image, pad_top, pad_left, padded_h, padded_w)
        mask = tf.image.pad_to_bounding_box(mask[..., None] - IGNORE_INDEX, pad_top, pad_left, padded_h, padded_w)
        mask = mask[..., 0] + IGNORE_INDEX
        # Random crop of the input size.
        crop_fraction = tf.random.stateless_uniform([2], crop_seed)
        top = tf.cast(crop_fraction[0] * tf.cast(padded_h - height + 1, tf.float32), tf.int32)
        left = tf.cast(crop_fraction[1] * tf.cast(padded_w - width + 1, tf.float32), tf.int32)
        image = image[top : top + height, left : left + width]
        mask = mask[top : top + height, left : left + width]
        if flip:
            image, mask = _random_flip(image, mask, flip_seed)
        return tf.ensure_shape(image, [height, width, channels]), tf.ensure_shape(mask, [height, width])

    return augment


def _random_flip(image, mask, seed):
    """Flips image and mask left-right together with probability 1/2."""
    flipped = tf.random.stateless_uniform([], seed) < 0.5
    return (tf.cond(flipped, lambda: tf.reverse(image, [1]), lambda: image),
            tf.cond(flipped, lambda: tf.reverse(mask, [1]), lambda: mask))


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    values = images.reshape(-1, images.shape[-1]).astype(np.float64)
    return values.mean(axis=0).tolist(), np.maximum(values.std(axis=0), 1e-3).tolist()


# --------------------------------------------------------------------------- entry point


def build_segmentation_datasets(cfg: dict, seed: int = 0, start_epoch: int = 0):
    """Build the batched train and validation pipelines of a segmentation recipe.

    Args:
        cfg: full recipe dict from :func:`keras_resnet.config.load_config`
            (``data.source`` one of mask_folder, voc, mosaic).
        seed: seed of the subset selection, the shuffle, the augmentation
            and the training mosaic.
        start_epoch: the epoch training starts at (a resumed run's); with
            ``data.mosaic_fresh_each_epoch`` it picks the canvases of the
            first training pass, so a resumed run trains on the canvases an
            uninterrupted one would have (shuffle order and augmentation
            still restart). Other sources ignore it.

    Returns:
        ``(train_ds, val_ds, info)``: batches of ``(float32 images (B, H, W, C)
        in 0..255, int32 masks (B, H, W))`` (train drops the last partial
        batch), and ``info`` with ``class_names``, ``num_train``, ``num_val``
        and per-channel ``mean`` / ``std`` (0..255) of up to 500 training
        images at the input size.

    Raises:
        SegmentationDataError: missing or bad data (naming the file), or
            ``data.batch_size`` larger than the training set.

    Example:
    >>> cfg = load_config("tasks/segmentation/mosaic_deeplabv3plus_resnet18.yaml")
    >>> train_ds, val_ds, info = build_segmentation_datasets(cfg)
    """
    data_cfg = cfg["data"]
    input_shape = list(cfg["model"]["input_shape"])
    height, width, channels = input_shape
    num_classes = cfg["model"]["num_classes"]
    source = data_cfg["source"]
    if source in ("mask_folder", "voc"):
        for key in ("train", "val"):
            if not data_cfg[key]:
                what = "a folder with images/ and masks/" if source == "mask_folder" else "the VOC20xx root"
                raise SegmentationDataError(f"data.{key} is required when data.source is {source}; set it to {what}")
        if source == "mask_folder":
            train_pairs, class_names = scan_mask_folder(data_cfg["train"], num_classes, config_key="data.train")
            val_pairs, _ = scan_mask_folder(data_cfg["val"], num_classes, config_key="data.val")
        else:
            train_pairs = scan_voc(data_cfg["train"], "train", num_classes, config_key="data.train")
            val_pairs = scan_voc(data_cfg["val"], "val", num_classes, config_key="data.val")
            class_names = list(VOC_CLASSES)
        train_pairs = [train_pairs[i] for i in _seeded_subset(len(train_pairs), data_cfg["limit_train"], seed)]
        val_pairs = [val_pairs[i] for i in _seeded_subset(len(val_pairs), data_cfg["limit_val"], seed + 1)]
        train, val = _file_sources(train_pairs, val_pairs, channels)
        num_train, num_val = len(train_pairs), len(val_pairs)
        stats_images = np.stack([
            decode_image_file(path, height, width, channels).numpy()
            for path, _ in train_pairs[:STATS_SAMPLE_SIZE]
        ])
    elif source == "mosaic":
        if num_classes != len(MOSAIC_CLASSES):
            raise SegmentationDataError(
                f"data.source=mosaic has {len(MOSAIC_CLASSES)} classes (background + 10 Fashion-MNIST) but "
                f"model.num_classes is {num_classes}; set model.num_classes={len(MOSAIC_CLASSES)}"
            )
        train, val, class_names = _mosaic_sources(cfg, seed, start_epoch)
        num_train, num_val = data_cfg["mosaic_train_size"], data_cfg["mosaic_val_size"]
        if data_cfg["limit_train"]:
            num_train = min(num_train, data_cfg["limit_train"])
            train = train.take(num_train)
        if data_cfg["limit_val"]:
            num_val = min(num_val, data_cfg["limit_val"])
            val = val.take(num_val)
        stats_images = np.stack([image for image, _ in train.take(STATS_SAMPLE_SIZE).as_numpy_iterator()])
    else:
        raise SegmentationDataError(f"data.source {source!r} is not one of mask_folder, voc, mosaic")
    batch_size = data_cfg["batch_size"]
    if batch_size > num_train:
        raise SegmentationDataError(
            f"data.batch_size={batch_size} is larger than the {num_train} training examples; "
            "lower data.batch_size or add data"
        )
    mean, std = _channel_stats(stats_images)
    if data_cfg["cache"]:
        val = val.cache()
        if not (source == "mosaic" and data_cfg["mosaic_fresh_each_epoch"]):  # a cache would freeze epoch 1's
            train = train.cache()
    val = val.map(lambda image, mask: resize_pair(image, mask, height, width), num_parallel_calls=tf.data.AUTOTUNE)
    train, val = shuffle_augment_batch(
        train, val, _make_train_augment(data_cfg["augment"], input_shape), data_cfg, num_train, seed
    )
    info = {"class_names": class_names, "num_train": num_train, "num_val": num_val, "mean": mean, "std": std}
    return train, val, info
