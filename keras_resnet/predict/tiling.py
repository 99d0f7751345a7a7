"""Tiled (sliding-window) prediction with any model form: Keras model, `.keras`, run dir, SavedModel, TFLite, ONNX.

The grid, the blending of segmentation probabilities and the NMS merge of
detections are `keras_resnet.tiling`; this module runs them around a model of
any form, on the host: an export runs window batches at its own input size
(tiles must be that size), a Keras model through its `predict_tiled` method
or a traced function.

`predict_tiled` is the Python entry point; `TilePlan` is how
`keras-resnet predict --tile auto|off|SIZE` decides per image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from keras_resnet.atomic_files import read_json
from keras_resnet.data.images import read_image, recorded_bit_depth
from keras_resnet.export.loading import ExportedModel, load_exported_model
from keras_resnet.export.signatures import MASK_NAME, OUTPUT_NAME
from keras_resnet.predict.progress import terminal_progress
from keras_resnet.runs import RUN_INFO_FILE, read_run_info
from keras_resnet.tiling import (
    DEFAULT_OVERLAP,
    DEFAULT_TILE_BATCH,
    as_image,
    detect_tiled,
    keras_segment_function,
    model_tile,
    segment_tiled,
)
from keras_resnet_settings import check_setting
from keras_resnet_settings.errors import ConfigError, ModelError
from keras_resnet_settings.registry import DETECTION, SEGMENTATION

TILE_MODES = ("auto", "off")
AUTO_TILE_FACTOR = 2  # auto tiles an image at least this many times the model input on a side
CROP_SAMPLING = "crop"


def tile_request(tile) -> str | int:
    """`tile` checked: "auto", "off" or a positive int side (an int-like string too)."""
    if isinstance(tile, str) and tile in TILE_MODES:
        return tile
    try:
        side = int(tile)
    except (TypeError, ValueError):
        side = 0
    if side < 1 or (not isinstance(tile, str) and side != tile):
        raise ConfigError(f"tile must be 'auto', 'off' or a positive int tile side, got {tile!r}")
    return side


def run_info_near(path) -> dict:
    """The `run.json` of a run dir, or of the run dir holding a `.keras` file; {} when there is none."""
    path = Path(path)
    if path.is_dir():
        return read_run_info(path)
    return read_json(path.parent / RUN_INFO_FILE) if (path.parent / RUN_INFO_FILE).is_file() else {}


def decoder_setting(info: dict, key: str, default):
    """A decoder setting from an export's metadata ("detection" "decoder") or a run's run.json ("decoder")."""
    decoder = (info.get("detection") or {}).get("decoder") or info.get("decoder") or {}
    return default if decoder.get(key) is None else decoder[key]


@dataclass(frozen=True)
class TilePlan:
    """Whether and how to tile each image.

    Attributes:
        mode: "auto", "off" or an int tile side.
        input_size: the model's `(height, width)`; None entries when unknown (a
            dynamic-size Keras model without a run.json).
        crop_trained: the run sampled crops for training (`data.sampling: crop`).
        overlap: the window overlap.
    """

    mode: str | int
    input_size: tuple
    crop_trained: bool
    overlap: float

    def window(self, height: int, width: int) -> tuple[int, int] | None:
        """The window size for an image of this size, or None to run it whole (resized/letterboxed)."""
        if self.mode == "off":
            return None
        if self.mode != "auto":
            return int(self.mode), int(self.mode)
        input_height, input_width = self.input_size
        if input_height is None or input_width is None:
            return None
        large = height >= AUTO_TILE_FACTOR * input_height or width >= AUTO_TILE_FACTOR * input_width
        return (int(input_height), int(input_width)) if self.crop_trained or large else None


def tile_plan(tile, overlap, input_size, info: dict, fixed: bool, where) -> TilePlan:
    """The `TilePlan` of a request, checked once for the model.

    Args:
        tile: "auto", "off" or an int tile side.
        overlap: the window overlap, or None for the run's `tile_overlap`
            (run.json or export metadata), else 0.25.
        input_size: the model's `(height, width)` (None entries: dynamic).
        info: the run.json or export metadata.
        fixed: the model takes only its input size (exports, most `.keras`).
        where: the model, for messages.

    Raises:
        ConfigError: a tile side that is not the input size of a fixed-size model, or a bad overlap.
    """
    mode = tile_request(tile)
    input_size = tuple(None if v is None else int(v) for v in input_size)
    if not fixed and None in input_size and info.get("input_shape"):
        input_size = tuple(int(v) for v in info["input_shape"][:2])
    if isinstance(mode, int) and fixed and (mode, mode) != input_size:
        raise ConfigError(
            f"--tile {mode} does not fit {where}, which takes {input_size[0]}x{input_size[1]} inputs; "
            "use --tile auto (windows of the model input) or --tile off"
        )
    overlap = info.get("tile_overlap", DEFAULT_OVERLAP) if overlap is None else overlap
    overlap = check_setting("data.tile_overlap", overlap, shown_as="tile overlap")
    return TilePlan(mode, input_size, info.get("sampling") == CROP_SAMPLING, overlap)


def _exported_tile(model: ExportedModel, tile) -> tuple[int, int]:
    size = tuple(model.input_shape[:2])
    if tile is None:
        return size
    wanted = (int(tile), int(tile)) if np.ndim(tile) == 0 else tuple(int(v) for v in tile)
    if wanted != size:
        raise ConfigError(f"tile {wanted} does not fit {model.path}, which takes {size[0]}x{size[1]} inputs")
    return size


def _image_for(image, channels: int, info: dict | None = None) -> np.ndarray:
    """The pixels of an array or image file (16-bit files at the `bit_depth` of `info`, the run.json or metadata)."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image, channels, recorded_bit_depth(info)).astype(np.float32)
    return as_image(image)


def _predict_exported(model: ExportedModel, image, tile, overlap, batch_size, progress) -> dict:
    window = _exported_tile(model, tile)
    image = _image_for(image, model.input_shape[-1], model.metadata)
    if model.task == SEGMENTATION:
        probabilities = segment_tiled(
            lambda windows: model.predict_outputs(windows)[OUTPUT_NAME], image, window, overlap, batch_size,
            terminal_progress(progress),
        )
        return {OUTPUT_NAME: probabilities, MASK_NAME: probabilities.argmax(-1).astype(np.int32)}
    if model.task == DETECTION:
        return detect_tiled(
            model.predict_outputs, image, window, overlap, batch_size,
            iou_threshold=decoder_setting(model.metadata, "iou_threshold", 0.5),
            max_detections=decoder_setting(model.metadata, "max_detections", 100),
            progress=terminal_progress(progress),
        )
    raise ModelError(f"{model.path} is a {model.task} model; tiled prediction is for segmenters and detectors")


def predict_tiled(model, image, tile=None, overlap: float = DEFAULT_OVERLAP, batch_size: int = DEFAULT_TILE_BATCH,
                  progress: bool | None = None) -> dict:
    """Segment or detect in an image of any size at its own resolution, window by window.

    Args:
        model: a `ResNetSegmenter` or `RetinaNetDetector` (or any Keras
            segmenter: a `(N, H, W, classes)` output), an `ExportedModel`, or
            a path to a `.keras` file, run dir, SavedModel dir, `.tflite` or
            `.onnx`. Models take raw pixels 0..255, NHWC.
        image: `(h, w, C)` or `(h, w)` pixels 0..255 of any size, or an image file
            (16-bit: read at the run's `bit_depth` for a model path or
            `ExportedModel`; a Keras model object carries none, so the image's own).
        tile: the window side (an int) or `(height, width)`; None: the model
            input. Models with a fixed input (exports, detectors) take only
            that; a dynamic-size Keras segmenter needs one.
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        batch_size: windows run at a time (bounds memory).
        progress: show a progress bar (None: on a terminal when there are
            more than 16 windows).

    Returns:
        Segmenters: `{"probabilities": float32 (h, w, K), "mask": int32 (h, w)}`
        at the image size (probabilities blended where windows overlap).
        Detectors: `{"boxes": float32 (K, 4) xyxy image pixels, "scores",
        "classes"}`, merged across windows by class-wise NMS.

    Raises:
        ModelError: a classifier, or an unreadable model.
        ConfigError: a tile that does not fit the model, a bad overlap.

    Example:
    >>> segmenter = ResNetSegmenter.from_preset("resnet18", 5, input_shape=(256, 256, 3))
    >>> out = predict_tiled(segmenter, np.zeros((1000, 1500, 3)), overlap=0.25)
    >>> out["mask"].shape
    (1000, 1500)
    >>> predict_tiled("saved_models/aerial/aerial_fp32.tflite", "field.jpg")["boxes"]
    """
    if isinstance(model, (str, os.PathLike)):
        model = load_exported_model(model)
    if isinstance(model, ExportedModel):
        return _predict_exported(model, image, tile, overlap, batch_size, progress)
    if not isinstance(model, keras.Model):
        raise ModelError(f"predict_tiled takes a Keras model, an ExportedModel or a model path, not {type(model)}")
    image = _image_for(image, model.input_shape[-1])
    hook = terminal_progress(progress)
    if hasattr(model, "predict_tiled"):  # ResNetSegmenter, RetinaNetDetector
        return model.predict_tiled(image, tile=tile, overlap=overlap, batch_size=batch_size, progress=hook)
    if len(model.output_shape) == 4:
        probabilities = segment_tiled(keras_segment_function(model), image, model_tile(model, tile), overlap,
                                      batch_size, hook)
        return {OUTPUT_NAME: probabilities, MASK_NAME: probabilities.argmax(-1).astype(np.int32)}
    raise ModelError(f"{model.name} is not a segmenter or detector; tiled prediction is for those")


__all__ = [
    "TilePlan",
    "decoder_setting",
    "predict_tiled",
    "run_info_near",
    "tile_plan",
    "tile_request",
]
