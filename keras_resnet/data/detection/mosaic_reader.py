"""The synthetic detection source ``mosaic``: Fashion-MNIST items on black canvases, boxed exactly."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from keras_resnet.data.detection.records import DetectionRecord
from keras_resnet.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from keras_resnet.data.scanning import keras_datasets_dir, progress
from keras_resnet_settings.errors import DataError

logger = logging.getLogger(__name__)

# Mosaic generation. Sizes are the side of the square 28x28 item after resizing, in canvas pixels.
MOSAIC_CANVAS_SIZE = 256
MOSAIC_ITEM_SIZE = (20, 112)
MOSAIC_ITEMS_PER_CANVAS = (1, 6)
MOSAIC_THRESHOLD = 16  # resized item pixels brighter than this are pasted; the rest stay 0
MOSAIC_MAX_IOU = 0.3  # a placement overlapping a placed item's box by more IoU is rejected
MOSAIC_MAX_COVER = 0.5  # ... and one covering more than this fraction of the smaller box
MOSAIC_ATTEMPTS = 20  # random positions tried per item before the item is skipped
MOSAIC_VAL_SEED = 1  # the validation mosaic is the same whatever the training seed is
MOSAIC_VERSION = 1  # bump when generation changes, so old caches are not reused
MOSAIC_CACHE_ENV = "KERAS_RESNET_MOSAIC_CACHE"


def _placement_ok(candidates: np.ndarray, placed: np.ndarray) -> np.ndarray:
    """Which candidate boxes ``(A, 4)`` overlap no placed box ``(P, 4)`` too much."""
    if not len(placed):
        return np.ones(len(candidates), bool)
    top_left = np.maximum(candidates[:, None, :2], placed[None, :, :2])
    bottom_right = np.minimum(candidates[:, None, 2:], placed[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=-1)
    area_c = np.prod(candidates[:, 2:] - candidates[:, :2], axis=-1)[:, None]
    area_p = np.prod(placed[:, 2:] - placed[:, :2], axis=-1)[None, :]
    iou = inter / (area_c + area_p - inter)
    cover = inter / np.minimum(area_c, area_p)
    return ((iou <= MOSAIC_MAX_IOU) & (cover <= MOSAIC_MAX_COVER)).all(axis=1)


def make_detection_mosaic(
    items: np.ndarray,
    labels: np.ndarray,
    count: int,
    canvas_size: int = MOSAIC_CANVAS_SIZE,
    items_per_canvas: tuple[int, int] = MOSAIC_ITEMS_PER_CANVAS,
    item_size: tuple[int, int] = MOSAIC_ITEM_SIZE,
    seed: int = 0,
):
    """Paste 28x28 items on black canvases and box each one exactly.

    Each canvas gets ``items_per_canvas`` (inclusive range) items. An item is
    resized (bilinear) to a square side drawn log-uniformly from
    ``item_size``; its pixels brighter than 16 are pasted (later items on
    top), the rest are left 0. Its box is the tight box of the pasted pixels,
    so every canvas pixel outside all boxes is 0 and every box edge touches
    a nonzero pixel. Up to 20 random positions are tried per item; a
    position is rejected when the item's box has IoU > 0.3 with a placed
    box, or covers more than half of the smaller of the two boxes; an item
    with no valid position is skipped (the first item of a canvas always fits).

    Args:
        items: uint8 ``(M, 28, 28)`` images (Fashion-MNIST).
        labels: ``(M,)`` class ids.
        count: number of canvases.
        canvas_size: canvas side in pixels.
        items_per_canvas: ``(min, max)`` items per canvas.
        item_size: ``(min, max)`` item side in pixels, at most ``canvas_size``.
        seed: generator seed; the same arguments give the same arrays.

    Returns:
        ``(images uint8 (count, S, S), boxes float32 (T, 4) xyxy, classes
        int32 (T,), offsets int64 (count + 1,))``: canvas ``i`` has boxes
        ``boxes[offsets[i]:offsets[i + 1]]``.

    Example:
    >>> (x, y), _ = load_fashion_mnist()
    >>> images, boxes, classes, offsets = make_detection_mosaic(x, y, 100, seed=0)
    """
    low, high = item_size
    if not 1 <= low <= high <= canvas_size:
        raise DataError(f"mosaic item_size {list(item_size)} must satisfy 1 <= min <= max <= canvas_size={canvas_size}")
    if not 1 <= items_per_canvas[0] <= items_per_canvas[1]:
        raise DataError(f"mosaic items_per_canvas {list(items_per_canvas)} must satisfy 1 <= min <= max")
    rng = np.random.default_rng(seed)
    images = np.zeros((count, canvas_size, canvas_size), np.uint8)
    boxes, classes, offsets = [], [], [0]
    per_canvas = rng.integers(items_per_canvas[0], items_per_canvas[1] + 1, count)
    for canvas in progress(range(count), f"generating {count} mosaic canvases"):
        placed = np.zeros((0, 4))
        for _ in range(per_canvas[canvas]):
            index = int(rng.integers(len(items)))
            size = int(round(np.exp(rng.uniform(np.log(low), np.log(high)))))
            corners = rng.integers(0, canvas_size - size + 1, (MOSAIC_ATTEMPTS, 2))
            patch = np.asarray(Image.fromarray(items[index]).resize((size, size), Image.BILINEAR))
            painted = patch > MOSAIC_THRESHOLD
            rows, cols = np.flatnonzero(painted.any(axis=1)), np.flatnonzero(painted.any(axis=0))
            if not len(rows):
                continue
            tight = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
            candidates = np.concatenate([corners[:, ::-1], corners[:, ::-1]], axis=1) + tight
            valid = np.flatnonzero(_placement_ok(candidates, placed))
            if not len(valid):
                continue
            top, left = corners[valid[0]]
            region = images[canvas, top : top + size, left : left + size]
            region[painted] = patch[painted]
            placed = np.vstack([placed, candidates[valid[0]]])
            classes.append(int(labels[index]))
        boxes.extend(placed)
        offsets.append(offsets[-1] + len(placed))
    return (
        images,
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(classes, np.int32),
        np.asarray(offsets, np.int64),
    )


def default_mosaic_cache_dir() -> Path:
    """``$KERAS_RESNET_MOSAIC_CACHE``, else ``$KERAS_HOME`` (or ``~/.keras``) ``/datasets/detection-mosaic``."""
    override = os.environ.get(MOSAIC_CACHE_ENV)
    if override:
        return Path(override)
    return keras_datasets_dir() / "detection-mosaic"


def _mosaic_arrays(split, count, canvas_size, items_per_canvas, item_size, seed, cache_dir, cache):
    if split not in ("train", "val"):
        raise DataError(f"mosaic split {split!r} is not train or val")
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    items, labels = (x_train, y_train) if split == "train" else (x_test, y_test)
    params = {
        "version": MOSAIC_VERSION, "split": split, "count": count, "canvas_size": canvas_size,
        "items_per_canvas": list(items_per_canvas), "item_size": list(item_size), "seed": seed,
        "threshold": MOSAIC_THRESHOLD, "max_iou": MOSAIC_MAX_IOU, "max_cover": MOSAIC_MAX_COVER,
        "attempts": MOSAIC_ATTEMPTS,
        # The items themselves, so a different copy of Fashion-MNIST never reuses a cache.
        "items_crc": zlib.crc32(np.ascontiguousarray(items)) ^ zlib.crc32(np.ascontiguousarray(labels)),
    }
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir or default_mosaic_cache_dir()) / f"{split}_{count}x{canvas_size}_{key}.npz"
    if cache and path.is_file():
        try:
            with np.load(path) as stored:
                return tuple(stored[name] for name in ("images", "boxes", "classes", "offsets"))
        except (OSError, ValueError, KeyError, zlib.error) as error:
            logger.warning("ignoring unreadable mosaic cache %s (%s); regenerating it", path, error)
    arrays = make_detection_mosaic(items, labels, count, canvas_size, items_per_canvas, item_size, seed)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
        np.savez(partial, **dict(zip(("images", "boxes", "classes", "offsets"), arrays)))
        os.replace(partial, path)
    return arrays


def read_mosaic(
    split: str = "train",
    count: int = 5000,
    canvas_size: int = MOSAIC_CANVAS_SIZE,
    items_per_canvas: tuple[int, int] = MOSAIC_ITEMS_PER_CANVAS,
    item_size: tuple[int, int] = MOSAIC_ITEM_SIZE,
    seed: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
) -> tuple[list[DetectionRecord], list[str]]:
    """A seeded synthetic detection set of Fashion-MNIST items on black canvases.

    See :func:`make_detection_mosaic` for the generation. The train split
    pastes Fashion-MNIST training items, the val split test items. The
    arrays are cached in ``cache_dir`` as an ``.npz`` whose name is a hash of
    every generation parameter and of the items.

    Args:
        split: "train" or "val".
        count: number of canvases.
        canvas_size, items_per_canvas, item_size: see :func:`make_detection_mosaic`.
        seed: generator seed; default 0 for train and 1 for val.
        cache_dir: cache folder; default :func:`default_mosaic_cache_dir`.
        cache: read and write the cache.

    Returns:
        ``(records, class_names)``: records hold grayscale uint8 ``(S, S)``
        canvases; class names are the 10 Fashion-MNIST classes.

    Example:
    >>> records, names = read_mosaic("val", count=500)
    """
    seed = (0 if split == "train" else MOSAIC_VAL_SEED) if seed is None else seed
    images, boxes, classes, offsets = _mosaic_arrays(
        split, count, canvas_size, items_per_canvas, item_size, seed, cache_dir, cache
    )
    records = [
        DetectionRecord(images[i], boxes[offsets[i] : offsets[i + 1]], classes[offsets[i] : offsets[i + 1]],
                        i + 1, canvas_size, canvas_size)
        for i in range(count)
    ]
    return records, list(FASHION_MNIST_CLASSES)
