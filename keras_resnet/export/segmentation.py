"""Segmenter exports: per-pixel "probabilities" and "mask", and pixel parity with Keras.

A segmenter's export (any model with a `(N, H, W, classes)` output, e.g.
`ResNetSegmenter`) returns two outputs at the input resolution:
"probabilities" `(N, H, W, classes)`, per-pixel softmax (added at export
when the model outputs logits), and "mask" `(N, H, W)` int32, the argmax
class of the model's output (builtin ARG_MAX in TFLite, ArgMax in ONNX).
The SavedModel's `serving_default` resizes its per-pixel scores back to
the size of the images given and returns `probabilities` and `mask`
there; its `serve_float` returns both at the model size.

Parity: float exports must match Keras' per-pixel probabilities to a
relative max difference of 1e-4, or, for a model that outputs logits, to what
logits agreeing to 1e-4 of their magnitude allow (`softmax_tolerance`: half of
that; large logits saturate the softmax); int8 must agree with Keras on the argmax
class of at least `int8_min_agreement` of the pixels (0.98 by default).
The figures also give the mIoU of the export's masks taken against Keras'
masks. Keras and the export run chunk by chunk, so large parity sets fit
in memory.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_resnet.export.model_output import DenseExport
from keras_resnet.export.parity import SegmentationParity
from keras_resnet.export.saved_model import load_saved_model, signature_runtime
from keras_resnet.export.signatures import (
    INPUT_FORMAT,
    MASK_NAME,
    OUTPUT_NAME,
    PREDICT_CHUNK,
    segmentation_outputs,
)
from keras_resnet_settings.registry import SEGMENTATION

DEFAULT_SEGMENTATION_INT8_MIN_AGREEMENT = 0.98
SEGMENTATION_CHUNK_VALUES = 1 << 22  # output values per chunk of a segmenter's parity check (16 MB)


def segmentation_chunk(input_shape, num_classes: int) -> int:
    """Images per chunk of a segmenter's parity check: outputs of at most ~16 MB."""
    height, width, _ = input_shape
    return int(max(1, min(PREDICT_CHUNK, SEGMENTATION_CHUNK_VALUES // (height * width * num_classes))))


class SegmentationExport(DenseExport):
    """The export of a segmenter (see the module docstring)."""

    task = SEGMENTATION
    default_int8_min_agreement = DEFAULT_SEGMENTATION_INT8_MIN_AGREEMENT
    int8_io = "float32 input and output; quantize/dequantize ops inside the model; the mask output is int32"
    integer_io = (
        "{io} input (raw pixels, scale 1, zero point {zero_point}) and {io} probabilities (scale and zero point in "
        "io_quantization); the mask output is int32; integer from input to output"
    )
    signatures = {
        "serving_default": "uint8 images [N, H, W, C] of any size, resized inside to the model size "
        "(bilinear); per-pixel scores resized back to H x W (bilinear) -> "
        "{probabilities [N, H, W, classes], mask (int32) [N, H, W]}",
        "serve_float": f"{INPUT_FORMAT} at the model size -> {{probabilities, mask (int32)}}",
    }

    def serve_uint8(self, images):
        scores = self.model(self.resized(images), training=False)
        scores = tf.image.resize(scores, tf.shape(images)[1:3], method="bilinear")
        return segmentation_outputs(scores, self.spec.logits)

    def parity(self, exported, images, info) -> dict:
        figures = self.chunked_parity(exported.predict_outputs, images)
        if self.request.format == "saved_model":
            figures["checks"] = {"serving_default": self.check_serving_default(images)}
        return figures

    def chunked_parity(self, run_export, images: np.ndarray) -> dict:
        """Streams images through Keras and `run_export` (`float32 chunk -> {probabilities, mask}`)."""
        num_classes = int(self.model.output_shape[-1])
        parity = SegmentationParity(num_classes)
        step = segmentation_chunk(self.model.input_shape[1:], num_classes)
        for start in range(0, len(images), step):
            chunk = images[start : start + step]
            scores = self.model(tf.constant(chunk, tf.float32), training=False)  # what every export computes from
            reference = segmentation_outputs(scores, self.spec.logits)
            if self.spec.logits:  # the probabilities are the export's softmax of these
                parity.add_logits(scores.numpy())
            exported = run_export(chunk)
            parity.update(
                reference[OUTPUT_NAME].numpy(), exported[OUTPUT_NAME], reference[MASK_NAME].numpy(),
                exported[MASK_NAME],
            )
        return parity.figures()

    def check_serving_default(self, images: np.ndarray) -> dict:
        """Parity of the SavedModel's uint8 `serving_default` on the rounded images (model size)."""
        pixels = np.clip(np.round(images), 0, 255).astype(np.float32)
        runtime = signature_runtime(load_saved_model(self.written), "serving_default")
        serve = runtime.runner(runtime.outputs)
        return self.chunked_parity(lambda chunk: serve(chunk.astype(np.uint8)), pixels)

    def int8_rule(self, figures: dict) -> tuple[str, bool]:
        return f"pixel agreement >= {self.int8_min_agreement:g}", figures["pixel_agreement"] >= self.int8_min_agreement

    def agreement_text(self, figures: dict) -> str:
        return (
            f"pixel agreement {100 * figures['pixel_agreement']:.2f}%, "
            f"mask mIoU vs Keras {figures['mask_miou']:.4f}"
        )

    def failure_agreement(self, figures: dict) -> str:
        return f"pixel agreement {figures['pixel_agreement']:.4f}"

    def task_metadata(self) -> dict:
        """The "output", "outputs" and "segmentation" entries of a segmenter's metadata."""
        height, width, _ = self.model.input_shape[1:]
        num_classes = int(self.model.output_shape[-1])
        added = "softmax added at export over the model's logits" if self.spec.logits else "the model's softmax output"
        probabilities = {
            "name": OUTPUT_NAME,
            "dtype": "float32",
            "shape": [self.batch_text, height, width, num_classes],
            "values": f"per-pixel class probabilities ({added}), at the input resolution",
        }
        mask = {
            "name": MASK_NAME,
            "dtype": "int32",
            "shape": [self.batch_text, height, width],
            "values": "per-pixel argmax class of the model's output (class index, 0..num_classes-1)",
        }
        run_info, model = self.source.run_info, self.source.model
        backbone = getattr(model, "backbone", None)
        return {
            "output": probabilities,
            "outputs": [probabilities, mask],
            "segmentation": {
                "head": run_info.get("head", getattr(model, "head", None)),
                "output_stride": run_info.get("output_stride", getattr(backbone, "output_stride", None)),
                "model_output": "logits" if self.spec.logits else "softmax",
                "ignore_index": run_info.get("ignore_index"),
            },
        }
