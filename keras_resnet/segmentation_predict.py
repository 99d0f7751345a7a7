"""Masks and colour overlays from a trained `ResNetSegmenter` or its exports.

`predict_masks` runs a `.keras` segmenter (or a training run folder), or a
segmenter exported by `keras_resnet.export` (SavedModel dir, `.tflite`,
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

OVERLAY_ALPHA = 0.5
IGNORE_COLOR = (255, 255, 255)


def color_palette(num_classes: int) -> np.ndarray:
    """The Pascal VOC colour map: `(num_classes, 3)` uint8, class 0 black.

    Colours come from the bits of the class index, so they are distinct
    and stable whatever the number of classes (up to 256).
    """
    palette = np.zeros((num_classes, 3), np.uint8)
    for index in range(num_classes):
        value, red, green, blue = index, 0, 0, 0
        for shift in range(7, -1, -1):
            red |= ((value >> 0) & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[index] = (red, green, blue)
    return palette


def colorize_mask(mask: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """`(H, W)` class indices -> `(H, W, 3)` uint8 colours; ignored pixels white."""
    mask = np.asarray(mask)
    palette = color_palette(num_classes)
    colors = palette[np.clip(mask, 0, num_classes - 1)]
    colors[mask == ignore_index] = IGNORE_COLOR
    return colors


def overlay_mask(image: np.ndarray, mask: np.ndarray, num_classes: int, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Blend the mask's colours over an image (`(H, W)`, `(H, W, 1)` or `(H, W, 3)`, 0..255).

    Returns:
        `(H, W, 3)` uint8: `(1 - alpha) * image + alpha * colour`.
    """
    image = np.asarray(image, np.float32)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    blended = (1 - alpha) * image + alpha * colorize_mask(mask, num_classes).astype(np.float32)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def save_index_mask(mask: np.ndarray, path: str | os.PathLike, num_classes: int) -> None:
    """Write class indices as a palette PNG (mode "P"; 16-bit grayscale above 256 classes)."""
    if num_classes <= 256:
        image = Image.fromarray(np.asarray(mask, np.uint8), mode="P")
        image.putpalette(color_palette(256).ravel().tolist())
    else:
        image = Image.fromarray(np.asarray(mask, np.uint16))
    image.save(path)


def load_segmenter(model_path_or_run_dir: str | os.PathLike):
    """Load a `.keras` segmenter, or the `best_model.keras` of a training run folder."""
    import keras

    import keras_resnet.segmenter  # noqa: F401  (registers the custom objects)

    path = Path(model_path_or_run_dir)
    if path.is_dir():
        path = path / "best_model.keras"
    if not path.is_file():
        raise ValueError(f"no segmentation model at {path}; pass a .keras file or a training run folder")
    model = keras.saving.load_model(path, compile=False)
    if not hasattr(model, "num_classes") or len(model.output_shape) != 4:
        raise ValueError(f"{path} is not a segmentation model (its output shape is {model.output_shape})")
    return model


def _is_export(path: Path) -> bool:
    return path.suffix in (".tflite", ".onnx") or (path.is_dir() and (path / "saved_model.pb").is_file())


def _mask_predictor(model_or_path):
    """`(input_shape, num_classes, image (H, W, C) float32 -> int32 mask (H, W))` of a segmenter or export."""
    from keras_resnet.export import SEGMENTATION, ExportedModel, load_exported_model

    if isinstance(model_or_path, ExportedModel) or _is_export(Path(model_or_path)):
        exported = model_or_path if isinstance(model_or_path, ExportedModel) else load_exported_model(model_or_path)
        if exported.task != SEGMENTATION:
            raise ValueError(f"{exported.path} is not a segmentation model: its output is not per-pixel")

        def predict(image):
            return exported.predict_outputs(image[None])["mask"][0]

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
            `.tflite` or `.onnx` written by `keras_resnet.export`) or an
            `ExportedModel`.
        images: an image file or folder, or a list of them (folders are
            searched recursively).
        output_dir: where `<stem>_mask.png` and `<stem>_overlay.png` go
            (created if needed).

    Returns:
        `[{"image": path, "mask": path, "overlay": path}, ...]` in input order.

    Raises:
        ValueError: missing model or image, an unreadable image, or a model
            that is not a segmenter.

    Example:
    >>> predict_masks("runs/mosaic_deeplabv3plus_resnet18", "photos/", "masks_out")
    >>> predict_masks("saved_models/mosaic/mosaic_int8.tflite", "photos/", "masks_out")
    """
    from keras_resnet.predict import find_image_files, load_image

    (height, width, channels), num_classes, predict = _mask_predictor(model_path_or_run_dir)
    files = find_image_files(images)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for path in files:
        try:
            with Image.open(path) as image:
                original = np.asarray(image.convert("RGB"))
        except Exception as error:  # PIL raises many exception types for bad files
            raise ValueError(f"cannot read image {path}: {type(error).__name__}: {error}") from None
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
