"""Export trained classifiers to SavedModel, TFLite and ONNX, with parity checks.

Every export takes float32 raw pixels 0..255, NHWC, and returns softmax
probabilities: the `ImageNormalization` layer inside the model travels with
it, so no export needs the training normalisation. After writing an
artefact, `export_model` runs it on sample images, compares it with the
Keras model and writes `<artefact>.json` (source, preset, input contract,
preprocessing, class names, quantization, parity figures, tool versions).

How each format is produced (Keras 3.15 / TF 2.21 / tf2onnx 1.17):

* SavedModel: `keras.export.ExportArchive` with two endpoints,
  `serving_default` (uint8 images `[N, H', W', C]` of any size, resized
  inside with bilinear `tf.image.resize`; returns `probabilities`,
  `top_class`, `top_score`) and `serve_float` (float32 raw pixels at the
  model size; returns `probabilities`). A plain `tf.Module` holding a
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
  the model, opset 17, float32 NHWC input "images", output "probabilities".
  tf2onnx works with protobuf 7, but `from_function`/`from_keras` fail on
  ResNeXt: Keras 3 wraps grouped convolutions in a nested XLA-only
  function that tf2onnx cannot convert ("StatefulPartitionedCall is not
  supported"). We freeze the function ourselves, drop the
  `_XlaMustCompile`/`_noinline` marks so grappler inlines the plain
  `Conv2D`, then convert. Run with onnxruntime.

Mixed-precision models (`mixed_bfloat16` / `mixed_float16` layers) are
rebuilt in float32 with the same weights before export (`as_float32`), and
parity is measured against that float32 model.

Parity: float exports (SavedModel, ONNX, TFLite fp32) must match Keras to
a relative max difference (max |diff| / max |Keras output|) of 1e-4;
float16 and dynamic-range TFLite are reported only; int8 must agree with
Keras on the top-1 class for at least `int8_min_agreement` of the samples
(0.99 by default: with fewer than 100 samples that means every sample).
A failed check raises `ExportParityError` after the artefact and its
metadata (with `"passed": false`) are written.
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

from keras_resnet.classifier import ResNetClassifier  # noqa: E402
from keras_resnet.layers import ImageNormalization  # noqa: E402

FORMATS = ("saved_model", "tflite", "onnx")
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
RUN_MODEL_FILES = ("best_model.keras", "last_model.keras")
RUN_INFO_FILE = "run.json"
RUN_RECIPE_FILE = "recipe.yaml"
METADATA_SUFFIX = ".json"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
INPUT_FORMAT = "float32 raw pixels 0..255, NHWC"
ONNX_OPSET = 17
FLOAT_RELATIVE_TOLERANCE = 1e-4
DEFAULT_INT8_MIN_AGREEMENT = 0.99
DEFAULT_PARITY_SAMPLES = 100
DEFAULT_CALIBRATION_SAMPLES = 200
RUNTIME_THREADS = 2
PREDICT_CHUNK = 32
SAMPLE_SEED = 0


class ExportParityError(ValueError):
    """An exported artefact disagrees with the Keras model beyond tolerance."""


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
        rebuilt at the new size with the same weights otherwise.

    Raises:
        ValueError: no size known, or a non-`ResNetClassifier` model with a
            fixed size different from `input_size`.
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
    if not isinstance(model, ResNetClassifier):
        if height is None and width is None:
            inputs = keras.Input(shape=(*input_size, channels), name=INPUT_NAME)
            return keras.Model(inputs, model(inputs), name=model.name)
        raise ValueError(
            f"model {model.name} takes {height}x{width} images; only ResNetClassifier models can be "
            f"re-exported at another input_size ({input_size[0]}x{input_size[1]})"
        )
    config = model.get_config()
    config["backbone"]["config"]["input_shape"] = [*input_size, channels]
    resized = ResNetClassifier.from_config(config)
    resized.set_weights(model.get_weights())
    return resized


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
    """

    def __init__(self, kind, path, input_shape, batch_size, run_batch, metadata, class_names):
        self.kind = kind
        self.path = str(path)
        self.input_shape = tuple(int(v) for v in input_shape)
        self.batch_size = batch_size
        self._run_batch = run_batch
        self.metadata = metadata
        self.class_names = class_names

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Outputs for float32 raw-pixel images `(N, H, W, C)` at `input_shape`, any N."""
        images = np.asarray(images, np.float32)
        if images.shape[1:] != self.input_shape:
            raise ValueError(f"{self.path} takes images of shape {self.input_shape}, got {images.shape[1:]}")
        outputs = [self.predict_batch(batch)[:count] for batch, count in _batches(images, self.batch_size)]
        return np.concatenate(outputs).astype(np.float32)

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """Runs one float32 batch as is (no checks or padding): the artefact's own call."""
        return self._run_batch(batch)


def _metadata_beside(path: Path) -> dict:
    metadata_path = Path(str(path).rstrip("/\\") + METADATA_SUFFIX)
    return _read_json(metadata_path) if metadata_path.is_file() else {}


def _load_keras(path) -> ExportedModel:
    source = load_model_source(path)
    metadata = source.run_info
    height, width = source.model.input_shape[1:3]
    if height is None or width is None:
        if not metadata.get("input_shape"):
            raise ValueError(f"model {source.path} has a dynamic input size and no run.json gives its size")
        height, width = metadata["input_shape"][:2]
    model = model_at_size(as_float32(source.model), (height, width))

    def run_batch(batch):
        return keras.ops.convert_to_numpy(model(batch, training=False))

    return ExportedModel("keras", source.path, model.input_shape[1:], None, run_batch, metadata, source.class_names)


def _load_saved_model(path: Path) -> ExportedModel:
    loaded = tf.saved_model.load(str(path))
    if "serve_float" not in loaded.signatures:
        raise ValueError(f"SavedModel {path} has no serve_float signature; export it with keras_resnet.export")
    signature = loaded.signatures["serve_float"]
    spec = signature.structured_input_signature[1][INPUT_NAME]
    metadata = _metadata_beside(path)

    def run_batch(batch):
        return signature(**{INPUT_NAME: tf.constant(batch)})[OUTPUT_NAME].numpy()

    run_batch.loaded = loaded  # keeps the restored variables alive with the signature
    return ExportedModel(
        "saved_model", path, spec.shape[1:], spec.shape[0], run_batch, metadata, metadata.get("class_names")
    )


def _load_tflite(path: Path, num_threads: int = RUNTIME_THREADS) -> ExportedModel:
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
    except ValueError as error:
        raise ValueError(f"cannot load TFLite model {path}: {error}") from None
    input_detail = interpreter.get_input_details()[0]
    output_index = interpreter.get_output_details()[0]["index"]
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
        return interpreter.get_tensor(output_index).copy()

    metadata = _metadata_beside(path)
    batch_size = None if dynamic_batch else signature[0]
    return ExportedModel("tflite", path, signature[1:], batch_size, run_batch, metadata, metadata.get("class_names"))


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

    def run_batch(batch):
        return session.run(None, {model_input.name: batch})[0]

    metadata = _metadata_beside(path)
    batch_size = batch_dim if isinstance(batch_dim, int) else None
    return ExportedModel(
        "onnx", path, model_input.shape[1:], batch_size, run_batch, metadata, metadata.get("class_names")
    )


def load_exported_model(path, num_threads: int = RUNTIME_THREADS) -> ExportedModel:
    """Open any model form for inference on float32 raw-pixel images.

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


# --------------------------------------------------------------------------- sample images


def _recipe_images(recipe_path: str, input_shape, split: str, count: int) -> np.ndarray:
    """Up to `count` un-augmented images of a recipe's train or val split, at `input_shape`."""
    from keras_resnet.config import load_config
    from keras_resnet.data.classification import build_classification_datasets

    height, width, channels = input_shape
    cfg = load_config(
        recipe_path,
        overrides=[
            f"model.input_shape=[{height},{width},{channels}]",
            "data.batch_size=1",
            "data.cache=false",
            f"data.limit_train={count}",
            f"data.limit_val={count}",
            "data.augment.random_crop_padding=0",
            "data.augment.horizontal_flip=false",
            "data.augment.random_erasing=0.0",
        ],
    )
    train, val, _ = build_classification_datasets(cfg, seed=SAMPLE_SEED)
    dataset = train if split == "train" else val
    images = [batch.numpy() for batch, _ in dataset.take(count)]
    return np.concatenate(images).astype(np.float32)


def _folder_images(folder: str, input_shape, count: int) -> np.ndarray:
    """Up to `count` images from a folder (recursive), a seeded sample when there are more."""
    from keras_resnet.predict import find_image_files, load_images

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


def _probabilities_fn(model: keras.Model):
    def probabilities(images):
        return {OUTPUT_NAME: model(images, training=False)}

    return probabilities


def _write_saved_model(model: keras.Model, directory: Path, batch_size: int | None) -> None:
    """A SavedModel with the `serving_default` (uint8, any size) and `serve_float` signatures."""
    height, width, channels = model.input_shape[1:]

    def serve_uint8(images):
        resized = tf.image.resize(tf.cast(images, tf.float32), [height, width], method="bilinear")
        probabilities = model(resized, training=False)
        return {
            OUTPUT_NAME: probabilities,
            "top_class": tf.argmax(probabilities, axis=-1, output_type=tf.int32),
            "top_score": tf.reduce_max(probabilities, axis=-1),
        }

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        serve_uint8,
        input_signature=[tf.TensorSpec([None, None, None, channels], tf.uint8, name=INPUT_NAME)],
    )
    archive.add_endpoint("serve_float", _probabilities_fn(model), input_signature=[_float_signature(model, batch_size)])
    archive.write_out(str(directory), verbose=False)


def _convert_tflite(model: keras.Model, batch_size: int | None, quantize: str, calibration_images) -> bytes:
    with tempfile.TemporaryDirectory(prefix="keras_resnet_tflite_") as tmp:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            "serving_default", _probabilities_fn(model), input_signature=[_float_signature(model, batch_size)]
        )
        archive.write_out(tmp, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantize in ("float16", "dynamic", "int8"):
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if quantize == "int8":
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            step = batch_size or 1

            def representative_dataset():
                for batch, _ in _batches(calibration_images, step):
                    yield [batch]

            converter.representative_dataset = representative_dataset
        return converter.convert()


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


def _convert_onnx(model: keras.Model, path: Path, batch_size: int | None) -> None:
    """Freeze the model's function, convert it with tf2onnx and name its tensors.

    The ONNX graph has one input "images" (float32 NHWC) and one output
    "probabilities"; a dynamic batch dimension is named "batch".
    """
    import onnx
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    function = tf.function(_probabilities_fn(model), autograph=False)
    concrete = function.get_concrete_function(_float_signature(model, batch_size))
    frozen = convert_variables_to_constants_v2(concrete, lower_control_flow=False, aggressive_inlining=True)
    graph_def = frozen.graph.as_graph_def(add_shapes=True)
    _allow_inlining(graph_def)
    input_name, output_name = frozen.inputs[0].name, frozen.outputs[0].name
    model_proto, _ = tf2onnx.convert.from_graph_def(
        graph_def, input_names=[input_name], output_names=[output_name], opset=ONNX_OPSET
    )
    _rename_onnx_tensor(model_proto.graph, input_name, INPUT_NAME)
    _rename_onnx_tensor(model_proto.graph, output_name, OUTPUT_NAME)
    if batch_size is None:
        for value in (model_proto.graph.input[0], model_proto.graph.output[0]):
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


def _judge(figures: dict, format: str, quantize: str, int8_min_agreement: float) -> None:
    """Adds `criterion` and `passed` to parity figures (in place)."""
    if format != "tflite" or quantize == "none":
        figures["criterion"] = f"relative max diff <= {FLOAT_RELATIVE_TOLERANCE:g}"
        figures["passed"] = figures["relative_max_diff"] <= FLOAT_RELATIVE_TOLERANCE
        for check in figures.get("checks", {}).values():
            check_passed = check["relative_max_diff"] <= FLOAT_RELATIVE_TOLERANCE and check["top_class_matches_argmax"]
            figures["passed"] = figures["passed"] and check_passed
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
    return (
        f"parity {label}: max|diff| {figures['max_abs_diff']:.3g}, relative {figures['relative_max_diff']:.3g}, "
        f"top-1 agreement {100 * figures['top1_agreement']:.1f}% on {figures['samples']} {sample_source} "
        f"[{figures['criterion']}: {verdict}]"
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


def _output_values(model: keras.Model) -> str:
    """What the output holds, from the classifier's activation."""
    activation = getattr(model, "activation", "softmax")
    return {
        "softmax": "class probabilities (softmax)",
        "sigmoid": "per-class scores (sigmoid)",
        None: "logits (no activation)",
    }.get(activation, f"{activation} outputs")


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
    int8_min_agreement: float = DEFAULT_INT8_MIN_AGREEMENT,
    name: str | None = None,
) -> dict:
    """Export a classifier, check it against Keras and write its metadata JSON.

    Args:
        model_or_dir: a `.keras` file, a training run dir or a `keras.Model`.
        format: "saved_model", "tflite" or "onnx".
        quantize: "none", or for TFLite "float16", "dynamic" (int8 weights,
            float activations) or "int8" (full integer, calibrated).
        calibration: a recipe YAML (its training images calibrate int8, its
            validation images check parity) or a folder of images (class
            subfolders or plain images). For int8 without it, the run's
            `recipe.yaml` is used.
        input_size: `(height, width)` of the export; defaults to the model's.
        batch_size: a fixed batch size (default 1) or "dynamic".
        output: output folder; defaults to `saved_models/<name>/`.
        parity_samples: images used for the parity check.
        calibration_samples: images used for int8 calibration.
        int8_min_agreement: minimum int8 top-1 agreement with Keras.
        name: base of the file names; defaults to the run dir name, the
            `.keras` file stem or the model name.

    Returns:
        `{"format", "quantize", "path", "metadata_path", "input_shape",
        "batch_size", "parity": {max_abs_diff, relative_max_diff,
        top1_agreement, samples, sample_source, criterion, passed, ...}}`.

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
    if not 0.0 <= int8_min_agreement <= 1.0:
        raise ValueError(f"int8_min_agreement must be in [0, 1], got {int8_min_agreement}")
    fixed_batch = _parse_batch_size(batch_size)

    with _step("loading the Keras model"):
        source = load_model_source(model_or_dir)
        policies = {layer.dtype_policy.name for layer in _walk_layers(source.model)}
        model = model_at_size(as_float32(source.model), input_size)
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
            _write_saved_model(model, path, fixed_batch)
        elif format == "tflite":
            calibration_input = calibration_images if quantize == "int8" else None
            path.write_bytes(_convert_tflite(model, fixed_batch, quantize, calibration_input))
        else:
            _convert_onnx(model, path, fixed_batch)

    with _step(f"checking {label} against Keras"):
        exported = load_exported_model(path)
        figures = parity_figures(reference, exported.predict(images))
        if format == "saved_model":
            figures["checks"] = {"serving_default": _check_uint8_signature(model, path, images)}
        figures["sample_source"] = sample_source
        _judge(figures, format, quantize, int8_min_agreement)

    preprocessing = find_preprocessing(model) or source.run_info.get("preprocessing")
    metadata = {
        "format": format,
        "quantization": quantize,
        "artefact": path.name,
        "source_model": str(Path(source.path).resolve()) if source.path else None,
        "model_name": model.name,
        "preset": source.run_info.get("preset"),
        "task": source.run_info.get("task", "classification"),
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
    if format == "saved_model":
        metadata["signatures"] = {
            "serving_default": "uint8 images [N, H, W, C] of any size, resized inside (bilinear) -> "
            "{probabilities, top_class (int32), top_score}",
            "serve_float": f"{INPUT_FORMAT} at the model size -> {{probabilities}}",
        }
    if quantize == "int8":
        metadata["int8"] = {
            "ops": "TFLITE_BUILTINS_INT8 (full-integer kernels)",
            "io": "float32 input and output; quantize/dequantize ops inside the model",
            "calibration": calibration_text,
            "calibration_samples": int(len(calibration_images)),
        }
    metadata_path = Path(str(path) + METADATA_SUFFIX)
    metadata_path.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    print(_parity_line(format, quantize, figures, sample_source), flush=True)
    if not figures["passed"]:
        raise ExportParityError(
            f"{path} fails its parity check against Keras ({figures['criterion']}): relative max diff "
            f"{figures['relative_max_diff']:.3g}, top-1 agreement {figures['top1_agreement']:.3f}"
        )
    return {
        "format": format,
        "quantize": quantize,
        "path": str(path),
        "metadata_path": str(metadata_path),
        "input_shape": list(input_shape),
        "batch_size": metadata["batch_size"],
        "parity": figures,
    }
