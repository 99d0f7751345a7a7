"""The recipe's backbone, shared by every task's model: preset, input normalisation, pretrained weights.

- `build_backbone_from_config`: the `ResNetBackbone` of `model.backbone` / `model.backbone_args`
  and the `ImageNormalization` layer that takes raw pixels 0..255.
- `build_model_from_config`: a task model on that backbone, with
  `initialize_backbone`: `model.weights` (a `.keras` model, a keras.applications `.h5`, or a
  torchvision/timm state dict `.pth`/`.pt`/`.bin`/`.safetensors`) and `model.freeze_stages`
  applied to a built task model.
- `read_recipe_weights`: `model.weights` (a `.keras` model or another library's file), read once.
- `load_pretrained_weights`: loads those files into a model's backbone (and a classifier's head).
- `preprocessing_info`: the `preprocessing` entry of run.json.
- `check_recipe_args`: a ConfigError for a `model.*_args` key that the constructor does not take.

Input normalisation: a model trained from scratch normalises with the
training set's per-channel mean/std. One fine-tuned from a `.keras` model keeps
that model's normalisation layer; one fine-tuned from
another library's weights (keras.applications `.h5`, torchvision/timm) keeps
the normalisation those weights were trained with (keras.applications'
"caffe"/"tf" modes; ImageNet mean/std for torchvision, a timm
`pretrained_cfg`'s where one comes with the weights): the pretrained features
expect it. The run says which in its first lines and in run.json's
`preprocessing` (`source`).
"""

import difflib
import inspect
import os

import keras

from keras_resnet.convert.weight_files import is_torch_file
from keras_resnet.layers.core import ImageNormalization
from keras_resnet.models.resnet.backbone import ResNetBackbone
from keras_resnet.models.resnet.classifier import ResNetClassifier
from keras_resnet.models.resnet.presets import get_preset_config
from keras_resnet.models.resnet.pretrained import (
    check_fits,
    load_pretrained,
    read_pretrained,
)
from keras_resnet.runs import load_keras_model
from keras_resnet_settings.errors import ConfigError, ConversionError
from keras_resnet_settings.weights import is_weights_name

KERAS_SUFFIX = ".keras"
H5_SUFFIX = ".h5"
DATASET_SOURCE = "training set statistics"


def check_recipe_args(section, args, constructor, allowed=None):
    """A ConfigError for the first key of `model.<section>` that is not an argument of `constructor`.

    Args:
        section: the recipe key (`"backbone_args"`, `"head_args"`, `"decoder_args"`).
        args: its dict.
        constructor: the class it is passed to; its `__init__` signature gives the
            allowed names unless `allowed` lists them.
    """
    if allowed is None:
        parameters = inspect.signature(constructor.__init__).parameters.values()
        allowed = [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)][1:]
    for key in args:
        if key not in allowed:
            suggestion = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean {suggestion[0]}?" if suggestion else f"allowed: {', '.join(allowed)}"
            raise ConfigError(f"model.{section}.{key} is not an argument of {constructor.__name__}; {hint}")


def read_recipe_weights(model_cfg):
    """`model.weights` read once: a `.keras` model, or another library's file (keras.applications, torch).

    Args:
        model_cfg: the recipe's `model` section.

    Returns:
        The reader (`keras_resnet.models.resnet.pretrained.read_pretrained`),
        the loaded `keras.Model` of a `.keras` file (its normalisation and
        its layers, copied by name, come from this one load), or None: no
        `model.weights`.

    Raises:
        ConfigError: a missing file, an unknown kind of file, one that is not
            the architecture's, or weights for other input channels.
    """
    path = model_cfg.weights
    if not path:
        return None
    _check_weights_path(path)
    if str(path).endswith(KERAS_SUFFIX):
        return load_keras_model(path)
    try:
        weights = read_pretrained(path, preset=model_cfg.backbone)
    except ConversionError as error:
        raise ConfigError(f"model.weights: {error}") from None
    channels = tuple(model_cfg.input_shape or (None,))[-1]
    if channels is not None and int(channels) != int(weights.input_channels):
        raise ConfigError(
            f"model.weights {path} needs {weights.input_channels} input channels but model.input_shape has "
            f"{channels}; set model.input_shape to [height, width, {weights.input_channels}]."
        )
    return weights


def _check_weights_path(path):
    if is_weights_name(path):  # "imagenet" or a catalogue tag: resolved (downloaded once) by read_pretrained
        return
    if not os.path.exists(path):
        raise ConfigError(f"model.weights file {path} does not exist.")
    if not (str(path).endswith((KERAS_SUFFIX, H5_SUFFIX)) or is_torch_file(path)):
        raise ConfigError(
            f"model.weights {path} must be a .keras model, a keras.applications .h5 weight file or a "
            "torchvision/timm state dict (.pth, .pt, .bin, .safetensors)."
        )


def source_preprocessing_info(weights) -> dict:
    """run.json's `preprocessing` for a model that keeps the normalisation of pretrained `weights`.

    Args:
        weights: a reader of `keras_resnet.models.resnet.pretrained` (torch or keras.applications).

    Returns:
        mean, std, scale, reverse_channels (torch: and interpolation,
        crop_pct when stated), `input_range` and `source`: the weights' file
        and where the figures come from.
    """
    if hasattr(weights, "preprocessing_info"):
        info = weights.preprocessing_info()
        origin = info.pop("from")
    else:
        layer = weights.preprocessing(name="normalization")
        info = {"mean": layer.mean, "std": layer.std, "scale": layer.scale, "reverse_channels": layer.reverse_channels}
        origin = f"{weights.describe()}, '{'caffe' if layer.reverse_channels else 'tf'}' mode"
    return {**info, "input_range": [0, 255], "source": f"pretrained weights {weights.source_name}: {origin}"}


def build_backbone_from_config(cfg, info, weights=None):
    """The recipe's backbone and the layer normalising raw pixels 0..255.

    Args:
        cfg: the recipe.
        info: its data's `info` (the training set's `mean`, `std`).
        weights: `model.weights` as `read_recipe_weights` read it (None: read
            here when the recipe names another library's file).

    Returns:
        `(backbone, preprocessing)`: normalisation by the training set's
        per-channel mean/std, or, with pretrained weights of another library,
        the normalisation those weights were trained with. Which one is
        recorded in `info["preprocessing"]` (run.json's `preprocessing`).
    """
    model_cfg = cfg.model
    get_preset_config(model_cfg.backbone)  # unknown preset -> ValueError listing the valid ones
    check_recipe_args("backbone_args", model_cfg.backbone_args, ResNetBackbone)
    if weights is None:
        weights = read_recipe_weights(model_cfg)
    try:
        backbone = ResNetBackbone.from_preset(
            model_cfg.backbone, input_shape=tuple(model_cfg.input_shape), **model_cfg.backbone_args
        )
    except TypeError as error:
        raise ConfigError(f"model.backbone_args: {error}") from None
    source_model = weights if isinstance(weights, keras.Model) else None
    source_normalization = keras_model_normalization(source_model, model_cfg) if source_model is not None else None
    if source_normalization is not None:
        preprocessing, info["preprocessing"] = source_normalization
    elif weights is not None and source_model is None:
        try:
            check_fits(backbone, weights, preset=model_cfg.backbone)
        except ConversionError as error:
            raise ConfigError(f"model.weights: {error}") from None
        preprocessing = weights.preprocessing(name="normalization")
        info["preprocessing"] = source_preprocessing_info(weights)
    else:
        preprocessing = ImageNormalization(mean=info["mean"], std=info["std"], name="normalization")
        info["preprocessing"] = dataset_preprocessing_info(info)
    return backbone, preprocessing


def keras_model_normalization(source, model_cfg):
    """`(layer, run.json preprocessing)` of `source`, the loaded `.keras` `model.weights`: its normalisation.

    A model fine-tuned from a `.keras` model of this package keeps that
    model's `ImageNormalization` (its features expect those inputs), as
    one fine-tuned from another library's weights keeps theirs. None when
    the model has no `normalization` layer (then the training set's
    statistics are used).

    Raises:
        ConfigError: the model normalises another number of channels than `model.input_shape` has.
    """
    path = model_cfg.weights
    try:
        layer = source.get_layer("normalization")
    except ValueError:
        return None
    if not isinstance(layer, ImageNormalization):
        return None
    config = layer.get_config()
    means = config["mean"] if isinstance(config["mean"], list) else None
    channels = int(tuple(model_cfg.input_shape)[-1])
    if means is not None and len(means) != channels:
        raise ConfigError(
            f"model.weights {path} takes {len(means)}-channel images but model.input_shape has {channels}; "
            f"set model.input_shape to [height, width, {len(means)}]."
        )
    info = {"mean": config["mean"], "std": config["std"], "scale": config["scale"],
            "reverse_channels": config["reverse_channels"], "input_range": [0, 255],
            **{key: config[key] for key in ("interpolation", "crop_pct") if config.get(key) is not None},
            "source": f"the normalisation of the .keras model {path}"}
    return ImageNormalization.from_config(config), info


def build_model_from_config(cfg, info, model_class, name, error_message=None, **kwargs):
    """A task model of the recipe: `model_class(backbone, model.num_classes, preprocessing=..., **kwargs)`.

    The backbone and the normalisation of raw pixels 0..255 come from
    `build_backbone_from_config` (the training set's statistics, or those of
    another library's `model.weights`; the choice is printed), then
    `initialize_backbone` applies `model.weights` and `model.freeze_stages`.

    Args:
        cfg: the recipe; info: its data's `info` (mean, std); it receives
            `info["preprocessing"]`, what run.json records.
        model_class: `ResNetClassifier`, `ResNetSegmenter`, `RetinaNetDetector`...
        name: the model's name after the preset's (`"{preset}_{name}"`).
        error_message: for a TypeError/ValueError of `model_class` (arguments
            from the recipe), a ConfigError with this text, `{error}` filled in;
            None lets them through.
        kwargs: further arguments of `model_class`.
    """
    if cfg.qat.source_run:  # `keras-resnet qat`: the source run's best model, quantize-aware
        from keras_resnet.training.qat import quantize_aware_from_run

        return quantize_aware_from_run(cfg, info, model_class)
    model_cfg = cfg.model
    weights = read_recipe_weights(model_cfg)
    backbone, preprocessing = build_backbone_from_config(cfg, info, weights)
    kept = (" (kept for fine-tuning, not the training set's statistics)"
            if info["preprocessing"]["source"] != DATASET_SOURCE else "")
    print(f"input normalisation: {describe_preprocessing(info['preprocessing'])}{kept}", flush=True)
    try:
        model = model_class(
            backbone,
            model_cfg.num_classes,
            preprocessing=preprocessing,
            name=f"{model_cfg.backbone}_{name}",
            **kwargs,
        )
    except (TypeError, ValueError) as error:
        if error_message is None:
            raise
        raise ConfigError(error_message.format(error=error)) from None
    return initialize_backbone(model, model_cfg, weights)


def initialize_backbone(model, model_cfg, weights=None):
    """Loads `model.weights` into `model` (when set) and freezes `model.freeze_stages` of its backbone.

    Args:
        model: the built task model.
        model_cfg: the recipe's `model` section.
        weights: `model.weights` already read by `read_recipe_weights` (None: read here).
    """
    if model_cfg.weights:
        load_pretrained_weights(model, model_cfg.weights, weights)
    if model_cfg.freeze_stages >= 0:
        model.backbone.freeze_stages(model_cfg.freeze_stages)
    return model


def dataset_preprocessing_info(info) -> dict:
    """run.json's `preprocessing` for normalisation by the training set's mean/std (of 0..255 pixels)."""
    return {"mean": info["mean"], "std": info["std"], "input_range": [0, 255], "source": DATASET_SOURCE}


def preprocessing_info(info):
    """run.json's `preprocessing`: the normalisation inside the model, of raw pixels 0..255.

    What `build_backbone_from_config` chose (`info["preprocessing"]`), else
    the training set's statistics.
    """
    return info.get("preprocessing") or dataset_preprocessing_info(info)


def describe_preprocessing(preprocessing) -> str:
    """One line for the run's log: which normalisation the model applies to raw pixels."""
    mean = ", ".join(f"{v:.4g}" for v in _as_list(preprocessing["mean"]))
    std = ", ".join(f"{v:.4g}" for v in _as_list(preprocessing["std"]))
    scale = preprocessing.get("scale", 1.0)
    pixels = "pixels" if scale == 1.0 else f"pixels x {scale:.6g}"
    bgr = ", RGB -> BGR first" if preprocessing.get("reverse_channels") else ""
    return f"({pixels} - [{mean}]) / [{std}]{bgr}: {preprocessing['source']}"


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _copy_layer_weights(source_layers, target_layers, source_name, target_name):
    by_name = {layer.name: layer for layer in source_layers if layer.weights}
    copied = 0
    for layer in target_layers:
        if not layer.weights:
            continue
        source = by_name.get(layer.name)
        if source is None:
            raise ConfigError(
                f"model.weights {source_name} is of another architecture: it has no layer {layer.name!r} "
                f"needed by {target_name}; pick the matching model.backbone."
            )
        values = source.get_weights()
        shapes = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != shapes:
            raise ConfigError(
                f"model.weights {source_name} does not fit {target_name}: layer {layer.name!r} has shapes "
                f"{[v.shape for v in values]}, the model needs {shapes} (another architecture or input channels)."
            )
        layer.set_weights(values)
        copied += 1
    return copied


def load_pretrained_weights(model, path, weights=None):
    """Initialises `model` from a `.keras` model, a keras.applications `.h5` or a torchvision/timm state dict.

    The backbone is loaded (by layer name for `.keras`, through
    `keras_resnet.models.resnet.pretrained` for the others; shapes checked,
    another architecture refused); the head too when `model` is a classifier
    and the source has a head with the same number of classes.

    Args:
        model: a task model with a `backbone`.
        path: the `model.weights` file.
        weights: `path` already read by `read_recipe_weights` (None: read here).
    """
    _check_weights_path(path)
    target_name = f"model.backbone={model.backbone.name!r}"
    if str(path).endswith(KERAS_SUFFIX):
        source = weights if weights is not None else load_keras_model(path)
        source_backbone = getattr(source, "backbone", source)
        _copy_layer_weights(source_backbone.layers, model.backbone.layers, path, target_name)
        if isinstance(source, ResNetClassifier) and source.num_classes == model.num_classes:
            model.get_layer("predictions").set_weights(source.get_layer("predictions").get_weights())
        return model
    head = model.get_layer("predictions") if isinstance(model, ResNetClassifier) else None
    try:
        if weights is None:
            weights = read_pretrained(path, preset=model.backbone.name)
        load_pretrained(weights, model.backbone, head=head, preset=model.backbone.name)
    except ValueError as error:
        raise ConfigError(f"model.weights: {error}") from None
    return model
