"""`ResNetBackbone`: one configurable functional model for the ResNet family."""

import contextlib
import sys

import keras
from keras import layers

from keras_resnet.layers.blocks import (
    BLOCK_TYPES,
    SHORTCUT_TYPES,
    VERSIONS,
    apply_basic_block,
    apply_batch_norm,
    apply_bottleneck_block,
    apply_conv,
)
from keras_resnet.models.resnet.presets import get_preset_config
from keras_resnet.models.resnet.pretrained import load_pretrained, read_pretrained
from keras_resnet_settings.errors import ConfigError

STEM_TYPES = ("7x7", "deep", "cifar")


def _check_choice(argument, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{argument}={value!r} is not supported; allowed values: {', '.join(map(repr, allowed))}.")


@keras.saving.register_keras_serializable(package="keras_resnet")
class ResNetBackbone(keras.Model):
    """A ResNet feature extractor built with the Keras functional API.

    One class spans the family through its arguments: ResNet-18...200
    (v1, v1.5), pre-activation ResNet v2, ResNeXt (`cardinality`,
    `base_width`), Wide ResNet (`width_multiplier`), SE-ResNet (`se_ratio`),
    ResNet-C/D (`stem_type="deep"`, `shortcut_type="D"`), the CIFAR nets of
    He et al. (2015) (`stem_type="cifar"`, `shortcut_type="A"`), stochastic
    depth and dilation (`output_stride`). Named configurations live in
    `keras_resnet.models.resnet.presets` and are built with `ResNetBackbone.from_preset`.

    The model maps images to the last feature map. `pyramid_outputs` is a
    dict `{"C2": ..., "C5": ...}` of the feature tensors at the end of each
    stage (strides 4, 8, 16, 32 for ImageNet stems; a dilated stage keeps
    its input's stride), and `feature_info` lists their channels and
    strides. `feature_extractor()` returns a model with those outputs.

    Args:
        stackwise_num_blocks: blocks per stage, e.g. `[3, 4, 6, 3]`.
        stackwise_num_filters: base width per stage; defaults to
            `[64, 128, 256, 512]` (ImageNet) or `[16, 32, 64]` for
            `stem_type="cifar"`.
        block_type: "basic" (3x3, 3x3) or "bottleneck" (1x1, 3x3, 1x1).
        version: "v1" (stride in the first 1x1: keras.applications and the
            paper's Caffe models), "v1.5" (stride in the 3x3: torchvision),
            or "v2" (pre-activation, keras.applications ResNetV2 layout).
        stackwise_strides: stride per stage; defaults to `[1, 2, 2, 2]`
            (v2: `[2, 2, 2, 1]`, applied in the last block of each stage).
        stem_type: "7x7" (conv 7x7/2 + max-pool), "deep" (three 3x3 convs
            + max-pool, ResNet-C/D) or "cifar" (one 3x3 conv, no pool).
        stem_width: channels of the stem (64, or 16 for "cifar").
        shortcut_type: "A" (zero-pad identity), "B" (projection where the
            shape changes), "C" (always projection) or "D" (avg-pool then
            projection where strided).
        cardinality: groups of the 3x3 conv in bottlenecks (ResNeXt).
        base_width: width per group (ResNeXt; 64 for plain ResNets).
        width_multiplier: widens the inner convs (Wide ResNet).
        se_ratio: squeeze-and-excitation ratio in (0, 1], or None.
        drop_path_rate: maximum stochastic depth rate, linearly increased
            over blocks from 0.
        zero_init_last_bn: zero-initialise the last BN gamma of each block
            (v2: the last conv) so each block starts as the identity.
        output_stride: 8, 16 or 32 (ImageNet stems) replaces strides of
            the last stages by dilation; None keeps the natural stride.
        use_conv_bias: convs carry biases (keras.applications layout).
        bn_epsilon, bn_momentum: BatchNormalization settings.
        input_shape: `(height, width, channels)`; height/width may be None.
        frozen_stages: -1 freezes nothing, 0 the stem, N the stem and the
            first N stages. Frozen BatchNorm layers run in inference mode.
        name: model name.

    Example:
    >>> backbone = ResNetBackbone.from_preset("resnet18", input_shape=(64, 64, 3))
    >>> features = backbone.feature_extractor()(np.zeros((1, 64, 64, 3)))
    >>> {k: tuple(v.shape) for k, v in features.items()}["C5"]
    (1, 2, 2, 512)
    """

    def __init__(
        self,
        stackwise_num_blocks,
        stackwise_num_filters=None,
        block_type="bottleneck",
        version="v1.5",
        stackwise_strides=None,
        stem_type="7x7",
        stem_width=None,
        shortcut_type="B",
        cardinality=1,
        base_width=64,
        width_multiplier=1.0,
        se_ratio=None,
        drop_path_rate=0.0,
        zero_init_last_bn=False,
        output_stride=None,
        use_conv_bias=False,
        bn_epsilon=1e-5,
        bn_momentum=0.9,
        input_shape=(None, None, 3),
        frozen_stages=-1,
        name="resnet_backbone",
        **kwargs,
    ):
        _check_choice("block_type", block_type, BLOCK_TYPES)
        _check_choice("version", version, VERSIONS)
        _check_choice("stem_type", stem_type, STEM_TYPES)
        _check_choice("shortcut_type", shortcut_type, SHORTCUT_TYPES)
        stackwise_num_blocks = [int(n) for n in stackwise_num_blocks]
        num_stages = len(stackwise_num_blocks)
        if stackwise_num_filters is None:
            stackwise_num_filters = [16, 32, 64] if stem_type == "cifar" else [64, 128, 256, 512]
        if stackwise_strides is None:
            stackwise_strides = [2] * num_stages
            stackwise_strides[-1 if version == "v2" else 0] = 1
        stackwise_num_filters = [int(f) for f in stackwise_num_filters]
        stackwise_strides = [int(s) for s in stackwise_strides]
        if not (len(stackwise_num_filters) == len(stackwise_strides) == num_stages) or num_stages == 0:
            raise ConfigError(
                "stackwise_num_blocks, stackwise_num_filters and stackwise_strides must be non-empty and of "
                f"equal length; got {stackwise_num_blocks}, {stackwise_num_filters}, {stackwise_strides}."
            )
        if any(n < 1 for n in stackwise_num_blocks):
            raise ConfigError(f"stackwise_num_blocks must be positive ints, got {stackwise_num_blocks}.")
        if cardinality < 1 or base_width < 1:
            raise ConfigError(f"cardinality and base_width must be >= 1, got {cardinality} and {base_width}.")
        if block_type == "basic" and (cardinality != 1 or base_width != 64):
            raise ConfigError(
                "block_type='basic' supports only cardinality=1 and base_width=64; "
                "use block_type='bottleneck' for ResNeXt."
            )
        if width_multiplier <= 0:
            raise ConfigError(f"width_multiplier must be > 0, got {width_multiplier}.")
        if se_ratio is not None and not 0 < se_ratio <= 1:
            raise ConfigError(f"se_ratio must be None or in (0, 1], got {se_ratio}.")
        if not 0 <= drop_path_rate < 1:
            raise ConfigError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}.")
        input_shape = tuple(input_shape)
        if len(input_shape) != 3 or (input_shape[-1] is None or input_shape[-1] < 1):
            raise ConfigError(
                f"input_shape must be (height, width, channels) with a known channel count, got {input_shape}."
            )
        if stem_width is None:
            stem_width = 16 if stem_type == "cifar" else 64
        stem_stride = 1 if stem_type == "cifar" else 4
        natural_strides = []
        stride = stem_stride
        for s in stackwise_strides:
            stride *= s
            natural_strides.append(stride)
        allowed_output_strides = sorted(set(natural_strides[1:]) - {stem_stride}) or natural_strides[-1:]
        if output_stride is not None:
            _check_choice("output_stride", output_stride, allowed_output_strides)
        if frozen_stages < -1 or frozen_stages > num_stages:
            raise ConfigError(f"frozen_stages must be in [-1, {num_stages}], got {frozen_stages}.")

        bn = dict(epsilon=bn_epsilon, momentum=bn_momentum)
        inputs = keras.Input(shape=input_shape, name="images")

        # Stem.
        x = inputs
        stem_norm = version != "v2"
        if stem_type == "7x7":
            x = apply_conv(x, stem_width, 7, strides=2, use_bias=use_conv_bias or not stem_norm, name="conv1_conv")
        elif stem_type == "deep":
            x = apply_conv(x, stem_width // 2, 3, strides=2, name="stem_1_conv")
            x = apply_batch_norm(x, name="stem_1_bn", **bn)
            x = layers.Activation("relu", name="stem_1_relu")(x)
            x = apply_conv(x, stem_width // 2, 3, name="stem_2_conv")
            x = apply_batch_norm(x, name="stem_2_bn", **bn)
            x = layers.Activation("relu", name="stem_2_relu")(x)
            x = apply_conv(x, stem_width, 3, use_bias=use_conv_bias or not stem_norm, name="conv1_conv")
        else:
            x = apply_conv(x, stem_width, 3, use_bias=use_conv_bias or not stem_norm, name="conv1_conv")
        if stem_norm:
            x = apply_batch_norm(x, name="conv1_bn", **bn)
            x = layers.Activation("relu", name="conv1_relu")(x)
        if stem_type != "cifar":
            x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
            x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)

        # Stages.
        total_blocks = sum(stackwise_num_blocks)
        current_stride, dilation, block_counter = stem_stride, 1, 0
        stage_features, feature_info = [], []
        for stage_index, (num_blocks, filters, stage_stride) in enumerate(
            zip(stackwise_num_blocks, stackwise_num_filters, stackwise_strides)
        ):
            stride_block = num_blocks - 1 if version == "v2" else 0
            feature = None
            for block_index in range(num_blocks):
                strides = stage_stride if block_index == stride_block else 1
                block_dilation = dilation
                if strides > 1 and output_stride is not None and current_stride * strides > output_stride:
                    dilation *= strides
                    strides = 1
                if version == "v2" and block_index == stride_block and stage_index < num_stages - 1:
                    feature = x  # keras V2 layout: last map before the stride
                current_stride *= strides
                block_name = f"conv{stage_index + 2}_block{block_index + 1}"
                common = dict(
                    name=block_name,
                    strides=strides,
                    dilation_rate=block_dilation if block_index == stride_block else dilation,
                    version=version,
                    shortcut_type=shortcut_type,
                    use_conv_bias=use_conv_bias,
                    se_ratio=se_ratio,
                    drop_path_rate=drop_path_rate * block_counter / max(total_blocks - 1, 1),
                    zero_init_last_bn=zero_init_last_bn,
                    **{f"bn_{k}": v for k, v in bn.items()},
                )
                if block_type == "basic":
                    x = apply_basic_block(x, int(filters * width_multiplier), **common)
                else:
                    x = apply_bottleneck_block(
                        x, filters, cardinality=cardinality, base_width=base_width,
                        width_multiplier=width_multiplier, **common,
                    )
                block_counter += 1
            if version == "v2" and stage_index == num_stages - 1:
                x = apply_batch_norm(x, name="post_bn", **bn)
                x = layers.Activation("relu", name="post_relu")(x)
            if feature is None:
                feature = x
            stage_features.append(feature)

        # Keras maps functional graphs recursively; very deep nets (ResNet-1202
        # has ~6000 layers in a chain) need a higher recursion limit.
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 2000 + 40 * total_blocks))
        # Levels are named by stage (C2 is the first stage's output).
        pyramid_outputs = {f"C{index + 2}": feature for index, feature in enumerate(stage_features)}
        super().__init__(inputs=inputs, outputs=x, name=name, **kwargs)

        for level, feature in pyramid_outputs.items():
            feature_info.append(
                {"name": level, "channels": int(feature.shape[-1]), "layer": feature._keras_history[0].name}
            )
        self._assign_feature_strides(feature_info, stem_stride, stackwise_strides, output_stride, version)

        self.pyramid_outputs = pyramid_outputs
        self.feature_info = feature_info
        self.pyramid_level_inputs = {info["name"].replace("C", "P"): info["layer"] for info in feature_info}
        self.stackwise_num_blocks = stackwise_num_blocks
        self.stackwise_num_filters = stackwise_num_filters
        self.block_type = block_type
        self.version = version
        self.stackwise_strides = stackwise_strides
        self.stem_type = stem_type
        self.stem_width = stem_width
        self.shortcut_type = shortcut_type
        self.cardinality = cardinality
        self.base_width = base_width
        self.width_multiplier = width_multiplier
        self.se_ratio = se_ratio
        self.drop_path_rate = drop_path_rate
        self.zero_init_last_bn = zero_init_last_bn
        self.output_stride = output_stride
        self.use_conv_bias = use_conv_bias
        self.bn_epsilon = bn_epsilon
        self.bn_momentum = bn_momentum
        self.image_shape = input_shape
        self.frozen_stages = -1
        self.freeze_stages(frozen_stages)

    @staticmethod
    def _assign_feature_strides(feature_info, stem_stride, stackwise_strides, output_stride, version):
        """Stride of each pyramid level: the natural stride, capped by dilation."""
        stride = stem_stride
        for index, (info, stage_stride) in enumerate(zip(feature_info, stackwise_strides)):
            if version == "v2" and index < len(stackwise_strides) - 1:
                level_stride = stride  # taken before the stage's final strided block
            else:
                level_stride = stride * stage_stride
            if output_stride is not None:
                level_stride = min(level_stride, output_stride)
            info["stride"] = level_stride
            stride *= stage_stride
            if output_stride is not None:
                stride = min(stride, output_stride)

    def stage_layers(self, stage):
        """Layers of `stage` (0 is the stem, 1..N the residual stages)."""
        if stage == 0:
            prefixes = ("conv1_", "stem_", "pool1_")
        else:
            prefixes = (f"conv{stage + 1}_",)
        selected = [layer for layer in self.layers if layer.name.startswith(prefixes)]
        if stage == len(self.stackwise_num_blocks):
            selected += [layer for layer in self.layers if layer.name.startswith("post_")]
        return selected

    def freeze_stages(self, frozen_stages):
        """Freezes the stem and the first `frozen_stages` stages.

        `-1` unfreezes everything, `0` freezes only the stem. Frozen layers
        stop training and their BatchNorm runs in inference mode (Keras 3
        semantics of `trainable=False`). Recompile the model afterwards.
        """
        num_stages = len(self.stackwise_num_blocks)
        if not -1 <= frozen_stages <= num_stages:
            raise ConfigError(f"frozen_stages must be in [-1, {num_stages}], got {frozen_stages}.")
        for stage in range(num_stages + 1):
            for layer in self.stage_layers(stage):
                layer.trainable = stage > frozen_stages
        self.frozen_stages = frozen_stages

    def feature_extractor(self, levels=None):
        """A functional model from images to a dict of pyramid features.

        Args:
            levels: names to return (e.g. `["C3", "C4", "C5"]`); all by default.
        """
        levels = list(self.pyramid_outputs) if levels is None else list(levels)
        unknown = [lv for lv in levels if lv not in self.pyramid_outputs]
        if unknown:
            raise ConfigError(f"Unknown pyramid levels {unknown}; available: {list(self.pyramid_outputs)}.")
        return keras.Model(self.input, {lv: self.pyramid_outputs[lv] for lv in levels}, name=f"{self.name}_features")

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "stackwise_num_blocks": self.stackwise_num_blocks,
            "stackwise_num_filters": self.stackwise_num_filters,
            "block_type": self.block_type,
            "version": self.version,
            "stackwise_strides": self.stackwise_strides,
            "stem_type": self.stem_type,
            "stem_width": self.stem_width,
            "shortcut_type": self.shortcut_type,
            "cardinality": self.cardinality,
            "base_width": self.base_width,
            "width_multiplier": self.width_multiplier,
            "se_ratio": self.se_ratio,
            "drop_path_rate": self.drop_path_rate,
            "zero_init_last_bn": self.zero_init_last_bn,
            "output_stride": self.output_stride,
            "use_conv_bias": self.use_conv_bias,
            "bn_epsilon": self.bn_epsilon,
            "bn_momentum": self.bn_momentum,
            "input_shape": list(self.image_shape),
            "frozen_stages": self.frozen_stages,
            "dtype": keras.dtype_policies.serialize(self.get_layer("conv1_conv").dtype_policy),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        # Layers take the global dtype policy when built: rebuild under the
        # policy the model was saved with (e.g. mixed_bfloat16).
        with dtype_policy_scope(config.pop("dtype", None)):
            return cls(**config)

    @classmethod
    def from_preset(cls, preset, weights=None, **overrides):
        """Builds a named configuration from `keras_resnet.models.resnet.presets.PRESETS`.

        Args:
            preset: a name from `keras_resnet.list_presets()`.
            weights: None (random initialisation), a name from the weights
                catalogue (`keras-resnet weights` lists them): "imagenet"
                (the preset's default ImageNet weights) or a tag such as
                "torchvision:IMAGENET1K_V2", "timm:a1_in1k",
                "keras_applications" -- downloaded once, verified and cached
                (`keras_resnet.weights`) --, or pretrained weights of
                the same architecture: a torchvision/timm state dict
                (`.pth`, `.pt`, `.bin`, `.safetensors`, a dict of arrays, a
                live `torch.nn.Module`) or a keras.applications `.h5` file
                or model. A file of another architecture is refused, naming
                both. The backbone takes the source's normalised images
                (ImageNet mean/std for torchvision/timm); task models put
                that normalisation in front.
            **overrides: constructor arguments that replace the preset's
                (e.g. `input_shape=(32, 32, 1)`, `output_stride=16`); with
                `weights`, only those that keep the architecture.

        Example:
        >>> backbone = ResNetBackbone.from_preset("resnet50", weights="imagenet")  # torchvision IMAGENET1K_V2
        >>> backbone = ResNetBackbone.from_preset("resnet50", weights="resnet50.safetensors")
        """
        pretrained = read_pretrained(weights, preset=preset) if weights is not None else None
        config = get_preset_config(preset)
        config.update(overrides)
        config.setdefault("name", preset)
        backbone = cls(**config)
        if pretrained is not None:
            load_pretrained(pretrained, backbone, preset=preset)
        return backbone


@contextlib.contextmanager
def dtype_policy_scope(policy):
    """Temporarily sets Keras' global dtype policy (None leaves it alone)."""
    previous = keras.mixed_precision.global_policy()
    if policy is not None:
        keras.mixed_precision.set_global_policy(keras.dtype_policies.get(policy))
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
