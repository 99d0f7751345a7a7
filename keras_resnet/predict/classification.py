"""Top-k predictions from any model form: `.keras`, run dir, SavedModel, TFLite, ONNX.

Every form is run the same way: images are decoded with PIL, converted to
the model's channel count (grayscale "L" or "RGB"; alpha dropped), resized
to the model's input size with `tf.image.resize` (bilinear, as in the
training input pipeline) and fed as float32 raw pixels 0..255, NHWC; 16-bit
images are read at the run's `bit_depth` (run.json or export metadata), as
in training. Class
names come from the metadata JSON written beside an export
(`<artefact>.json`) or from a run's `run.json`.
"""

from __future__ import annotations

import os

import numpy as np

from keras_resnet.data.images import find_image_files, load_images, recorded_bit_depth
from keras_resnet.export.loading import load_exported_model
from keras_resnet_settings.errors import ConfigError, ModelError
from keras_resnet_settings.registry import CLASSIFICATION

LOAD_CHUNK = 256  # images decoded and run at a time


def predict_files(model_path: str | os.PathLike, images, top_k: int = 5) -> list[dict]:
    """Classify image files with a `.keras` file, run dir, SavedModel, `.tflite` or `.onnx`.

    Args:
        model_path: the model or export (see `keras_resnet.export.loading.load_exported_model`).
        images: an image file or folder, or a list of them (folders expanded recursively).
        top_k: classes reported per image (capped at the number of classes).

    Returns:
        `[{"image": path, "top": [{"index": i, "class": name, "score": p}, ...]}, ...]`
        in input order, best class first. `class` is the class name when the
        metadata has them, else the index as a string.

    Raises:
        ModelError: missing model path, or a model that is not a classifier.
        DataError: missing or unreadable image.
        ConfigError: bad `top_k`.
    """
    if int(top_k) < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    model = load_exported_model(model_path)
    if model.task != CLASSIFICATION:
        raise ModelError(
            f"{model_path} is a {model.task} model; use keras_resnet.predict.segmentation.predict_masks "
            "(or `keras-resnet predict`, which writes mask overlays)"
        )
    files = find_image_files(images)
    height, width, channels = model.input_shape
    bit_depth = recorded_bit_depth(model.metadata)
    probabilities = np.concatenate(
        [
            model.predict(load_images(files[start : start + LOAD_CHUNK], height, width, channels, bit_depth))
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
