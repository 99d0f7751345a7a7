"""Tiled inference: a model run window by window over an image of any size, the results stitched.

A large image with small objects (aerial photos of 400-4000 px, microscopy)
loses them when it is resized or letterboxed to the model input. Tiled
inference keeps the image at its own resolution instead: windows of the model
input size (`keras_resnet.tiling.grid`) slide over it with a fractional overlap, the model
runs on `batch_size` windows at a time, and the results are stitched:

- `segment_tiled`: per-pixel class probabilities, blended where windows
  overlap with weights that fall off linearly towards a window's inner edges
  (a pixel seen near the centre of one window and near the edge of another
  counts mostly from the first, where the model saw more context); sides on
  the image border keep full weight. The weights are positive everywhere and
  normalised per pixel, so wherever every covering window gives the same
  probabilities (a model that is translation-equivariant there) the stitched
  result is exactly the untiled one.
- `detect_tiled`: per-window detections shifted by the window origin,
  clipped to the image (boxes in the zero padding of a window that hangs
  over the border vanish) and merged with class-wise NMS
  (`tf.image.non_max_suppression` per class), so an object in the overlap
  of two windows is found once.

Everything here is NumPy around a per-batch predict callable, so it serves a
Keras model (`keras_segment_function`, `keras_detect_function`) and every
export format (`keras_resnet.predict.tiling`) alike. Windows past the image
(an image smaller than a tile, or narrower on one side) are padded with 0.
Nothing here prints: a caller that wants a progress bar passes `progress`
(`keras_resnet.predict.progress.terminal_progress`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import tensorflow as tf

from keras_resnet.tiling.grid import (
    DEFAULT_OVERLAP,
    check_overlap,
    tile_grid,
    tile_weights,
)
from keras_resnet_settings.errors import ConfigError, DataError, ModelError

DEFAULT_TILE_BATCH = 8


# ----------------------------------------------------------------------------
# Windows in batches
# ----------------------------------------------------------------------------
def as_image(image) -> np.ndarray:
    """float32 `(h, w, C)` pixels of an `(h, w)` or `(h, w, C)` array (0..255, as the models take them)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or min(image.shape) < 1:
        raise DataError(f"expected one image (height, width[, channels]), got an array of shape {image.shape}")
    return image.astype(np.float32, copy=False)


def _tile_size(tile_shape) -> tuple[int, int]:
    tile_height, tile_width = (int(v) for v in tuple(tile_shape)[:2])
    if tile_height < 1 or tile_width < 1:
        raise ConfigError(f"tile size must be positive, got {tile_height}x{tile_width}")
    return tile_height, tile_width


def _windows(image: np.ndarray, origins, tile_height: int, tile_width: int) -> np.ndarray:
    """The windows at `origins`, zero-padded past the image: float32 `(n, tile_height, tile_width, C)`."""
    windows = np.zeros((len(origins), tile_height, tile_width, image.shape[-1]), np.float32)
    for index, (y, x) in enumerate(origins):
        crop = image[y : y + tile_height, x : x + tile_width]
        windows[index, : crop.shape[0], : crop.shape[1]] = crop
    return windows


@contextmanager
def no_progress(total: int, description: str):
    """The silent progress hook: `progress(total, description)` is a context manager yielding `advance(count)`."""
    yield lambda count: None


def _batches(image, tile_shape, overlap, batch_size, progress, description):
    """`(origins, windows)` of the image's grid, `batch_size` windows at a time."""
    tile_height, tile_width = _tile_size(tile_shape)
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    height, width = image.shape[:2]
    origins = tile_grid(height, width, tile_height, tile_width, overlap)
    with (progress or no_progress)(len(origins), description) as advance:
        for start in range(0, len(origins), batch_size):
            chunk = origins[start : start + batch_size]
            yield chunk, _windows(image, chunk, tile_height, tile_width)
            advance(len(chunk))


# ----------------------------------------------------------------------------
# Segmentation
# ----------------------------------------------------------------------------
def segment_tiled(
    predict_probabilities: Callable,
    image,
    tile_shape,
    overlap: float = DEFAULT_OVERLAP,
    batch_size: int = DEFAULT_TILE_BATCH,
    progress: Callable | None = None,
) -> np.ndarray:
    """Per-pixel class probabilities of an image of any size, window by window.

    Args:
        predict_probabilities: `float32 windows (n, tile_height, tile_width,
            C) -> (n, tile_height, tile_width, K)` class probabilities (a
            segmenter export's "probabilities", `keras_segment_function`).
            Called with at most `batch_size` windows at a time.
        image: `(h, w, C)` or `(h, w)` raw pixels 0..255 (the model's input
            scale), any size.
        tile_shape: `(tile_height, tile_width)` of the windows (the model input).
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        batch_size: windows per call of `predict_probabilities`.
        progress: None (silent), or a hook `progress(total, description)`:
            a context manager yielding `advance(count)` (e.g.
            `keras_resnet.predict.progress.terminal_progress()`).

    Returns:
        float32 `(h, w, K)` probabilities at the image's own size: the
        weighted average of the windows covering each pixel (linear ramps
        towards inner window edges, see the module docstring).

    Example:
    >>> predict = keras_segment_function(segmenter)
    >>> probabilities = segment_tiled(predict, big_image, segmenter.input_shape[1:3], overlap=0.25)
    >>> mask = probabilities.argmax(-1)
    """
    image = as_image(image)
    overlap = check_overlap(overlap)
    tile_height, tile_width = _tile_size(tile_shape)
    height, width = image.shape[:2]
    total = weight_sum = None
    for origins, windows in _batches(image, tile_shape, overlap, batch_size, progress, "segmenting tiles"):
        probabilities = np.asarray(predict_probabilities(windows), np.float32)
        if probabilities.ndim != 4 or probabilities.shape[:3] != windows.shape[:3]:
            raise ModelError(
                f"a segmenter should return ({len(windows)}, {tile_height}, {tile_width}, classes) for "
                f"{len(windows)} windows, got {probabilities.shape}"
            )
        if total is None:
            total = np.zeros((height, width, probabilities.shape[-1]), np.float32)
            weight_sum = np.zeros((height, width), np.float32)
        for (y, x), window in zip(origins, probabilities):
            rows, columns = min(tile_height, height - y), min(tile_width, width - x)
            weights = tile_weights(height, width, tile_height, tile_width, (y, x), overlap)[:rows, :columns]
            total[y : y + rows, x : x + columns] += weights[..., None] * window[:rows, :columns]
            weight_sum[y : y + rows, x : x + columns] += weights
    return total / weight_sum[..., None]


def keras_segment_function(model) -> Callable:
    """`float32 windows -> NumPy probabilities` of a Keras segmenter (softmax added over logits outputs).

    A model's output counts as probabilities when its `activation` is
    "softmax" (`ResNetSegmenter(activation="softmax")`) or its last layer is
    a softmax; otherwise it is taken as logits. One traced function: reuse it.
    """
    activation = getattr(model, "activation", None)
    if not hasattr(model, "activation") and model.layers:
        last = model.layers[-1]
        is_softmax = getattr(getattr(last, "activation", None), "__name__", None) == "softmax"
        activation = "softmax" if type(last).__name__ == "Softmax" or is_softmax else None

    @tf.function(reduce_retracing=True)
    def run(windows):
        outputs = tf.cast(model(windows, training=False), tf.float32)
        return outputs if activation == "softmax" else tf.nn.softmax(outputs, axis=-1)

    return lambda windows: run(tf.constant(windows, tf.float32)).numpy()


# ----------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------
def merge_detections(boxes, scores, classes, iou_threshold=0.5, score_threshold=None, max_detections=100) -> dict:
    """Class-wise NMS over detections pooled from several windows, best first.

    One `tf.image.non_max_suppression` per class present (boxes of
    different classes never suppress each other).

    Returns:
        `{"boxes": float32 (K, 4), "scores": float32 (K,), "classes": int32 (K,)}`,
        sorted by score, K <= `max_detections`.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(-1)
    classes = np.asarray(classes, np.int32).reshape(-1)
    threshold = float("-inf") if score_threshold is None else float(score_threshold)
    kept = []
    for class_id in np.unique(classes):
        members = np.flatnonzero(classes == class_id)
        selected = tf.image.non_max_suppression(
            boxes[members], scores[members], max_output_size=int(max_detections),
            iou_threshold=float(iou_threshold), score_threshold=threshold,
        )
        kept.append(members[selected.numpy()])
    kept = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    kept = kept[np.argsort(-scores[kept], kind="stable")][: int(max_detections)]
    return {"boxes": boxes[kept], "scores": scores[kept], "classes": classes[kept]}


def _window_detections(outputs: dict, origins, height: int, width: int):
    """The valid detections of a batch of windows in image pixels: `(boxes, scores, classes)`."""
    boxes = np.asarray(outputs["boxes"], np.float32)
    scores = np.asarray(outputs["scores"], np.float32)
    classes = np.asarray(outputs["classes"], np.int32)
    valid = classes >= 0
    if "num_detections" in outputs:
        counts = np.asarray(outputs["num_detections"]).reshape(-1, 1)
        valid &= np.arange(classes.shape[1])[None] < counts
    shifts = np.asarray([[x, y, x, y] for y, x in origins], np.float32)
    boxes = boxes + shifts[:, None, :]
    boxes = np.clip(boxes, 0.0, np.asarray([width, height, width, height], np.float32))
    # a box left without area lay in the zero padding of a window hanging over the border
    valid &= (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    return boxes[valid], scores[valid], classes[valid]


def detect_tiled(
    detect: Callable,
    image,
    tile_shape,
    overlap: float = DEFAULT_OVERLAP,
    batch_size: int = DEFAULT_TILE_BATCH,
    iou_threshold: float = 0.5,
    score_threshold: float | None = None,
    max_detections: int = 100,
    progress: Callable | None = None,
) -> dict:
    """Detections in an image of any size, window by window, merged by class-wise NMS.

    Args:
        detect: `float32 windows (n, tile_height, tile_width, C) -> {"boxes":
            (n, K, 4) xyxy window pixels, "scores": (n, K), "classes": (n, K)
            (-1: padding), optionally "num_detections": (n,)}` (a detector
            export's decoded outputs, `keras_detect_function`). Called with
            at most `batch_size` windows at a time.
        image: `(h, w, C)` or `(h, w)` raw pixels 0..255, any size.
        tile_shape: `(tile_height, tile_width)` of the windows (the model input).
        overlap: fraction of a window shared with its neighbour, in [0, 1).
            Objects up to about `overlap * tile` pixels lie whole in some window.
        batch_size: windows per call of `detect`.
        iou_threshold: boxes of one class overlapping more than this after
            stitching are one object (the best-scored box is kept).
        score_threshold: drop merged detections scored below this (None:
            keep what `detect` returns).
        max_detections: detections kept for the whole image.
        progress: None (silent), or a hook `progress(total, description)`:
            a context manager yielding `advance(count)` (e.g.
            `keras_resnet.predict.progress.terminal_progress()`).

    Returns:
        `{"boxes": float32 (K, 4) xyxy in the image's own pixels, clipped to
        it, "scores": float32 (K,), "classes": int32 (K,)}`, best first.

    Example:
    >>> detect = keras_detect_function(detector, score_threshold=0.3)
    >>> found = detect_tiled(detect, aerial_photo, detector.input_shape[1:3], overlap=0.25)
    >>> found["boxes"].shape
    (K, 4)
    """
    image = as_image(image)
    overlap = check_overlap(overlap)
    height, width = image.shape[:2]
    found = []
    for origins, windows in _batches(image, tile_shape, overlap, batch_size, progress, "detecting in tiles"):
        outputs = {key: np.asarray(value) for key, value in detect(windows).items()}
        found.append(_window_detections(outputs, origins, height, width))
    boxes, scores, classes = (np.concatenate(parts) for parts in zip(*found))
    return merge_detections(boxes, scores, classes, iou_threshold, score_threshold, max_detections)


def keras_detect_function(model, **decoder_kwargs) -> Callable:
    """`float32 windows -> NumPy decoded detections` of a `RetinaNetDetector` and its `DetectionDecoder`.

    Args:
        model: a `RetinaNetDetector` (anything with `make_decoder`).
        **decoder_kwargs: `DetectionDecoder` arguments (thresholds, max_detections).

    Returns:
        The function; its `decoder` attribute is the decoder it uses.
    """
    decoder = model.make_decoder(**decoder_kwargs)

    @tf.function(reduce_retracing=True)
    def run(windows):
        return decoder(model(windows, training=False))

    def detect(windows):
        return {key: value.numpy() for key, value in run(tf.constant(windows, tf.float32)).items()}

    detect.decoder = decoder
    return detect


# ----------------------------------------------------------------------------
# The window size of a Keras model
# ----------------------------------------------------------------------------
def model_tile(model, tile=None) -> tuple[int, int]:
    """The window size for a Keras model: its static input size; `tile` (an int side or `(h, w)`) must match it.

    A model with a dynamic input size takes any `tile` (and needs one).
    """
    height, width = model.input_shape[1:3]
    if tile is None:
        if height is None or width is None:
            raise ConfigError(f"{model.name} takes any input size: pass tile=SIZE (e.g. the training crop size)")
        return int(height), int(width)
    wanted = (int(tile), int(tile)) if np.ndim(tile) == 0 else _tile_size(tile)
    if height is not None and width is not None and wanted != (int(height), int(width)):
        raise ConfigError(
            f"tile {wanted[0]}x{wanted[1]} does not fit {model.name}, which takes {height}x{width} inputs; "
            "leave tile unset to use the model input"
        )
    return wanted


__all__ = [
    "DEFAULT_TILE_BATCH",
    "as_image",
    "detect_tiled",
    "keras_detect_function",
    "keras_segment_function",
    "merge_detections",
    "model_tile",
    "no_progress",
    "segment_tiled",
]
