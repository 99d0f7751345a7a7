"""keras.applications ResNets (live models and `.h5` weight files) as our models.

`from_keras_applications` takes a live keras.applications ResNet50/101/152
or ResNet50V2/101V2/152V2 model, or a `.h5` weight file in the layout
keras.applications distributes (legacy Keras HDF5: a `layer_names`
attribute and one group per layer with `weight_names`; with or without the
top, with or without the old `:0` suffix), and returns a
`ResNetClassifier` (with the top) or a `ResNetBackbone` (notop) holding the
same weights. Layer names of our `*_v1`/`*_v2` presets follow
keras.applications, so conversion is a name lookup, checked both ways: every
source weight is used and every target weight is set
(`KerasApplicationsWeights`, also the reader behind
`from_preset(name, weights="....h5")`).
"""


import os
import re

import keras
import numpy as np

from keras_resnet.convert.weight_files import read_keras_h5
from keras_resnet.layers.core import ImageNormalization
from keras_resnet.models.resnet.backbone import ResNetBackbone
from keras_resnet.models.resnet.classifier import ResNetClassifier
from keras_resnet_settings.errors import ConversionError

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
HEAD = "predictions"


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


def _read_model_weights(model):
    weights = {}
    for layer in model.layers:
        if layer.weights:
            weights[layer.name] = {w.path.split("/")[-1].split(":")[0]: np.asarray(w.numpy()) for w in layer.weights}
    return weights


def _layer_values(layer, arrays, source_name):
    order = _WEIGHT_ORDER.get(type(layer).__name__)
    if order is None:
        raise ConversionError(f"Cannot convert layer {layer.name!r} of type {type(layer).__name__}.")
    values = []
    for short, variable in zip(order, layer.weights):
        if short not in arrays:
            raise ConversionError(f"{source_name}: layer {layer.name!r} lacks weight {short!r}.")
        value = arrays[short]
        if tuple(variable.shape) != value.shape:
            raise ConversionError(
                f"{source_name}: weight {layer.name}/{variable.name} has shape {value.shape}, our model expects "
                f"{tuple(variable.shape)}. Check `arch` and `input_shape` (imported weights need "
                f"{value.shape[-2] if layer.name == 'conv1_conv' else 'matching'} input channels)."
            )
        values.append(value)
    return values


class KerasApplicationsWeights:
    """The weights of a keras.applications ResNet50/101/152 or ResNet50V2/101V2/152V2.

    Args:
        source: a live keras.applications model, or the path of a `.h5` weight
            file in keras.applications' layout (legacy Keras HDF5: a
            `layer_names` attribute and one group per layer with
            `weight_names`; with or without the top and the old `:0` suffix).
        arch: "resnet50", "resnet101v2", ... (or our preset name
            "resnet50_v1", ...). Inferred from the layer names when None;
            when given, it must agree with the weights.

    Attributes:
        preset: our preset of the same layout ("resnet50_v1", ...).
        num_classes: classes of the top ("predictions"), None without it.
        activation: the live model's top activation (None: logits).
        input_shape: the live model's input shape, None for a file.
    """

    format = "keras.applications"

    KINDS = "a keras.applications .h5 file"

    @classmethod
    def accepts(cls, source) -> bool:
        return is_keras_model(source) or (
            isinstance(source, (str, os.PathLike)) and os.fspath(source).lower().endswith(".h5"))

    @classmethod
    def read(cls, source, arch=None, preset=None):
        return cls(source, arch)

    def __init__(self, source, arch=None):
        self.input_shape = None
        self.activation = "softmax"
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if not os.path.exists(path):
                raise ConversionError(f"Weight file {path} does not exist.")
            self.arrays = read_keras_h5(path)
            self.source_name = path
        elif hasattr(source, "layers"):
            self.arrays = _read_model_weights(source)
            self.source_name = f"model {source.name!r}"
            self.input_shape = tuple(source.input_shape[1:])
            self.activation = None
            if HEAD in self.arrays:
                activation = source.get_layer(HEAD).activation.__name__
                self.activation = None if activation == "linear" else activation
        else:
            raise ConversionError(f"Expected a keras.applications model or a .h5 path, got {type(source).__name__}.")
        inferred = _infer_arch(list(self.arrays), self.source_name)
        if arch is not None and _normalise_arch(arch) != inferred:
            raise ConversionError(
                f"arch={arch!r} does not match {self.source_name}, whose layers are those of {inferred!r}."
            )
        self.arch = inferred
        self.preset = KERAS_APPLICATIONS_ARCHS[inferred]
        self.num_classes = self.arrays[HEAD]["kernel"].shape[-1] if HEAD in self.arrays else None
        self.input_channels = self.arrays["conv1_conv"]["kernel"].shape[2]

    def describe(self) -> str:
        return f"keras.applications {self.arch} (preset {self.preset})"

    def preprocessing(self, name="preprocessing"):
        """keras.applications' own preprocessing: "caffe" for v1, "tf" for v2."""
        version = "v2" if self.arch.endswith("v2") else "v1"
        return ImageNormalization.from_mode(_PREPROCESSING_MODE[version], name=name)

    def load_backbone(self, backbone):
        """Copies the weights into `backbone` by layer name, both ways checked."""
        channels = backbone.image_shape[-1]
        if channels != self.input_channels:
            raise ConversionError(
                f"input_shape={tuple(backbone.image_shape)} does not fit the imported weights: they need "
                f"{self.input_channels} input channels; use input_shape=(height, width, {self.input_channels})."
            )
        source = {name: arrays for name, arrays in self.arrays.items() if name != HEAD}
        assignments = []
        for layer in backbone.layers:
            if not layer.weights:
                continue
            if layer.name not in source:
                raise ConversionError(
                    f"{self.source_name} has no weights for layer {layer.name!r}; is it the right arch?"
                )
            assignments.append((layer, _layer_values(layer, source[layer.name], self.source_name)))
        unused = sorted(set(source) - {layer.name for layer, _ in assignments})
        if unused:
            raise ConversionError(
                f"{self.source_name} has weights our model did not use: {unused[:5]}; is `arch` right?"
            )
        for layer, values in assignments:
            layer.set_weights(values)

    def load_head(self, dense):
        """Copies the top into `dense` (a Dense layer of `num_classes` units)."""
        dense.set_weights(_layer_values(dense, self.arrays[HEAD], self.source_name))


def is_keras_model(source) -> bool:
    """True for a live Keras model (a keras.applications source)."""
    return isinstance(source, keras.Model)




DEFAULT_INPUT_SHAPE = (224, 224, 3)


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
    weights = (
        model_or_path if isinstance(model_or_path, KerasApplicationsWeights)
        else KerasApplicationsWeights(model_or_path, arch)
    )
    live = weights.input_shape is not None
    input_shape = tuple(input_shape or weights.input_shape or DEFAULT_INPUT_SHAPE)
    if weights.num_classes is None:
        return ResNetBackbone.from_preset(weights.preset, weights=weights, input_shape=input_shape)
    return ResNetClassifier.from_preset(
        weights.preset,
        num_classes=weights.num_classes,
        weights=weights,
        input_shape=input_shape,
        activation=weights.activation if live else classifier_activation,
        preprocessing=weights.preprocessing() if include_preprocessing else None,
    )


__all__ = ["KERAS_APPLICATIONS_ARCHS", "KerasApplicationsWeights", "from_keras_applications", "is_keras_model"]
