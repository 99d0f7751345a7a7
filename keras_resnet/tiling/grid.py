"""The tile grid: where windows of the model input size sit on an image, and how their results blend.

One rule for every sliding window in keras_resnet (tiled prediction, tiled
evaluation of crop-trained runs, the validation-loss tiles of `data.sampling:
crop`): along each axis, window origins are `stride = round(tile * (1 -
overlap))` apart, at least 1, and there are `ceil(max(size - tile, 0) /
stride) + 1` of them. What happens at the far border is the padding rule:

- `"flush"`: the last window is moved back to end at the border (it may
  overlap its neighbour more); an image side shorter than a tile gets one
  window at 0, zero-padded past the image. Tiled prediction and evaluation.
- `"pad"`: windows stay on the stride; the last one hangs over the border and
  is padded. With overlap 0 this is the plain non-overlapping grid of the
  validation-loss tiles (every pixel in exactly one tile).

:func:`grid_origins` is written in TensorFlow ops, so it runs eagerly (tiled
prediction, :func:`tile_grid`) and inside `tf.data` graphs (validation tiles).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_resnet_settings import check_setting, default
from keras_resnet_settings.errors import ConfigError

DEFAULT_OVERLAP = default("data.tile_overlap")
PADDING_RULES = ("flush", "pad")


def check_overlap(overlap) -> float:
    """`overlap` as a float, checked against `data.tile_overlap`'s declared range."""
    return check_setting("data.tile_overlap", overlap, shown_as="tile overlap")


def tile_stride(tile: int, overlap: float) -> int:
    """Pixels between window origins: `round(tile * (1 - overlap))`, at least 1."""
    return max(1, int(round(int(tile) * (1.0 - check_overlap(overlap)))))


def _check_tile(tile_height: int, tile_width: int) -> tuple[int, int]:
    tile_height, tile_width = int(tile_height), int(tile_width)
    if tile_height < 1 or tile_width < 1:
        raise ConfigError(f"tile size must be positive, got {tile_height}x{tile_width}")
    return tile_height, tile_width


def _axis_origins(size, tile: int, stride: int, padding: str):
    """int32 window starts along one axis (`size` a Python int or a scalar tensor)."""
    size = tf.cast(size, tf.int32)
    beyond = tf.maximum(size - tile, 0)
    count = (beyond + stride - 1) // stride + 1
    origins = tf.range(count, dtype=tf.int32) * stride
    return tf.minimum(origins, beyond) if padding == "flush" else origins


def grid_origins(height, width, tile_height: int, tile_width: int, overlap: float = 0.0, padding: str = "flush"):
    """int32 `(n, 2)` `(top, left)` origins of the windows that cover an image, row by row.

    Args:
        height, width: the image size (Python ints or scalar tensors, e.g. `tf.shape(image)[0]` in a graph).
        tile_height, tile_width: the window size (the model input).
        overlap: fraction of a window shared with its neighbour (`data.tile_overlap`'s range).
        padding: "flush" (the last window ends at the border) or "pad" (it hangs over; see the module docstring).

    Example:
    >>> grid_origins(100, 64, 32, 32, overlap=0.25).numpy()[:4]  # stride 24: rows 0, 24, 48, 68
    array([[ 0,  0], [ 0, 24], [ 0, 32], [24,  0]], dtype=int32)
    """
    if padding not in PADDING_RULES:
        raise ConfigError(f"padding must be one of {', '.join(PADDING_RULES)}, got {padding!r}")
    tile_height, tile_width = _check_tile(tile_height, tile_width)
    rows = _axis_origins(height, tile_height, tile_stride(tile_height, overlap), padding)
    columns = _axis_origins(width, tile_width, tile_stride(tile_width, overlap), padding)
    tops = tf.repeat(rows, tf.size(columns))
    lefts = tf.tile(columns, [tf.size(rows)])
    return tf.stack([tops, lefts], axis=-1)


def tile_grid(height: int, width: int, tile_height: int, tile_width: int, overlap: float) -> list[tuple[int, int]]:
    """:func:`grid_origins` (padding "flush") as a list of Python `(y, x)` tuples, for host-side loops.

    Example:
    >>> tile_grid(100, 64, 32, 32, overlap=0.25)
    [(0, 0), (0, 24), (0, 32), (24, 0), ...]
    """
    origins = grid_origins(int(height), int(width), tile_height, tile_width, overlap, "flush").numpy()
    return [(int(y), int(x)) for y, x in origins]


def _axis_weights(size: int, tile: int, origin: int, ramp: int) -> np.ndarray:
    """1-D blending weights of a window: linear ramps of `ramp` pixels on sides that have a neighbour."""
    weights = np.ones(tile, np.float32)
    if ramp <= 0 or size <= tile:
        return weights
    rising = np.minimum(1.0, (np.arange(tile, dtype=np.float32) + 1.0) / (ramp + 1.0))
    if origin > 0:  # a window before this one
        weights = np.minimum(weights, rising)
    if origin + tile < size:  # a window after this one
        weights = np.minimum(weights, rising[::-1])
    return weights


def tile_weights(height, width, tile_height, tile_width, origin, overlap) -> np.ndarray:
    """float32 `(tile_height, tile_width)` blending weights of the window at `origin`.

    Linear ramps towards the window's inner edges (a pixel counts mostly from
    the window that saw it nearest its centre); sides on the image border keep
    full weight. Where two windows overlap by the regular `tile - stride`
    pixels their weights sum to 1 (a linear cross-fade); every weight is positive.
    """
    y, x = origin
    ramp_y = tile_height - tile_stride(tile_height, overlap)
    ramp_x = tile_width - tile_stride(tile_width, overlap)
    return np.outer(_axis_weights(height, tile_height, y, ramp_y), _axis_weights(width, tile_width, x, ramp_x))


def grid_tiles(image, tile_height: int, tile_width: int, fill=0):
    """`(n, tile_height, tile_width, ...)` non-overlapping tiles of `image` (padding "pad", overlap 0), in
    :func:`grid_origins` order; the last row and column are padded with `fill`. Graph-safe (tf.data)."""
    image = tf.convert_to_tensor(image)
    squeeze = image.shape.rank == 2
    if squeeze:
        image = image[..., None]
    shape = tf.shape(image)
    origins = grid_origins(shape[0], shape[1], tile_height, tile_width, 0.0, "pad")
    rows = tf.size(tf.unique(origins[:, 0])[0])
    cols = tf.shape(origins)[0] // rows
    padded = tf.pad(image, [[0, rows * tile_height - shape[0]], [0, cols * tile_width - shape[1]], [0, 0]],
                    constant_values=tf.cast(fill, image.dtype))
    channels = image.shape[-1]
    tiles = tf.reshape(padded, [rows, tile_height, cols, tile_width, channels])
    tiles = tf.reshape(tf.transpose(tiles, [0, 2, 1, 3, 4]), [rows * cols, tile_height, tile_width, channels])
    return tiles[..., 0] if squeeze else tiles
