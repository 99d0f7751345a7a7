"""`quantize_aware(model)`: a task model rebuilt with BatchNorm folded and fake quantization where TFLite quantizes.

The functional graph of the float model (nested backbones flattened) is
walked twice with Keras' own graph runner (`Function._run_through_graph`):

1. an analysis pass with placeholder tokens finds who consumes each
   layer's output, so that a `Conv2D` whose only consumer is a
   `BatchNormalization` is folded with it, and an output that only feeds
   a ReLU is not given a range of its own (TFLite fuses conv/add + ReLU
   and quantizes after the ReLU);
2. a build pass calls the replacement layers on new inputs: quantized
   convolutions, dense and FPN layers, the input normalisation as a
   1x1 convolution, a `FakeQuant` after every other layer whose output
   TFLite quantizes (ReLU, add, concatenation, pooling to a vector,
   resize, sigmoid, multiply...), and nothing after layers that keep
   their input's range (padding, max pooling, reshape, dropout).

The result is one of `QuantizeAwareResNetClassifier`,
`QuantizeAwareResNetSegmenter`, `QuantizeAwareRetinaNetDetector`: the
task's own class (its methods -- decoders, tiling, anchors -- work on the
quantized graph), serialisable (its config is the float model's config
plus the quantization settings, so `.keras` files round-trip).
"""

from collections import defaultdict

import keras
from keras import tree

from keras_resnet.layers.core import PACKAGE, DropPath, ImageNormalization
from keras_resnet.layers.fpn import FPN, ResizeLike
from keras_resnet.models.resnet.classifier import ResNetClassifier
from keras_resnet.models.retinanet.detector import RetinaNetDetector
from keras_resnet.models.segmentation.segmenter import ResNetSegmenter
from keras_resnet.quantization.layers import (
    DEFAULT_MOMENTUM,
    FakeQuant,
    QuantizedConv2D,
    QuantizedDense,
    QuantizedFPN,
    QuantizedNormalization,
    TiedFakeQuant,
    is_quantize_aware,
)
from keras_resnet_settings.errors import ConfigError

DEFAULT_SETTINGS = {"momentum": DEFAULT_MOMENTUM, "enabled": True}
RAW_PIXEL_RANGE = (0.0, 255.0)
# Layers whose int8 output keeps the input's scale and zero point (TFLite propagates it): no range of their own.
PASS_THROUGH = (
    keras.layers.ZeroPadding2D,
    keras.layers.MaxPooling2D,
    keras.layers.Reshape,
    keras.layers.Flatten,
    keras.layers.Dropout,
    keras.layers.SpatialDropout2D,
    keras.layers.Identity,
    keras.layers.Cropping2D,
    DropPath,
)
# Layers rebuilt as a quantized layer that carries its own output range.
SELF_QUANTIZED = (keras.layers.Conv2D, keras.layers.Dense, ImageNormalization, FPN)


class _Token:
    """A stand-in tensor for the analysis pass: which layer produced it (None: a model input), whose range it has.

    `owner` is the layer whose output range the tensor carries: the
    producer, or, after a pass-through layer (reshape, padding...), the
    owner of its input.
    """

    __slots__ = ("op", "owner")

    def __init__(self, op, owner=None):
        self.op = op
        self.owner = owner


def _is_relu(op) -> bool:
    if isinstance(op, keras.layers.ReLU):
        config = op.get_config()
        return config.get("max_value") is None and not config.get("negative_slope") and not config.get("threshold")
    return isinstance(op, keras.layers.Activation) and op.get_config().get("activation") == "relu"


def _is_nested(op) -> bool:
    return isinstance(op, keras.Model) and hasattr(op, "_run_through_graph")


def _float32(config: dict) -> dict:
    config = dict(config)
    config["dtype"] = "float32"
    return config


class _Graph:
    """The analysis pass: the layers of a functional model (nested models flattened) and their consumers."""

    def __init__(self, model):
        self.consumers = defaultdict(list)
        self.ops = {}
        self.input_consumers = []
        self.uniform_concats = set()  # id(Concatenate) whose inputs all carry one range
        self.input_owners = defaultdict(list)  # id(op) -> per call, the owner of its first input's range
        self.resized = {}  # id(ResizeLike) -> the layer whose output it resizes (not the size reference)
        model._run_through_graph([_Token(None) for _ in model.inputs], call_fn=self._call)

    def _call(self, op, *args, **kwargs):
        tokens = [t for t in tree.flatten((args, kwargs)) if isinstance(t, _Token)]
        if _is_nested(op):
            return op._run_through_graph(tokens, call_fn=self._call)
        self.ops[id(op)] = op
        for token in tokens:
            if token.op is None:
                self.input_consumers.append(op)
            else:
                self.consumers[id(token.op)].append(op)
        if isinstance(op, ResizeLike) and tokens:
            self.resized[id(op)] = tokens[0].op
        self.input_owners[id(op)].append(tokens[0].owner if tokens else None)
        owner = op
        if isinstance(op, PASS_THROUGH) and tokens:
            owner = tokens[0].owner
        elif isinstance(op, keras.layers.Concatenate):
            owners = {id(token.owner) for token in tokens}
            if len(owners) == 1 and tokens[0].owner is not None:
                self.uniform_concats.add(id(op))
                owner = tokens[0].owner
        count = len(op._inbound_nodes[0].outputs) if op._inbound_nodes else 1
        return _Token(op, owner) if count == 1 else [_Token(op, owner) for _ in range(count)]

    def folded_batch_norm(self, op):
        """The BatchNormalization folded into Conv2D `op`, or None."""
        if type(op) is not keras.layers.Conv2D:
            return None
        consumers = self.consumers[id(op)]
        if not consumers or any(c is not consumers[0] for c in consumers):
            return None
        bn = consumers[0]
        if not isinstance(bn, keras.layers.BatchNormalization) or bn.get_config().get("axis") not in (-1, 3, [-1], [3]):
            return None
        return bn

    def only_relu_follows(self, op) -> bool:
        consumers = self.consumers[id(op)]
        return bool(consumers) and all(_is_relu(c) for c in consumers)

    def only_consumer(self, op):
        """The one layer that reads `op`'s output (possibly several times), or None."""
        consumers = self.consumers[id(op)]
        return consumers[0] if consumers and all(c is consumers[0] for c in consumers) else None


class _Builder:
    """The build pass: replacement layers called on new inputs, and the float weights copied into them."""

    def __init__(self, model, settings, float_layers=()):
        if not isinstance(model, keras.Model) or not hasattr(model, "_run_through_graph"):
            raise ConfigError(f"quantize_aware needs a functional Keras model, got {type(model).__name__}.")
        if is_quantize_aware(model):
            raise ConfigError(f"{model.name} is already quantize-aware; quantize the float model once.")
        self.model = model
        self.settings = settings
        self.float_layers = set(float_layers)
        self.graph = _Graph(model)
        self.folded = {}  # id(bn) -> conv
        self.batch_norms = {}  # id(conv) -> the bn folded into it
        for op in self.graph.ops.values():
            bn = self.graph.folded_batch_norm(op)
            if bn is not None:
                self.folded[id(bn)] = op
                self.batch_norms[id(op)] = bn
        self.replacements = {}
        self.output_quants = {}
        self.ranges = {}  # id(op) -> the FakeQuant whose range its output has
        self.copies = []  # (new layer, callable that copies the float weights into it)

    def _quant(self, name, fixed_range=None):
        return FakeQuant(momentum=self.settings["momentum"], fixed_range=fixed_range,
                         enabled=self.settings["enabled"], name=name)

    def build(self):
        model = self.model
        inputs = [keras.Input(batch_shape=x.shape, dtype="float32", name=x.name) for x in model.inputs]
        raw_pixels = any(isinstance(op, ImageNormalization) for op in self.graph.input_consumers)
        fixed = RAW_PIXEL_RANGE if raw_pixels else None
        quantized = [self._quant(f"input_quant{'' if i == 0 else f'_{i}'}", fixed)(x) for i, x in enumerate(inputs)]
        outputs = model._run_through_graph(quantized, call_fn=self._call)
        return (inputs[0] if len(inputs) == 1 else inputs), outputs

    def _call(self, op, *args, **kwargs):
        if _is_nested(op):
            return op._run_through_graph(tree.flatten(args), call_fn=self._call)
        if id(op) in self.folded:
            conv = self.folded[id(op)]
            if id(conv) in self.ranges:
                self.ranges[id(op)] = self.ranges[id(conv)]
            return args[0]  # the conv before it already applies this BatchNorm
        layer = self._replacement(op)
        if isinstance(layer, QuantizedConv2D):
            owners = self.graph.input_owners[id(op)]
            if len(owners) == 1 and owners[0] is not None:  # one call: one input range
                layer.use_input_range(self.ranges.get(id(owners[0])))
        outputs = layer(*args, **kwargs)
        quant = self._output_quant(op)
        if isinstance(quant, (FakeQuant, TiedFakeQuant)):
            self.ranges[id(op)] = quant if isinstance(quant, FakeQuant) else quant.source
        elif isinstance(layer, (QuantizedConv2D, QuantizedNormalization)) and layer.output_quantizer is not None:
            self.ranges[id(op)] = layer.output_quantizer
        return quant(outputs) if quant is not None else outputs

    def _owning_concatenation(self, op):
        """The concatenation whose range TFLite gives `op`'s output (directly or through a resize), or None.

        The converter gives the inputs of a same-scale operator the range of
        its output: each input of a concatenation of differently ranged
        tensors is written straight in the concatenation's range, not
        rounded on a range of its own first. So a tensor that only feeds
        such a concatenation gets no range of its own; rounding once after
        the concatenation is the same.
        """
        target = self.batch_norms.get(id(op), op)
        consumer = self.graph.only_consumer(target)
        if (isinstance(consumer, keras.layers.Concatenate) and consumer.name not in self.float_layers
                and id(consumer) not in self.graph.uniform_concats):
            return consumer
        if isinstance(consumer, ResizeLike) and self.graph.resized.get(id(consumer)) is target:
            return self._owning_concatenation(consumer)
        return None

    def _make_output_quant(self, op):
        if op.name in self.float_layers or self._owning_concatenation(op) is not None:
            return None
        if isinstance(op, PASS_THROUGH + SELF_QUANTIZED):
            return None
        if isinstance(op, keras.layers.Concatenate) and id(op) in self.graph.uniform_concats:
            return None  # one range in, the same range out (TFLite's concatenation keeps it)
        if isinstance(op, (keras.layers.Add, keras.layers.BatchNormalization)) and self.graph.only_relu_follows(op):
            return None
        input_range = self.ranges.get(id(self.graph.resized.get(id(op)))) if isinstance(op, ResizeLike) else None
        if input_range is not None:
            # TFLite resizes on the input's grid: the output is rounded with the input's range (the
            # input's range is tracked, not the output's, so rounding there never clips what it tracks)
            return TiedFakeQuant(input_range, name=f"{op.name}_quant")
        return self._quant(f"{op.name}_quant")

    def _output_quant(self, op):
        if id(op) not in self.output_quants:
            self.output_quants[id(op)] = self._make_output_quant(op)
        return self.output_quants[id(op)]

    def _replacement(self, op):
        if id(op) not in self.replacements:
            self.replacements[id(op)] = self._replace(op)
        return self.replacements[id(op)]

    def _replace(self, op):
        common = dict(momentum=self.settings["momentum"], enabled=self.settings["enabled"], name=op.name)
        if type(op) is keras.layers.Conv2D:
            bn = self.batch_norms.get(id(op))
            target = bn if bn is not None else op
            quantize_output = not self.graph.only_relu_follows(target) and self._owning_concatenation(op) is None
            layer = QuantizedConv2D(op.get_config(), bn.get_config() if bn is not None else None,
                                    quantize_output=quantize_output, **common)
            self.copies.append((layer, lambda layer=layer, op=op, bn=bn: _copy_conv(layer, op, bn)))
            return layer
        if type(op) is keras.layers.Dense:
            layer = QuantizedDense(op.get_config(), **common)
            self.copies.append((layer, lambda layer=layer, op=op: _assign(layer, {"kernel": op.kernel,
                                                                                  "bias": op.bias})))
            return layer
        if isinstance(op, ImageNormalization):
            return QuantizedNormalization(op.get_config(), **common)
        if isinstance(op, FPN):
            config = {k: v for k, v in op.get_config().items() if k not in ("dtype", "name")}
            layer = QuantizedFPN(**config, **common)
            self.copies.append((layer, lambda layer=layer, op=op: _copy_fpn(layer, op)))
            return layer
        if isinstance(op, (keras.layers.Conv1D, keras.layers.Conv3D, keras.layers.DepthwiseConv2D,
                           keras.layers.SeparableConv2D, keras.layers.Conv2DTranspose)):
            raise ConfigError(f"quantize_aware has no int8 rule for layer {op.name} ({type(op).__name__}).")
        layer = type(op).from_config(_float32(op.get_config()))
        if op.weights:
            self.copies.append((layer, lambda layer=layer, op=op: layer.set_weights(op.get_weights())))
        return layer

    def copy_weights(self):
        for _, copy in self.copies:
            copy()


def _assign(layer, values):
    for name, value in values.items():
        if value is not None:
            getattr(layer, name).assign(keras.ops.convert_to_numpy(value))


def _copy_conv(layer, conv, bn):
    values = {"kernel": conv.kernel, "bias": conv.bias if conv.use_bias else None}
    if bn is not None:
        values.update(gamma=bn.gamma if bn.scale else None, beta=bn.beta if bn.center else None,
                      moving_mean=bn.moving_mean, moving_variance=bn.moving_variance)
    _assign(layer, values)


def _copy_fpn(layer, fpn):
    for new_list, old_list in ((layer.lateral_convs, fpn.lateral_convs), (layer.output_convs, fpn.output_convs),
                               (layer.extra_convs, fpn.extra_convs)):
        for new, old in zip(new_list, old_list):
            _assign(new, {"kernel": old.kernel, "bias": old.bias})


def _is_plain(value) -> bool:
    """Numbers, strings, None and lists/tuples/dicts of them (config values, not tensors or functions)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _is_plain(item) for key, item in value.items())
    return False


class BackboneSettings:
    """What a quantize-aware model keeps of its float backbone: the plain settings, read-only.

    Args:
        backbone: the float model's `ResNetBackbone` (None: nothing).
    """

    def __init__(self, backbone):
        settings = {"name": getattr(backbone, "name", None)}
        for key, value in (vars(backbone) if backbone is not None else {}).items():
            if not key.startswith("_") and _is_plain(value):
                settings[key] = value
        object.__setattr__(self, "_settings", settings)

    def __getattr__(self, key):
        try:
            return self._settings[key]
        except KeyError:
            raise AttributeError(
                f"a quantize-aware model keeps only its float backbone's settings ({', '.join(self._settings)}), "
                f"not {key!r}; use the float model for backbone operations."
            ) from None

    def __setattr__(self, key, value):
        raise AttributeError("a quantize-aware model's backbone settings are read-only (its layers are folded).")


class QuantizeAwareTask:
    """Mixin of the quantize-aware task classes: built from a float task model, serialised as its config.

    Args:
        source: the float model's serialised form
            (`keras.saving.serialize_keras_object(model)`); the quantized
            graph is rebuilt from it.
        settings: `{"momentum": ..., "enabled": ...}` (see `FakeQuant`).
        float_model: the float model itself (its weights are copied);
            `quantize_aware` passes it, `from_config` does not.
    """

    FLOAT_LAYERS = ()  # names of layers whose output stays float (outside the int8 export)

    def __init__(self, source, settings=None, name=None, float_model=None, **kwargs):
        settings = {**DEFAULT_SETTINGS, **(settings or {})}
        if float_model is None:
            float_model = keras.saving.deserialize_keras_object(source)
        builder = _Builder(float_model, settings, self.FLOAT_LAYERS)
        inputs, outputs = builder.build()
        # The functional constructor above the task class: the task's own __init__ builds the float graph.
        mro = type(self).__mro__
        task_class = mro[mro.index(QuantizeAwareTask) + 1]
        super(task_class, self).__init__(inputs=inputs, outputs=outputs, name=name or float_model.name, **kwargs)
        builder.copy_weights()
        self.source = source
        self.settings = settings
        for key, value in vars(float_model).items():
            if key.startswith("_") or key in vars(self) or key in ("backbone", "preprocessing"):
                continue
            if isinstance(value, (keras.layers.Layer, keras.Variable)):
                continue
            setattr(self, key, value)
        normalizations = [layer for layer in builder.replacements.values()
                          if isinstance(layer, QuantizedNormalization)]
        self.preprocessing = normalizations[0] if normalizations else None
        # The float backbone's settings (output_stride, name...) for code that reads them; its layers are in
        # this graph, folded and quantized, so the backbone itself is not kept (nor its weights saved twice).
        self.backbone = BackboneSettings(getattr(float_model, "backbone", None))

    @property
    def float_class_name(self):
        return self.source.get("class_name")

    def get_config(self):
        return {"name": self.name, "source": self.source, "settings": dict(self.settings)}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package=PACKAGE)
class QuantizeAwareResNetClassifier(QuantizeAwareTask, ResNetClassifier):
    """A `ResNetClassifier` with BatchNorm folded and int8 fake quantization (see `quantize_aware`)."""


@keras.saving.register_keras_serializable(package=PACKAGE)
class QuantizeAwareResNetSegmenter(QuantizeAwareTask, ResNetSegmenter):
    """A `ResNetSegmenter` with BatchNorm folded and int8 fake quantization (see `quantize_aware`)."""


@keras.saving.register_keras_serializable(package=PACKAGE)
class QuantizeAwareRetinaNetDetector(QuantizeAwareTask, RetinaNetDetector):
    """A `RetinaNetDetector` (raw head outputs) with BatchNorm folded and int8 fake quantization.

    The int8 export ends at the heads' box deltas and class logits (the
    decoder and NMS after them run in float), so their concatenation
    ("predictions") is not quantized: the raw outputs are the heads' int8
    values, as the export gives them.
    """

    FLOAT_LAYERS = ("predictions",)


QUANTIZE_AWARE_CLASSES = {
    ResNetClassifier: QuantizeAwareResNetClassifier,
    ResNetSegmenter: QuantizeAwareResNetSegmenter,
    RetinaNetDetector: QuantizeAwareRetinaNetDetector,
}


def quantize_aware(model, momentum=DEFAULT_MOMENTUM, enabled=True):
    """A trainable copy of a task model for quantization-aware training (QAT), on Keras 3.

    BatchNormalization is folded into the preceding convolution (moving
    statistics frozen, gamma/beta trained), weights are fake-quantized per
    output channel (symmetric int8) and activations per tensor (asymmetric
    int8, ranges tracked by moving average while training) wherever
    TFLite's int8 kernels quantize. The copy starts from `model`'s weights;
    `model` is not changed. Export the trained copy with
    `keras-resnet export ... --quantize int8`: the converter reads the
    trained ranges, no calibration data needed.

    Args:
        model: a `ResNetClassifier`, `ResNetSegmenter` or
            `RetinaNetDetector` (float, trained).
        momentum: moving-average momentum of the activation ranges.
        enabled: False folds BatchNorm but does not round (the float
            model's outputs, for checks).

    Returns:
        A `QuantizeAwareResNetClassifier` / `...Segmenter` /
        `...RetinaNetDetector`: the same task class (same methods), a new
        functional graph, serialisable to `.keras`.

    Example:
    >>> qat = quantize_aware(keras.models.load_model("runs/x/best.keras"))
    >>> qat.compile(optimizer="adam", loss=...)
    >>> qat.fit(train_ds, epochs=2)
    """
    cls = next((qat for base, qat in QUANTIZE_AWARE_CLASSES.items() if isinstance(model, base)), None)
    if cls is None:
        raise ConfigError(
            f"quantize_aware takes a ResNetClassifier, ResNetSegmenter or RetinaNetDetector, got "
            f"{type(model).__name__}."
        )
    if keras.mixed_precision.global_policy().name != "float32":
        raise ConfigError(
            f"quantize_aware needs the float32 policy (now {keras.mixed_precision.global_policy().name!r}): "
            "fake quantization runs in float32; call keras.mixed_precision.set_global_policy('float32') first."
        )
    source = keras.saving.serialize_keras_object(model)
    return cls(source, {"momentum": float(momentum), "enabled": bool(enabled)}, name=model.name, float_model=model)
