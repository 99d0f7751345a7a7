"""Fake-quantization layers (TensorFlow backend): int8 ranges the TFLite converter reads.

TFLite's int8 kernels quantize weights per output channel, symmetric, in
[-127, 127] ("narrow range"), and activations per tensor, asymmetric, in
[-128, 127]. These layers simulate exactly that in float, with
`tf.quantization.fake_quant_*` ops (straight-through gradients), so that
training sees the rounding it will meet on the device and the converter
reads each tensor's range from the graph instead of calibrating it:

- `FakeQuant`: an activation quantizer; its range is tracked during
  training as a moving average of the batch min/max (or fixed, e.g.
  0..255 for raw pixels).
- `QuantizedConv2D`: a `Conv2D` with its following `BatchNormalization`
  folded in (`w * gamma / sqrt(var + eps)`, `beta - mean * gamma /
  sqrt(var + eps)`, the moving statistics frozen: what TFLite folds at
  inference) and per-channel weight quantization; optionally its output
  quantized.
- `QuantizedDense`: the same for `Dense` (logits quantized before a
  softmax).
- `QuantizedNormalization`: `ImageNormalization` as a 1x1 convolution
  with a diagonal kernel, so that raw pixels 0..255 enter an int8 graph
  through one integer convolution (each output channel has one nonzero
  weight, which per-channel quantization represents exactly).
- `QuantizedFPN`: the FPN layer with quantized convolutions and ranges on
  its laterals, sums and outputs.

Every layer takes `enabled`; `enabled=False` keeps the folding and
skips the rounding, so a disabled model reproduces the float model.
"""

import keras
import tensorflow as tf
from keras import ops

from keras_resnet.layers.core import PACKAGE
from keras_resnet.layers.fpn import FPN, upsample_nearest_like

QUANTIZATION_LAYERS = []  # the layer classes of this module, filled as they are defined
NUM_BITS = 8
DEFAULT_MOMENTUM = 0.99


def _register(cls):
    QUANTIZATION_LAYERS.append(cls)
    return keras.saving.register_keras_serializable(package=PACKAGE)(cls)


def sublayers(model):
    """Every layer of `model`, nested models and layers included."""
    stack = list(getattr(model, "layers", []) or [])
    seen = set()
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        yield layer
        stack.extend(getattr(layer, "_layers", None) or [])


def is_quantize_aware(model) -> bool:
    """True when `model` (or a layer nested in it) is a fake-quantization layer of this package."""
    if not isinstance(model, keras.layers.Layer):
        return False
    classes = tuple(QUANTIZATION_LAYERS)
    return isinstance(model, classes) or any(isinstance(layer, classes) for layer in sublayers(model))


def quantize_weights_per_tensor(kernel, enabled=True):
    """Symmetric narrow-range int8 fake quantization with one scale (TFLite's FULLY_CONNECTED weights)."""
    if not enabled:
        return kernel
    bound = tf.maximum(tf.reduce_max(tf.abs(kernel)), 1e-8)
    return tf.quantization.fake_quant_with_min_max_vars(kernel, -bound, bound, num_bits=NUM_BITS, narrow_range=True)


def round_bias(bias, kernel, input_scale):
    """`bias` on TFLite's int32 grid: steps of input scale x per-channel weight scale (straight-through)."""
    axes = list(range(len(kernel.shape) - 1))
    step = input_scale * tf.maximum(tf.reduce_max(tf.abs(kernel), axis=axes), 1e-8) / 127.0
    return bias + tf.stop_gradient(tf.round(bias / step) * step - bias)


def _pair(value):
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def quantize_weights_per_channel(kernel, enabled=True):
    """Symmetric narrow-range int8 fake quantization per output channel (the last axis)."""
    if not enabled:
        return kernel
    axes = list(range(len(kernel.shape) - 1))
    bound = tf.maximum(tf.reduce_max(tf.abs(kernel), axis=axes), 1e-8)
    return tf.quantization.fake_quant_with_min_max_vars_per_channel(
        kernel, -bound, bound, num_bits=NUM_BITS, narrow_range=True
    )


@_register
class FakeQuant(keras.layers.Layer):
    """Per-tensor asymmetric int8 fake quantization of activations.

    In training, the range follows the batch's min and max (always
    including 0, as TFLite requires) by an exponential moving average; the
    first batch sets it. In inference the stored range is used. With
    `fixed_range`, the range never moves (raw pixels: `(0, 255)`).

    Args:
        momentum: weight of the old range in the moving average.
        fixed_range: `(min, max)` that is never updated, or None.
        enabled: False passes values through (the range is still tracked).

    Example:
    >>> x = keras.Input((8, 8, 3))
    >>> y = FakeQuant(fixed_range=(0.0, 255.0))(x)
    """

    def __init__(self, momentum=DEFAULT_MOMENTUM, fixed_range=None, enabled=True, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.momentum = float(momentum)
        self.fixed_range = tuple(float(v) for v in fixed_range) if fixed_range is not None else None
        self.enabled = bool(enabled)
        self.observing = False  # `calibration.observing`: update the range in inference calls too

    def build(self, input_shape):
        low, high = self.fixed_range or (0.0, 0.0)
        self.range_min = self.add_weight(name="range_min", shape=(), initializer=keras.initializers.Constant(low),
                                         trainable=False, aggregation="mean")
        self.range_max = self.add_weight(name="range_max", shape=(), initializer=keras.initializers.Constant(high),
                                         trainable=False, aggregation="mean")
        self.tracked = self.add_weight(
            name="tracked", shape=(), initializer=keras.initializers.Constant(1.0 if self.fixed_range else 0.0),
            trainable=False, aggregation="only_first_replica",
        )

    def _update_range(self, x):
        low = tf.minimum(tf.reduce_min(x), 0.0)
        high = tf.maximum(tf.reduce_max(x), 0.0)
        first = tf.cast(self.tracked, x.dtype) < 0.5
        momentum = tf.where(first, 0.0, self.momentum)
        self.range_min.assign(momentum * self.range_min + (1.0 - momentum) * low)
        self.range_max.assign(momentum * self.range_max + (1.0 - momentum) * high)
        self.tracked.assign(1.0)

    def call(self, inputs, training=False):
        x = ops.cast(inputs, "float32")
        if (training or self.observing) and self.fixed_range is None:
            self._update_range(tf.stop_gradient(x))
        return self.fake_quantize(x)

    def _range_max(self):
        # An untracked range (never trained) would be empty; keep it 1e-6 wide until it is set.
        return tf.maximum(self.range_max, self.range_min + 1e-6)

    def scale(self):
        """The int8 step of the stored range, `(max - min) / 255`: the scale TFLite gives the tensor."""
        return (self._range_max() - self.range_min) / 255.0

    def fake_quantize(self, x):
        """`x` rounded on this layer's int8 grid (the stored range; unchanged when not `enabled`)."""
        if not self.enabled:
            return x
        return tf.quantization.fake_quant_with_min_max_vars(
            x, self.range_min, self._range_max(), num_bits=NUM_BITS, narrow_range=False
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum,
                "fixed_range": list(self.fixed_range) if self.fixed_range else None, "enabled": self.enabled}


class TiedFakeQuant(keras.layers.Layer):
    """Fake quantization with another `FakeQuant`'s range (no variables of its own).

    TFLite's resize keeps its input's scale and zero point (a same-scale
    operator), so `quantize_aware` rounds a resize's output with the range
    of the tensor it resizes. That range is tracked before the resize,
    which never widens it, so rounding here never clips what is tracked.
    The layer is rebuilt with the graph (a quantize-aware model serialises
    as its float source), so it is not registered for deserialisation on
    its own.

    Args:
        source: the `FakeQuant` whose range (and `enabled`) it uses; built
            here if it is not yet.
    """

    def __init__(self, source, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if not source.built:
            source.build(None)
        self.source = source

    def call(self, inputs):
        return self.source.fake_quantize(ops.cast(inputs, "float32"))

    def compute_output_shape(self, input_shape):
        return input_shape


QUANTIZATION_LAYERS.append(TiedFakeQuant)


@_register
class QuantizedConv2D(keras.layers.Layer):
    """A 2-D convolution with an optional folded BatchNormalization, per-channel int8 weights.

    The kernel, bias and BatchNorm parameters stay separate variables (so a
    float checkpoint loads and training updates gamma/beta); the moving
    mean and variance are frozen, and the forward pass convolves with the
    folded, fake-quantized kernel and adds the folded bias -- the graph
    TFLite's converter turns into one int8 CONV_2D.

    Args:
        conv: the `Conv2D` config (`layer.get_config()`).
        batch_norm: the following `BatchNormalization`'s config, or None.
        quantize_output: add a `FakeQuant` of the output (False when a
            ReLU follows and carries the range).
        momentum, enabled: as `FakeQuant`.

    Example:
    >>> conv = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)
    >>> layer = QuantizedConv2D(conv.get_config(), keras.layers.BatchNormalization().get_config())
    """

    def __init__(self, conv, batch_norm=None, quantize_output=True, momentum=DEFAULT_MOMENTUM, enabled=True,
                 **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.conv = dict(conv)
        self.batch_norm = dict(batch_norm) if batch_norm is not None else None
        self.quantize_output = bool(quantize_output)
        self.momentum = float(momentum)
        self.enabled = bool(enabled)
        if self.batch_norm is not None and self.batch_norm.get("axis", -1) not in (-1, 3, [-1], [3]):
            raise ValueError(f"QuantizedConv2D folds BatchNormalization on the channel axis only, got {self.batch_norm}.")
        self.output_quantizer = (
            FakeQuant(momentum=momentum, enabled=enabled, name="output_quant") if self.quantize_output else None
        )
        self.input_quantizer = None  # see `use_input_range`

    def build(self, input_shape):
        filters = int(self.conv["filters"])
        kernel_size = _pair(self.conv["kernel_size"])
        groups = int(self.conv.get("groups", 1) or 1)
        channels = int(input_shape[-1])
        self.kernel = self.add_weight(name="kernel", shape=(*kernel_size, channels // groups, filters),
                                      initializer="glorot_uniform")
        self.bias = (self.add_weight(name="bias", shape=(filters,), initializer="zeros")
                     if self.conv.get("use_bias", True) else None)
        if self.batch_norm is not None:
            bn = self.batch_norm
            self.gamma = (self.add_weight(name="gamma", shape=(filters,), initializer="ones")
                          if bn.get("scale", True) else None)
            self.beta = (self.add_weight(name="beta", shape=(filters,), initializer="zeros")
                         if bn.get("center", True) else None)
            self.moving_mean = self.add_weight(name="moving_mean", shape=(filters,), initializer="zeros",
                                               trainable=False)
            self.moving_variance = self.add_weight(name="moving_variance", shape=(filters,), initializer="ones",
                                                   trainable=False)
        if self.output_quantizer is not None:
            self.output_quantizer.build((*input_shape[:-1], filters))

    def use_input_range(self, quantizer):
        """Rounds the bias as TFLite stores it (int32, input x weight scale), the input having `quantizer`'s range.

        `quantize_aware` calls it for a conv called on one tensor whose
        range it knows. The `FakeQuant` belongs to the layer before, so it
        is referenced, not tracked (its variables are saved once, there).
        """
        object.__setattr__(self, "input_quantizer", quantizer)

    def folded(self):
        """`(kernel, bias)` with the BatchNorm folded in (float, not quantized)."""
        kernel = ops.convert_to_tensor(self.kernel)
        bias = ops.convert_to_tensor(self.bias) if self.bias is not None else ops.zeros((kernel.shape[-1],))
        if self.batch_norm is None:
            return kernel, bias
        scale = ops.rsqrt(ops.convert_to_tensor(self.moving_variance) + float(self.batch_norm.get("epsilon", 1e-3)))
        if self.gamma is not None:
            scale = scale * self.gamma
        bias = (bias - self.moving_mean) * scale
        if self.beta is not None:
            bias = bias + self.beta
        return kernel * scale, bias

    def call(self, inputs, training=False):
        kernel, bias = self.folded()
        if self.enabled and self.input_quantizer is not None:
            bias = round_bias(bias, kernel, self.input_quantizer.scale())
        kernel = quantize_weights_per_channel(kernel, self.enabled)
        x = ops.conv(
            ops.cast(inputs, "float32"), kernel, strides=_pair(self.conv.get("strides", 1)),
            padding=self.conv.get("padding", "valid"), dilation_rate=_pair(self.conv.get("dilation_rate", 1)),
        )
        x = x + bias
        activation = self.conv.get("activation", "linear")
        if activation not in (None, "linear"):
            x = keras.activations.get(activation)(x)
        if self.output_quantizer is not None:
            x = self.output_quantizer(x, training=training)
        return x

    def compute_output_shape(self, input_shape):
        return keras.layers.Conv2D.from_config(self.conv).compute_output_shape(input_shape)

    def get_config(self):
        return {**super().get_config(), "conv": self.conv, "batch_norm": self.batch_norm,
                "quantize_output": self.quantize_output, "momentum": self.momentum, "enabled": self.enabled}


@_register
class QuantizedDense(keras.layers.Layer):
    """A `Dense` layer with int8 weights (one scale, as the converter quantizes FULLY_CONNECTED) and quantized logits.

    The logits are quantized before the activation (softmax), as TFLite
    runs FULLY_CONNECTED then SOFTMAX.

    Args:
        dense: the `Dense` config.
        momentum, enabled: as `FakeQuant`.
    """

    def __init__(self, dense, momentum=DEFAULT_MOMENTUM, enabled=True, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.dense = dict(dense)
        self.momentum = float(momentum)
        self.enabled = bool(enabled)
        self.output_quantizer = FakeQuant(momentum=momentum, enabled=enabled, name="logits_quant")

    def build(self, input_shape):
        units = int(self.dense["units"])
        self.kernel = self.add_weight(name="kernel", shape=(int(input_shape[-1]), units), initializer="glorot_uniform")
        self.bias = self.add_weight(name="bias", shape=(units,), initializer="zeros") if self.dense.get(
            "use_bias", True) else None
        self.output_quantizer.build((*input_shape[:-1], units))

    def call(self, inputs, training=False):
        x = ops.matmul(ops.cast(inputs, "float32"), quantize_weights_per_tensor(self.kernel, self.enabled))
        if self.bias is not None:
            x = x + self.bias
        x = self.output_quantizer(x, training=training)
        activation = self.dense.get("activation", "linear")
        if activation not in (None, "linear"):
            x = keras.activations.get(activation)(x)
        return x

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], int(self.dense["units"]))

    def get_config(self):
        return {**super().get_config(), "dense": self.dense, "momentum": self.momentum, "enabled": self.enabled}


@_register
class QuantizedNormalization(keras.layers.Layer):
    """`ImageNormalization` (raw pixels -> network range) as an int8-friendly 1x1 convolution.

    `y = (x[..., order] * scale - mean) / std` is a 1x1 convolution whose
    kernel has one nonzero weight per output channel (`scale / std`, at the
    input channel `order` picks) and whose bias is `-mean / std`; per-channel
    int8 quantization represents that kernel exactly, and the raw-pixel
    input keeps the range 0..255 (scale 1 for uint8 input).

    Args:
        normalization: the `ImageNormalization` config.
        momentum, enabled: as `FakeQuant`.
    """

    def __init__(self, normalization, momentum=DEFAULT_MOMENTUM, enabled=True, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.normalization = dict(normalization)
        self.momentum = float(momentum)
        self.enabled = bool(enabled)
        norm = self.normalization
        self.mean, self.std = norm.get("mean", 0.0), norm.get("std", 1.0)
        self.scale, self.reverse_channels = float(norm.get("scale", 1.0)), bool(norm.get("reverse_channels", False))
        self.output_quantizer = FakeQuant(momentum=momentum, enabled=enabled, name="output_quant")

    def build(self, input_shape):
        self.channels = int(input_shape[-1])
        self.output_quantizer.build(input_shape)

    def _kernel_and_bias(self):
        channels = self.channels
        mean = ops.broadcast_to(ops.convert_to_tensor(self.mean, "float32"), (channels,))
        std = ops.broadcast_to(ops.convert_to_tensor(self.std, "float32"), (channels,))
        order = list(reversed(range(channels))) if self.reverse_channels else list(range(channels))
        selection = ops.one_hot(ops.convert_to_tensor(order), channels, dtype="float32")  # [out, in]
        kernel = ops.transpose(selection) * (self.scale / std)[None, :]  # [in, out]
        return ops.reshape(kernel, (1, 1, channels, channels)), -mean / std

    def call(self, inputs, training=False):
        kernel, bias = self._kernel_and_bias()
        if self.enabled:
            bias = round_bias(bias, kernel, 1.0)  # the input: raw pixels, scale 1
        x = ops.conv(ops.cast(inputs, "float32"), quantize_weights_per_channel(kernel, self.enabled), padding="valid")
        return self.output_quantizer(x + bias, training=training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "normalization": self.normalization, "momentum": self.momentum,
                "enabled": self.enabled}


@_register
class QuantizedFPN(FPN):
    """`FPN` with quantized convolutions and ranges on its laterals, top-down sums, outputs and extra levels.

    Args:
        momentum, enabled: as `FakeQuant`; the rest as `FPN`.
    """

    def __init__(self, *args, momentum=DEFAULT_MOMENTUM, enabled=True, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(*args, **kwargs)
        self.momentum = float(momentum)
        self.enabled = bool(enabled)

    def _quant(self, name):
        return FakeQuant(momentum=self.momentum, enabled=self.enabled, name=name)

    def _conv(self, filters, kernel_size, name, strides=1, padding="same"):
        config = keras.layers.Conv2D(filters, kernel_size, strides=strides, padding=padding, name=name).get_config()
        return QuantizedConv2D(config, None, quantize_output=True, momentum=self.momentum, enabled=self.enabled,
                               name=name)

    def build(self, input_shape):
        levels = self._input_levels(input_shape)
        self.lateral_convs = [self._conv(self.width, 1, f"lateral_P{level}") for level in levels]
        self.output_convs = [self._conv(self.width, 3, f"output_P{level}") for level in levels]
        padding = "valid" if self._symmetric_extra_padding() else "same"
        self.extra_convs = [self._conv(self.width, 3, f"extra_P{level}", strides=2, padding=padding)
                            for level in range(levels[-1] + 1, self.max_level + 1)]
        # the top-down sums: every level but the coarsest, which is its lateral alone
        self.sum_quants = [self._quant(f"sum_P{level}_quant") for level in levels[:-1]]
        self.relu_quants = [self._quant(f"relu_P{level}_quant") for level in range(levels[-1] + 1, self.max_level)]
        for index, (level, lateral, output) in enumerate(zip(levels, self.lateral_convs, self.output_convs)):
            lateral.build(input_shape[f"C{level}"])
            shape = lateral.compute_output_shape(input_shape[f"C{level}"])
            output.build(shape)
            if index < len(self.sum_quants):
                self.sum_quants[index].build(shape)
        extra_channels = input_shape[f"C{levels[-1]}"][-1] if self.extra_levels_from == "C5" else self.width
        for extra in self.extra_convs:
            extra.build((None, None, None, extra_channels))
            extra_channels = self.width
        for quant in self.relu_quants:
            quant.build((None, None, None, self.width))
        self._levels = levels

    def call(self, inputs, training=False):
        levels = self._levels
        merged = [None] * len(levels)
        coarser = None
        for index in reversed(range(len(levels))):
            x = self.lateral_convs[index](inputs[f"C{levels[index]}"], training=training)
            if coarser is not None:
                x = self.sum_quants[index](x + upsample_nearest_like(coarser, x), training=training)
            merged[index] = coarser = x
        outputs = {f"P{level}": conv(x, training=training)
                   for level, conv, x in zip(levels, self.output_convs, merged)}
        top = levels[-1]
        x = inputs[f"C{top}"] if self.extra_levels_from == "C5" else outputs[f"P{top}"]
        for offset, conv in enumerate(self.extra_convs):
            if offset > 0:
                x = self.relu_quants[offset - 1](ops.relu(x), training=training)
            if self._symmetric_extra_padding():  # PyTorch's padding=1 (torchvision's P6/P7): a PAD, then VALID
                x = ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
            x = conv(x, training=training)
            outputs[f"P{top + offset + 1}"] = x
        return outputs

    def _symmetric_extra_padding(self):
        return getattr(self, "extra_padding", "same") == "symmetric"

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "enabled": self.enabled}
