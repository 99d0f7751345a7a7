"""Sliding windows over large images: one grid rule, blending, and tiled inference of segmenters and detectors.

- `grid`: `grid_origins` (the one grid function, graph-safe; padding "flush"
  or "pad"), `tile_grid`, `tile_weights`, `grid_tiles`, `tile_stride`.
- `stitch`: `segment_tiled` (blended probabilities), `detect_tiled` (boxes
  merged by class-wise NMS) around any per-batch predict function, and the
  Keras-model functions (`keras_segment_function`, `keras_detect_function`).

Used by the models' `predict_tiled` methods, crop-sampled validation tiles
(`data.crops`), tiled evaluation (`training`) and `keras_resnet.predict`.
Prints nothing: callers pass a `progress` hook.
"""

from keras_resnet.tiling.grid import (
    DEFAULT_OVERLAP,
    grid_origins,
    grid_tiles,
    tile_grid,
    tile_stride,
    tile_weights,
)
from keras_resnet.tiling.stitch import (
    DEFAULT_TILE_BATCH,
    as_image,
    detect_tiled,
    keras_detect_function,
    keras_segment_function,
    merge_detections,
    model_tile,
    no_progress,
    segment_tiled,
)

__all__ = [
    "DEFAULT_OVERLAP",
    "DEFAULT_TILE_BATCH",
    "as_image",
    "detect_tiled",
    "grid_origins",
    "grid_tiles",
    "keras_detect_function",
    "keras_segment_function",
    "merge_detections",
    "model_tile",
    "no_progress",
    "segment_tiled",
    "tile_grid",
    "tile_stride",
    "tile_weights",
]
