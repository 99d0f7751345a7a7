"""Running any model form alike: `.keras` file or run dir, SavedModel, `.tflite`, `.onnx`.

`load_exported_model` opens an artefact as an `ExportedModel`, which takes
float32 raw-pixel images at its input size, any number of them; `model_task`
tells an artefact's task without running it. Prediction builds on these.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import tensorflow as tf

from keras_resnet.export.keras_model import (
    as_float32,
    is_detector,
    load_model_source,
    make_decoder,
    model_at_size,
)
from keras_resnet.export.onnx import open_onnx
from keras_resnet.export.saved_model import (
    is_saved_model,
    load_saved_model,
    signature_runtime,
)
from keras_resnet.export.signatures import (
    DETECTION_NAMES,
    MASK_NAME,
    METADATA_SUFFIX,
    OUTPUT_NAME,
    RAW_NAME,
    batches,
    is_detection_output,
    is_rejected_path,
    output_spec,
    outputs_fn,
    read_metadata,
    run_in_batches,
    task_from_rank,
)
from keras_resnet.export.tflite import open_tflite
from keras_resnet.models.retinanet.decoder import decoder_from_config
from keras_resnet.models.segmentation.segmenter import ResNetSegmenter
from keras_resnet.runs import read_run_info, run_model_file
from keras_resnet_settings.errors import DataError, ModelError
from keras_resnet_settings.registry import CLASSIFICATION, DETECTION, SEGMENTATION

RUNTIME_THREADS = 2
RUNTIMES = {".tflite": open_tflite, ".onnx": open_onnx}


class ExportedModel:
    """Runs a `.keras` file/run dir, SavedModel, `.tflite` or `.onnx` alike.

    Attributes:
        kind: "keras", "saved_model", "tflite" or "onnx".
        path: the artefact path.
        input_shape: `(height, width, channels)` the artefact takes.
        batch_size: fixed batch size, or None when dynamic.
        class_names: from the metadata JSON or run.json, or None.
        metadata: the metadata dict (empty when there is none).
        task: "classification", "segmentation" or "detection" (from the
            metadata, else from the artefact's outputs).
        output_names: the outputs `predict_outputs` returns, "probabilities"
            first ("mask" follows for segmenters); for detectors "boxes",
            "scores", "classes", "num_detections" (then "raw" when the
            artefact has raw outputs).
    """

    def __init__(self, kind, path, input_shape, batch_size, run_batch, metadata, class_names, task=None,
                 decode=None, has_raw=False, raw_batch=None):
        self.kind = kind
        self.path = str(path)
        self.input_shape = tuple(int(v) for v in input_shape)
        self.batch_size = batch_size
        self._run_batch = run_batch
        self._decode = decode
        self._raw_batch = raw_batch
        self.metadata = metadata
        self.class_names = class_names
        self.task = task or metadata.get("task") or CLASSIFICATION
        if self.task == DETECTION:
            self.output_names = DETECTION_NAMES + ((RAW_NAME,) if has_raw else ())
        else:
            self.output_names = (OUTPUT_NAME, MASK_NAME) if self.task == SEGMENTATION else (OUTPUT_NAME,)

    @property
    def num_classes(self) -> int | None:
        """From the metadata or the class names; None when neither says."""
        if self.metadata.get("num_classes"):
            return int(self.metadata["num_classes"])
        return len(self.class_names) if self.class_names else None

    def _check(self, images) -> np.ndarray:
        images = np.asarray(images, np.float32)
        if images.shape[1:] != self.input_shape:
            raise DataError(f"{self.path} takes images of shape {self.input_shape}, got {images.shape[1:]}")
        return images

    def predict(self, images: np.ndarray) -> np.ndarray:
        """The "probabilities" output for float32 raw-pixel images `(N, H, W, C)` at `input_shape`, any N.

        A detector returns its "raw" output `(N, anchors, 4 + classes)`
        (a SavedModel's `serve_raw`; ModelError when the artefact has none:
        use `predict_outputs`).
        """
        if self.task == DETECTION:
            if RAW_NAME in self.output_names:
                return self.predict_outputs(images)[RAW_NAME]
            if self._raw_batch is None:
                raise ModelError(f"{self.path} outputs decoded detections only; use predict_outputs")
            images = self._check(images)
            return np.concatenate(
                [self._raw_batch(batch)[:count] for batch, count in batches(images, self.batch_size)]
            )
        images = self._check(images)
        outputs = [self.predict_batch(batch)[:count] for batch, count in batches(images, self.batch_size)]
        return np.concatenate(outputs).astype(np.float32)

    def predict_outputs(self, images: np.ndarray) -> dict:
        """Every output (`output_names`) for images `(N, H, W, C)` at `input_shape`, any N.

        For a segmenter: `{"probabilities": float32 (N, H, W, classes),
        "mask": int32 (N, H, W)}`; "mask" is the argmax of "probabilities"
        when the artefact has no mask output (a `.keras` model).

        For a detector (images letterboxed to `input_shape`): `{"boxes":
        float32 (N, K, 4) xyxy model-input pixels, "scores": (N, K),
        "classes": int32 (N, K) (-1 padding), "num_detections": int32
        (N,)}`, plus "raw" `(N, anchors, 4 + classes)` when the artefact
        has it; a raw artefact is decoded with the `DetectionDecoder` of its
        metadata.
        """
        outputs = run_in_batches(self._run_decoded, self._check(images), self.batch_size)
        if self.task == SEGMENTATION and MASK_NAME not in outputs:
            outputs[MASK_NAME] = np.argmax(outputs[OUTPUT_NAME], axis=-1).astype(np.int32)
        return outputs

    def _run_decoded(self, batch: np.ndarray) -> dict:
        outputs = self._run_batch(batch)
        if self._decode is not None and "num_detections" not in outputs:
            outputs = {**self._decode(outputs[RAW_NAME]), **outputs}
        return outputs

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """Runs one float32 batch as is (no checks or padding): the artefact's own call; "probabilities"."""
        return self._run_batch(batch)[RAW_NAME if self.task == DETECTION else OUTPUT_NAME]


def _raw_decoder(metadata: dict, path):
    """`raw -> decoded dict (NumPy)` from the "detection" "decoder" config of a raw export's metadata."""
    config = (metadata.get("detection") or {}).get("decoder")
    if not config:
        raise ModelError(
            f"{path} outputs raw detections but has no metadata JSON with the decoder config "
            f"({Path(str(path).rstrip('/')).name}{METADATA_SUFFIX}); keep it beside the artefact"
        )
    decoder = decoder_from_config(config)
    shape = [None, int(decoder.anchors.shape[0]), 4 + decoder.num_classes]
    decode = tf.function(decoder.call, input_signature=[tf.TensorSpec(shape, tf.float32)])

    def run(raw):
        return {name: value.numpy() for name, value in decode(tf.constant(raw, tf.float32)).items()}

    return run


def _from_runtime(path, runtime, metadata: dict, raw_runtime=None) -> ExportedModel:
    """The `ExportedModel` of an opened artefact; its task from its output names and ranks.

    An artefact not written by `export_model` (no "probabilities" and no
    detector outputs) is read through its first output.
    """
    names = runtime.outputs
    options = {}
    if is_detection_output(names):
        task, handles = DETECTION, names
        raw_only = not set(DETECTION_NAMES) <= set(names)
        options = {"decode": _raw_decoder(metadata, path) if raw_only else None, "has_raw": RAW_NAME in names}
        if raw_runtime is not None:
            run_raw = raw_runtime.runner({RAW_NAME: RAW_NAME})
            options["raw_batch"] = lambda batch: run_raw(batch)[RAW_NAME]
    else:
        fallback = OUTPUT_NAME not in names and runtime.first is not None
        handles = {OUTPUT_NAME: runtime.first} if fallback else names
        task = task_from_rank(runtime.shapes[handles[OUTPUT_NAME]])
    return ExportedModel(
        runtime.kind, path, runtime.input_shape, runtime.batch_size, runtime.runner(handles), metadata,
        metadata.get("class_names"), task, **options,
    )


def _load_saved_model(path: Path) -> ExportedModel:
    """A SavedModel: `predict_outputs` runs `serve_float`; a detector's `predict` runs `serve_raw`."""
    metadata = read_metadata(path)
    check_not_rejected(path, metadata)
    loaded = load_saved_model(path)
    if "serve_float" not in loaded.signatures:
        raise ModelError(f"SavedModel {path} has no serve_float signature; export it with keras_resnet.export.api")
    runtime = signature_runtime(loaded, "serve_float")
    raw_runtime = signature_runtime(loaded, "serve_raw") if "serve_raw" in loaded.signatures else None
    return _from_runtime(path, runtime, metadata, raw_runtime)


def _load_keras(path) -> ExportedModel:
    source = load_model_source(path)
    metadata = source.run_info
    if is_detector(source.model):
        return _load_keras_detector(source)
    spec = output_spec(source.model)
    height, width = source.model.input_shape[1:3]
    if height is None or width is None:
        if not metadata.get("input_shape"):
            raise ModelError(f"model {source.path} has a dynamic input size and no run.json gives its size")
        height, width = metadata["input_shape"][:2]
    model = model_at_size(as_float32(source.model), (height, width))
    outputs = outputs_fn(model, spec)

    def run_batch(batch):
        return {name: value.numpy() for name, value in outputs(tf.constant(batch)).items()}

    return ExportedModel(
        "keras", source.path, model.input_shape[1:], None, run_batch, metadata, source.class_names, spec.task
    )


def _load_keras_detector(source) -> ExportedModel:
    """A `.keras` detector run as its exports are: raw output and the run's decoder in one tf.function."""
    model = as_float32(source.model)
    decoder = make_decoder(model, source.run_info)

    @tf.function(input_signature=[tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)])
    def run(images):
        raw = model(images, training=False)
        return {**decoder.call(raw), RAW_NAME: raw}

    def run_batch(batch):
        return {name: value.numpy() for name, value in run(tf.constant(batch)).items()}

    class_names = source.class_names or [str(i) for i in range(model.num_classes)]
    metadata = {**source.run_info, "task": DETECTION, "num_classes": int(model.num_classes)}
    return ExportedModel(
        "keras", source.path, model.input_shape[1:], None, run_batch, metadata, class_names, DETECTION,
        has_raw=True,
    )


def check_not_rejected(path, metadata: dict) -> None:
    """A ModelError for an artefact that failed its parity gate when it was exported (kept for inspection only)."""
    rejected = metadata.get("rejected")
    if rejected or is_rejected_path(path):
        reason = f" ({rejected.get('criterion')}: {rejected.get('reason')})" if isinstance(rejected, dict) else ""
        raise ModelError(
            f"{path} failed its parity check against the Keras model when it was exported{reason} and is kept for "
            "inspection only; predict with the passing artefact, or export again (e.g. more calibration samples)"
        )


def load_exported_model(path, num_threads: int = RUNTIME_THREADS) -> ExportedModel:
    """Open any model form for inference on float32 raw-pixel images.

    Classifiers and segmenters alike: `predict` returns "probabilities",
    `predict_outputs` every output (a segmenter's "mask" too). Detectors
    (`task == "detection"`): `predict_outputs` returns the decoded
    detections (boxes, scores, classes, num_detections) of letterboxed
    images, decoding a raw export with its metadata's decoder.

    Args:
        path: a `.keras` file, a training run dir, a SavedModel dir (written
            by `export_model`: it needs the `serve_float` signature), a
            `.tflite` or an `.onnx` file.
        num_threads: CPU threads for TFLite and onnxruntime.

    Returns:
        An `ExportedModel`.

    Raises:
        ModelError: missing path or unrecognised file.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model path {path} does not exist")
    if is_saved_model(path):
        return _load_saved_model(path)
    if path.is_dir() or path.suffix == ".keras":
        return _load_keras(path)
    if path.suffix in RUNTIMES:
        metadata = read_metadata(path)
        check_not_rejected(path, metadata)
        runtime = RUNTIMES[path.suffix](path, num_threads)
        return _from_runtime(path, runtime, metadata)
    raise ModelError(
        f"{path} is not a model: expected a .keras file, a training run dir, a SavedModel dir, .tflite or .onnx"
    )


def as_exported_model(model_or_path) -> ExportedModel | None:
    """An `ExportedModel` as is, an export path (`is_export_path`) loaded, anything else None.

    Prediction runs exports through this and loads `.keras` files and run
    dirs itself.
    """
    if isinstance(model_or_path, ExportedModel):
        return model_or_path
    return load_exported_model(model_or_path) if is_export_path(model_or_path) else None


def is_export_path(path) -> bool:
    """True for an exported artefact: a `.tflite` or `.onnx` file or a SavedModel dir."""
    path = Path(path)
    return path.suffix in RUNTIMES or is_saved_model(path)


def model_task(path) -> str | None:
    """"classification", "segmentation" or "detection" for any model form, without running it.

    Exports: the task in their metadata JSON, else their outputs (the
    artefact is loaded). `.keras` files and run dirs: the task in the
    run's `run.json`, else "segmentation" for a saved `ResNetSegmenter` and
    "detection" for a `RetinaNetDetector`.

    Returns:
        The task, or None when `path` does not exist.
    """
    path = Path(path)
    if not path.exists():
        return None
    if is_export_path(path):
        return read_metadata(path).get("task") or load_exported_model(path).task
    run_dir = path if path.is_dir() else path.parent
    task = read_run_info(run_dir).get("task")
    if task:
        return task
    model_file = path if path.is_file() else run_model_file(path)
    try:
        with zipfile.ZipFile(model_file) as archive:
            class_name = json.loads(archive.read("config.json")).get("class_name")
    except Exception:  # not a .keras zip: the loaders report it
        return CLASSIFICATION
    if class_name == "RetinaNetDetector":
        return DETECTION
    return SEGMENTATION if class_name == ResNetSegmenter.__name__ else CLASSIFICATION
