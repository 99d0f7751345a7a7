"""Top-k predictions from any model form: `.keras`, run dir, SavedModel, TFLite, ONNX.

Every form is run the same way: images are decoded with PIL, converted to
the model's channel count (grayscale "L" or "RGB"; alpha dropped), resized
to the model's input size with `tf.image.resize` (bilinear, as in the
training input pipeline) and fed as float32 raw pixels 0..255, NHWC. Class
names come from the metadata JSON written beside an export
(`<artefact>.json`) or from a run's `run.json`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from keras_resnet.export.api import load_exported_model

LOAD_CHUNK = 256  # images decoded and run at a time
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def find_image_files(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Expand image files and folders into a list of image files.

    Folders are searched recursively for files with an image extension
    (any case; hidden entries skipped) and listed in sorted order; files are
    kept as given, whatever their extension.

    Args:
        paths: one path or several.

    Returns:
        Image file paths, folders expanded in place.

    Raises:
        ValueError: a path does not exist, or a folder holds no images.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[str] = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(str(path))
        elif path.is_dir():
            found = sorted(
                str(p)
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise ValueError(f"folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            files.extend(found)
        else:
            raise ValueError(f"image path {path} does not exist")
    return files


def load_image(path: str | os.PathLike, height: int, width: int, channels: int) -> np.ndarray:
    """Read one image as float32 raw pixels 0..255, shape `(height, width, channels)`.

    Args:
        path: image file.
        height, width: model input size; the image is resized to it (bilinear).
        channels: 1 (converted to grayscale) or 3 (converted to RGB).

    Raises:
        ValueError: the file is missing or is not a readable image (names the file).
    """
    if channels not in (1, 3):
        raise ValueError(f"models take 1 or 3 channel images, not {channels}")
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
    except FileNotFoundError:
        raise ValueError(f"image {path} does not exist") from None
    except Exception as error:  # PIL raises many exception types for bad files
        raise ValueError(f"cannot read image {path}: {type(error).__name__}: {error}") from None
    if channels == 1:
        array = array[..., None]
    if array.shape[:2] == (height, width):
        return array
    import tensorflow as tf

    return tf.image.resize(array, [height, width], method="bilinear").numpy()


def load_images(paths: Sequence[str], height: int, width: int, channels: int) -> np.ndarray:
    """Stack `load_image` over several files into a `(N, height, width, channels)` array."""
    return np.stack([load_image(path, height, width, channels) for path in paths]).astype(np.float32)


def predict_files(model_path: str | os.PathLike, images, top_k: int = 5) -> list[dict]:
    """Classify image files with a `.keras` file, run dir, SavedModel, `.tflite` or `.onnx`.

    Args:
        model_path: the model or export (see `keras_resnet.export.api.load_exported_model`).
        images: an image file or folder, or a list of them (folders expanded recursively).
        top_k: classes reported per image (capped at the number of classes).

    Returns:
        `[{"image": path, "top": [{"index": i, "class": name, "score": p}, ...]}, ...]`
        in input order, best class first. `class` is the class name when the
        metadata has them, else the index as a string.

    Raises:
        ValueError: missing model or image path, unreadable image, bad `top_k`.
    """
    if int(top_k) < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    model = load_exported_model(model_path)
    if model.task != "classification":
        raise ValueError(
            f"{model_path} is a {model.task} model; use keras_resnet.predict.segmentation.predict_masks "
            "(or `keras-resnet predict`, which writes mask overlays)"
        )
    files = find_image_files(images)
    height, width, channels = model.input_shape
    probabilities = np.concatenate(
        [
            model.predict(load_images(files[start : start + LOAD_CHUNK], height, width, channels))
            for start in range(0, len(files), LOAD_CHUNK)
        ]
    )
    class_names = model.class_names
    results = []
    for path, scores in zip(files, probabilities):
        best = np.argsort(-scores, kind="stable")[: int(top_k)]
        results.append(
            {
                "image": path,
                "top": [
                    {
                        "index": int(i),
                        "class": class_names[i] if class_names and i < len(class_names) else str(int(i)),
                        "score": float(scores[i]),
                    }
                    for i in best
                ],
            }
        )
    return results
