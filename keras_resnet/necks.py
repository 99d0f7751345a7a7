"""Feature necks on top of a backbone's pyramid: the Feature Pyramid Network.

`apply_fpn` turns the backbone's `{"C2": ..., "C5": ...}` features into
`{"P2": ..., "P5": ...}` maps of one common width (Lin et al., 2017). It is
a functional helper: call it on the KerasTensors of a model under
construction. `ResizeLike` is the registered layer that resizes one tensor
to the spatial size of another, so that top-down paths and heads work for
any input size (odd sizes included) without Lambda layers.
"""

import keras
from keras import layers, ops

PACKAGE = "keras_resnet"
RESIZE_INTERPOLATIONS = ("nearest", "bilinear")


@keras.saving.register_keras_serializable(package=PACKAGE)
class ResizeLike(keras.layers.Layer):
    """Resizes `inputs[0]` to the height and width of `inputs[1]`.

    Only the spatial shape of the reference tensor is used (its values and
    dtype are ignored), so the reference may be the raw input image.

    Args:
        interpolation: "nearest" or "bilinear" (half-pixel centres, as
            `tf.image.resize`).

    Example:
    >>> coarse = keras.Input((5, 7, 16)); fine = keras.Input((10, 13, 8))
    >>> ResizeLike("bilinear")([coarse, fine]).shape
    (None, 10, 13, 16)
    """

    def __init__(self, interpolation="bilinear", **kwargs):
        super().__init__(**kwargs)
        if interpolation not in RESIZE_INTERPOLATIONS:
            raise ValueError(f"interpolation={interpolation!r}; allowed: {RESIZE_INTERPOLATIONS}.")
        self.interpolation = interpolation

    def call(self, inputs):
        features, reference = inputs
        features = ops.cast(features, self.compute_dtype)
        height, width = ops.shape(reference)[1:3]
        return ops.image.resize(features, (height, width), interpolation=self.interpolation)

    def compute_output_shape(self, input_shape):
        features_shape, reference_shape = input_shape
        return (features_shape[0], reference_shape[1], reference_shape[2], features_shape[-1])

    def get_config(self):
        return {**super().get_config(), "interpolation": self.interpolation}


def apply_conv_bn_relu(x, filters, kernel_size, name, dilation_rate=1):
    """Conv (no bias, "same" padding) + BatchNorm + ReLU, the unit of the heads."""
    x = layers.Conv2D(
        filters, kernel_size, padding="same", dilation_rate=dilation_rate, use_bias=False, name=f"{name}_conv"
    )(x)
    x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def apply_fpn(pyramid, levels=("C2", "C3", "C4", "C5"), width=256, name="fpn"):
    """Feature Pyramid Network: lateral 1x1 convs, top-down path, 3x3 outputs.

    Each level `Ck` gets a 1x1 lateral conv to `width` channels; going down
    from the coarsest level, the coarser merged map is resized (nearest) to
    the lateral's exact size and added; a 3x3 conv then smooths each merged
    map into `Pk`. Levels of equal stride (dilated backbones) work too.

    Args:
        pyramid: dict of backbone features, e.g. `backbone.pyramid_outputs`.
        levels: the keys to use, finest first.
        width: channels of every output level.
        name: prefix of the layer names.

    Returns:
        dict `{"P2": ..., "P5": ...}` (one `P` per `C` in `levels`), finest first.

    Example:
    >>> backbone = ResNetBackbone.from_preset("resnet18", input_shape=(64, 64, 3))
    >>> features = apply_fpn(backbone.pyramid_outputs, width=128)
    >>> [tuple(f.shape[1:]) for f in features.values()]
    [(16, 16, 128), (8, 8, 128), (4, 4, 128), (2, 2, 128)]
    """
    levels = list(levels)
    missing = [level for level in levels if level not in pyramid]
    if missing or not levels:
        raise ValueError(f"FPN levels {levels} must be non-empty keys of the pyramid {list(pyramid)}.")
    laterals = {
        level: layers.Conv2D(width, 1, name=f"{name}_lateral_{level}")(pyramid[level]) for level in levels
    }
    merged = {}
    coarser = None
    for level in reversed(levels):
        x = laterals[level]
        if coarser is not None:
            upsampled = ResizeLike("nearest", name=f"{name}_upsample_{level}")([coarser, x])
            x = layers.Add(name=f"{name}_merge_{level}")([x, upsampled])
        merged[level] = coarser = x
    return {
        level.replace("C", "P", 1): layers.Conv2D(width, 3, padding="same", name=f"{name}_output_{level}")(
            merged[level]
        )
        for level in levels
    }
