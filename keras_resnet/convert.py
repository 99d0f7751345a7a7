"""Import keras.applications ResNet models and weight files.

`from_keras_applications` takes a live keras.applications ResNet50/101/152
or ResNet50V2/101V2/152V2 model, or a `.h5` weight file in the layout
keras.applications distributes (legacy Keras HDF5: a `layer_names`
attribute and one group per layer with `weight_names`; with or without the
top, with or without the old `:0` suffix), and returns a
`ResNetClassifier` (with the top) or a `ResNetBackbone` (notop) holding the
same weights. Layer names of our `*_v1`/`*_v2` presets follow
keras.applications, so conversion is a name lookup, checked both ways: every
source weight is used and every target weight is set.
"""

import os
import re

import numpy as np

from keras_resnet.errors import ConversionError
from keras_resnet.layers.core import ImageNormalization
from keras_resnet.models.resnet.backbone import ResNetBackbone
from keras_resnet.models.resnet.classifier import ResNetClassifier

# keras.applications model name -> our preset.
KERAS_APPLICATIONS_ARCHS = {
    "resnet50": "resnet50_v1",
    "resnet101": "resnet101_v1",
    "resnet152": "resnet152_v1",
    "resnet50v2": "resnet50_v2",
    "resnet101v2": "resnet101_v2",
    "resnet152v2": "resnet152_v2",
}
# Blocks in stage conv4 identify the depth; "preact" layers identify V2.
_DEPTH_BY_CONV4_BLOCKS = {6: 50, 23: 101, 36: 152}
_PREPROCESSING_MODE = {"v1": "caffe", "v2": "tf"}
_WEIGHT_ORDER = {
    "Conv2D": ("kernel", "bias"),
    "Dense": ("kernel", "bias"),
    "BatchNormalization": ("gamma", "beta", "moving_mean", "moving_variance"),
    "FusedBatchNormalization": ("gamma", "beta", "moving_mean", "moving_variance"),
}


def _normalise_arch(arch):
    key = str(arch).lower().replace("_", "").replace("-", "")
    if key in KERAS_APPLICATIONS_ARCHS:
        return key
    for source, preset in KERAS_APPLICATIONS_ARCHS.items():
        if arch == preset:
            return source
    raise ConversionError(
        f"arch={arch!r} is not a keras.applications ResNet; allowed: "
        f"{', '.join(KERAS_APPLICATIONS_ARCHS)} (or our presets {', '.join(KERAS_APPLICATIONS_ARCHS.values())})."
    )


def _infer_arch(layer_names, source):
    blocks = [int(m.group(1)) for n in layer_names if (m := re.match(r"conv4_block(\d+)_", n))]
    depth = _DEPTH_BY_CONV4_BLOCKS.get(max(blocks) if blocks else 0)
    if depth is None:
        raise ConversionError(
            f"{source} does not look like a keras.applications ResNet (no conv4_blockN layers with 6, 23 or 36 "
            "blocks); pass a ResNet50/101/152 or ResNet50V2/101V2/152V2 model or weight file."
        )
    is_v2 = any("preact" in n for n in layer_names)
    return f"resnet{depth}{'v2' if is_v2 else ''}"


def _read_h5_weights(path):
    """Reads a legacy Keras HDF5 weight file into {layer: {weight: array}}."""
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise ConversionError(f"{path} is not a readable HDF5 weight file ({error}).") from None
    with handle as f:
        group = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in group.attrs:
            hint = (
                " It looks like a Keras 3 `.weights.h5` file: load it with `model.load_weights()` into the same model."
                if "layers" in group or "vars" in group
                else ""
            )
            raise ConversionError(
                f"{path} is not a keras.applications weight file: it has no 'layer_names' attribute.{hint}"
            )
        weights = {}
        for raw_layer in group.attrs["layer_names"]:
            layer = raw_layer.decode() if isinstance(raw_layer, bytes) else str(raw_layer)
            layer_group = group[layer]
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in layer_group.attrs.get("weight_names", [])]
            if not names:
                continue
            arrays = {}
            for weight_name in names:
                short = weight_name.split("/")[-1].split(":")[0]
                arrays[short] = np.asarray(layer_group[weight_name])
            weights[layer] = arrays
    return weights


def _read_model_weights(model):
    weights = {}
    for layer in model.layers:
        if layer.weights:
            weights[layer.name] = {w.path.split("/")[-1].split(":")[0]: np.asarray(w.numpy()) for w in layer.weights}
    return weights


def _assign_weights(target_layers, source, source_name):
    """Copies `source` weights into `target_layers` by layer name, both ways checked."""
    used = set()
    for layer in target_layers:
        if not layer.weights:
            continue
        if layer.name not in source:
            raise ConversionError(f"{source_name} has no weights for layer {layer.name!r}; is it the right arch?")
        arrays = source[layer.name]
        order = _WEIGHT_ORDER.get(type(layer).__name__)
        if order is None:
            raise ConversionError(f"Cannot convert layer {layer.name!r} of type {type(layer).__name__}.")
        values = []
        for short in order[: len(layer.weights)]:
            if short not in arrays:
                raise ConversionError(f"{source_name}: layer {layer.name!r} lacks weight {short!r}.")
            values.append(arrays[short])
        for variable, value in zip(layer.weights, values):
            if tuple(variable.shape) != value.shape:
                raise ConversionError(
                    f"{source_name}: weight {layer.name}/{variable.name} has shape {value.shape}, our model expects "
                    f"{tuple(variable.shape)}. Check `arch` and `input_shape` (imported weights need "
                    f"{value.shape[-2] if layer.name == 'conv1_conv' else 'matching'} input channels)."
                )
        layer.set_weights(values)
        used.add(layer.name)
    unused = sorted(set(source) - used)
    if unused:
        raise ConversionError(f"{source_name} has weights our model did not use: {unused[:5]}; is `arch` right?")


def from_keras_applications(
    model_or_path,
    arch=None,
    input_shape=None,
    include_preprocessing=False,
    classifier_activation="softmax",
):
    """Converts a keras.applications ResNet (model or `.h5` weights) to ours.

    Args:
        model_or_path: a live keras.applications ResNet50/101/152 or
            ResNet50V2/101V2/152V2 model, or the path of a `.h5` weight file
            in keras.applications' layout (`*_weights_tf_dim_ordering_tf_kernels.h5`
            or the `_notop` variant).
        arch: "resnet50", "resnet101v2", ... (or our preset name
            "resnet50_v1", ...). Inferred from the layer names when None;
            when given, it must agree with the weights.
        input_shape: our model's input shape; defaults to the live model's
            or `(224, 224, 3)` for files (the notop weights work for any
            spatial size). Its channel count must match the weights (3).
        include_preprocessing: put keras.applications' preprocessing inside
            the model ("caffe" for v1, "tf" for v2) so it takes raw RGB
            pixels 0-255.
        classifier_activation: activation of the top for weight files
            (live models keep their own).

    Returns:
        A `ResNetClassifier` when the source has the 1000-class top
        ("predictions"), else a `ResNetBackbone`.

    Example:
    >>> ka = keras.applications.ResNet50(weights=None)
    >>> ours = from_keras_applications(ka)
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        if not os.path.exists(path):
            raise ConversionError(f"Weight file {path} does not exist.")
        source = _read_h5_weights(path)
        source_name = path
        default_shape = (224, 224, 3)
        activation = classifier_activation
    else:
        model = model_or_path
        if not hasattr(model, "layers"):
            raise ConversionError(
                f"Expected a keras.applications model or a .h5 path, got {type(model_or_path).__name__}."
            )
        source = _read_model_weights(model)
        source_name = f"model {model.name!r}"
        default_shape = tuple(model.input_shape[1:])
        activation = None
        if "predictions" in source:
            activation = model.get_layer("predictions").activation.__name__
            activation = None if activation == "linear" else activation
    inferred = _infer_arch(list(source), source_name)
    if arch is not None and _normalise_arch(arch) != inferred:
        raise ConversionError(
            f"arch={arch!r} does not match {source_name}, whose layers are those of {inferred!r}."
        )
    preset = KERAS_APPLICATIONS_ARCHS[inferred]
    input_shape = tuple(input_shape or default_shape)
    weight_channels = source["conv1_conv"]["kernel"].shape[2]
    if len(input_shape) != 3 or input_shape[-1] != weight_channels:
        raise ConversionError(
            f"input_shape={input_shape} does not fit the imported weights: they need {weight_channels} input channels; "
            f"use input_shape=(height, width, {weight_channels})."
        )
    backbone = ResNetBackbone.from_preset(preset, input_shape=input_shape)
    _assign_weights(backbone.layers, {k: v for k, v in source.items() if k != "predictions"}, source_name)
    if "predictions" not in source:
        return backbone
    version = backbone.version
    preprocessing = (
        ImageNormalization.from_mode(_PREPROCESSING_MODE[version], name="preprocessing")
        if include_preprocessing
        else None
    )
    num_classes = source["predictions"]["kernel"].shape[-1]
    classifier = ResNetClassifier(
        backbone, num_classes, activation=activation, preprocessing=preprocessing, name=f"{preset}_classifier"
    )
    classifier.get_layer("predictions").set_weights(
        [source["predictions"]["kernel"], source["predictions"]["bias"]]
    )
    return classifier
