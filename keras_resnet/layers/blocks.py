"""Residual blocks as functions over tensors (Keras functional API).

He et al. (2015): a block learns a residual F(x) and outputs F(x) + x.
Blocks here are small module-level functions that take a tensor and return
a tensor, with deterministic layer names that follow keras.applications
(`conv3_block2_1_conv`, `..._bn`, `..._0_conv` for the shortcut, `..._out`),
so that weight conversion and debugging are name lookups.

Versions:
- "v1": post-activation, stride in the first 1x1 conv of a bottleneck
  (the paper's Caffe models and keras.applications ResNet50/101/152).
- "v1.5": post-activation, stride in the 3x3 conv (torchvision, timm).
- "v2": pre-activation (He et al., 2016, "Identity Mappings"), in the
  keras.applications ResNetV2 layout: the stride sits in the 3x3 conv of
  the *last* block of a stage, and a strided identity shortcut is a 1x1
  max-pool subsample.

Shortcuts (the paper's options, plus ResNet-D):
- "A": identity; where the shape changes, subsample and zero-pad channels
  (parameter free; the CIFAR nets).
- "B": identity; a 1x1 projection only where the shape changes.
- "C": always a 1x1 projection.
- "D": like B, but a strided projection is a 2x2 average pool followed by a
  1x1 conv (Bag of Tricks, ResNet-D).
"""

from keras import layers

from keras_resnet.layers.core import (
    DropPath,
    FusedBatchNormalization,
    ZeroPadChannels,
)
from keras_resnet_settings.errors import ConfigError

VERSIONS = ("v1", "v1.5", "v2")
SHORTCUT_TYPES = ("A", "B", "C", "D")
BLOCK_TYPES = ("basic", "bottleneck")


def make_divisible(value, divisor=8, min_value=None, round_limit=0.9):
    """Rounds `value` to a multiple of `divisor` (timm's rule for SE widths)."""
    min_value = min_value or divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < round_limit * value:
        new_value += divisor
    return new_value


def apply_conv(
    x,
    filters,
    kernel_size,
    *,
    name,
    strides=1,
    dilation_rate=1,
    groups=1,
    use_bias=False,
    kernel_initializer="he_normal",
):
    """A Conv2D with explicit, symmetric padding.

    Strided convs are preceded by a `ZeroPadding2D` of `(k - 1) // 2 * d`
    and use "valid" padding, which is what torchvision and keras.applications
    V2 do (Keras "same" pads asymmetrically for strided convs), so weights
    converted from either give the same outputs.
    """
    if strides > 1 and kernel_size > 1:
        pad = (kernel_size - 1) // 2 * dilation_rate
        x = layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same"
    return layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        dilation_rate=dilation_rate,
        groups=groups,
        use_bias=use_bias,
        kernel_initializer=kernel_initializer,
        name=name,
    )(x)


def apply_batch_norm(x, *, name, epsilon=1e-5, momentum=0.9, zero_init=False):
    """BatchNormalization over channels; `zero_init` sets gamma to zero.

    A `FusedBatchNormalization`: Keras' layer with TensorFlow's fused kernel for training steps.
    """
    return FusedBatchNormalization(
        axis=-1,
        epsilon=epsilon,
        momentum=momentum,
        gamma_initializer="zeros" if zero_init else "ones",
        name=name,
    )(x)


def apply_squeeze_excite(x, *, se_ratio, name):
    """Squeeze-and-excitation (Hu et al., 2018) gate over channels."""
    channels = x.shape[-1]
    reduced = make_divisible(channels * se_ratio, 8)
    s = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_se_pool")(x)
    s = layers.Conv2D(reduced, 1, activation="relu", name=f"{name}_se_reduce")(s)
    s = layers.Conv2D(channels, 1, activation="sigmoid", name=f"{name}_se_expand")(s)
    return layers.Multiply(name=f"{name}_se_scale")([x, s])


def apply_shortcut(
    x,
    preact,
    out_channels,
    *,
    strides,
    shortcut_type,
    version,
    use_conv_bias,
    bn_epsilon,
    bn_momentum,
    name,
):
    """The shortcut branch of a block (see the module docstring for types).

    Args:
        x: the block input.
        preact: the pre-activated input (v2; equal to `x` for v1/v1.5);
            projections read from it, identities from `x`.
        out_channels: channels of the residual branch's output.
        strides: spatial stride of the block.
        shortcut_type: one of "A", "B", "C", "D".
        version: one of "v1", "v1.5", "v2".
    """
    in_channels = x.shape[-1]
    channels_change = in_channels != out_channels
    if shortcut_type == "A":
        if out_channels < in_channels:
            raise ConfigError(
                f"shortcut_type='A' cannot reduce channels ({in_channels} -> "
                f"{out_channels}); use 'B' or 'C'."
            )
        shortcut = x
        if strides > 1:
            shortcut = layers.MaxPooling2D(1, strides=strides, name=f"{name}_0_pool")(shortcut)
        if channels_change:
            shortcut = ZeroPadChannels(out_channels - in_channels, name=f"{name}_0_zeropad")(shortcut)
        return shortcut

    # In the keras V2 layout a channel-preserving strided shortcut subsamples.
    subsample_identity = version == "v2" and not channels_change
    needs_projection = shortcut_type == "C" or channels_change or (strides > 1 and not subsample_identity)
    if not needs_projection:
        if strides > 1:
            return layers.MaxPooling2D(1, strides=strides, name=f"{name}_0_pool")(x)
        return x

    source = preact
    conv_strides = strides
    if shortcut_type == "D" and strides > 1:
        source = layers.AveragePooling2D(2, strides=strides, padding="same", name=f"{name}_0_avgpool")(source)
        conv_strides = 1
    if version == "v2":
        # Pre-activation: no norm follows, so the projection keeps its bias.
        return apply_conv(source, out_channels, 1, strides=conv_strides, use_bias=use_conv_bias, name=f"{name}_0_conv")
    shortcut = apply_conv(source, out_channels, 1, strides=conv_strides, use_bias=use_conv_bias, name=f"{name}_0_conv")
    return apply_batch_norm(shortcut, epsilon=bn_epsilon, momentum=bn_momentum, name=f"{name}_0_bn")


def _finish_block(x, shortcut, *, version, se_ratio, drop_path_rate, name):
    """SE gate, stochastic depth, the residual sum and (v1) the final ReLU."""
    if se_ratio:
        x = apply_squeeze_excite(x, se_ratio=se_ratio, name=name)
    if drop_path_rate > 0:
        x = DropPath(drop_path_rate, name=f"{name}_drop_path")(x)
    if version == "v2":
        return layers.Add(name=f"{name}_out")([shortcut, x])
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.Activation("relu", name=f"{name}_out")(x)


def _block_input(x, out_channels, *, strides, shortcut_type, version, use_conv_bias, bn_epsilon, bn_momentum, name):
    """A block's residual-branch input (pre-activated for v2) and its shortcut."""
    preact = x
    if version == "v2":
        preact = apply_batch_norm(x, epsilon=bn_epsilon, momentum=bn_momentum, name=f"{name}_preact_bn")
        preact = layers.Activation("relu", name=f"{name}_preact_relu")(preact)
    shortcut = apply_shortcut(
        x, preact, out_channels, strides=strides, shortcut_type=shortcut_type, version=version,
        use_conv_bias=use_conv_bias, bn_epsilon=bn_epsilon, bn_momentum=bn_momentum, name=name,
    )
    return preact, shortcut


def _last_conv(y, filters, kernel_size, *, index, version, use_conv_bias, zero_init_last_bn, bn, name, dilation_rate=1):
    """A block's last conv: v2 has no norm after it (zero-init its kernel), v1 its BN (zero-init gamma)."""
    if version == "v2":
        return apply_conv(
            y, filters, kernel_size, dilation_rate=dilation_rate, use_bias=use_conv_bias,
            kernel_initializer="zeros" if zero_init_last_bn else "he_normal", name=f"{name}_{index}_conv",
        )
    y = apply_conv(y, filters, kernel_size, dilation_rate=dilation_rate, use_bias=use_conv_bias, name=f"{name}_{index}_conv")
    return apply_batch_norm(y, name=f"{name}_{index}_bn", zero_init=zero_init_last_bn, **bn)


def apply_basic_block(
    x,
    filters,
    *,
    name,
    strides=1,
    dilation_rate=1,
    version="v1.5",
    shortcut_type="B",
    use_conv_bias=False,
    se_ratio=None,
    drop_path_rate=0.0,
    zero_init_last_bn=False,
    bn_epsilon=1e-5,
    bn_momentum=0.9,
):
    """Basic residual block: 3x3 conv, 3x3 conv (ResNet-18/34, CIFAR nets).

    Args:
        x: input tensor (NHWC).
        filters: output channels of both convs.
        name: prefix of every layer name, e.g. "conv2_block1".
        strides: stride of the first 3x3 conv.
        dilation_rate: dilation of the 3x3 convs (output_stride < 32).
        version: "v1"/"v1.5" (post-activation; identical here) or "v2".
        shortcut_type: "A", "B", "C" or "D".
        use_conv_bias: whether convs carry a bias (v2: only convs that no
            norm follows).
        se_ratio: squeeze-and-excitation reduction ratio, or None.
        drop_path_rate: stochastic depth rate of the residual branch.
        zero_init_last_bn: start the last BN's gamma at zero.
        bn_epsilon, bn_momentum: BatchNormalization settings.

    Returns:
        The block's output tensor with `filters` channels.
    """
    bn = dict(epsilon=bn_epsilon, momentum=bn_momentum)
    post_bias = use_conv_bias and version != "v2"
    preact, shortcut = _block_input(
        x, filters, strides=strides, shortcut_type=shortcut_type, version=version,
        use_conv_bias=use_conv_bias, bn_epsilon=bn_epsilon, bn_momentum=bn_momentum, name=name,
    )
    y = apply_conv(preact, filters, 3, strides=strides, dilation_rate=dilation_rate, use_bias=post_bias, name=f"{name}_1_conv")
    y = apply_batch_norm(y, name=f"{name}_1_bn", **bn)
    y = layers.Activation("relu", name=f"{name}_1_relu")(y)
    y = _last_conv(
        y, filters, 3, index=2, dilation_rate=dilation_rate, version=version, use_conv_bias=use_conv_bias,
        zero_init_last_bn=zero_init_last_bn, bn=bn, name=name,
    )
    return _finish_block(y, shortcut, version=version, se_ratio=se_ratio, drop_path_rate=drop_path_rate, name=name)


def apply_bottleneck_block(
    x,
    filters,
    *,
    name,
    strides=1,
    dilation_rate=1,
    version="v1.5",
    shortcut_type="B",
    cardinality=1,
    base_width=64,
    width_multiplier=1.0,
    expansion=4,
    use_conv_bias=False,
    se_ratio=None,
    drop_path_rate=0.0,
    zero_init_last_bn=False,
    bn_epsilon=1e-5,
    bn_momentum=0.9,
):
    """Bottleneck residual block: 1x1 reduce, 3x3 (grouped), 1x1 expand.

    The inner width is `int(filters * width_multiplier * base_width / 64) *
    cardinality` (torchvision's rule: ResNeXt 32x4d has cardinality 32 and
    base_width 4; Wide ResNet-50-2 has width_multiplier 2); the output has
    `filters * expansion` channels.

    Args:
        x: input tensor (NHWC).
        filters: the stage's base width (64, 128, 256, 512 for ImageNet).
        name: prefix of every layer name, e.g. "conv3_block1".
        strides: block stride; in the 1x1 reduce conv for "v1", in the 3x3
            conv for "v1.5" and "v2".
        dilation_rate: dilation of the 3x3 conv.
        version: "v1", "v1.5" or "v2".
        shortcut_type: "A", "B", "C" or "D".
        cardinality: groups of the 3x3 conv (ResNeXt).
        base_width: width per group at the first stage (ResNeXt).
        width_multiplier: widens the inner convs (Wide ResNet).
        expansion: output channels per `filters`.
        use_conv_bias, se_ratio, drop_path_rate, zero_init_last_bn,
        bn_epsilon, bn_momentum: as in `apply_basic_block`.

    Returns:
        The block's output tensor with `filters * expansion` channels.
    """
    bn = dict(epsilon=bn_epsilon, momentum=bn_momentum)
    post_bias = use_conv_bias and version != "v2"
    width = int(filters * width_multiplier * base_width / 64.0) * cardinality
    out_channels = filters * expansion
    reduce_strides = strides if version == "v1" else 1
    spatial_strides = 1 if version == "v1" else strides

    preact, shortcut = _block_input(
        x, out_channels, strides=strides, shortcut_type=shortcut_type, version=version,
        use_conv_bias=use_conv_bias, bn_epsilon=bn_epsilon, bn_momentum=bn_momentum, name=name,
    )
    y = apply_conv(preact, width, 1, strides=reduce_strides, use_bias=post_bias, name=f"{name}_1_conv")
    y = apply_batch_norm(y, name=f"{name}_1_bn", **bn)
    y = layers.Activation("relu", name=f"{name}_1_relu")(y)
    y = apply_conv(
        y, width, 3, strides=spatial_strides, dilation_rate=dilation_rate, groups=cardinality,
        use_bias=post_bias, name=f"{name}_2_conv",
    )
    y = apply_batch_norm(y, name=f"{name}_2_bn", **bn)
    y = layers.Activation("relu", name=f"{name}_2_relu")(y)
    y = _last_conv(
        y, out_channels, 1, index=3, version=version, use_conv_bias=use_conv_bias,
        zero_init_last_bn=zero_init_last_bn, bn=bn, name=name,
    )
    return _finish_block(y, shortcut, version=version, se_ratio=se_ratio, drop_path_rate=drop_path_rate, name=name)
