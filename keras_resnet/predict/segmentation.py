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
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

import keras_resnet.models.segmentation.segmenter  # noqa: F401  (registers the custom objects)
from keras_resnet.data.images import find_image_files, load_image, read_image
from keras_resnet.errors import ModelError
from keras_resnet.export.contract import MASK_NAME
from keras_resnet.export.loading import as_exported_model
from keras_resnet.export.source import load_keras_model
from keras_resnet.registry import SEGMENTATION
from keras_resnet.runs import BEST_MODEL_FILE
from keras_resnet.visualize import overlay_mask, save_index_mask


def load_segmenter(model_path_or_run_dir: str | os.PathLike):
    """Load a `.keras` segmenter, or the `best_model.keras` of a training run folder."""
    path = Path(model_path_or_run_dir)
    if path.is_dir():
        path = path / BEST_MODEL_FILE
    if not path.is_file():
        raise ModelError(f"no segmentation model at {path}; pass a .keras file or a training run folder")
    model = load_keras_model(path)
    if not hasattr(model, "num_classes") or len(model.output_shape) != 4:
        raise ModelError(f"{path} is not a segmentation model (its output shape is {model.output_shape})")
    return model


def _mask_predictor(model_or_path):
    """`(input_shape, num_classes, image (H, W, C) float32 -> int32 mask (H, W))` of a segmenter or export."""
    exported = as_exported_model(model_or_path)
    if exported is not None:
        if exported.task != SEGMENTATION:
            raise ModelError(f"{exported.path} is not a segmentation model: its output is not per-pixel")

        def predict(image):
            return exported.predict_outputs(image[None])[MASK_NAME][0]

        num_classes = exported.num_classes or int(exported.predict(np.zeros((1, *exported.input_shape))).shape[-1])
        return exported.input_shape, num_classes, predict

    model = load_segmenter(model_or_path)

    def predict(image):
        return np.asarray(model.predict_on_batch(image[None])[0]).argmax(axis=-1)

    return model.input_shape[1:], model.num_classes, predict


def predict_masks(model_path_or_run_dir, images, output_dir) -> list[dict]:
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

    Returns:
        `[{"image": path, "mask": path, "overlay": path}, ...]` in input order.

    Raises:
        ModelError: a missing model, or a model that is not a segmenter.
        DataError: a missing or unreadable image.

    Example:
    >>> predict_masks("runs/mosaic_deeplabv3plus_resnet18", "photos/", "masks_out")
    >>> predict_masks("saved_models/mosaic/mosaic_int8.tflite", "photos/", "masks_out")
    """
    (height, width, channels), num_classes, predict = _mask_predictor(model_path_or_run_dir)
    files = find_image_files(images)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for path in files:
        original = read_image(path, 3)
        original_height, original_width = original.shape[:2]
        model_input = load_image(path, height or original_height, width or original_width, channels)
        mask = np.asarray(predict(model_input), np.int32)
        if mask.shape != (original_height, original_width):
            resized = Image.fromarray(mask.astype(np.int32)).resize((original_width, original_height), Image.NEAREST)
            mask = np.asarray(resized, np.int32)
        stem = Path(path).stem
        mask_path, overlay_path = output_dir / f"{stem}_mask.png", output_dir / f"{stem}_overlay.png"
        save_index_mask(mask, mask_path, num_classes)
        Image.fromarray(overlay_mask(original, mask, num_classes)).save(overlay_path)
        results.append({"image": str(path), "mask": str(mask_path), "overlay": str(overlay_path)})
    return results
