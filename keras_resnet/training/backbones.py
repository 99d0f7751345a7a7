"""The recipe's backbone, shared by every task's model: preset, input normalisation, pretrained weights.

- `build_backbone_from_config`: the `ResNetBackbone` of `model.backbone` / `model.backbone_args`
  and the `ImageNormalization` layer that takes raw pixels 0..255.
- `build_model_from_config`: a task model on that backbone, with
  `initialize_backbone`: `model.weights` (a `.keras` model, a keras.applications `.h5`, or a
  torchvision/timm state dict `.pth`/`.pt`/`.bin`/`.safetensors`) and `model.freeze_stages`
  applied to a built task model.
- `load_pretrained_weights`: loads those files into a model's backbone (and a classifier's head).
- `preprocessing_info`: the `preprocessing` entry of run.json.
- `check_recipe_args`: a ConfigError for a `model.*_args` key that the constructor does not take.
"""

import difflib
import inspect
import os

import keras

from keras_resnet.errors import ConfigError
from keras_resnet.layers.core import ImageNormalization
from keras_resnet.models.resnet.backbone import ResNetBackbone
from keras_resnet.models.resnet.classifier import ResNetClassifier
from keras_resnet.models.resnet.presets import get_preset_config
from keras_resnet.models.resnet.pretrained import load_pretrained, read_pretrained
from keras_resnet.models.weight_files import is_torch_file


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


def build_backbone_from_config(cfg, info):
    """The recipe's backbone and the layer normalising raw pixels 0..255.

    Returns:
        `(backbone, preprocessing)`; normalisation uses the training set's
        per-channel mean/std from `info`.
    """
    model_cfg = cfg["model"]
    get_preset_config(model_cfg["backbone"])  # unknown preset -> ValueError listing the valid ones
    check_recipe_args("backbone_args", model_cfg["backbone_args"], ResNetBackbone)
    try:
        backbone = ResNetBackbone.from_preset(
            model_cfg["backbone"], input_shape=tuple(model_cfg["input_shape"]), **model_cfg["backbone_args"]
        )
    except TypeError as error:
        raise ConfigError(f"model.backbone_args: {error}") from None
    preprocessing = ImageNormalization(mean=info["mean"], std=info["std"], name="normalization")
    return backbone, preprocessing


def build_model_from_config(cfg, info, model_class, name, error_message=None, **kwargs):
    """A task model of the recipe: `model_class(backbone, model.num_classes, preprocessing=..., **kwargs)`.

    The backbone and the normalisation of raw pixels 0..255 come from
    `build_backbone_from_config`, then `initialize_backbone` applies
    `model.weights` and `model.freeze_stages`.

    Args:
        cfg: the recipe; info: its data's `info` (mean, std).
        model_class: `ResNetClassifier`, `ResNetSegmenter`, `RetinaNetDetector`...
        name: the model's name after the preset's (`"{preset}_{name}"`).
        error_message: for a TypeError/ValueError of `model_class` (arguments
            from the recipe), a ConfigError with this text, `{error}` filled in;
            None lets them through.
        kwargs: further arguments of `model_class`.
    """
    model_cfg = cfg["model"]
    backbone, preprocessing = build_backbone_from_config(cfg, info)
    try:
        model = model_class(
            backbone,
            model_cfg["num_classes"],
            preprocessing=preprocessing,
            name=f"{model_cfg['backbone']}_{name}",
            **kwargs,
        )
    except (TypeError, ValueError) as error:
        if error_message is None:
            raise
        raise ConfigError(error_message.format(error=error)) from None
    return initialize_backbone(model, model_cfg)


def initialize_backbone(model, model_cfg):
    """Loads `model.weights` into `model` (when set) and freezes `model.freeze_stages` of its backbone."""
    if model_cfg["weights"]:
        load_pretrained_weights(model, model_cfg["weights"])
    if model_cfg["freeze_stages"] >= 0:
        model.backbone.freeze_stages(model_cfg["freeze_stages"])
    return model


def preprocessing_info(info):
    """run.json's `preprocessing`: the normalisation inside the model, of raw pixels 0..255."""
    return {"mean": info["mean"], "std": info["std"], "input_range": [0, 255]}


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


def load_pretrained_weights(model, path):
    """Initialises `model` from a `.keras` model, a keras.applications `.h5` or a torchvision/timm state dict.

    The backbone is loaded (by layer name for `.keras`, through
    `keras_resnet.models.resnet.pretrained` for the others; shapes checked,
    another architecture refused); the head too when `model` is a classifier
    and the source has a head with the same number of classes.
    """
    if not os.path.exists(path):
        raise ConfigError(f"model.weights file {path} does not exist.")
    target_name = f"model.backbone={model.backbone.name!r}"
    if path.endswith(".keras"):
        source = keras.saving.load_model(path, compile=False)
        source_backbone = getattr(source, "backbone", source)
        _copy_layer_weights(source_backbone.layers, model.backbone.layers, path, target_name)
        if isinstance(source, ResNetClassifier) and source.num_classes == model.num_classes:
            model.get_layer("predictions").set_weights(source.get_layer("predictions").get_weights())
        return model
    if path.endswith(".h5") or is_torch_file(path):
        head = model.get_layer("predictions") if isinstance(model, ResNetClassifier) else None
        try:
            weights = read_pretrained(path, preset=model.backbone.name)
            load_pretrained(weights, model.backbone, head=head, preset=model.backbone.name)
        except ValueError as error:
            raise ConfigError(f"model.weights: {error}") from None
        return model
    raise ConfigError(
        f"model.weights {path} must be a .keras model, a keras.applications .h5 weight file or a torchvision/timm "
        "state dict (.pth, .pt, .bin, .safetensors)."
    )
