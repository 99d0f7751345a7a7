"""Export trained classifiers, segmenters and detectors to SavedModel, TFLite and ONNX, with parity checks.

Detectors (`RetinaNetDetector`, detection run dirs) are exported by
`keras_resnet.export.detection` (NMS inside or raw outputs, detection
parity); `export_model`, `load_exported_model` and `model_task` hand them
over. The rest of this docstring is about classifiers and segmenters.

Every export takes float32 raw pixels 0..255, NHWC: the `ImageNormalization`
layer inside the model travels with it, so no export needs the training
normalisation. A classifier's export returns its output ("probabilities":
softmax, or logits for a logits model). A segmenter's export (any model
with a `(N, H, W, classes)` output, e.g. `ResNetSegmenter`) returns two
outputs at the input resolution: "probabilities" `(N, H, W, classes)`,
per-pixel softmax (added at export when the model outputs logits), and
"mask" `(N, H, W)` int32, the argmax class of the model's output (builtin
ARG_MAX in TFLite, ArgMax in ONNX). After writing an artefact,
`export_model` runs it on sample images, compares it with the Keras model
and writes `<artefact>.json` (source, preset, input contract, outputs,
preprocessing, class names, quantization, parity figures, tool versions).

How each format is produced (Keras 3.15 / TF 2.21 / tf2onnx 1.17):

* SavedModel: `keras.export.ExportArchive` with two endpoints,
  `serving_default` (uint8 images `[N, H', W', C]` of any size, resized
  inside with bilinear `tf.image.resize`; returns `probabilities`,
  `top_class`, `top_score`) and `serve_float` (float32 raw pixels at the
  model size; returns `probabilities`). A segmenter's `serving_default`
  resizes its per-pixel scores back to the size of the images given and
  returns `probabilities` and `mask` there; its `serve_float` returns both
  at the model size. A plain `tf.Module` holding a
  Keras 3 model is *not* used: its variables are not tracked as resources
  the TFLite converter can freeze, and the converted model outputs NaN.
* TFLite: `tf.lite.TFLiteConverter.from_saved_model` on a temporary
  ExportArchive SavedModel with one float32 signature, builtin ops only
  (`TFLITE_BUILTINS`; int8: `TFLITE_BUILTINS_INT8`, never SELECT_TF_OPS).
  int8 is full-integer quantization calibrated on a representative
  dataset; its input and output stay float32 (quantize/dequantize ops
  inside the model), so every TFLite variant is called the same way.
  Run with `ai_edge_litert.interpreter.Interpreter`.
* ONNX: tf2onnx 1.17 (`from_graph_def`) on the frozen `tf.function` of
  the model, opset 17, float32 NHWC input "images", output "probabilities"
  (segmenters: and "mask", int32).
  tf2onnx works with protobuf 7, but `from_function`/`from_keras` fail on
  ResNeXt: Keras 3 wraps grouped convolutions in a nested XLA-only
  function that tf2onnx cannot convert ("StatefulPartitionedCall is not
  supported"). We freeze the function ourselves, drop the
  `_XlaMustCompile`/`_noinline` marks so grappler inlines the plain
  `Conv2D`, then convert. A resize to a static size becomes an ONNX
  Resize with float32 `scales`, one pixel short when the ratio is
  fractional (segmenter heads at sizes the strides do not divide): those
  nodes get exact `sizes` instead (`_exact_resize_sizes`). Run with
  onnxruntime.

Mixed-precision models (`mixed_bfloat16` / `mixed_float16` layers) are
rebuilt in float32 with the same weights before export (`as_float32`), and
parity is measured against that float32 model.

Parity: float exports (SavedModel, ONNX, TFLite fp32) must match Keras to
a relative max difference (max |diff| / max |Keras output|) of 1e-4 (for
segmenters: of the per-pixel probabilities); float16 and dynamic-range
TFLite are reported only; int8 must agree with Keras on the top-1 class for
at least `int8_min_agreement` of the samples (classifiers: 0.99 by default,
with fewer than 100 samples that means every sample) or on the argmax class
of at least `int8_min_agreement` of the pixels (segmenters: 0.98 by
default). Segmenter figures also give the mIoU of the export's masks taken
against Keras' masks. A failed check raises `ExportParityError` after the
artefact and its metadata (with `"passed": false`) are written.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_resnet.errors import ExportParityError
from keras_resnet.layers.core import ImageNormalization  # noqa: E402
from keras_resnet.models.resnet.classifier import ResNetClassifier  # noqa: E402
from keras_resnet.models.segmentation.segmenter import ResNetSegmenter  # noqa: E402

FORMATS = ("saved_model", "tflite", "onnx")
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
RUN_MODEL_FILES = ("best_model.keras", "last_model.keras")
RUN_INFO_FILE = "run.json"
RUN_RECIPE_FILE = "recipe.yaml"
METADATA_SUFFIX = ".json"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
MASK_NAME = "mask"
CLASSIFICATION = "classification"
SEGMENTATION = "segmentation"
DETECTION = "detection"
DETECTION_NAMES = ("boxes", "scores", "classes", "num_detections")
RAW_NAME = "raw"
INPUT_FORMAT = "float32 raw pixels 0..255, NHWC"
ONNX_OPSET = 17
FLOAT_RELATIVE_TOLERANCE = 1e-4
DEFAULT_INT8_MIN_AGREEMENT = 0.99
DEFAULT_SEGMENTATION_INT8_MIN_AGREEMENT = 0.98
DEFAULT_PARITY_SAMPLES = 100
DEFAULT_CALIBRATION_SAMPLES = 200
RUNTIME_THREADS = 2
PREDICT_CHUNK = 32
SEGMENTATION_CHUNK_VALUES = 1 << 22  # output values per chunk of a segmenter's parity check (16 MB)
SAMPLE_SEED = 0


@dataclass
class ModelSource:
    """A Keras model and what is known about it.

    Args:
        model: the loaded `keras.Model`.
        path: the `.keras` file it came from (None for an in-memory model).
        name: short name used for export file names.
        run_info: contents of the run's `run.json` (empty when absent).
        recipe_path: the run's `recipe.yaml` when present.
    """

    model: keras.Model
    path: str | None
    name: str
    run_info: dict = field(default_factory=dict)
    recipe_path: str | None = None

    @property
    def class_names(self) -> list[str] | None:
        return self.run_info.get("class_names")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None


def load_model_source(model_or_dir) -> ModelSource:
    """Load a classifier from a `.keras` file, a training run dir or a live model.

    A run dir (a training `output_dir`) provides `best_model.keras` (else
    `last_model.keras`), plus `run.json` (class names, preset,
    preprocessing) and `recipe.yaml` when present. A `.keras` file inside a
    run dir picks up the same files.

    Args:
        model_or_dir: path to a `.keras` file or run dir, or a `keras.Model`.

    Returns:
        A `ModelSource`.

    Raises:
        ValueError: the path is missing, is not a `.keras` file, or is a
            folder without `best_model.keras` / `last_model.keras`.
    """
    if isinstance(model_or_dir, keras.Model):
        return ModelSource(model=model_or_dir, path=None, name=model_or_dir.name)
    path = Path(model_or_dir)
    if not path.exists():
        raise ValueError(f"model path {path} does not exist; pass a .keras file or a training run output_dir")
    if path.is_dir():
        model_file = next((path / f for f in RUN_MODEL_FILES if (path / f).is_file()), None)
        if model_file is None:
            raise ValueError(
                f"folder {path} is not a training run: it has neither {' nor '.join(RUN_MODEL_FILES)}"
            )
        run_dir = path
    elif path.suffix == ".keras":
        model_file = path
        run_dir = path.parent if (path.parent / RUN_INFO_FILE).is_file() else None
    else:
        raise ValueError(f"{path} is not a Keras model: expected a .keras file or a training run output_dir")
    try:
        model = keras.saving.load_model(model_file, compile=False)
    except Exception as error:  # zip, JSON and deserialisation errors
        raise ValueError(f"cannot load Keras model {model_file}: {type(error).__name__}: {error}") from None
    run_info = _read_json(run_dir / RUN_INFO_FILE) if run_dir and (run_dir / RUN_INFO_FILE).is_file() else {}
    recipe = run_dir / RUN_RECIPE_FILE if run_dir else None
    return ModelSource(
        model=model,
        path=str(model_file),
        name=run_dir.name if run_dir else model_file.stem,
        run_info=run_info,
        recipe_path=str(recipe) if recipe and recipe.is_file() else None,
    )


def _walk_layers(model: keras.Model):
    """All layers of a model, nested models included, depth first."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _walk_layers(layer)


def _float32_policies(config):
    """A copy of a serialized model config with every dtype policy set to float32."""
    if isinstance(config, dict):
        if str(config.get("class_name", "")).endswith("DTypePolicy"):
            return {**config, "config": {**config["config"], "name": "float32"}}
        return {key: _float32_policies(value) for key, value in config.items()}
    if isinstance(config, list):
        return [_float32_policies(value) for value in config]
    return config


def as_float32(model: keras.Model) -> keras.Model:
    """The model computing in float32, rebuilt with the same weights if needed.

    Mixed-precision training saves layers with `mixed_bfloat16` /
    `mixed_float16` policies; TFLite builtins and tf2onnx need one float32
    graph (a bfloat16 layer next to float32 ones gives an invalid ONNX
    model). Variables are float32 under mixed precision, so the weights
    carry over exactly.

    Args:
        model: a Keras model.

    Returns:
        `model` itself when every layer computes in float32, else a float32 copy.
    """
    if all(layer.dtype_policy.compute_dtype == "float32" for layer in _walk_layers(model)):
        return model
    config = _float32_policies(keras.saving.serialize_keras_object(model))
    global_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        rebuilt = keras.saving.deserialize_keras_object(config)
    finally:
        keras.mixed_precision.set_global_policy(global_policy)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def model_at_size(model: keras.Model, input_size) -> keras.Model:
    """The model with a fixed input size, rebuilt when the size changes.

    Args:
        model: a Keras image model.
        input_size: `(height, width)`, or None to keep the model's own size.

    Returns:
        `model` itself when its input already has that size (or has a
        dynamic size and `input_size` is None raises); a `ResNetClassifier`
        or `ResNetSegmenter` rebuilt at the new size with the same weights
        otherwise (a model with a dynamic size is wrapped at the new size).

    Raises:
        ValueError: no size known, or a model of another class with a fixed
            size different from `input_size`.
    """
    height, width, channels = model.input_shape[1:]
    if input_size is None:
        if height is None or width is None:
            raise ValueError(f"model {model.name} has a dynamic input size; pass input_size (H W)")
        return model
    input_size = tuple(int(v) for v in input_size)
    if len(input_size) != 2 or min(input_size) < 1:
        raise ValueError(f"input_size must be two positive ints (H W), got {input_size}")
    if (height, width) == input_size:
        return model
    if not isinstance(model, (ResNetClassifier, ResNetSegmenter)):
        if height is None and width is None:
            inputs = keras.Input(shape=(*input_size, channels), name=INPUT_NAME)
            return keras.Model(inputs, model(inputs), name=model.name)
        raise ValueError(
            f"model {model.name} takes {height}x{width} images; only ResNetClassifier and ResNetSegmenter "
            f"models can be re-exported at another input_size ({input_size[0]}x{input_size[1]})"
        )
    config = model.get_config()
    config["backbone"]["config"]["input_shape"] = [*input_size, channels]
    resized = type(model).from_config(config)
    resized.set_weights(model.get_weights())
    return resized


@dataclass(frozen=True)
class OutputSpec:
    """What an export computes from the model's output.

    Attributes:
        task: "classification" (output `(N, classes)`) or "segmentation"
            (output `(N, H, W, classes)`).
        logits: True when the model outputs logits (a segmenter's export
            then adds the softmax), False for softmax (or other) outputs.
    """

    task: str
    logits: bool

    @property
    def output_names(self) -> tuple[str, ...]:
        return (OUTPUT_NAME, MASK_NAME) if self.task == SEGMENTATION else (OUTPUT_NAME,)


def _model_activation(model: keras.Model):
    """The model's output activation: its `activation` attribute, else its last layer's (None: linear)."""
    if hasattr(model, "activation"):
        return model.activation
    last = model.layers[-1] if model.layers else None
    if isinstance(last, keras.layers.Softmax):
        return "softmax"
    if isinstance(last, keras.layers.Activation):
        activation = keras.activations.serialize(last.activation)
        return activation if isinstance(activation, str) else getattr(last.activation, "__name__", None)
    return None


def output_spec(model: keras.Model) -> OutputSpec:
    """The `OutputSpec` of a Keras model: a 4-D output `(N, H, W, classes)` makes it a segmenter.

    Call it on the model as loaded (before `model_at_size` wraps a
    dynamic-size model, which hides the model's `activation`).
    """
    shape = model.output_shape
    is_segmenter = isinstance(shape, tuple) and len(shape) == 4 and not isinstance(shape[0], (tuple, list))
    activation = _model_activation(model)
    return OutputSpec(SEGMENTATION if is_segmenter else CLASSIFICATION, activation in (None, "linear"))


def _segmentation_outputs(scores, logits: bool) -> dict:
    """`{"probabilities": softmax over classes, "mask": int32 argmax}` of per-pixel scores."""
    probabilities = tf.nn.softmax(scores, axis=-1) if logits else scores
    return {OUTPUT_NAME: probabilities, MASK_NAME: tf.argmax(scores, axis=-1, output_type=tf.int32)}


def _outputs_fn(model: keras.Model, spec: OutputSpec):
    """`images -> {name: tensor}`: what every export of the model computes (see `OutputSpec`)."""

    def outputs(images):
        scores = model(images, training=False)
        if spec.task == SEGMENTATION:
            return _segmentation_outputs(scores, spec.logits)
        return {OUTPUT_NAME: scores}

    return outputs


def find_preprocessing(model: keras.Model) -> dict | None:
    """The settings of the first `ImageNormalization` layer in the model, or None."""
    for layer in _walk_layers(model):
        if isinstance(layer, ImageNormalization):
            return {
                "mean": layer.mean,
                "std": layer.std,
                "scale": layer.scale,
                "reverse_channels": layer.reverse_channels,
                "applied": "inside the model; feed raw pixels",
            }
    return None


# --------------------------------------------------------------------------- running artefacts


def _batches(images: np.ndarray, batch_size: int | None):
    """Split images into batches of `batch_size` (padding the last by repetition).

    Yields `(batch, count)` with `count` the real images in the batch.
    """
    size = batch_size or PREDICT_CHUNK
    for start in range(0, len(images), size):
        batch = images[start : start + size]
        count = len(batch)
        if batch_size and count < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - count, axis=0)])
        yield batch, count


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
            raise ValueError(f"{self.path} takes images of shape {self.input_shape}, got {images.shape[1:]}")
        return images

    def predict(self, images: np.ndarray) -> np.ndarray:
        """The "probabilities" output for float32 raw-pixel images `(N, H, W, C)` at `input_shape`, any N.

        A detector returns its "raw" output `(N, anchors, 4 + classes)`
        (a SavedModel's `serve_raw`; ValueError when the artefact has none:
        use `predict_outputs`).
        """
        if self.task == DETECTION:
            if RAW_NAME in self.output_names:
                return self.predict_outputs(images)[RAW_NAME]
            if self._raw_batch is None:
                raise ValueError(f"{self.path} outputs decoded detections only; use predict_outputs")
            images = self._check(images)
            return np.concatenate(
                [self._raw_batch(batch)[:count] for batch, count in _batches(images, self.batch_size)]
            )
        images = self._check(images)
        outputs = [self.predict_batch(batch)[:count] for batch, count in _batches(images, self.batch_size)]
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
        images = self._check(images)
        chunks = []
        for batch, count in _batches(images, self.batch_size):
            outputs = self._run_batch(batch)
            if self._decode is not None and "num_detections" not in outputs:
                outputs = {**self._decode(outputs[RAW_NAME]), **outputs}
            chunks.append({name: value[:count] for name, value in outputs.items()})
        outputs = {name: np.concatenate([chunk[name] for chunk in chunks]) for name in chunks[0]}
        if self.task == SEGMENTATION and MASK_NAME not in outputs:
            outputs[MASK_NAME] = np.argmax(outputs[OUTPUT_NAME], axis=-1).astype(np.int32)
        return outputs

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """Runs one float32 batch as is (no checks or padding): the artefact's own call; "probabilities"."""
        return self._run_batch(batch)[RAW_NAME if self.task == DETECTION else OUTPUT_NAME]


def _detection_task(names) -> bool:
    """True when an artefact's output names are a detector's (decoded or raw)."""
    names = set(names)
    return set(DETECTION_NAMES) <= names or (RAW_NAME in names and OUTPUT_NAME not in names)


def _raw_decoder(metadata: dict, path):
    """`raw -> decoded dict (NumPy)` from the "detection" "decoder" config of a raw export's metadata."""
    config = (metadata.get("detection") or {}).get("decoder")
    if not config:
        raise ValueError(
            f"{path} outputs raw detections but has no metadata JSON with the decoder config "
            f"({Path(str(path).rstrip('/')).name}{METADATA_SUFFIX}); keep it beside the artefact"
        )
    from keras_resnet.export.detection import decoder_from_config

    decoder = decoder_from_config(config)
    shape = [None, int(decoder.anchors.shape[0]), 4 + decoder.num_classes]
    decode = tf.function(decoder.call, input_signature=[tf.TensorSpec(shape, tf.float32)])

    def run(raw):
        return {name: value.numpy() for name, value in decode(tf.constant(raw, tf.float32)).items()}

    return run


def _metadata_beside(path: Path) -> dict:
    metadata_path = Path(str(path).rstrip("/\\") + METADATA_SUFFIX)
    return _read_json(metadata_path) if metadata_path.is_file() else {}


def _task_from_rank(shape) -> str:
    """The task of an artefact whose "probabilities" output has this shape."""
    return SEGMENTATION if shape is not None and len(shape) == 4 else CLASSIFICATION


def _load_keras(path) -> ExportedModel:
    source = load_model_source(path)
    metadata = source.run_info
    from keras_resnet.export.detection import is_detector

    if is_detector(source.model):
        return _load_keras_detector(source)
    spec = output_spec(source.model)
    height, width = source.model.input_shape[1:3]
    if height is None or width is None:
        if not metadata.get("input_shape"):
            raise ValueError(f"model {source.path} has a dynamic input size and no run.json gives its size")
        height, width = metadata["input_shape"][:2]
    model = model_at_size(as_float32(source.model), (height, width))
    outputs = _outputs_fn(model, spec)

    def run_batch(batch):
        return {name: value.numpy() for name, value in outputs(tf.constant(batch)).items()}

    return ExportedModel(
        "keras", source.path, model.input_shape[1:], None, run_batch, metadata, source.class_names, spec.task
    )


def _load_keras_detector(source) -> ExportedModel:
    """A `.keras` detector run as its exports are: raw output and the run's decoder in one tf.function."""
    from keras_resnet.export.detection import make_decoder

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


def _load_saved_model(path: Path) -> ExportedModel:
    loaded = tf.saved_model.load(str(path))
    if "serve_float" not in loaded.signatures:
        raise ValueError(f"SavedModel {path} has no serve_float signature; export it with keras_resnet.export.api")
    signature = loaded.signatures["serve_float"]
    spec = signature.structured_input_signature[1][INPUT_NAME]
    metadata = _metadata_beside(path)
    if _detection_task(signature.structured_outputs):
        return _saved_model_detector(path, loaded, signature, spec, metadata)
    task = _task_from_rank(signature.structured_outputs[OUTPUT_NAME].shape)

    def run_batch(batch):
        return {name: value.numpy() for name, value in signature(**{INPUT_NAME: tf.constant(batch)}).items()}

    run_batch.loaded = loaded  # keeps the restored variables alive with the signature
    return ExportedModel(
        "saved_model", path, spec.shape[1:], spec.shape[0], run_batch, metadata, metadata.get("class_names"), task
    )


def _saved_model_detector(path, loaded, signature, spec, metadata) -> ExportedModel:
    """A detector SavedModel: `predict_outputs` runs `serve_float` (decoded), `predict` runs `serve_raw`."""
    raw_signature = loaded.signatures["serve_raw"] if "serve_raw" in loaded.signatures else None

    def run_batch(batch):
        return {name: value.numpy() for name, value in signature(**{INPUT_NAME: tf.constant(batch)}).items()}

    def raw_batch(batch):
        return raw_signature(**{INPUT_NAME: tf.constant(batch)})[RAW_NAME].numpy()

    run_batch.loaded = loaded
    return ExportedModel(
        "saved_model", path, spec.shape[1:], spec.shape[0], run_batch, metadata, metadata.get("class_names"),
        DETECTION, raw_batch=raw_batch if raw_signature is not None else None,
    )


def _tflite_output_indices(interpreter) -> dict:
    """`{output name: tensor index}` from the model's signature (one output named "probabilities" without)."""
    signatures = interpreter.get_signature_list()
    if signatures:
        runner = interpreter.get_signature_runner(next(iter(signatures)))
        return {name: detail["index"] for name, detail in runner.get_output_details().items()}
    return {OUTPUT_NAME: interpreter.get_output_details()[0]["index"]}


def _load_tflite(path: Path, num_threads: int = RUNTIME_THREADS) -> ExportedModel:
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
    except ValueError as error:
        raise ValueError(f"cannot load TFLite model {path}: {error}") from None
    input_detail = interpreter.get_input_details()[0]
    output_indices = _tflite_output_indices(interpreter)
    metadata = _metadata_beside(path)
    detection = _detection_task(output_indices)
    if not detection and OUTPUT_NAME not in output_indices:  # not written by export_model: its first output
        output_indices = {OUTPUT_NAME: interpreter.get_output_details()[0]["index"]}
    output_shapes = {detail["index"]: detail["shape"] for detail in interpreter.get_output_details()}
    task = DETECTION if detection else _task_from_rank(output_shapes[output_indices[OUTPUT_NAME]])
    signature = [int(v) for v in input_detail["shape_signature"]]
    dynamic_batch = signature[0] == -1
    allocated = {"batch": None}

    def run_batch(batch):
        if allocated["batch"] != len(batch):
            if dynamic_batch:
                interpreter.resize_tensor_input(input_detail["index"], [len(batch), *signature[1:]])
            interpreter.allocate_tensors()
            allocated["batch"] = len(batch)
        interpreter.set_tensor(input_detail["index"], batch)
        interpreter.invoke()
        return {name: interpreter.get_tensor(index).copy() for name, index in output_indices.items()}

    batch_size = None if dynamic_batch else signature[0]
    return ExportedModel(
        "tflite", path, signature[1:], batch_size, run_batch, metadata, metadata.get("class_names"), task,
        **_detection_options(task, output_indices, metadata, path),
    )


def _detection_options(task, names, metadata, path) -> dict:
    """`decode` and `has_raw` arguments of an `ExportedModel` (a raw detector decodes with its metadata)."""
    if task != DETECTION:
        return {}
    raw_only = not set(DETECTION_NAMES) <= set(names)
    return {"decode": _raw_decoder(metadata, path) if raw_only else None, "has_raw": RAW_NAME in names}


def _load_onnx(path: Path, num_threads: int = RUNTIME_THREADS) -> ExportedModel:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types
        raise ValueError(f"cannot load ONNX model {path}: {error}") from None
    model_input = session.get_inputs()[0]
    batch_dim = model_input.shape[0]
    outputs = {output.name: output for output in session.get_outputs()}
    detection = _detection_task(outputs)
    if not detection and OUTPUT_NAME not in outputs:  # an ONNX model not written by export_model: its first output
        outputs = {OUTPUT_NAME: session.get_outputs()[0]}
    names = list(outputs)
    onnx_names = [output.name for output in outputs.values()]
    task = DETECTION if detection else _task_from_rank(outputs[OUTPUT_NAME].shape)

    def run_batch(batch):
        return dict(zip(names, session.run(onnx_names, {model_input.name: batch})))

    metadata = _metadata_beside(path)
    batch_size = batch_dim if isinstance(batch_dim, int) else None
    return ExportedModel(
        "onnx", path, model_input.shape[1:], batch_size, run_batch, metadata, metadata.get("class_names"), task,
        **_detection_options(task, names, metadata, path),
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
        ValueError: missing path or unrecognised file.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"model path {path} does not exist")
    if path.is_dir() and (path / "saved_model.pb").is_file():
        return _load_saved_model(path)
    if path.is_dir() or path.suffix == ".keras":
        return _load_keras(path)
    if path.suffix == ".tflite":
        return _load_tflite(path, num_threads)
    if path.suffix == ".onnx":
        return _load_onnx(path, num_threads)
    raise ValueError(
        f"{path} is not a model: expected a .keras file, a training run dir, a SavedModel dir, .tflite or .onnx"
    )


def _is_export_path(path: Path) -> bool:
    return path.suffix in (".tflite", ".onnx") or (path.is_dir() and (path / "saved_model.pb").is_file())


def model_task(path) -> str | None:
    """"classification", "segmentation" or "detection" for any model form, without running it.

    Exports: the task in their metadata JSON, else their outputs (the
    artefact is loaded). `.keras` files and run dirs: the task in the
    run's `run.json`, else "segmentation" for a saved `ResNetSegmenter` and
    "detection" for a `RetinaNetDetector`.

    Returns:
        The task, or None when `path` does not exist.
    """
    import zipfile

    path = Path(path)
    if not path.exists():
        return None
    if _is_export_path(path):
        return _metadata_beside(path).get("task") or load_exported_model(path).task
    run_dir = path if path.is_dir() else path.parent
    if (run_dir / RUN_INFO_FILE).is_file() and _read_json(run_dir / RUN_INFO_FILE).get("task"):
        return _read_json(run_dir / RUN_INFO_FILE)["task"]
    model_file = path if path.is_file() else next((path / f for f in RUN_MODEL_FILES if (path / f).is_file()), None)
    try:
        with zipfile.ZipFile(model_file) as archive:
            class_name = json.loads(archive.read("config.json")).get("class_name")
    except Exception:  # not a .keras zip: the loaders report it
        return CLASSIFICATION
    if class_name == "RetinaNetDetector":
        return DETECTION
    return SEGMENTATION if class_name == ResNetSegmenter.__name__ else CLASSIFICATION


# --------------------------------------------------------------------------- sample images


def _recipe_images(recipe_path: str, input_shape, split: str, count: int) -> np.ndarray:
    """Up to `count` un-augmented images of a recipe's train or val split, at `input_shape`.

    Classification and segmentation recipes alike (a segmentation recipe's
    images without their masks; a mosaic recipe's validation mosaic is the
    recipe's own, its training mosaic is generated at `count` canvases).
    """
    from keras_resnet.config import load_config
    from keras_resnet.data.classification import build_classification_datasets

    height, width, channels = input_shape
    task = load_config(recipe_path)["task"]
    overrides = [
        f"model.input_shape=[{height},{width},{channels}]",
        "data.batch_size=1",
        "data.cache=false",
        f"data.limit_train={count}",
        f"data.limit_val={count}",
        "data.augment.horizontal_flip=false",
    ]
    if task == SEGMENTATION:
        overrides += ["data.augment.scale_range=[1.0,1.0]", f"data.mosaic_train_size={count}"]
    else:
        overrides += ["data.augment.random_crop_padding=0", "data.augment.random_erasing=0.0"]
    cfg = load_config(recipe_path, overrides=overrides)
    if task == SEGMENTATION:
        from keras_resnet.data.segmentation import build_segmentation_datasets

        train, val, _ = build_segmentation_datasets(cfg, seed=SAMPLE_SEED)
    else:
        train, val, _ = build_classification_datasets(cfg, seed=SAMPLE_SEED)
    dataset = train if split == "train" else val
    images = [batch.numpy() for batch, _ in dataset.take(count)]
    return np.concatenate(images).astype(np.float32)


def _folder_images(folder: str, input_shape, count: int) -> np.ndarray:
    """Up to `count` images from a folder (recursive), a seeded sample when there are more.

    A segmentation folder (`images/` beside `masks/`) gives its `images/` only.
    """
    from keras_resnet.data.images import find_image_files, load_images

    if (Path(folder) / "images").is_dir() and (Path(folder) / "masks").is_dir():
        folder = str(Path(folder) / "images")
    files = find_image_files(folder)
    if len(files) > count:
        keep = np.sort(np.random.default_rng(SAMPLE_SEED).choice(len(files), count, replace=False))
        files = [files[i] for i in keep]
    return load_images(files, *input_shape)


def _random_images(input_shape, count: int) -> np.ndarray:
    return np.random.default_rng(SAMPLE_SEED).uniform(0, 255, (count, *input_shape)).astype(np.float32)


def _is_recipe(path) -> bool:
    return path is not None and Path(path).suffix.lower() in (".yaml", ".yml")


def _calibration_images(calibration, source: ModelSource, input_shape, count: int):
    """`(images, description)` for int8 calibration."""
    if calibration is None:
        if source.recipe_path is None:
            raise ValueError(
                "int8 quantization needs calibration images: pass calibration= a recipe YAML or an image folder"
            )
        calibration = source.recipe_path
    if not Path(calibration).exists():
        raise ValueError(f"calibration path {calibration} does not exist; pass a recipe YAML or an image folder")
    if _is_recipe(calibration):
        return _recipe_images(str(calibration), input_shape, "train", count), f"training images of {calibration}"
    if not Path(calibration).is_dir():
        raise ValueError(f"calibration {calibration} is neither a recipe YAML nor an image folder")
    return _folder_images(str(calibration), input_shape, count), f"images in {calibration}"


def _parity_images(calibration, source: ModelSource, input_shape, count: int):
    """`(images, description)` used to compare an export with Keras.

    Order of preference: the validation split of the calibration recipe or
    of the run's recipe, the calibration folder, deterministic random images.
    A run recipe whose data cannot be loaded falls back to random images,
    and the description says why.
    """
    from keras_resnet.config import ConfigError
    from keras_resnet.data.classification import DataError

    if _is_recipe(calibration):
        return _recipe_images(str(calibration), input_shape, "val", count), f"validation images of {calibration}"
    if calibration is not None:
        return _folder_images(str(calibration), input_shape, count), f"images in {calibration}"
    random_text = f"random uniform 0..255 images (seed {SAMPLE_SEED})"
    if source.recipe_path is not None:
        try:
            images = _recipe_images(source.recipe_path, input_shape, "val", count)
            return images, f"validation images of {source.recipe_path}"
        except (ConfigError, DataError) as error:
            return _random_images(input_shape, count), f"{random_text}; run recipe data unavailable: {error}"
    return _random_images(input_shape, count), random_text


# --------------------------------------------------------------------------- converters


@contextmanager
def _step(description: str):
    """A rich spinner on stderr while a conversion step runs."""
    from rich.console import Console

    with Console(stderr=True).status(description):
        yield


def _float_signature(model: keras.Model, batch_size: int | None) -> tf.TensorSpec:
    return tf.TensorSpec([batch_size, *model.input_shape[1:]], tf.float32, name=INPUT_NAME)


def _write_saved_model(model: keras.Model, spec: OutputSpec, directory: Path, batch_size: int | None) -> None:
    """A SavedModel with the `serving_default` (uint8, any size) and `serve_float` signatures.

    Classifier: `serving_default` returns `probabilities`, `top_class`,
    `top_score`. Segmenter: the images are resized to the model size, and
    the model's per-pixel scores resized back (bilinear) to the size of the
    images given before `probabilities` and `mask` are taken.
    """
    height, width, channels = model.input_shape[1:]

    def serve_uint8(images):
        resized = tf.image.resize(tf.cast(images, tf.float32), [height, width], method="bilinear")
        scores = model(resized, training=False)
        if spec.task == SEGMENTATION:
            scores = tf.image.resize(scores, tf.shape(images)[1:3], method="bilinear")
            return _segmentation_outputs(scores, spec.logits)
        return {
            OUTPUT_NAME: scores,
            "top_class": tf.argmax(scores, axis=-1, output_type=tf.int32),
            "top_score": tf.reduce_max(scores, axis=-1),
        }

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        serve_uint8,
        input_signature=[tf.TensorSpec([None, None, None, channels], tf.uint8, name=INPUT_NAME)],
    )
    archive.add_endpoint("serve_float", _outputs_fn(model, spec), input_signature=[_float_signature(model, batch_size)])
    archive.write_out(str(directory), verbose=False)


def tflite_bytes(fn, input_signature, track=None, quantize="none", calibration_images=None, batch_size=1) -> bytes:
    """Converts `fn` (via a temporary ExportArchive SavedModel) to TFLite builtins, optionally quantized.

    Args:
        fn: the function to serve (images -> outputs).
        input_signature: its `tf.TensorSpec` list.
        track: the Keras model (or layer) whose variables `fn` uses.
        quantize: "none", "float16", "dynamic" or "int8" (float input/output).
        calibration_images: float32 images for int8 calibration.
        batch_size: calibration batch size (None = 1).
    """
    with tempfile.TemporaryDirectory(prefix="keras_resnet_tflite_") as tmp:
        archive = keras.export.ExportArchive()
        if track is not None:
            archive.track(track)
        archive.add_endpoint("serving_default", fn, input_signature=input_signature)
        archive.write_out(tmp, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantize in ("float16", "dynamic", "int8"):
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if quantize == "int8":
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]

            def representative_dataset():
                for batch, _ in _batches(calibration_images, batch_size or 1):
                    yield [batch]

            converter.representative_dataset = representative_dataset
        return converter.convert()


def _convert_tflite(
    model: keras.Model, spec: OutputSpec, batch_size: int | None, quantize: str, calibration_images
) -> bytes:
    return tflite_bytes(_outputs_fn(model, spec), [_float_signature(model, batch_size)], track=model,
                        quantize=quantize, calibration_images=calibration_images, batch_size=batch_size)


def _allow_inlining(graph_def) -> None:
    """Lets grappler inline functions Keras marks for XLA (grouped convs on CPU).

    Keras 3 runs grouped convolutions (ResNeXt) through a nested
    `tf.function(jit_compile=True)`, which a frozen graph keeps as a
    `StatefulPartitionedCall` marked `_XlaMustCompile` / `_noinline`; tf2onnx
    cannot convert that op. Dropping the two marks lets tf2onnx's grappler
    pass inline the plain `Conv2D` inside.
    """
    marks = ("_XlaMustCompile", "_noinline")
    nodes = list(graph_def.node) + [node for function in graph_def.library.function for node in function.node_def]
    for attributes in [node.attr for node in nodes] + [function.attr for function in graph_def.library.function]:
        for mark in marks:
            if mark in attributes:
                del attributes[mark]


def _rename_onnx_tensor(graph, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in list(graph.input) + list(graph.output):
        if value.name == old:
            value.name = new


def _exact_resize_sizes(model_proto) -> int:
    """Gives Resize nodes with fractional constant `scales` their exact output `sizes` instead.

    tf2onnx turns a TF resize to a static size into an ONNX Resize with
    float32 `scales = out / in`. When the ratio is not an integer (the FPN
    top-down path or the segmenter heads at an input size that strides do
    not divide, e.g. 3 -> 5), `floor(in * scale)` comes out one short and
    onnxruntime rejects the graph ("Incompatible dimensions"). The fixed
    node takes `sizes` (`Shape(x)[:1]` joined to the static C, H, W for a
    dynamic batch), from which runtimes derive the same scale.

    Returns:
        The number of Resize nodes changed.
    """
    from onnx import helper, numpy_helper, shape_inference

    graph = model_proto.graph
    fixed, replaced = 0, set()
    while any(node.op_type == "Resize" and len(node.input) == 3 for node in graph.node):
        constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        try:
            inferred = shape_inference.infer_shapes(model_proto, data_prop=True)
        except Exception:  # onnx raises its own error types; keep tf2onnx's graph as is
            break
        shapes = {
            value.name: [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
            for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
        }
        for index, node in enumerate(graph.node):
            if node.op_type != "Resize" or len(node.input) != 3 or node.input[2] not in constants:
                continue
            scales = constants[node.input[2]].astype(np.float64)
            shape = shapes.get(node.input[0])
            if np.all(scales == np.round(scales)) or not shape or len(shape) != len(scales):
                continue
            if any(dim is None for dim in shape[1:]):
                continue
            static = np.round(np.asarray(shape[1:], np.float64) * scales[1:]).astype(np.int64)
            prefix = f"{node.name or 'Resize'}_exact_sizes_{fixed}"
            new_nodes = []
            if shape[0] is not None:
                graph.initializer.append(numpy_helper.from_array(np.concatenate([[shape[0]], static]), prefix))
            else:
                graph.initializer.extend([
                    numpy_helper.from_array(static, f"{prefix}_static"),
                    numpy_helper.from_array(np.array([0], np.int64), f"{prefix}_zero"),
                    numpy_helper.from_array(np.array([1], np.int64), f"{prefix}_one"),
                ])
                new_nodes = [
                    helper.make_node("Shape", [node.input[0]], [f"{prefix}_shape"], name=f"{prefix}_shape"),
                    helper.make_node(
                        "Slice", [f"{prefix}_shape", f"{prefix}_zero", f"{prefix}_one"], [f"{prefix}_batch"],
                        name=f"{prefix}_batch",
                    ),
                    helper.make_node(
                        "Concat", [f"{prefix}_batch", f"{prefix}_static"], [prefix], name=prefix, axis=0
                    ),
                ]
            replaced.add(node.input[2])
            node.input[:] = [node.input[0], node.input[1], "", prefix]
            nodes = list(graph.node)
            nodes[index:index] = new_nodes
            del graph.node[:]
            graph.node.extend(nodes)
            fixed += 1
            break
        else:
            break
    used = {name for node in graph.node for name in node.input}
    for initializer in [i for i in graph.initializer if i.name in replaced and i.name not in used]:
        graph.initializer.remove(initializer)
    return fixed


def _convert_onnx(model: keras.Model, spec: OutputSpec, path: Path, batch_size: int | None) -> None:
    """Freeze the model's function, convert it with tf2onnx and name its tensors.

    The ONNX graph has one input "images" (float32 NHWC) and the outputs of
    `spec` ("probabilities"; a segmenter adds "mask", int32); a dynamic
    batch dimension is named "batch".
    """
    _convert_onnx_fn(_outputs_fn(model, spec), _float_signature(model, batch_size), spec.output_names, path, batch_size)


def _convert_onnx_fn(fn, input_spec: tf.TensorSpec, output_names, path: Path, batch_size: int | None) -> None:
    """`_convert_onnx` for any `images -> {name: tensor}` function (`output_names`: the dict's keys, in order)."""
    import onnx
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    function = tf.function(fn, autograph=False)
    concrete = function.get_concrete_function(input_spec)
    frozen = convert_variables_to_constants_v2(concrete, lower_control_flow=False, aggressive_inlining=True)
    graph_def = frozen.graph.as_graph_def(add_shapes=True)
    _allow_inlining(graph_def)
    # The frozen outputs follow tf.nest order of the output dict: sorted keys.
    tensor_names = dict(zip(sorted(output_names), (tensor.name for tensor in frozen.outputs)))
    input_name = frozen.inputs[0].name
    model_proto, _ = tf2onnx.convert.from_graph_def(
        graph_def,
        input_names=[input_name],
        output_names=[tensor_names[name] for name in output_names],
        opset=ONNX_OPSET,
    )
    _exact_resize_sizes(model_proto)
    _rename_onnx_tensor(model_proto.graph, input_name, INPUT_NAME)
    for name, tensor_name in tensor_names.items():
        _rename_onnx_tensor(model_proto.graph, tensor_name, name)
    if batch_size is None:
        for value in [*model_proto.graph.input, *model_proto.graph.output]:
            value.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.checker.check_model(model_proto)
    onnx.save(model_proto, str(path))


# --------------------------------------------------------------------------- parity and metadata


def parity_figures(reference: np.ndarray, exported: np.ndarray) -> dict:
    """Max abs diff, relative max diff and top-1 agreement of two probability arrays.

    Args:
        reference: Keras outputs `(N, classes)`.
        exported: the export's outputs on the same images.
    """
    max_abs_diff = float(np.max(np.abs(exported.astype(np.float64) - reference)))
    scale = float(np.max(np.abs(reference)))
    agreement = np.argmax(exported, axis=-1) == np.argmax(reference, axis=-1)
    return {
        "max_abs_diff": max_abs_diff,
        "relative_max_diff": max_abs_diff / scale if scale > 0 else max_abs_diff,
        "top1_agreement": float(np.mean(agreement)),
        "top1_disagreements": int(np.sum(~agreement)),
        "samples": int(len(reference)),
    }


class SegmentationParity:
    """A segmenter export's parity with Keras, accumulated over chunks of images.

    Compares per-pixel probabilities (max abs / relative max diff) and the
    argmax masks: pixel agreement, and the mIoU of the export's masks taken
    against Keras' masks as the truth (classes absent from both left out).

    Args:
        num_classes: classes of the masks.
    """

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)
        self.max_abs_diff = 0.0
        self.scale = 0.0
        self.samples = 0
        self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)

    def update(self, reference, exported, reference_mask, exported_mask) -> None:
        """Adds a chunk: Keras and export probabilities `(n, H, W, classes)` and masks `(n, H, W)`."""
        self.max_abs_diff = max(self.max_abs_diff, float(np.max(np.abs(exported.astype(np.float64) - reference))))
        self.scale = max(self.scale, float(np.max(np.abs(reference))))
        keras_mask = np.asarray(reference_mask, np.int64).ravel()
        export_mask = np.clip(np.asarray(exported_mask, np.int64).ravel(), 0, self.num_classes - 1)
        self.confusion += np.bincount(
            keras_mask * self.num_classes + export_mask, minlength=self.num_classes**2
        ).reshape(self.num_classes, self.num_classes)
        self.samples += len(reference)

    def figures(self) -> dict:
        from keras_resnet.models.segmentation.metrics import confusion_to_iou

        pixels = int(self.confusion.sum())
        agreeing = int(np.trace(self.confusion))
        _, mask_miou = confusion_to_iou(self.confusion)
        return {
            "max_abs_diff": self.max_abs_diff,
            "relative_max_diff": self.max_abs_diff / self.scale if self.scale > 0 else self.max_abs_diff,
            "pixel_agreement": agreeing / max(pixels, 1),
            "pixel_disagreements": pixels - agreeing,
            "pixels": pixels,
            "mask_miou": mask_miou,
            "samples": self.samples,
        }


def segmentation_parity_figures(reference, exported, reference_mask=None, exported_mask=None) -> dict:
    """Max abs diff, relative max diff, pixel agreement and mask mIoU of two segmenters' outputs.

    Args:
        reference: Keras probabilities `(N, H, W, classes)`.
        exported: the export's probabilities on the same images.
        reference_mask, exported_mask: `(N, H, W)` class masks; the argmax
            of the probabilities when None.
    """
    reference, exported = np.asarray(reference), np.asarray(exported)
    parity = SegmentationParity(reference.shape[-1])
    parity.update(
        reference,
        exported,
        np.argmax(reference, axis=-1) if reference_mask is None else reference_mask,
        np.argmax(exported, axis=-1) if exported_mask is None else exported_mask,
    )
    return parity.figures()


def _judge(figures: dict, format: str, quantize: str, int8_min_agreement: float, task: str = CLASSIFICATION) -> None:
    """Adds `criterion` and `passed` to parity figures (in place)."""
    if format != "tflite" or quantize == "none":
        figures["criterion"] = f"relative max diff <= {FLOAT_RELATIVE_TOLERANCE:g}"
        figures["passed"] = figures["relative_max_diff"] <= FLOAT_RELATIVE_TOLERANCE
        for check in figures.get("checks", {}).values():
            check_passed = check["relative_max_diff"] <= FLOAT_RELATIVE_TOLERANCE and check.get(
                "top_class_matches_argmax", True
            )
            figures["passed"] = figures["passed"] and check_passed
    elif quantize == "int8" and task == SEGMENTATION:
        figures["criterion"] = f"pixel agreement >= {int8_min_agreement:g}"
        figures["passed"] = figures["pixel_agreement"] >= int8_min_agreement
    elif quantize == "int8":
        allowed = math.floor((1.0 - int8_min_agreement) * figures["samples"] + 1e-9)
        figures["criterion"] = (
            f"top-1 agreement >= {int8_min_agreement:g} "
            f"(at most {allowed} of {figures['samples']} samples may differ)"
        )
        figures["passed"] = figures["top1_disagreements"] <= allowed
    else:
        figures["criterion"] = "reported only"
        figures["passed"] = True


def _tool_versions(format: str) -> dict:
    packages = {"saved_model": [], "tflite": ["ai-edge-litert"], "onnx": ["tf2onnx", "onnx", "onnxruntime"]}[format]
    versions = {"keras_resnet": importlib_metadata.version("keras_resnet"), "tensorflow": tf.__version__}
    versions["keras"] = keras.__version__
    for package in packages:
        versions[package] = importlib_metadata.version(package)
    return versions


def _artefact_path(output_dir: Path, name: str, format: str, quantize: str) -> Path:
    if format == "saved_model":
        return output_dir / "saved_model"
    if format == "onnx":
        return output_dir / f"{name}.onnx"
    return output_dir / f"{name}_{'fp32' if quantize == 'none' else quantize}.tflite"


def _parity_line(format: str, quantize: str, figures: dict, sample_source: str) -> str:
    label = format if format != "tflite" else f"tflite {'fp32' if quantize == 'none' else quantize}"
    verdict = "ok" if figures["passed"] else "FAILED"
    if "pixel_agreement" in figures:
        agreement = (
            f"pixel agreement {100 * figures['pixel_agreement']:.2f}%, "
            f"mask mIoU vs Keras {figures['mask_miou']:.4f}"
        )
    else:
        agreement = f"top-1 agreement {100 * figures['top1_agreement']:.1f}%"
    return (
        f"parity {label}: max|diff| {figures['max_abs_diff']:.3g}, relative {figures['relative_max_diff']:.3g}, "
        f"{agreement} on {figures['samples']} {sample_source} [{figures['criterion']}: {verdict}]"
    )


def _keras_outputs(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """The Keras model's probabilities, computed in chunks."""
    return np.concatenate(
        [keras.ops.convert_to_numpy(model(batch, training=False)) for batch, _ in _batches(images, None)]
    )


def _check_uint8_signature(model: keras.Model, path: Path, images: np.ndarray) -> dict:
    """Parity of the SavedModel's uint8 `serving_default` on the rounded images."""
    pixels = np.clip(np.round(images), 0, 255).astype(np.uint8)
    reference = _keras_outputs(model, pixels.astype(np.float32))
    loaded = tf.saved_model.load(str(path))
    serve = loaded.signatures["serving_default"]
    outputs = [serve(**{INPUT_NAME: tf.constant(batch)}) for batch, _ in _batches(pixels, None)]
    probabilities = np.concatenate([o[OUTPUT_NAME].numpy() for o in outputs])
    figures = parity_figures(reference, probabilities)
    top_class = np.concatenate([o["top_class"].numpy() for o in outputs])
    figures["top_class_matches_argmax"] = bool(np.array_equal(top_class, np.argmax(probabilities, axis=-1)))
    return figures


def _segmentation_chunk(input_shape, num_classes: int) -> int:
    """Images per chunk of a segmenter's parity check: outputs of at most ~16 MB."""
    height, width, _ = input_shape
    return int(max(1, min(PREDICT_CHUNK, SEGMENTATION_CHUNK_VALUES // (height * width * num_classes))))


def _segmentation_parity(model: keras.Model, spec: OutputSpec, run_export, images: np.ndarray) -> dict:
    """Streams images through Keras and `run_export` (`float32 chunk -> {probabilities, mask}`)."""
    num_classes = int(model.output_shape[-1])
    keras_outputs = _outputs_fn(model, spec)
    parity = SegmentationParity(num_classes)
    step = _segmentation_chunk(model.input_shape[1:], num_classes)
    for start in range(0, len(images), step):
        chunk = images[start : start + step]
        reference = keras_outputs(tf.constant(chunk, tf.float32))
        exported = run_export(chunk)
        parity.update(
            reference[OUTPUT_NAME].numpy(), exported[OUTPUT_NAME], reference[MASK_NAME].numpy(), exported[MASK_NAME]
        )
    return parity.figures()


def _check_uint8_segmentation(model: keras.Model, spec: OutputSpec, path: Path, images: np.ndarray) -> dict:
    """Parity of a segmenter SavedModel's uint8 `serving_default` on the rounded images (model size)."""
    pixels = np.clip(np.round(images), 0, 255).astype(np.float32)
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]

    def run_export(chunk):
        outputs = serve(**{INPUT_NAME: tf.constant(chunk.astype(np.uint8))})
        return {name: value.numpy() for name, value in outputs.items()}

    return _segmentation_parity(model, spec, run_export, pixels)


def _output_values(model: keras.Model) -> str:
    """What the output holds, from the classifier's activation."""
    activation = getattr(model, "activation", "softmax")
    return {
        "softmax": "class probabilities (softmax)",
        "sigmoid": "per-class scores (sigmoid)",
        None: "logits (no activation)",
    }.get(activation, f"{activation} outputs")


def _segmentation_metadata(model: keras.Model, spec: OutputSpec, source: ModelSource, fixed_batch) -> dict:
    """The "output", "outputs" and "segmentation" entries of a segmenter's metadata."""
    height, width, _ = model.input_shape[1:]
    num_classes = int(model.output_shape[-1])
    batch = fixed_batch if fixed_batch is not None else "N"
    added = "softmax added at export over the model's logits" if spec.logits else "the model's softmax output"
    probabilities = {
        "name": OUTPUT_NAME,
        "dtype": "float32",
        "shape": [batch, height, width, num_classes],
        "values": f"per-pixel class probabilities ({added}), at the input resolution",
    }
    mask = {
        "name": MASK_NAME,
        "dtype": "int32",
        "shape": [batch, height, width],
        "values": "per-pixel argmax class of the model's output (class index, 0..num_classes-1)",
    }
    backbone = getattr(source.model, "backbone", None)
    return {
        "output": probabilities,
        "outputs": [probabilities, mask],
        "segmentation": {
            "head": source.run_info.get("head", getattr(source.model, "head", None)),
            "output_stride": source.run_info.get("output_stride", getattr(backbone, "output_stride", None)),
            "model_output": "logits" if spec.logits else "softmax",
            "ignore_index": source.run_info.get("ignore_index"),
        },
    }


def _parse_batch_size(batch_size) -> int | None:
    if batch_size == "dynamic" or batch_size is None:
        return None
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive int or 'dynamic', got {batch_size!r}")
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
    int8_min_agreement: float | None = None,
    name: str | None = None,
    detection_outputs: str = "decoded",
    decoder_args: dict | None = None,
) -> dict:
    """Export a classifier, segmenter or detector, check it against Keras and write its metadata JSON.

    A segmenter (a model with a `(N, H, W, classes)` output, e.g. a
    `ResNetSegmenter` or a segmentation run dir) exports "probabilities"
    (per-pixel softmax, added when the model outputs logits) and "mask"
    (int32 argmax); see the module docstring. A `RetinaNetDetector` (or a
    detection run dir) exports boxes, scores, classes and num_detections
    with NMS inside, or its raw outputs; see `keras_resnet.export.detection`.

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

    Returns:
        `{"format", "quantize", "task", "path", "metadata_path",
        "input_shape", "batch_size", "parity": {...}}`; parity holds
        max_abs_diff, relative_max_diff, samples, sample_source, criterion,
        passed, and top1_agreement (classifiers) or pixel_agreement,
        pixel_disagreements, pixels, mask_miou (segmenters).

    Raises:
        ValueError: bad arguments, paths or calibration data.
        ExportParityError: the export fails its parity criterion (the
            artefact and metadata are written first).
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not supported; allowed: {', '.join(FORMATS)}")
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r} is not supported; allowed: {', '.join(QUANTIZATIONS)}")
    if quantize != "none" and format != "tflite":
        raise ValueError(f"quantize={quantize!r} applies only to format='tflite', not {format!r}")
    if int(parity_samples) < 1 or int(calibration_samples) < 1:
        raise ValueError("parity_samples and calibration_samples must be >= 1")
    if int8_min_agreement is not None and not 0.0 <= int8_min_agreement <= 1.0:
        raise ValueError(f"int8_min_agreement must be in [0, 1], got {int8_min_agreement}")
    fixed_batch = _parse_batch_size(batch_size)

    with _step("loading the Keras model"):
        source = load_model_source(model_or_dir)
    from keras_resnet.export.detection import export_detector, is_detector

    if is_detector(source.model):
        return export_detector(
            source, format, quantize, calibration, input_size, fixed_batch, output, int(parity_samples),
            int(calibration_samples), int8_min_agreement, name, detection_outputs, decoder_args,
        )
    if detection_outputs != "decoded" or decoder_args:
        raise ValueError("detection_outputs and decoder_args apply to detectors only")
    with _step("preparing the Keras model"):
        policies = {layer.dtype_policy.name for layer in _walk_layers(source.model)}
        spec = output_spec(source.model)
        model = model_at_size(as_float32(source.model), input_size)
    segmenter = spec.task == SEGMENTATION
    if int8_min_agreement is None:
        int8_min_agreement = DEFAULT_SEGMENTATION_INT8_MIN_AGREEMENT if segmenter else DEFAULT_INT8_MIN_AGREEMENT
    input_shape = tuple(model.input_shape[1:])
    name = name or source.name
    output_dir = Path(output) if output is not None else Path("saved_models") / name
    path = _artefact_path(output_dir, name, format, quantize)

    calibration_text = None
    if quantize == "int8":
        with _step("loading calibration images"):
            calibration_images, calibration_text = _calibration_images(
                calibration, source, input_shape, int(calibration_samples)
            )
    with _step("loading parity images"):
        images, sample_source = _parity_images(calibration, source, input_shape, int(parity_samples))
    if not segmenter:  # a segmenter's Keras outputs are computed chunk by chunk during the check
        with _step("running the Keras model"):
            reference = _keras_outputs(model, images)

    output_dir.mkdir(parents=True, exist_ok=True)
    label = format if quantize == "none" else f"{format} {quantize}"
    with _step(f"converting to {label}: {path}"):
        if format == "saved_model":
            if path.exists():
                if not (path / "saved_model.pb").is_file():
                    raise ValueError(f"{path} exists and is not a SavedModel; choose another output folder")
                shutil.rmtree(path)
            _write_saved_model(model, spec, path, fixed_batch)
        elif format == "tflite":
            calibration_input = calibration_images if quantize == "int8" else None
            path.write_bytes(_convert_tflite(model, spec, fixed_batch, quantize, calibration_input))
        else:
            _convert_onnx(model, spec, path, fixed_batch)

    with _step(f"checking {label} against Keras"):
        exported = load_exported_model(path)
        if segmenter:
            figures = _segmentation_parity(model, spec, exported.predict_outputs, images)
            if format == "saved_model":
                figures["checks"] = {"serving_default": _check_uint8_segmentation(model, spec, path, images)}
        else:
            figures = parity_figures(reference, exported.predict(images))
            if format == "saved_model":
                figures["checks"] = {"serving_default": _check_uint8_signature(model, path, images)}
        figures["sample_source"] = sample_source
        _judge(figures, format, quantize, int8_min_agreement, spec.task)

    preprocessing = find_preprocessing(model) or source.run_info.get("preprocessing")
    metadata = {
        "format": format,
        "quantization": quantize,
        "artefact": path.name,
        "source_model": str(Path(source.path).resolve()) if source.path else None,
        "model_name": model.name,
        "preset": source.run_info.get("preset"),
        "task": spec.task,
        "source_dtype_policies": sorted(policies),
        "input_shape": list(input_shape),
        "batch_size": fixed_batch if fixed_batch is not None else "dynamic",
        "input": {"name": INPUT_NAME, "dtype": "float32", "format": INPUT_FORMAT},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "values": _output_values(model)},
        "preprocessing": preprocessing,
        "num_classes": int(model.output_shape[-1]),
        "class_names": source.class_names,
        "parity": figures,
        "tool_versions": _tool_versions(format),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if segmenter:
        metadata.update(_segmentation_metadata(model, spec, source, fixed_batch))
    if format == "saved_model":
        metadata["signatures"] = {
            "serving_default": "uint8 images [N, H, W, C] of any size, resized inside (bilinear) -> "
            "{probabilities, top_class (int32), top_score}",
            "serve_float": f"{INPUT_FORMAT} at the model size -> {{probabilities}}",
        }
        if segmenter:
            metadata["signatures"] = {
                "serving_default": "uint8 images [N, H, W, C] of any size, resized inside to the model size "
                "(bilinear); per-pixel scores resized back to H x W (bilinear) -> "
                "{probabilities [N, H, W, classes], mask (int32) [N, H, W]}",
                "serve_float": f"{INPUT_FORMAT} at the model size -> {{probabilities, mask (int32)}}",
            }
    if quantize == "int8":
        metadata["int8"] = {
            "ops": "TFLITE_BUILTINS_INT8 (full-integer kernels)",
            "io": "float32 input and output; quantize/dequantize ops inside the model"
            + ("; the mask output is int32" if segmenter else ""),
            "calibration": calibration_text,
            "calibration_samples": int(len(calibration_images)),
            "min_agreement": int8_min_agreement,
        }
    metadata_path = Path(str(path) + METADATA_SUFFIX)
    metadata_path.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    print(_parity_line(format, quantize, figures, sample_source), flush=True)
    if not figures["passed"]:
        agreement = (
            f"pixel agreement {figures['pixel_agreement']:.4f}"
            if segmenter
            else f"top-1 agreement {figures['top1_agreement']:.3f}"
        )
        raise ExportParityError(
            f"{path} fails its parity check against Keras ({figures['criterion']}): relative max diff "
            f"{figures['relative_max_diff']:.3g}, {agreement}"
        )
    return {
        "format": format,
        "quantize": quantize,
        "task": spec.task,
        "path": str(path),
        "metadata_path": str(metadata_path),
        "input_shape": list(input_shape),
        "batch_size": metadata["batch_size"],
        "parity": figures,
    }
