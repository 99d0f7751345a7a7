"""What classifier and segmenter exports share: they serve the model's own output.

A classifier's export returns its output ("probabilities": softmax, or
logits for a logits model); a segmenter's (any model with a `(N, H, W,
classes)` output) returns "probabilities" (per-pixel softmax, added when
the model outputs logits) and "mask" (int32 argmax) at the input
resolution. The SavedModel has two endpoints: `serving_default` (uint8
images of any size, resized inside; each task's `serve_uint8`) and
`serve_float` (float32 raw pixels at the model size).
"""

from __future__ import annotations

import tensorflow as tf

from keras_resnet.export.keras_model import as_float32, model_at_size
from keras_resnet.export.parity import difference_text, relative_diff_rule
from keras_resnet.export.samples import DENSE_SAMPLES
from keras_resnet.export.signatures import (
    OUTPUT_NAME,
    input_metadata,
    output_spec,
    outputs_fn,
    uint8_image_spec,
)
from keras_resnet.export.steps import ExportJob
from keras_resnet_settings.errors import ExportError


class DenseExport(ExportJob):
    """The export of a classifier or segmenter; `signatures` describes its SavedModel endpoints."""

    samples = DENSE_SAMPLES
    int8_ops = "TFLITE_BUILTINS_INT8 (full-integer kernels)"
    signatures: dict

    def check_request(self) -> None:
        if self.request.detection_outputs != "decoded" or self.request.decoder_args:
            raise ExportError("detection_outputs and decoder_args apply to detectors only")

    def prepare(self):
        self.spec = output_spec(self.source.model)
        return model_at_size(as_float32(self.source.model), self.request.input_size)

    @property
    def output_names(self) -> tuple:
        return self.spec.output_names

    def outputs_fn(self):
        return outputs_fn(self.model, self.spec)

    def resized(self, images):
        """uint8 images of any size as float32 at the model size (bilinear)."""
        height, width = self.model.input_shape[1:3]
        return tf.image.resize(tf.cast(images, tf.float32), [height, width], method="bilinear")

    def saved_model_endpoints(self) -> dict:
        return {
            "serving_default": (lambda images: self.serve_uint8(images), [uint8_image_spec(self.model.input_shape[-1])]),
            "serve_float": (self.outputs_fn(), [self.image_spec()]),
        }

    float_rule = staticmethod(relative_diff_rule)

    def summary(self, figures: dict) -> str:
        return f"{difference_text(figures)}, {self.agreement_text(figures)}"

    def failure(self, figures: dict) -> str:
        return f"relative max diff {figures['relative_max_diff']:.3g}, {self.failure_agreement(figures)}"

    def output_values(self) -> str:
        """What the output holds, from the classifier's activation."""
        activation = getattr(self.model, "activation", "softmax")
        return {
            "softmax": "class probabilities (softmax)",
            "sigmoid": "per-class scores (sigmoid)",
            None: "logits (no activation)",
        }.get(activation, f"{activation} outputs")

    def metadata(self) -> dict:
        metadata = {
            **self.metadata_head(),
            **self.metadata_shape(),
            "input": input_metadata(),
            "output": {"name": OUTPUT_NAME, "dtype": "float32", "values": self.output_values()},
            "preprocessing": self.preprocessing(),
            "num_classes": int(self.model.output_shape[-1]),
            "class_names": self.source.class_names,
            "parity": None,  # filled in by the check
            **self.metadata_tail(),
        }
        metadata.update(self.task_metadata())
        if self.request.format == "saved_model":
            metadata["signatures"] = self.signatures
        return metadata

    def task_metadata(self) -> dict:
        """The task's own metadata entries ("output" replaced in place, the others after "created")."""
        return {}
