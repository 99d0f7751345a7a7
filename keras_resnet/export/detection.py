"""Export of `RetinaNetDetector` models: SavedModel, TFLite and ONNX with NMS inside, or raw outputs.

`keras_resnet.export.api.export_model` hands detectors (a detection run dir, a
`RetinaNetDetector` `.keras` file or model) to `DetectionExport`. The
detector's decoder settings (score/IoU thresholds, `max_detections`,
`pre_nms_top_k`) come from the run's `run.json` ("decoder"), overridden by
`decoder_args`. Every artefact takes float32 raw pixels 0..255, NHWC, at the
model size: images letterboxed as in validation (scaled by `s = min(H / h,
W / w)` keeping the aspect ratio, bilinear with antialiasing, rounded to
uint8, padded bottom/right with 0); boxes of the model input map back to
the original image by `box / s` (clipped to it). `letterbox_images` does it
for a batch; the SavedModel's `serving_default` does it inside.

Two output layouts (`detection_outputs`):

* "decoded" (default): NMS inside. Outputs "boxes" `(B, K, 4)` float32
  xyxy pixels of the model input, "scores" `(B, K)` float32 sigmoid scores,
  "classes" `(B, K)` int32 (-1 for padding rows, whose boxes and scores are
  0) and "num_detections" `(B,)` int32, sorted by score, `K =
  max_detections`. The graph is the model followed by `DetectionDecoder`:
  top-k (anchor, class) candidates, box decoding, clipping, class-wise NMS
  by one NON_MAX_SUPPRESSION_V5 over class-offset boxes. All of it is TFLite
  builtins (no Flex ops) and plain ONNX (NonMaxSuppression). A static batch
  decodes image by image in an unrolled graph; a dynamic batch loops
  (TFLite WHILE, ONNX Loop).
* "raw": the model's output "raw" `(B, N, 4 + C)`: per anchor the box deltas
  `(dx, dy, dw, dh)` then C class logits. Decode with
  `DetectionDecoder.from_config(metadata["detection"]["decoder"])` (the
  metadata JSON holds its config: anchors, variance, thresholds), which is
  what `load_exported_model` does for raw artefacts.

The SavedModel always has both: `serving_default` (uint8 images `[N, h, w,
C]` of any size, letterboxed inside; returns boxes in the pixels of the
images given, with scores, classes, num_detections), `serve_float`
(float32 at the model size -> decoded, boxes in model-input pixels) and
`serve_raw` (float32 at the model size -> "raw").

Quantized TFLite (float16, dynamic, int8) quantizes the network only: the
backbone, FPN and heads (outputs "box_deltas" and "class_logits") are
converted with the quantization, the tail (concatenation, and for decoded
outputs the decoder and NMS) is converted in float32 on its own, and the
two flatbuffers are joined into one model (`graft_tflite`): the tail's
inputs are the network's (dequantized) outputs. Letting the converter
quantize the decoder puts the decoded boxes (and the class offsets of the
NMS trick) into int8, a step of about 1 px per 256 px of image and of
several pixels once offset, which breaks NMS; TFLite's `denylisted_nodes`
did not keep the fused decoder ops in float. int8 is full-integer
(`TFLITE_BUILTINS_INT8`) over the network with float32 input and outputs.
With `io` "uint8" / "int8" the input is integer (raw pixels, scale 1, zero
point 0 / -128) and feeds the int8 network directly; the outputs (boxes,
scores, raw: float32; classes, num_detections: int32) stay as they are,
since the decoder and NMS after the network run in float32 (the network's
outputs are dequantized into them).

Parity: see `keras_resnet.export.detection_parity`.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from keras_resnet.data.images import LETTERBOX_TEXT, letterbox_images
from keras_resnet.export.detection_parity import (
    coco_map,
    detection_parity,
    keras_reference,
    topk_cuts,
)
from keras_resnet.export.keras_model import (
    as_float32,
    check_input_size,
    make_decoder,
    rebuild_at_size,
)
from keras_resnet.export.parity import (
    difference_figures,
    float_criterion,
    within_tolerance,
)
from keras_resnet.export.samples import DETECTION_SAMPLES
from keras_resnet.export.saved_model import load_saved_model, signature_runtime
from keras_resnet.export.signatures import (
    DETECTION_NAMES,
    INPUT_FORMAT,
    RAW_NAME,
    input_metadata,
    uint8_image_spec,
)
from keras_resnet.export.steps import ExportJob
from keras_resnet.export.tflite import (
    check_builtin_ops,
    graft_tflite,
    tflite_bytes,
    tflite_ops,
)
from keras_resnet.models.retinanet.decoder import (
    decoder_from_config,  # the metadata's "nms" names it here
)
from keras_resnet_settings.errors import ExportError
from keras_resnet_settings.registry import DETECTION

DETECTION_OUTPUTS = ("decoded", "raw")
HEAD_NAMES = ("box_deltas", "class_logits")
DEFAULT_DETECTION_INT8_MIN_AGREEMENT = 0.9
DECODE_TEXT = (
    "top pre_nms_top_k (anchor, class) logits; sigmoid; deltas * box_variance; centre = anchor centre + "
    "(dx, dy) * anchor size; size = exp(min((dw, dh), log(1000/16))) * anchor size; clip to the image; "
    "class-wise NMS (iou_threshold, score_threshold, max_detections) by one NonMaxSuppressionV5 over "
    "boxes offset by class * (max(H, W) + 1)"
)
RAW_DECODE_TEXT = (
    "not in the model: keras_resnet.export.detection.decoder_from_config(metadata['detection']"
    "['decoder']) decodes 'raw'"
)


def detector_at_size(model, input_size):
    """The detector rebuilt at another input size with the same weights (anchors follow the size)."""
    if input_size is None:
        return model
    input_size = check_input_size(input_size)
    if tuple(model.input_shape[1:3]) == input_size:
        return model
    return rebuild_at_size(model, input_size)


def head_model(model):
    """images -> {"box_deltas": (B, N, 4), "class_logits": (B, N, C)}: the detector before its last concat."""
    outputs = {name: model.get_layer(name).output for name in HEAD_NAMES}
    return keras.Model(model.input, outputs, name=f"{model.name}_heads")


def detector_outputs(model, decoder, detection_outputs: str):
    """images -> the export's outputs: the decoded dict or {"raw": ...}."""

    def decoded(images):
        return decoder(model(images, training=False))

    def raw(images):
        return {RAW_NAME: model(images, training=False)}

    return decoded if detection_outputs == "decoded" else raw


class DetectionExport(ExportJob):
    """The export of a `RetinaNetDetector` (see the module docstring)."""

    task = DETECTION
    samples = DETECTION_SAMPLES
    default_int8_min_agreement = DEFAULT_DETECTION_INT8_MIN_AGREEMENT
    prepare_step = "loading the Keras detector"
    reference_step = "running the Keras detector"
    count_key = "images"
    int8_ops = (
        "network (backbone, FPN, heads) full-integer TFLITE_BUILTINS_INT8; "
        "concatenation, decoder and NMS float32 (grafted)"
    )
    qat_ops = (
        "network (backbone, FPN, heads) full-integer builtins with the ranges trained by its fake quantization; "
        "concatenation, decoder and NMS float32 (grafted)"
    )
    int8_io = "float32 input and outputs; quantize/dequantize ops inside the model"
    integer_io = (
        "{io} input (raw pixels, scale 1, zero point {zero_point}) into the int8 network; the outputs stay float: "
        "the network's outputs are dequantized into the float32 decoder and NMS (boxes, scores float32; classes, "
        "num_detections int32; raw float32)"
    )

    def check_request(self) -> None:
        if self.request.detection_outputs not in DETECTION_OUTPUTS:
            raise ExportError(
                f"detection_outputs={self.request.detection_outputs!r} is not supported; allowed: "
                f"{', '.join(DETECTION_OUTPUTS)}"
            )

    def prepare(self):
        model = detector_at_size(as_float32(self.source.model), self.request.input_size)
        self.decoder = make_decoder(model, self.source.run_info, self.request.decoder_args)
        return model

    @property
    def detection_outputs(self) -> str:
        """The outputs of the artefact: a SavedModel has both (its `serve_float` decoded)."""
        return "decoded" if self.request.format == "saved_model" else self.request.detection_outputs

    def artefact_path(self):
        path = super().artefact_path()
        if self.request.format in ("tflite", "onnx") and self.request.detection_outputs == "raw":
            path = path.with_name(f"{path.stem}_raw{path.suffix}")
        return path

    @property
    def output_names(self) -> tuple:
        return DETECTION_NAMES if self.detection_outputs == "decoded" else (RAW_NAME,)

    def outputs_fn(self):
        return detector_outputs(self.model, self.decoder, self.detection_outputs)

    # ------------------------------------------------------------------ conversion

    def saved_model_endpoints(self) -> dict:
        """`serving_default` (uint8, any size, letterbox inside), `serve_float`, `serve_raw`."""
        height, width, channels = self.model.input_shape[1:]
        decoded = detector_outputs(self.model, self.decoder, "decoded")

        def serve_uint8(images):
            letterboxed, scale = letterbox_images(images, height, width)
            outputs = decoded(letterboxed)
            size = tf.cast(tf.shape(images)[1:3], tf.float32)
            limits = tf.stack([size[1], size[0], size[1], size[0]])
            boxes = tf.minimum(outputs["boxes"] / scale, limits)
            return {**outputs, "boxes": boxes}

        return {
            "serving_default": (serve_uint8, [uint8_image_spec(channels)]),
            "serve_float": (decoded, [self.image_spec()]),
            "serve_raw": (detector_outputs(self.model, self.decoder, "raw"), [self.image_spec()]),
        }

    def tflite_model(self, calibration) -> bytes:
        """The detector as TFLite builtins: the whole graph in float32, or a quantized network + float tail.

        See the module docstring. With a dynamic batch the decoder loops
        (`WHILE` subgraphs), which `graft_tflite` carries over.
        """
        if self.request.quantize == "none":
            return super().tflite_model(None)
        model_bytes = self.quantized_tflite(calibration)
        self.ops = check_builtin_ops(tflite_ops(model_bytes), "the TFLite detector")
        self.describe_io(model_bytes)
        return model_bytes

    def quantized_tflite(self, calibration) -> bytes:
        model, batch_size = self.model, self.request.batch_size
        heads = head_model(model)
        network = tflite_bytes(
            lambda images: heads(images, training=False), [self.image_spec()], track=heads,
            quantize=self.request.quantize, calibration_images=calibration, batch_size=batch_size,
            io=self.request.io, quantized_outputs=False, qat=self.qat,
        )
        num_anchors, num_classes = int(model.output_shape[1]), int(model.num_classes)

        def tail(box_deltas, class_logits):
            raw = tf.concat([box_deltas, class_logits], axis=-1)
            return self.decoder(raw) if self.detection_outputs == "decoded" else {RAW_NAME: raw}

        tail_bytes = tflite_bytes(
            tail,
            [
                tf.TensorSpec([batch_size, num_anchors, 4], tf.float32, name=HEAD_NAMES[0]),
                tf.TensorSpec([batch_size, num_anchors, num_classes], tf.float32, name=HEAD_NAMES[1]),
            ],
        )
        return graft_tflite(network, tail_bytes)

    # ------------------------------------------------------------------ parity

    def keras_reference(self, images) -> None:
        self.raw_reference, self.reference = keras_reference(self.model, self.decoder, images)
        self.topk = topk_cuts(self.raw_reference, self.decoder)

    def parity(self, exported, images, info) -> dict:
        outputs = exported.predict_outputs(images)
        figures = detection_parity(self.reference, outputs, self.decoder, self.topk)
        if RAW_NAME in outputs:
            figures["raw"] = difference_figures(self.raw_reference, outputs[RAW_NAME])
        if self.request.format == "saved_model":
            figures["checks"] = self.saved_model_checks(images)
            figures["raw"] = figures["checks"].pop("serve_raw")
        if info is not None:
            figures["keras_mAP"] = coco_map(self.reference, info)
            figures["export_mAP"] = coco_map(outputs, info)
            figures["mAP_diff"] = figures["export_mAP"] - figures["keras_mAP"]
        return figures

    def saved_model_checks(self, images) -> dict:
        """serving_default (uint8, rounded images at the model size) and serve_raw figures."""
        loaded = load_saved_model(self.written)
        pixels = np.clip(np.round(images), 0, 255)
        uint8_raw, uint8_reference = keras_reference(self.model, self.decoder, pixels.astype(np.float32))
        outputs = signature_runtime(loaded, "serving_default").run(pixels.astype(np.uint8))
        serving = detection_parity(uint8_reference, outputs, self.decoder, topk_cuts(uint8_raw, self.decoder))
        raw = signature_runtime(loaded, "serve_raw").run(images)[RAW_NAME]
        return {"serving_default": serving, "serve_raw": difference_figures(self.raw_reference, raw)}

    def float_rule(self, figures: dict) -> tuple[str, bool]:
        criterion = (
            f"every Keras detection above score_threshold + {figures['score_margin']:g} matched (same class, box "
            f"within {figures['box_tolerance']:g} px, score within {figures['score_margin']:g}), no extra detection"
        )
        passed = figures["unmatched_keras"] == 0 and figures["unmatched_export"] == 0
        raw = figures.get("raw")
        if raw is not None:
            criterion += f"; raw outputs {float_criterion()}"
            passed = passed and within_tolerance(raw)
        for check in figures.get("checks", {}).values():
            check_passed = check["unmatched_keras"] == 0 and check["unmatched_export"] == 0
            if "relative_max_diff" in check:
                check_passed = check_passed and within_tolerance(check)
            passed = passed and check_passed
        return criterion, passed

    def int8_rule(self, figures: dict) -> tuple[str, bool]:
        criterion = (
            f"Keras detections above score_threshold + {figures['score_margin']:g} matched by class at IoU >= 0.5: "
            f">= {self.int8_min_agreement:g}"
        )
        return criterion, figures["agreement_iou50"] >= self.int8_min_agreement

    def summary(self, figures: dict) -> str:
        text = (
            f"{figures['matched']}/{figures['compared']} Keras detections matched exactly "
            f"(max box diff {figures['max_box_diff']:.3g} px, score {figures['max_score_diff']:.3g}), "
            f"{figures['unmatched_export']} extra; agreement IoU>=0.5 {100 * figures['agreement_iou50']:.1f}%, "
            f"IoU>=0.9 {100 * figures['agreement_iou90']:.1f}% "
            f"(confident: {100 * figures['confident_agreement_iou50']:.1f}% / "
            f"{100 * figures['confident_agreement_iou90']:.1f}% of {figures['confident']})"
        )
        if "raw" in figures:
            text += f"; raw relative diff {figures['raw']['relative_max_diff']:.3g}"
        if figures.get("keras_mAP") is not None:
            text += f"; mAP Keras {figures['keras_mAP']:.4f} export {figures['export_mAP']:.4f}"
        return text

    def failure(self, figures: dict) -> str:
        return (
            f"{figures['unmatched_keras']} Keras detections unmatched, {figures['unmatched_export']} extra, "
            f"agreement at IoU >= 0.5 {figures['agreement_iou50']:.3f}"
            + (f", raw relative diff {figures['raw']['relative_max_diff']:.3g}" if "raw" in figures else "")
        )

    # ------------------------------------------------------------------ metadata

    def outputs_metadata(self) -> list[dict]:
        batch = self.batch_text
        if self.detection_outputs == "raw":
            return [{
                "name": RAW_NAME, "dtype": "float32",
                "shape": [batch, int(self.model.output_shape[1]), 4 + int(self.model.num_classes)],
                "values": "per anchor: box deltas (dx, dy, dw, dh) then class logits; decode with the 'decoder' config",
            }]
        k = self.decoder.max_detections
        return [
            {"name": "boxes", "dtype": "float32", "shape": [batch, k, 4],
             "values": "xyxy (x_min, y_min, x_max, y_max) pixels of the model input, clipped; 0 for padding rows"},
            {"name": "scores", "dtype": "float32", "shape": [batch, k], "values": "sigmoid scores, sorted descending"},
            {"name": "classes", "dtype": "int32", "shape": [batch, k], "values": "class index; -1 for padding rows"},
            {"name": "num_detections", "dtype": "int32", "shape": [batch], "values": "valid rows per image"},
        ]

    def metadata(self) -> dict:
        num_classes = int(self.model.num_classes)
        outputs = self.outputs_metadata()
        metadata = {
            **self.metadata_head(),
            "detection_outputs": self.detection_outputs,
            **self.metadata_shape(),
            "input": input_metadata(resize=LETTERBOX_TEXT),
            "output": outputs[0],
            "outputs": outputs,
            "preprocessing": self.preprocessing(),
            "num_classes": num_classes,
            "class_names": self.source.class_names or [str(i) for i in range(num_classes)],
            "detection": {
                "decoder": {key: value for key, value in self.decoder.get_config().items()
                            if key not in ("name", "trainable", "dtype")},
                "num_anchors": int(self.model.output_shape[1]),
                "box_format": "xyxy pixels of the model input",
                "decode": DECODE_TEXT,
                "nms": "inside the model" if self.detection_outputs == "decoded" else RAW_DECODE_TEXT,
            },
            **self.metadata_tail(),
        }
        if self.request.format == "saved_model":
            metadata["signatures"] = {
                "serving_default": "uint8 images [N, h, w, C] of any size, letterboxed inside to the model size -> "
                "{boxes (xyxy pixels of the images given), scores, classes (int32), num_detections (int32)}",
                "serve_float": f"{INPUT_FORMAT} at the model size (letterboxed) -> "
                "{boxes (model-input pixels), scores, classes, num_detections}",
                "serve_raw": f"{INPUT_FORMAT} at the model size -> {{raw}}",
            }
        return metadata

    def result_entries(self, metadata: dict) -> dict:
        return {"detection_outputs": metadata["detection_outputs"]}


__all__ = [
    "DETECTION_OUTPUTS",
    "DetectionExport",
    "decoder_from_config",
    "detector_at_size",
]
