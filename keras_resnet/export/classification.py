"""Classifier exports: "probabilities" `(N, classes)`, and top-1 parity with Keras.

The SavedModel's `serving_default` takes uint8 images `[N, H', W', C]` of
any size, resized inside with bilinear `tf.image.resize`, and returns
`probabilities`, `top_class` and `top_score`; `serve_float` takes float32
raw pixels at the model size and returns `probabilities`.

Parity: float exports must match Keras to a relative max difference of
1e-4; int8 must agree with Keras on the top-1 class for at least
`int8_min_agreement` of the samples (0.99 by default: with fewer than 100
samples that means every sample).
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from keras_resnet.export.model_output import DenseExport
from keras_resnet.export.parity import parity_figures
from keras_resnet.export.saved_model import load_saved_model, signature_runtime
from keras_resnet.export.signatures import INPUT_FORMAT, OUTPUT_NAME, batches
from keras_resnet_settings.registry import CLASSIFICATION

DEFAULT_INT8_MIN_AGREEMENT = 0.99


def keras_outputs(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """The Keras model's probabilities, computed in chunks."""
    return np.concatenate(
        [keras.ops.convert_to_numpy(model(batch, training=False)) for batch, _ in batches(images, None)]
    )


class ClassificationExport(DenseExport):
    """The export of a classifier (see the module docstring)."""

    task = CLASSIFICATION
    default_int8_min_agreement = DEFAULT_INT8_MIN_AGREEMENT
    reference_step = "running the Keras model"
    int8_io = "float32 input and output; quantize/dequantize ops inside the model"
    integer_io = (
        "{io} input (raw pixels, scale 1, zero point {zero_point}) and {io} output (its scale and zero point in "
        "io_quantization); integer from input to output"
    )
    signatures = {
        "serving_default": "uint8 images [N, H, W, C] of any size, resized inside (bilinear) -> "
        "{probabilities, top_class (int32), top_score}",
        "serve_float": f"{INPUT_FORMAT} at the model size -> {{probabilities}}",
    }

    def serve_uint8(self, images):
        scores = self.model(self.resized(images), training=False)
        return {
            OUTPUT_NAME: scores,
            "top_class": tf.argmax(scores, axis=-1, output_type=tf.int32),
            "top_score": tf.reduce_max(scores, axis=-1),
        }

    def keras_reference(self, images) -> None:
        self.reference = keras_outputs(self.model, images)

    def parity(self, exported, images, info) -> dict:
        figures = parity_figures(self.reference, exported.predict(images))
        if self.request.format == "saved_model":
            figures["checks"] = {"serving_default": self.check_serving_default(images)}
        return figures

    def check_serving_default(self, images: np.ndarray) -> dict:
        """Parity of the SavedModel's uint8 `serving_default` on the rounded images."""
        pixels = np.clip(np.round(images), 0, 255).astype(np.uint8)
        reference = keras_outputs(self.model, pixels.astype(np.float32))
        outputs = signature_runtime(load_saved_model(self.written), "serving_default").run(pixels)
        figures = parity_figures(reference, outputs[OUTPUT_NAME])
        figures["top_class_matches_argmax"] = bool(
            np.array_equal(outputs["top_class"], np.argmax(outputs[OUTPUT_NAME], axis=-1))
        )
        return figures

    def int8_rule(self, figures: dict) -> tuple[str, bool]:
        allowed = math.floor((1.0 - self.int8_min_agreement) * figures["samples"] + 1e-9)
        criterion = (
            f"top-1 agreement >= {self.int8_min_agreement:g} "
            f"(at most {allowed} of {figures['samples']} samples may differ)"
        )
        return criterion, figures["top1_disagreements"] <= allowed

    def agreement_text(self, figures: dict) -> str:
        return f"top-1 agreement {100 * figures['top1_agreement']:.1f}%"

    def failure_agreement(self, figures: dict) -> str:
        return f"top-1 agreement {figures['top1_agreement']:.3f}"
