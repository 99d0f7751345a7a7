"""Segmentation files: mask folders and Pascal VOC, checked up front, decoded in ``tf.data``.

- ``mask_folder``: ``data.train`` and ``data.val`` are folders holding
  ``images/`` (png/jpg/tif...) and ``masks/`` (PNG of class indices, same file
  stem; palette "P" PNGs are read as indices). An optional ``classes.txt``
  (one name per line) beside them names the classes. Every pair is checked
  up front.
- ``voc``: a Pascal VOC root (``VOCdevkit/VOC2012``) with ``JPEGImages/``,
  ``SegmentationClass/`` and ``ImageSets/Segmentation/{train,val}.txt``;
  ``data.train`` and ``data.val`` may name the same root.

Mask value 255 means "ignore" (VOC borders, augmentation padding).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from keras_resnet.data.images import (
    TRAINING_IMAGE_EXTENSIONS,
    decode_image,
    encoded_paths,
    image_problem,
    image_size,
)
from keras_resnet.data.pascal_voc import VOC_SEGMENTATION_CLASSES, read_split_ids
from keras_resnet.data.scanning import progress
from keras_resnet_settings.errors import SegmentationDataError
from keras_resnet_settings.registry import IGNORE_INDEX, binary_masks_problem

logger = logging.getLogger(__name__)

VOC_CLASSES = VOC_SEGMENTATION_CLASSES


def _mask_problem(image_path: str, mask_path: str, num_classes: int, seen: set | None = None) -> str | None:
    """Why an image/mask pair is unusable, or None. Decodes the whole image and mask; adds its values to `seen`."""
    problem = image_problem(image_path)
    if problem:
        return f"unreadable image {image_path} ({problem}); delete or replace it"
    image_size_shown = image_size(image_path)
    try:
        with Image.open(mask_path) as mask:
            mode, mask_size = mask.mode, mask.size
            values = np.asarray(mask) if mode in ("P", "L", "I", "I;16") else None
    except Exception as error:
        return f"unreadable mask {mask_path} ({type(error).__name__}: {error}); fix or delete it"
    if values is not None and seen is not None:
        seen.update(int(value) for value in np.unique(values))
    if values is None:
        return (
            f"mask {mask_path} is a {mode} image; masks must be single-channel PNGs of class indices "
            "(mode L or palette P), not colour images: convert colours to indices"
        )
    if mask_size != image_size_shown:
        return (
            f"mask {mask_path} is {mask_size[0]}x{mask_size[1]} but its image {image_path} is "
            f"{image_size_shown[0]}x{image_size_shown[1]}; masks must have their image's size"
        )
    bad = np.unique(values[(values >= num_classes) & (values != IGNORE_INDEX)])
    if bad.size:
        return (
            f"mask {mask_path} has values {bad[:5].tolist()} >= model.num_classes={num_classes} "
            f"(only {IGNORE_INDEX} may exceed it, meaning ignore); fix the mask or model.num_classes"
        )
    return None


def _check_pairs(pairs: list[tuple[str, str]], num_classes: int, root) -> None:
    seen: set = set()
    for image_path, mask_path in progress(pairs, f"checking {len(pairs)} masks in {root}"):
        problem = _mask_problem(image_path, mask_path, num_classes, seen)
        if problem:
            raise SegmentationDataError(problem)
    if IGNORE_INDEX in seen and seen <= {0, IGNORE_INDEX}:  # binary masks saved as 0/255: nothing to learn
        raise SegmentationDataError(binary_masks_problem(f"every mask in {root} holds"))


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
    missing = (
        f"{config_key}={root} is not a VOC root: {list_file} is missing; point {config_key} at "
        "VOCdevkit/VOC2012 (the folder holding JPEGImages and SegmentationClass)"
    )
    ids = read_split_ids(list_file, missing, SegmentationDataError)
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
    with Image.open(os.fsdecode(path)) as mask:
        return np.asarray(mask, dtype=np.int32)


def decode_pair(image_path, mask_path, channels, bit_depth=None):
    """Decode an image (any size, float32 0..255) and its index mask (int32).

    ``bit_depth``: the training set's depth of 16-bit images
    (``keras_resnet.data.images.dataset_bit_depth``; None: each image's own).
    """
    image = decode_image(image_path, channels, bit_depth=bit_depth)
    # Palette PNGs must be read as indices: tf.io.decode_png would expand them to colours.
    mask = tf.numpy_function(_read_mask, [mask_path], tf.int32, stateful=False)
    return image, tf.ensure_shape(mask, [None, None])


def pair_dataset(pairs, channels, bit_depth=None) -> tf.data.Dataset:
    """Unbatched ``(image, mask)`` examples (see :func:`decode_pair`) of ``(image_path, mask_path)`` pairs."""
    images, masks = encoded_paths([image for image, _ in pairs]), encoded_paths([mask for _, mask in pairs])
    return tf.data.Dataset.from_tensor_slices((images, masks)).map(
        lambda image, mask: decode_pair(image, mask, channels, bit_depth), num_parallel_calls=tf.data.AUTOTUNE
    )


def native_pair_sources(pairs, channels: int, num_classes: int, bit_depth=None):
    """``(sources, decode)`` of native-resolution pairs (``data.sampling: crop``), compact in memory.

    ``sources`` slices the encoded ``(image_path, mask_path)`` pairs;
    ``decode`` gives a uint8 ``(h, w, C)`` image (16-bit images at
    ``bit_depth``, see :func:`decode_pair`) and its mask, uint8 when every
    value fits (``num_classes`` <= 255, 255 = ignore) else int32.
    """
    images, masks = encoded_paths([image for image, _ in pairs]), encoded_paths([mask for _, mask in pairs])
    mask_dtype = tf.uint8 if num_classes <= IGNORE_INDEX else tf.int32

    def decode(image_path, mask_path):
        mask = tf.numpy_function(_read_mask, [mask_path], tf.int32, stateful=False)
        mask = tf.cast(tf.ensure_shape(mask, [None, None]), mask_dtype)
        return decode_image(image_path, channels, as_float=False, bit_depth=bit_depth), mask

    return tf.data.Dataset.from_tensor_slices((images, masks)), decode
