"""Feature necks on top of a backbone's pyramid: the Feature Pyramid Network.

`apply_fpn` turns the backbone's `{"C2": ..., "C5": ...}` features into
`{"P2": ..., "P5": ...}` maps of one common width (Lin et al., 2017). It is
a functional helper: call it on the KerasTensors of a model under
construction. `FPN` is the same network as one serialisable layer, with
RetinaNet's extra stride-2 levels (P6, P7) on top; the detector uses it.
`ResizeLike` is the registered layer that resizes one tensor
to the spatial size of another, so that top-down paths and heads work for
any input size (odd sizes included) without Lambda layers.
"""

import keras
from keras import layers, ops

from keras_resnet.layers.core import FusedBatchNormalization
from keras_resnet_settings.errors import ConfigError

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
            raise ConfigError(f"interpolation={interpolation!r}; allowed: {RESIZE_INTERPOLATIONS}.")
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
    x = FusedBatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def apply_separable_conv_bn_relu(x, filters, name, dilation_rate=1):
    """Depthwise-separable 3x3 unit: depthwise 3x3 + BatchNorm + ReLU, then 1x1 conv + BatchNorm + ReLU.

    DeepLabV3+'s "SC" (Chen et al., 2018, section 3.2; DeepLab's `split_separable_conv2d`): the same
    receptive field as `apply_conv_bn_relu(x, filters, 3, ...)` at about 1/9 + 1/filters of its
    multiply-accumulates. Layers are "{name}_depthwise", "{name}_depthwise_bn", "{name}_conv", "{name}_bn".
    """
    x = layers.DepthwiseConv2D(3, padding="same", dilation_rate=dilation_rate, use_bias=False,
                               name=f"{name}_depthwise")(x)
    x = FusedBatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_depthwise_bn")(x)
    x = layers.Activation("relu", name=f"{name}_depthwise_relu")(x)
    return apply_conv_bn_relu(x, filters, 1, name=name)


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
        raise ConfigError(f"FPN levels {levels} must be non-empty keys of the pyramid {list(pyramid)}.")
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


EXTRA_LEVEL_SOURCES = ("C5", "P5")
EXTRA_LEVEL_PADDINGS = ("same", "symmetric")


def upsample_nearest_like(x, reference):
    """Nearest-neighbour upsampling of `x` to the height and width of `reference`.

    When `x` is the stride-2 level above `reference` (its size is
    `ceil(size / 2)`), output pixel `i` takes input pixel `i // 2`: a 2x
    repeat cropped to the reference, which is what torchvision's FPN
    (`F.interpolate(size=..., mode="nearest")`) gives for these sizes. It is
    built from reshape/tile/slice, so XLA can compile its gradient
    (`ResizeNearestNeighborGrad` has no XLA kernel). Equal sizes (dilated
    levels) pass through; other or unknown sizes use `ops.image.resize`.
    """
    source, target = tuple(x.shape[1:3]), tuple(reference.shape[1:3])
    if None not in source + target:
        if source == target:
            return x
        if all(-(-t // 2) == s for s, t in zip(source, target)):
            return ops.repeat(ops.repeat(x, 2, axis=1), 2, axis=2)[:, : target[0], : target[1], :]
    height, width = ops.shape(reference)[1], ops.shape(reference)[2]
    return ops.image.resize(x, (height, width), interpolation="nearest")


def _level_of(key):
    if not (isinstance(key, str) and len(key) > 1 and key[0] == "C" and key[1:].isdigit()):
        raise ConfigError(f"FPN inputs must be keyed 'C<level>' (e.g. 'C3'), got {key!r}.")
    return int(key[1:])


@keras.saving.register_keras_serializable(package=PACKAGE)
class FPN(keras.layers.Layer):
    """Feature Pyramid Network layer with RetinaNet's extra coarse levels.

    Takes a dict of backbone features `{"C3": ..., "C4": ..., "C5": ...}`
    (extra keys outside `min_level..max_level` are ignored) and returns
    `{"P3": ..., "P7": ...}`, every level `width` channels (Lin et al.,
    2017, "Focal Loss for Dense Object Detection"):

    - levels present in the input: a 1x1 lateral conv; going down from the
      coarsest, the merged coarser map is upsampled (nearest,
      `upsample_nearest_like`) to the exact size of the lateral and added,
      so odd sizes work; a 3x3 conv smooths each sum into `Pk`;
    - levels above the coarsest input: a 3x3 stride-2 conv ("same"
      padding, so sizes are `ceil(h / 2)`) on the coarsest input
      (`extra_levels_from="C5"`, the paper) or on its FPN output ("P5",
      as torchvision and Detectron2 do for FCOS); each further level is a
      3x3 stride-2 conv on the ReLU of the previous one. `extra_padding`
      "same" pads those convs as TensorFlow does (an even size gets its
      one pixel at the bottom/right only), "symmetric" one pixel on every
      side as PyTorch's `Conv2d(3, 2, padding=1)` (torchvision's
      `LastLevelP6P7`); the output sizes agree, the values differ on even
      sizes.

    Sublayers are created in `build()`, so the layer is serialisable and
    its weights load into a freshly built copy.

    Args:
        min_level: finest output level; `C<min_level>` must be an input.
        max_level: coarsest output level.
        width: channels of every output level.
        extra_levels_from: "C5" or "P5": the source of the first level
            above the coarsest input (the coarsest input level, C5 for
            ResNets, or its FPN output).
        extra_padding: "same" or "symmetric": the padding of the extra
            levels' stride-2 convs.

    Example:
    >>> backbone = ResNetBackbone.from_preset("resnet18", input_shape=(64, 64, 3))
    >>> pyramid = FPN(width=64)(backbone.pyramid_outputs)
    >>> {k: tuple(v.shape[1:3]) for k, v in pyramid.items()}
    {'P3': (8, 8), 'P4': (4, 4), 'P5': (2, 2), 'P6': (1, 1), 'P7': (1, 1)}
    """

    def __init__(self, min_level=3, max_level=7, width=256, extra_levels_from="C5", extra_padding="same", **kwargs):
        super().__init__(**kwargs)
        min_level, max_level, width = int(min_level), int(max_level), int(width)
        if not 1 <= min_level <= max_level:
            raise ConfigError(f"Need 1 <= min_level <= max_level, got min_level={min_level}, max_level={max_level}.")
        if width < 1:
            raise ConfigError(f"width must be >= 1, got {width}.")
        if extra_levels_from not in EXTRA_LEVEL_SOURCES:
            raise ConfigError(f"extra_levels_from={extra_levels_from!r}; allowed: {EXTRA_LEVEL_SOURCES}.")
        if extra_padding not in EXTRA_LEVEL_PADDINGS:
            raise ConfigError(f"extra_padding={extra_padding!r}; allowed: {EXTRA_LEVEL_PADDINGS}.")
        self.min_level = min_level
        self.max_level = max_level
        self.width = width
        self.extra_levels_from = extra_levels_from
        self.extra_padding = extra_padding

    def _input_levels(self, input_shape):
        """Input levels used: min_level up to the coarsest input (at most max_level)."""
        if not isinstance(input_shape, dict):
            raise ConfigError(f"FPN takes a dict of features keyed 'C<level>', got {type(input_shape).__name__}.")
        available = sorted(_level_of(key) for key in input_shape)
        top = min(max(available), self.max_level)
        needed = list(range(self.min_level, top + 1))
        missing = [f"C{level}" for level in needed if level not in available]
        if missing or not needed:
            raise ConfigError(
                f"FPN(min_level={self.min_level}, max_level={self.max_level}) needs inputs "
                f"C{self.min_level}..C{top} (every level in between); missing {missing or [f'C{self.min_level}']}, "
                f"got {sorted(input_shape)}."
            )
        return needed

    def build(self, input_shape):
        levels = self._input_levels(input_shape)
        conv = dict(dtype=self.dtype_policy)
        self.lateral_convs = [layers.Conv2D(self.width, 1, name=f"lateral_P{level}", **conv) for level in levels]
        self.output_convs = [
            layers.Conv2D(self.width, 3, padding="same", name=f"output_P{level}", **conv) for level in levels
        ]
        padding = "same" if self.extra_padding == "same" else "valid"
        self.extra_convs = [
            layers.Conv2D(self.width, 3, strides=2, padding=padding, name=f"extra_P{level}", **conv)
            for level in range(levels[-1] + 1, self.max_level + 1)
        ]
        for level, lateral, output in zip(levels, self.lateral_convs, self.output_convs):
            lateral.build(input_shape[f"C{level}"])
            output.build(lateral.compute_output_shape(input_shape[f"C{level}"]))
        extra_channels = input_shape[f"C{levels[-1]}"][-1] if self.extra_levels_from == "C5" else self.width
        for extra in self.extra_convs:
            extra.build((None, None, None, extra_channels))
            extra_channels = self.width
        self._levels = levels

    def call(self, inputs):
        levels = self._levels
        merged = [None] * len(levels)
        coarser = None
        for index in reversed(range(len(levels))):
            x = self.lateral_convs[index](inputs[f"C{levels[index]}"])
            if coarser is not None:
                x = x + ops.cast(upsample_nearest_like(coarser, x), x.dtype)
            merged[index] = coarser = x
        outputs = {f"P{level}": conv(x) for level, conv, x in zip(levels, self.output_convs, merged)}
        top = levels[-1]
        x = inputs[f"C{top}"] if self.extra_levels_from == "C5" else outputs[f"P{top}"]
        for offset, conv in enumerate(self.extra_convs):
            x = ops.relu(x) if offset > 0 else x
            if self.extra_padding == "symmetric":
                x = ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
            x = conv(x)
            outputs[f"P{top + offset + 1}"] = x
        return outputs

    def compute_output_shape(self, input_shape):
        levels = self._input_levels(input_shape)
        shapes = {f"P{level}": (*input_shape[f"C{level}"][:3], self.width) for level in levels}
        batch, height, width, _ = shapes[f"P{levels[-1]}"]
        for level in range(levels[-1] + 1, self.max_level + 1):
            height = None if height is None else -(-height // 2)
            width = None if width is None else -(-width // 2)
            shapes[f"P{level}"] = (batch, height, width, self.width)
        return shapes

    def get_config(self):
        return {
            **super().get_config(),
            "min_level": self.min_level,
            "max_level": self.max_level,
            "width": self.width,
            "extra_levels_from": self.extra_levels_from,
            "extra_padding": self.extra_padding,
        }
