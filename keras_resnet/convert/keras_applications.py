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
(`keras_resnet.models.resnet.keras_applications`).
"""

from keras_resnet.models.resnet.backbone import ResNetBackbone
from keras_resnet.models.resnet.classifier import ResNetClassifier
from keras_resnet.models.resnet.keras_applications import KerasApplicationsWeights

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


__all__ = ["from_keras_applications"]
