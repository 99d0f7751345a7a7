"""`ResNetSegmenter`: semantic segmentation heads on any `ResNetBackbone`.

Four heads are available:

- "deeplabv3plus" (Chen et al., 2018): ASPP on the coarsest feature map
  (a 1x1 conv, three 3x3 atrous convs and an image-pooling branch), a 1x1
  projection, then a decoder that upsamples to the finest level, fuses a
  1x1-reduced copy of it (48 channels), and refines with two 3x3 convs.
- "fpn", the Semantic FPN of Kirillov et al. (2019): an FPN over all levels;
  each level goes through conv + 2x upsampling stages down to the finest
  stride, the maps are summed and classified.
- "deeplabv3" (Chen et al., 2017), torchvision's `DeepLabHead`: the same ASPP
  on the coarsest feature map, Dropout(0.5), a 3x3 conv, no decoder
  (torchvision's `deeplabv3_resnet50/101` import exactly, see
  `keras_resnet.convert.torch_segmentation`).
- "fcn" (Long et al., 2015), torchvision's `FCNHead`: a 3x3 conv on the
  coarsest feature map and Dropout(0.1) (`fcn_resnet50/101`).

Both end in a 1x1 classifier computed in float32 and a bilinear resize to
the exact input size, so the output is `(N, H, W, num_classes)` logits (or
probabilities with `activation="softmax"`) for any input size and output
stride, mixed precision included.
"""

import math
import warnings

import keras
import numpy as np
from keras import layers

from keras_resnet.layers.fpn import (
    ResizeLike,
    apply_conv_bn_relu,
    apply_fpn,
    apply_separable_conv_bn_relu,
)
from keras_resnet.models.task import Task
from keras_resnet.models.task_weights import is_task_preset, task_model_from_catalogue
from keras_resnet.tiling import (
    DEFAULT_OVERLAP,
    DEFAULT_TILE_BATCH,
    keras_segment_function,
    model_tile,
    segment_tiled,
)
from keras_resnet_settings.errors import ConfigError
from keras_resnet_settings.registry import SEGMENTATION, SEGMENTATION_HEADS

HEADS = SEGMENTATION_HEADS
ACTIVATIONS = (None, "softmax")
# DeepLab's ASPP rates at output stride 16; scaled by 16 / stride otherwise
# (output stride 8 -> (12, 24, 36), as in the paper).
ASPP_RATES_AT_STRIDE_16 = (6, 12, 18)


def default_aspp_rates(feature_stride):
    """ASPP dilation rates for a coarsest feature map at `feature_stride`.

    (6, 12, 18) at stride 16 and (12, 24, 36) at stride 8 as in DeepLab;
    other strides scale the same way (stride 32 -> (3, 6, 9)).
    """
    return tuple(max(1, int(round(rate * 16 / feature_stride))) for rate in ASPP_RATES_AT_STRIDE_16)


def _warn_on_wasted_rates(rates, feature_size):
    """Warns when an atrous rate reaches past a static feature map.

    A 3x3 conv with dilation >= the map size only ever sees its centre tap
    (the others fall in the zero padding), so it is a costly 1x1 conv: on
    TF's CPU kernels a 4x4 map at rates (6, 12, 18) trains ~4x slower than
    at (1, 2, 3) (benchmarks/segmentation_throughput.py).
    """
    known = [int(size) for size in feature_size if size is not None]
    if not known or max(rates) < min(known):
        return
    side = min(known)
    if side > 3:
        fix = f"pass aspp_rates smaller than {side} (e.g. [1, 2, 3]) or use a larger input"
    else:
        # Three distinct rates all below the map size do not exist on a map this small.
        fix = "use a larger input or a smaller output_stride (three distinct rates need a map of at least 4x4)"
    warnings.warn(
        f"ASPP rates {tuple(rates)} reach past the {'x'.join(map(str, known))} coarsest feature map: taps that "
        f"land in the padding are wasted compute. For small inputs {fix}.",
        stacklevel=3,
    )


def _conv3x3(x, filters, name, separable, dilation_rate=1):
    if separable:
        return apply_separable_conv_bn_relu(x, filters, name, dilation_rate=dilation_rate)
    return apply_conv_bn_relu(x, filters, 3, name=name, dilation_rate=dilation_rate)


def apply_aspp(features, rates, width, name="aspp", separable=False):
    """Atrous Spatial Pyramid Pooling: 1x1, three atrous 3x3 and image pooling, projected to `width`.

    `separable=True` makes the atrous 3x3 convs depthwise-separable (DeepLabV3+'s "SC").
    """
    branches = [apply_conv_bn_relu(features, width, 1, name=f"{name}_1x1")]
    for rate in rates:
        branches.append(_conv3x3(features, width, f"{name}_rate{rate}", separable, dilation_rate=rate))
    pooled = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_pool")(features)
    pooled = apply_conv_bn_relu(pooled, width, 1, name=f"{name}_pool_1x1")
    branches.append(ResizeLike("bilinear", name=f"{name}_pool_resize")([pooled, features]))
    x = layers.Concatenate(name=f"{name}_concat")(branches)
    return apply_conv_bn_relu(x, width, 1, name=f"{name}_projection")


def apply_deeplabv3_head(features, rates, width, name="aspp"):
    """torchvision's `DeepLabHead` up to its classifier: ASPP, Dropout(0.5), 3x3 conv + BN + ReLU.

    Args:
        features: the coarsest feature map (a KerasTensor, NHWC).
        rates: the three ASPP dilation rates ((12, 24, 36) in torchvision).
        width: channels of every conv (256 in torchvision).
        name: prefix of the ASPP layers (`apply_aspp`); the 3x3 conv is "head_refine".

    Returns:
        The `width`-channel map the 1x1 classifier takes.

    Example:
    >>> features = keras.Input((40, 40, 2048))
    >>> apply_deeplabv3_head(features, (12, 24, 36), 256).shape
    (None, 40, 40, 256)
    """
    x = apply_aspp(features, rates, width, name=name)
    x = layers.Dropout(0.5, name=f"{name}_dropout")(x)
    return apply_conv_bn_relu(x, width, 3, name="head_refine")


def apply_fcn_head(features, width):
    """torchvision's `FCNHead` up to its classifier: 3x3 conv + BN + ReLU ("fcn_*"), Dropout(0.1).

    Args:
        features: the coarsest feature map (a KerasTensor, NHWC).
        width: channels of the 3x3 conv (torchvision: the input channels // 4).

    Example:
    >>> apply_fcn_head(keras.Input((40, 40, 2048)), 512).shape
    (None, 40, 40, 512)
    """
    x = apply_conv_bn_relu(features, width, 3, name="fcn")
    return layers.Dropout(0.1, name="fcn_dropout")(x)


def _decoder_levels(decoder_level, levels):
    """`decoder_level` (None, a level name or a list of them) as a tuple of levels, coarse to fine."""
    if decoder_level is None:
        return (levels[0],)
    return (decoder_level,) if isinstance(decoder_level, str) else tuple(decoder_level)


def _deeplabv3plus_head(pyramid, strides, head_width, decoder_width, aspp_rates, decoder_level=None,
                        separable=False):
    levels = list(pyramid)
    decoder_levels = _decoder_levels(decoder_level, levels)
    coarsest = pyramid[levels[-1]]
    rates = tuple(aspp_rates) if aspp_rates is not None else default_aspp_rates(strides[levels[-1]])
    _warn_on_wasted_rates(rates, coarsest.shape[1:3])
    x = apply_aspp(coarsest, rates, head_width, separable=separable)
    # Intermediate levels (a coarse-to-fine list): upsample, fuse the level's reduced features, one 3x3 conv.
    for level in decoder_levels[:-1]:
        features = pyramid[level]
        x = ResizeLike("bilinear", name=f"decoder_{level}_upsample")([x, features])
        lateral = apply_conv_bn_relu(features, decoder_width, 1, name=f"decoder_{level}_low_level")
        x = layers.Concatenate(name=f"decoder_{level}_concat")([x, lateral])
        x = _conv3x3(x, head_width, f"decoder_{level}_refine", separable)
    # The last (finest) level: the paper's decoder, two 3x3 convs.
    decoder_features = pyramid[decoder_levels[-1]]
    x = ResizeLike("bilinear", name="decoder_upsample")([x, decoder_features])
    low_level = apply_conv_bn_relu(decoder_features, decoder_width, 1, name="decoder_low_level")
    x = layers.Concatenate(name="decoder_concat")([x, low_level])
    x = _conv3x3(x, head_width, "decoder_refine1", separable)
    return _conv3x3(x, head_width, "decoder_refine2", separable)


def _deeplabv3_head(pyramid, strides, head_width, aspp_rates):
    levels = list(pyramid)
    coarsest = pyramid[levels[-1]]
    rates = tuple(aspp_rates) if aspp_rates is not None else default_aspp_rates(strides[levels[-1]])
    _warn_on_wasted_rates(rates, coarsest.shape[1:3])
    return apply_deeplabv3_head(coarsest, rates, head_width)


def _semantic_fpn_head(pyramid, strides, head_width):
    levels = list(pyramid)
    fpn = apply_fpn(pyramid, levels=levels, width=head_width, name="fpn")
    branch_width = max(head_width // 2, 1)
    finest_stride = strides[levels[0]]
    # The first level of each stride is the resize target of the stage above it.
    reference_by_stride = {}
    for level in levels:
        reference_by_stride.setdefault(strides[level], fpn[level.replace("C", "P", 1)])
    outputs = []
    for level in levels:
        key = level.replace("C", "P", 1)
        x, stride = fpn[key], strides[level]
        num_stages = max(1, int(round(math.log2(stride / finest_stride))))
        for stage in range(num_stages):
            x = apply_conv_bn_relu(x, branch_width, 3, name=f"seg_{key}_stage{stage + 1}")
            if stride > finest_stride:
                stride //= 2
                x = ResizeLike("bilinear", name=f"seg_{key}_upsample{stage + 1}")([x, reference_by_stride[stride]])
        outputs.append(x)
    return layers.Add(name="seg_sum")(outputs) if len(outputs) > 1 else outputs[0]


@keras.saving.register_keras_serializable(package="keras_resnet")
class ResNetSegmenter(Task):
    """A semantic segmentation model on top of any `ResNetBackbone`.

    The graph is `images -> [preprocessing] -> backbone pyramid -> head ->
    1x1 classifier -> resize to the input size`. With a preprocessing layer
    inside (e.g. `ImageNormalization`) the model takes raw pixels 0..255.
    The classifier ("classifier") and the final resize ("logits") compute in
    float32, so the output is float32 under mixed precision.

    Args:
        backbone: a `ResNetBackbone` (any output stride; its `image_shape`
            is the input shape, height/width may be None).
        num_classes: number of classes (background included).
        head: "deeplabv3plus", "fpn" (Semantic FPN), "deeplabv3" (no
            decoder: torchvision's DeepLabHead) or "fcn" (torchvision's
            FCNHead); see the module docstring.
        preprocessing: None, or a Keras layer applied to the input images.
        activation: None (logits, the default: pair with from_logits losses)
            or "softmax".
        head_width: channels of the ASPP / decoder convs, of the FPN
            (the Semantic FPN branches use `head_width // 2`, as 256/128 in
            the paper), or of the FCN head's 3x3 conv (torchvision uses the
            backbone's channels // 4: 512 on ResNet-50).
        decoder_width: channels of the reduced low-level features
            (DeepLabV3+ only).
        aspp_rates: three ASPP dilation rates (the DeepLab heads); None
            derives them from the stride of the coarsest level
            (`default_aspp_rates`: (12, 24, 36) at stride 8, torchvision's).
        decoder_level: the pyramid level whose features the DeepLabV3+
            decoder fuses (keras-hub's `low_level_feature_key`), e.g. "C3";
            None takes the finest level (C2: stride 4 for ImageNet stems, as
            in the paper). With a stride-1 stem C2 sits at stride 2 and "C3"
            keeps the decoder at stride 4. A list, coarse to fine (e.g.
            `["C4", "C3"]`), fuses each level in turn on the way down (an
            upsample, the level's 1x1-reduced features and one 3x3 conv per
            intermediate level, then the paper's decoder on the last), so
            items smaller than the ASPP stride get stride-8 semantics.
        separable: DeepLabV3+ only: depthwise-separable 3x3 convs in the
            ASPP and the decoder (the paper's "SC", TF Model Garden's
            `use_depthwise_convolution`): ResNet-50 at 512 and output
            stride 32 does 24.7 instead of 47.6 GMACs per image and trains
            1.8x faster on CPU (BENCHMARKS.md). False (dense 3x3 convs, as
            in saved models from before this argument) by default.
        name: model name.

    Example:
    >>> backbone = ResNetBackbone.from_preset("resnet18", input_shape=(40, 56, 3), output_stride=16)
    >>> model = ResNetSegmenter(backbone, num_classes=5)
    >>> model.predict(np.zeros((2, 40, 56, 3)), verbose=0).shape
    (2, 40, 56, 5)
    """

    TASK_ARGS = (
        "head", "preprocessing", "activation", "head_width", "decoder_width", "aspp_rates", "decoder_level",
        "separable", "name",
    )

    def __init__(
        self,
        backbone,
        num_classes,
        head="deeplabv3plus",
        preprocessing=None,
        activation=None,
        head_width=256,
        decoder_width=48,
        aspp_rates=None,
        decoder_level=None,
        separable=False,
        name="resnet_segmenter",
        **kwargs,
    ):
        if not isinstance(backbone, keras.Model) or not hasattr(backbone, "pyramid_outputs"):
            raise ConfigError(f"backbone must be a ResNetBackbone, got {type(backbone).__name__}.")
        if head not in HEADS:
            raise ConfigError(f"head={head!r} is not supported; allowed values: {HEADS}.")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"activation={activation!r} is not supported; allowed values: {ACTIVATIONS}.")
        if int(num_classes) < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}.")
        if int(head_width) < 1 or int(decoder_width) < 1:
            raise ConfigError(f"head_width and decoder_width must be >= 1, got {head_width} and {decoder_width}.")
        if aspp_rates is not None and (
            len(aspp_rates) != 3 or any(int(r) < 1 for r in aspp_rates) or len(set(map(int, aspp_rates))) != 3
        ):
            raise ConfigError(f"aspp_rates must be three distinct positive ints or None, got {aspp_rates}.")
        strides = {info["name"]: info["stride"] for info in backbone.feature_info}
        if decoder_level is not None:
            if not isinstance(decoder_level, str):
                decoder_level = [str(level) for level in decoder_level]
            chosen = _decoder_levels(decoder_level, list(strides))
            order = [list(strides).index(level) if level in strides else -1 for level in chosen]
            if (
                head != "deeplabv3plus"
                or not chosen
                or min(order) < 0
                or order != sorted(set(order), reverse=True)
            ):
                raise ConfigError(
                    f"decoder_level={decoder_level!r} needs head='deeplabv3plus' and one of the backbone's levels "
                    f"{list(strides)}, or a list of them from coarse to fine (e.g. ['C4', 'C3'])."
                )
        if separable and head != "deeplabv3plus":
            raise ConfigError(f"separable=True needs head='deeplabv3plus' (got head={head!r}); the {head} head's "
                              "convs are dense (torchvision's layout, for its weights).")

        inputs = keras.Input(shape=backbone.input_shape[1:], name="images")
        x = preprocessing(inputs) if preprocessing is not None else inputs
        pyramid = backbone.feature_extractor()(x)
        if head == "deeplabv3plus":
            x = _deeplabv3plus_head(pyramid, strides, int(head_width), int(decoder_width), aspp_rates, decoder_level,
                                    bool(separable))
        elif head == "deeplabv3":
            x = _deeplabv3_head(pyramid, strides, int(head_width), aspp_rates)
        elif head == "fcn":
            x = apply_fcn_head(pyramid[list(pyramid)[-1]], int(head_width))
        else:
            x = _semantic_fpn_head(pyramid, strides, int(head_width))
        x = layers.Conv2D(num_classes, 1, dtype="float32", name="classifier")(x)
        outputs = ResizeLike("bilinear", dtype="float32", name="logits")([x, inputs])
        if activation is not None:
            outputs = layers.Activation(activation, dtype="float32", name="probabilities")(outputs)
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.head = head
        self.preprocessing = preprocessing
        self.activation = activation
        self.head_width = int(head_width)
        self.decoder_width = int(decoder_width)
        self.aspp_rates = [int(r) for r in aspp_rates] if aspp_rates is not None else None
        self.decoder_level = decoder_level  # None, a level name, or the list validated above
        self.separable = bool(separable)

    def get_config(self):
        return {
            **self.task_config(),
            "head": self.head,
            "activation": self.activation,
            "head_width": self.head_width,
            "decoder_width": self.decoder_width,
            "aspp_rates": self.aspp_rates,
            "decoder_level": self.decoder_level,
            "separable": self.separable,
        }

    def predict_tiled(self, image, tile=None, overlap=DEFAULT_OVERLAP, batch_size=DEFAULT_TILE_BATCH, progress=None):
        """Segments an image of any size at its own resolution, sliding windows of the input size over it.

        Args:
            image: `(h, w, C)` or `(h, w)` raw pixels 0..255, any size.
            tile: the window side (int) or `(height, width)`; None: the
                model's input size (a fixed-size model takes only that).
            overlap: fraction of a window shared with its neighbour, in [0, 1).
            batch_size: windows run at a time.
            progress: None (silent) or a progress hook
                (`keras_resnet.predict.progress.terminal_progress()`).

        Returns:
            `{"probabilities": float32 (h, w, num_classes), "mask": int32 (h, w)}`
            (see `keras_resnet.tiling.segment_tiled`).

        Example:
        >>> model = ResNetSegmenter.from_preset("resnet18", 5, input_shape=(256, 256, 3))
        >>> model.predict_tiled(np.zeros((900, 1400, 3)))["mask"].shape
        (900, 1400)
        """
        probabilities = segment_tiled(
            keras_segment_function(self), image, model_tile(self, tile), overlap, batch_size, progress
        )
        return {"probabilities": probabilities, "mask": probabilities.argmax(-1).astype(np.int32)}

    @classmethod
    def from_preset(cls, preset, num_classes=None, head="deeplabv3plus", weights=None, **overrides):
        """Builds a segmenter on a named backbone preset, or a task preset with its published weights.

        Args:
            preset: a backbone preset (`keras_resnet.list_presets()`), or a
                task preset of the weights catalogue: "deeplabv3_resnet50",
                "deeplabv3_resnet101", "fcn_resnet50", "fcn_resnet101"
                (torchvision's, exactly; `keras-resnet weights` lists them).
            num_classes: number of classes. A task preset keeps its weights'
                21 (background + the 20 VOC classes) when None; another
                number keeps the backbone and head and makes a fresh final
                1x1 classifier.
            head: "deeplabv3plus", "fpn", "deeplabv3" or "fcn" (backbone presets).
            weights: backbone presets: None or ImageNet backbone weights
                ("imagenet", a catalogue tag or a file; see
                `ResNetBackbone.from_preset`), whose normalisation goes in
                front of the model (it then takes raw pixels 0-255). Task
                presets: "coco_voc" (or "coco"), downloaded once and cached.
            **overrides: segmenter arguments (`preprocessing`, `activation`,
                `head_width`, `decoder_width`, `aspp_rates`, `decoder_level`, `separable`, `name`) and
                backbone arguments (anything else, e.g. `input_shape`,
                `output_stride`); for a task preset, `input_shape` only.

        Example:
        >>> model = ResNetSegmenter.from_preset("resnet50", 21, head="fpn", input_shape=(256, 256, 3))
        >>> voc = ResNetSegmenter.from_preset("deeplabv3_resnet50", weights="coco_voc", input_shape=(520, 520, 3))
        """
        if is_task_preset(preset):
            return task_model_from_catalogue(SEGMENTATION, preset, weights, num_classes=num_classes, **overrides)
        if num_classes is None:
            raise ValueError(f"ResNetSegmenter.from_preset({preset!r}) needs num_classes")
        backbone, segmenter_args, _ = cls.backbone_from_preset(preset, overrides, weights)
        segmenter_args.setdefault("name", f"{preset}_{head}")
        return cls(backbone, num_classes, head=head, **segmenter_args)


__all__ = ["ResNetSegmenter", "HEADS", "apply_aspp", "apply_deeplabv3_head", "apply_fcn_head", "default_aspp_rates"]
