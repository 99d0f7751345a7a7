"""Masks and colour overlays from a trained `ResNetSegmenter` or its exports.

`predict_masks` runs a `.keras` segmenter (or a training run folder), or a
segmenter exported by `keras_resnet.export.export_model` (SavedModel dir, `.tflite`,
`.onnx`), on image files of any size: each image is converted to the
model's channel count, resized (bilinear) to the model's input size when
the model has a fixed one (exports always do), segmented, and the
predicted index mask (an export's "mask" output) is resized back to the
image's original size with nearest-neighbour interpolation (so it holds
class indices only). For each image it writes

    <stem>_mask.png      the class indices at the original size (a palette
                         PNG: pixel values are class ids, viewers show colours)
    <stem>_overlay.png   the palette colours blended over the original image

With `tile` ("auto", or a tile side) large images are not resized but
segmented at their own resolution by windows of the model input
(`keras_resnet.predict.tiling`): per-pixel probabilities are blended where
windows overlap and their argmax is the mask.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import keras_resnet.models.segmentation.segmenter  # noqa: F401  (registers the custom objects)
from keras_resnet.data.images import (
    find_image_files,
    load_image,
    read_image,
    recorded_bit_depth,
)
from keras_resnet.export.loading import as_exported_model
from keras_resnet.export.signatures import MASK_NAME
from keras_resnet.predict.progress import terminal_progress
from keras_resnet.predict.tiling import run_info_near, tile_plan
from keras_resnet.runs import BEST_MODEL_FILE, load_keras_model
from keras_resnet.tiling import (
    DEFAULT_TILE_BATCH,
    keras_segment_function,
    segment_tiled,
)
from keras_resnet.visualize import overlay_mask, save_index_mask
from keras_resnet_settings.errors import ModelError
from keras_resnet_settings.registry import SEGMENTATION


def load_segmenter(model_path_or_run_dir: str | os.PathLike):
    """Load a `.keras` segmenter (a model with an `(N, H, W, classes)` output) or a run folder's `best_model.keras`."""
    path = Path(model_path_or_run_dir)
    if path.is_dir():
        path = path / BEST_MODEL_FILE
    if not path.is_file():
        raise ModelError(f"no segmentation model at {path}; pass a .keras file or a training run folder")
    model = load_keras_model(path)
    if not isinstance(model.output_shape, tuple) or len(model.output_shape) != 4:
        raise ModelError(f"{path} is not a segmentation model (its output shape is {model.output_shape})")
    return model


@dataclass
class _Segmenter:
    """A segmenter of any form, as `predict_masks` runs it."""

    input_shape: tuple  # (height, width, channels); height/width None for a dynamic-size .keras model
    num_classes: int
    mask: Callable  # image (H, W, C) float32 at input_shape -> int32 mask (H, W)
    probabilities: Callable  # float32 windows (n, h, w, C) -> (n, h, w, classes)
    info: dict  # run.json or export metadata
    fixed: bool  # takes its input size only
    where: str


def _segmenter(model_or_path) -> _Segmenter:
    """The `_Segmenter` of a `.keras` file, run dir, export path or `ExportedModel`."""
    exported = as_exported_model(model_or_path)
    if exported is not None:
        if exported.task != SEGMENTATION:
            raise ModelError(f"{exported.path} is not a segmentation model: its output is not per-pixel")

        def mask(image):
            return exported.predict_outputs(image[None])[MASK_NAME][0]

        num_classes = exported.num_classes or int(exported.predict(np.zeros((1, *exported.input_shape))).shape[-1])
        return _Segmenter(exported.input_shape, num_classes, mask, lambda windows: exported.predict(windows),
                          exported.metadata, True, exported.path)

    model = load_segmenter(model_or_path)

    def mask(image):
        return np.asarray(model.predict_on_batch(image[None])[0]).argmax(axis=-1)

    input_shape = model.input_shape[1:]
    num_classes = getattr(model, "num_classes", None) or int(model.output_shape[-1])
    return _Segmenter(input_shape, num_classes, mask, keras_segment_function(model),
                      run_info_near(model_or_path), None not in input_shape[:2], str(model_or_path))


def predict_masks(model_path_or_run_dir, images, output_dir, tile="off", overlap=None,
                  batch_size=DEFAULT_TILE_BATCH) -> list[dict]:
    """Segment image files and write index masks and colour overlays.

    Args:
        model_path_or_run_dir: a `.keras` `ResNetSegmenter`, a run folder
            holding `best_model.keras`, a segmenter export (SavedModel dir,
            `.tflite` or `.onnx` written by `keras_resnet.export.export_model`) or an
            `ExportedModel`.
        images: an image file or folder, or a list of them (folders are
            searched recursively).
        output_dir: where `<stem>_mask.png` and `<stem>_overlay.png` go
            (created if needed).
        tile: "off" (resize each image to the model input and the mask
            back), "auto" (tiles of the model input when the run trained on
            crops, `data.sampling: crop`, or the image is at least twice the
            input on a side) or an int tile side (the model input size for
            fixed-size models).
        overlap: tile overlap in [0, 1); None: the run's `data.tile_overlap`
            (run.json or export metadata), else 0.25.
        batch_size: tiles run at a time.

    Returns:
        `[{"image": path, "mask": path, "overlay": path, "tiled": bool}, ...]` in input order.

    Raises:
        ModelError: a missing model, or a model that is not a segmenter.
        DataError: a missing or unreadable image.
        ConfigError: a tile that does not fit the model.

    Example:
    >>> predict_masks("runs/mosaic_deeplabv3plus_resnet18", "photos/", "masks_out")
    >>> predict_masks("saved_models/mosaic/mosaic_int8.tflite", "photos/", "masks_out", tile="auto")
    """
    segmenter = _segmenter(model_path_or_run_dir)
    height, width, channels = segmenter.input_shape
    plan = tile_plan(tile, overlap, (height, width), segmenter.info, segmenter.fixed, segmenter.where)
    bit_depth = recorded_bit_depth(segmenter.info)  # 16-bit images at the training set's depth
    files = find_image_files(images)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for path in files:
        original = read_image(path, 3, bit_depth)
        original_height, original_width = original.shape[:2]
        window = plan.window(original_height, original_width)
        if window is not None:
            pixels = read_image(path, channels, bit_depth).astype(np.float32)
            probabilities = segment_tiled(segmenter.probabilities, pixels, window, plan.overlap, batch_size,
                                          progress=terminal_progress())
            mask = probabilities.argmax(axis=-1).astype(np.int32)
        else:
            model_input = load_image(path, height or original_height, width or original_width, channels, bit_depth)
            mask = np.asarray(segmenter.mask(model_input), np.int32)
        if mask.shape != (original_height, original_width):
            resized = Image.fromarray(mask.astype(np.int32)).resize((original_width, original_height), Image.NEAREST)
            mask = np.asarray(resized, np.int32)
        stem = Path(path).stem
        mask_path, overlay_path = output_dir / f"{stem}_mask.png", output_dir / f"{stem}_overlay.png"
        save_index_mask(mask, mask_path, segmenter.num_classes)
        Image.fromarray(overlay_mask(original, mask, segmenter.num_classes)).save(overlay_path)
        results.append({"image": str(path), "mask": str(mask_path), "overlay": str(overlay_path),
                        "tiled": window is not None})
    return results
