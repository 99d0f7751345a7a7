"""The Keras model an export starts from: loading it, its run's files, float32 and input-size copies.

Mixed-precision models (`mixed_bfloat16` / `mixed_float16` layers) are
rebuilt in float32 with the same weights before export (`as_float32`), and
parity is measured against that float32 model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import keras

from keras_resnet.export.signatures import INPUT_NAME, output_spec
from keras_resnet.layers.core import ImageNormalization
from keras_resnet.models.resnet.classifier import ResNetClassifier
from keras_resnet.models.retinanet.detector import DECODER_DEFAULT_ARGS
from keras_resnet.models.segmentation.segmenter import ResNetSegmenter
from keras_resnet.runs import (
    RUN_INFO_FILE,
    RUN_MODEL_FILES,
    RUN_RECIPE_FILE,
    load_keras_model,
    read_run_info,
    run_model_file,
)
from keras_resnet_settings.errors import ExportError, ModelError
from keras_resnet_settings.registry import DETECTION

DECODER_ARGS = DECODER_DEFAULT_ARGS  # the DetectionDecoder arguments a detector or recipe may set


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
        # run.json's, else the model's own (a converted torchvision detector carries COCO's)
        return self.run_info.get("class_names") or getattr(self.model, "class_names", None) or None


def load_model_source(model_or_dir) -> ModelSource:
    """Load a model from a `.keras` file, a training run dir or a live model.

    A run dir (a training `output_dir`) provides `best_model.keras` (else
    `last_model.keras`), plus `run.json` (class names, preset,
    preprocessing) and `recipe.yaml` when present. A `.keras` file inside a
    run dir picks up the same files.

    Args:
        model_or_dir: path to a `.keras` file or run dir, or a `keras.Model`.

    Returns:
        A `ModelSource`.

    Raises:
        ModelError: the path is missing, is not a `.keras` file, or is a
            folder without `best_model.keras` / `last_model.keras`.
    """
    if isinstance(model_or_dir, keras.Model):
        return ModelSource(model=model_or_dir, path=None, name=model_or_dir.name)
    path = Path(model_or_dir)
    if not path.exists():
        raise ModelError(f"model path {path} does not exist; pass a .keras file or a training run output_dir")
    if path.is_dir():
        model_file = run_model_file(path)
        if model_file is None:
            raise ModelError(
                f"folder {path} is not a training run: it has neither {' nor '.join(RUN_MODEL_FILES)}"
            )
        run_dir = path
    elif path.suffix == ".keras":
        model_file = path
        run_dir = path.parent if (path.parent / RUN_INFO_FILE).is_file() else None
    else:
        raise ModelError(f"{path} is not a Keras model: expected a .keras file or a training run output_dir")
    model = load_keras_model(model_file)
    recipe = run_dir / RUN_RECIPE_FILE if run_dir else None
    return ModelSource(
        model=model,
        path=str(model_file),
        name=run_dir.name if run_dir else model_file.stem,
        run_info=read_run_info(run_dir) if run_dir else {},
        recipe_path=str(recipe) if recipe and recipe.is_file() else None,
    )


def walk_layers(model: keras.Model):
    """All layers of a model, nested models included, depth first."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from walk_layers(layer)


def dtype_policies(model: keras.Model) -> list[str]:
    """The sorted names of the dtype policies of the model's layers."""
    return sorted({layer.dtype_policy.name for layer in walk_layers(model)})


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
    if all(layer.dtype_policy.compute_dtype == "float32" for layer in walk_layers(model)):
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


def check_input_size(input_size) -> tuple[int, int]:
    """`input_size` as `(height, width)` ints; an `ExportError` unless two positive ints."""
    input_size = tuple(int(v) for v in input_size)
    if len(input_size) != 2 or min(input_size) < 1:
        raise ExportError(f"input_size must be two positive ints (H W), got {input_size}")
    return input_size


def rebuild_at_size(model: keras.Model, input_size) -> keras.Model:
    """A model built on a `ResNetBackbone` rebuilt at `(height, width)` with the same weights.

    A quantize-aware model is rebuilt from its float source's config at the
    new size (the folded, fake-quantized graph and its ranges carry over).
    """
    config = json.loads(json.dumps(model.get_config()))  # a plain copy (Keras tracks dict attributes)
    task_config = config["source"]["config"] if "source" in config and "backbone" not in config else config
    task_config["backbone"]["config"]["input_shape"] = [*input_size, model.input_shape[-1]]
    resized = type(model).from_config(config)
    resized.set_weights(model.get_weights())
    return resized


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
        ExportError: no size known, or a model of another class with a fixed
            size different from `input_size`.
    """
    height, width, channels = model.input_shape[1:]
    if input_size is None:
        if height is None or width is None:
            raise ExportError(f"model {model.name} has a dynamic input size; pass input_size (H W)")
        return model
    input_size = check_input_size(input_size)
    if (height, width) == input_size:
        return model
    if not isinstance(model, (ResNetClassifier, ResNetSegmenter)):
        if height is None and width is None:
            inputs = keras.Input(shape=(*input_size, channels), name=INPUT_NAME)
            return keras.Model(inputs, model(inputs), name=model.name)
        raise ExportError(
            f"model {model.name} takes {height}x{width} images; only ResNetClassifier and ResNetSegmenter "
            f"models can be re-exported at another input_size ({input_size[0]}x{input_size[1]})"
        )
    return rebuild_at_size(model, input_size)


def find_preprocessing(model: keras.Model) -> dict | None:
    """The settings of the first `ImageNormalization` layer in the model (or of its QAT form), or None."""
    from keras_resnet.quantization import QuantizedNormalization

    for layer in walk_layers(model):
        if isinstance(layer, QuantizedNormalization):  # a QAT model: the same normalisation, as a 1x1 conv
            layer = ImageNormalization.from_config(layer.normalization)
        if isinstance(layer, ImageNormalization):
            return {
                "mean": layer.mean,
                "std": layer.std,
                "scale": layer.scale,
                "reverse_channels": layer.reverse_channels,
                **({"interpolation": layer.interpolation} if layer.interpolation is not None else {}),
                **({"crop_pct": layer.crop_pct} if layer.crop_pct is not None else {}),
                "applied": "inside the model; feed raw pixels",
            }
    return None


def is_detector(model) -> bool:
    """True for a `RetinaNetDetector` (anything with `make_decoder` and an anchor generator)."""
    return hasattr(model, "make_decoder") and hasattr(model, "anchor_generator")


def task_of(model) -> str:
    """"detection" for a detector, else "segmentation" or "classification" (see `output_spec`)."""
    return DETECTION if is_detector(model) else output_spec(model).task


def make_decoder(model, run_info: dict | None = None, decoder_args: dict | None = None):
    """The detector's `DetectionDecoder` with the run's decoder settings, overridden by `decoder_args`."""
    settings = dict((run_info or {}).get("decoder") or {})
    for key, value in (decoder_args or {}).items():
        if key not in DECODER_ARGS:
            raise ExportError(f"unknown decoder argument {key!r}; allowed: {', '.join(DECODER_ARGS)}")
        if value is not None:
            settings[key] = value
    return model.make_decoder(**{k: v for k, v in settings.items() if k in DECODER_ARGS})
