"""Export trained classifiers, segmenters and detectors to SavedModel, TFLite and ONNX, with parity checks.

`export_model` checks its arguments, loads the model and hands it to its
task's export (`EXPORTS`): `classification`, `segmentation` (shared parts
in `dense`) or `detection`. Each export goes through `job.ExportJob.run`:
after writing an artefact it runs it on sample images (`samples`), compares
it with the Keras model (`parity`) and writes `<artefact>.json` (source,
preset, input contract, outputs, preprocessing, class names, quantization,
parity figures, tool versions).

Every export takes float32 raw pixels 0..255, NHWC (`signatures`). How each
format is produced (Keras 3.15 / TF 2.21 / tf2onnx 1.17): `saved_model`
(`keras.export.ExportArchive`), `tflite` (builtin ops only, int8
full-integer with float32 input and output), `onnx` (tf2onnx on the frozen
function, opset 17). int8 TFLite with `io="uint8"` / `"int8"` is integer
end to end (uint8 / int8 input of scale 1, quantized outputs; see
`tflite`). `loading.load_exported_model` runs any artefact.
"""

from __future__ import annotations

from keras_resnet.export.classification import ClassificationExport
from keras_resnet.export.detection import DetectionExport
from keras_resnet.export.keras_model import load_model_source, task_of
from keras_resnet.export.options import check_options
from keras_resnet.export.segmentation import SegmentationExport
from keras_resnet.export.steps import ExportRequest, spinner
from keras_resnet_settings import default
from keras_resnet_settings.errors import ExportError
from keras_resnet_settings.registry import CLASSIFICATION, DETECTION, SEGMENTATION

DEFAULT_PARITY_SAMPLES = default("export.parity_samples")
DEFAULT_CALIBRATION_SAMPLES = default("export.calibration_samples")
DEFAULT_CALIBRATION_METHOD = default("export.calibration_method")
EXPORTS = {
    CLASSIFICATION: ClassificationExport,
    SEGMENTATION: SegmentationExport,
    DETECTION: DetectionExport,
}


def parse_batch_size(batch_size) -> int | None:
    """A fixed batch size, or None for "dynamic"."""
    if batch_size == "dynamic" or batch_size is None:
        return None
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or int(batch_size) < 1:
        raise ExportError(f"batch_size must be a positive int or 'dynamic', got {batch_size!r}")
    return int(batch_size)


def export_model(
    model_or_dir,
    format: str = "saved_model",
    quantize: str = "none",
    calibration=None,
    input_size=None,
    batch_size=1,
    output=None,
    parity_samples: int = DEFAULT_PARITY_SAMPLES,
    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES,
    calibration_method: str = DEFAULT_CALIBRATION_METHOD,
    int8_min_agreement: float | None = None,
    name: str | None = None,
    detection_outputs: str = "decoded",
    decoder_args: dict | None = None,
    io: str = "float",
) -> dict:
    """Export a classifier, segmenter or detector, check it against Keras and write its metadata JSON.

    A segmenter (a model with a `(N, H, W, classes)` output, e.g. a
    `ResNetSegmenter` or a segmentation run dir) exports "probabilities"
    (per-pixel softmax, added when the model outputs logits) and "mask"
    (int32 argmax); see `keras_resnet.export.segmentation`. A
    `RetinaNetDetector` (or a detection run dir) exports boxes, scores,
    classes and num_detections with NMS inside, or its raw outputs; see
    `keras_resnet.export.detection`.

    Args:
        model_or_dir: a `.keras` file, a training run dir or a `keras.Model`.
        format: "saved_model", "tflite" or "onnx".
        quantize: "none", or for TFLite "float16", "dynamic" (int8 weights,
            float activations) or "int8" (full integer, calibrated).
        calibration: a recipe YAML (its training images calibrate int8, its
            validation images check parity; classification or segmentation
            recipes) or a folder of images (class subfolders, plain images,
            or a segmentation folder with `images/` and `masks/`). For int8
            without it, the run's `recipe.yaml` is used.
        input_size: `(height, width)` of the export; defaults to the model's.
        batch_size: a fixed batch size (default 1) or "dynamic".
        output: output folder; defaults to `saved_models/<name>/`.
        parity_samples: images used for the parity check.
        calibration_samples: images used for int8 calibration.
        calibration_method: int8 calibration (not for a quantization-aware
            model): "mean_range" (default: each activation's range is the
            mean over batches of calibration images of their min and max,
            set on the model's quantization-aware copy; see
            `keras_resnet.quantization.calibration`) or "minmax" (the TFLite
            converter's min and max over all calibration images).
        int8_min_agreement: minimum int8 agreement with Keras: top-1 over
            samples for a classifier (default 0.99), argmax over pixels for
            a segmenter (default 0.98), Keras detections matched by class
            at IoU >= 0.5 for a detector (default 0.9).
        name: base of the file names; defaults to the run dir name, the
            `.keras` file stem or the model name.
        detection_outputs: detectors only: "decoded" (NMS inside) or "raw"
            (TFLite and ONNX; a SavedModel always has both).
        decoder_args: detectors only: overrides of the run's decoder
            settings (score_threshold, iou_threshold, max_detections,
            pre_nms_top_k) baked into decoded exports.
        io: int8 TFLite only: "float" (default: float32 input and outputs,
            `<name>_int8.tflite`), "uint8" (uint8 raw pixels as they are,
            scale 1 and zero point 0; uint8 outputs with their scale and
            zero point in the metadata; `<name>_int8_uint8io.tflite`) or
            "int8" (int8 pixels - 128; int8 outputs;
            `<name>_int8_int8io.tflite`). A detector's outputs stay float
            (its decoder and NMS run in float32). A quantization-aware model
            (`keras_resnet.quantization`) exports int8 with its trained
            ranges, without calibration images.

    Returns:
        `{"format", "quantize", "task", "path", "metadata_path",
        "input_shape", "batch_size", "parity": {...}}` (detectors: and
        "detection_outputs"); parity holds max_abs_diff, relative_max_diff,
        samples, sample_source, criterion, passed, and top1_agreement
        (classifiers) or pixel_agreement, pixel_disagreements, pixels,
        mask_miou (segmenters); a detector's, see
        `keras_resnet.export.detection_parity.detection_parity`.

    Raises:
        ExportError, ModelError, DataError: bad arguments, paths or calibration data.
        ExportParityError: the export fails its parity criterion (the
            artefact and metadata are written first).
    """
    check_options(format=format, quantize=quantize, io=io, parity_samples=parity_samples,
                  calibration_samples=calibration_samples, calibration_method=calibration_method,
                  int8_min_agreement=int8_min_agreement,
                  detection_outputs=detection_outputs)
    request = ExportRequest(
        format=format, quantize=quantize, calibration=calibration, input_size=input_size,
        batch_size=parse_batch_size(batch_size), output=output, parity_samples=int(parity_samples),
        calibration_samples=int(calibration_samples), calibration_method=calibration_method,
        int8_min_agreement=int8_min_agreement, name=name,
        detection_outputs=detection_outputs, decoder_args=decoder_args, io=io,
    )
    with spinner("loading the Keras model"):
        source = load_model_source(model_or_dir)
    return EXPORTS[task_of(source.model)](source, request).run()
