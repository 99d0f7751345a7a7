"""What every export takes and returns: tensor names, the image signature, batching, output specs.

Every export takes float32 raw pixels 0..255, NHWC ("images"): the
`ImageNormalization` layer inside the model travels with it. (A
full-integer TFLite model, `io` "uint8" / "int8", takes the same pixels as
uint8, or int8 less 128; `open_tflite` feeds it float32 pixels alike.) A classifier
returns "probabilities" `(N, classes)`; a segmenter "probabilities" `(N, H,
W, classes)` and "mask" `(N, H, W)` int32; a detector "boxes", "scores",
"classes", "num_detections" (NMS inside) or "raw". The metadata JSON of an
artefact lies beside it as `<artefact>.json`.

`Runtime` is an artefact opened by its runtime (TensorFlow, TFLite,
onnxruntime): the format modules open them, `loading` turns them into
`ExportedModel`s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from keras_resnet.atomic_files import read_json
from keras_resnet.models.retinanet.decoder import OUTPUT_KEYS
from keras_resnet_settings.registry import CLASSIFICATION, SEGMENTATION

METADATA_SUFFIX = ".json"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
MASK_NAME = "mask"
RAW_NAME = "raw"
DETECTION_NAMES = OUTPUT_KEYS  # ("boxes", "scores", "classes", "num_detections")
INPUT_FORMAT = "float32 raw pixels 0..255, NHWC"
PREDICT_CHUNK = 32


def batches(images: np.ndarray, batch_size: int | None):
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


def run_in_batches(run_batch, images: np.ndarray, batch_size: int | None) -> dict:
    """`run_batch` (`batch -> {name: array}`) over all images, in `batches`, outputs concatenated."""
    chunks = [
        {name: value[:count] for name, value in run_batch(batch).items()}
        for batch, count in batches(images, batch_size)
    ]
    return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in chunks[0]}


def image_spec(model, batch_size: int | None) -> tf.TensorSpec:
    """The float32 "images" signature of a model at its size (`batch_size` None: dynamic)."""
    return tf.TensorSpec([batch_size, *model.input_shape[1:]], tf.float32, name=INPUT_NAME)


def uint8_image_spec(channels: int) -> tf.TensorSpec:
    """uint8 "images" `[N, H, W, channels]` of any size (a SavedModel's `serving_default`)."""
    return tf.TensorSpec([None, None, None, channels], tf.uint8, name=INPUT_NAME)


INTEGER_INPUT_FORMATS = {
    "uint8": "uint8 raw pixels 0..255, NHWC, fed as they are (scale 1, zero point 0)",
    "int8": "int8 raw pixels - 128, NHWC (scale 1, zero point -128)",
}


def input_metadata(**extra) -> dict:
    """The "input" entry of every export's metadata."""
    return {"name": INPUT_NAME, "dtype": "float32", "format": INPUT_FORMAT, **extra}


def integer_io_metadata(metadata: dict, io: str, quantization: dict) -> None:
    """Marks the integer I/O of a full-integer TFLite model in its metadata (in place).

    The "input" entry gets the dtype `io`, its format, "quantization"
    (`{"scale", "zero_point"}`) and how to quantize pixels for it; each entry
    of "output" / "outputs" gets its tensor's dtype, and when quantized its
    "quantization" and how to dequantize it.

    Args:
        metadata: the export metadata (with "input", "output", maybe "outputs").
        io: "uint8" or "int8".
        quantization: `keras_resnet.export.tflite.io_quantization` of the model.
    """

    def quantized(entry, tensor, formula):
        entry["dtype"] = tensor["dtype"]
        if "scale" in tensor:
            entry["quantization"] = {"scale": tensor["scale"], "zero_point": tensor["zero_point"]}
            entry[formula[0]] = formula[1]

    image = metadata["input"]
    quantized(image, next(iter(quantization["inputs"].values())), ("quantize", "q = round(x / scale + zero_point)"))
    image["format"] = INTEGER_INPUT_FORMATS[io]
    for entry in [metadata.get("output"), *metadata.get("outputs", [])]:
        if entry is not None and entry.get("name") in quantization["outputs"]:
            quantized(entry, quantization["outputs"][entry["name"]], ("dequantize", "x = (q - zero_point) * scale"))


def metadata_path(path) -> Path:
    """`<artefact>.json`, the metadata beside an artefact (a SavedModel dir: beside the dir)."""
    return Path(str(path).rstrip("/\\") + METADATA_SUFFIX)


REJECTED_MARK = ".rejected"


def rejected_path(path) -> Path:
    """Where an artefact that failed its parity gate is kept: `<stem>.rejected<suffix>` beside `path`."""
    path = Path(path)
    return path.with_name(f"{path.stem}{REJECTED_MARK}{path.suffix}")


def is_rejected_path(path) -> bool:
    """True for a path `rejected_path` makes."""
    return REJECTED_MARK in Path(path).name


def read_metadata(path) -> dict:
    """The metadata JSON beside an artefact, or {} when it has none."""
    path = metadata_path(path)
    return read_json(path) if path.is_file() else {}


def is_detection_output(names) -> bool:
    """True when an artefact's output names are a detector's (decoded or raw)."""
    names = set(names)
    return set(DETECTION_NAMES) <= names or (RAW_NAME in names and OUTPUT_NAME not in names)


def task_from_rank(shape) -> str:
    """The task of an artefact whose "probabilities" output has this shape."""
    return SEGMENTATION if shape is not None and len(shape) == 4 else CLASSIFICATION


@dataclass
class Runtime:
    """An artefact opened by its runtime.

    Attributes:
        kind: "saved_model", "tflite" or "onnx".
        input_shape: `(height, width, channels)` it takes.
        batch_size: its fixed batch size, or None when dynamic.
        outputs: `{output name: handle}` of the outputs it names.
        shapes: `{handle: shape}` of its outputs.
        first: the handle of the runtime's first output (None: no fallback).
        fetch: `(float32 batch, {name: handle}) -> {name: NumPy array}`; a
            runtime whose model takes integers quantizes the float32 raw
            pixels itself and dequantizes quantized outputs.
        input_dtype: the dtype of the model's input tensor ("float32";
            "uint8" / "int8" for a full-integer TFLite model).
    """

    kind: str
    input_shape: tuple
    batch_size: int | None
    outputs: dict
    shapes: dict
    first: object
    fetch: Callable
    input_dtype: str = "float32"

    def runner(self, handles: dict):
        """`batch -> {name: NumPy array}` of the outputs `handles` names."""
        return lambda batch: self.fetch(batch, handles)

    def run(self, images: np.ndarray) -> dict:
        """Every named output for all `images`, run in `batches` of the runtime's batch size."""
        return run_in_batches(self.runner(self.outputs), images, self.batch_size)


@dataclass(frozen=True)
class OutputSpec:
    """What a classifier's or segmenter's export computes from the model's output.

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


def model_activation(model):
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


def output_spec(model) -> OutputSpec:
    """The `OutputSpec` of a Keras model: a 4-D output `(N, H, W, classes)` makes it a segmenter.

    Call it on the model as loaded (before `model_at_size` wraps a
    dynamic-size model, which hides the model's `activation`).
    """
    shape = model.output_shape
    is_segmenter = isinstance(shape, tuple) and len(shape) == 4 and not isinstance(shape[0], (tuple, list))
    activation = model_activation(model)
    return OutputSpec(SEGMENTATION if is_segmenter else CLASSIFICATION, activation in (None, "linear"))


def segmentation_outputs(scores, logits: bool) -> dict:
    """`{"probabilities": softmax over classes, "mask": int32 argmax}` of per-pixel scores."""
    probabilities = tf.nn.softmax(scores, axis=-1) if logits else scores
    return {OUTPUT_NAME: probabilities, MASK_NAME: tf.argmax(scores, axis=-1, output_type=tf.int32)}


def outputs_fn(model, spec: OutputSpec):
    """`images -> {name: tensor}`: what every export of a classifier or segmenter computes."""

    def outputs(images):
        scores = model(images, training=False)
        if spec.task == SEGMENTATION:
            return segmentation_outputs(scores, spec.logits)
        return {OUTPUT_NAME: scores}

    return outputs
