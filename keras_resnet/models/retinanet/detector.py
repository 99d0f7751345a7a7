"""`RetinaNetDetector`: RetinaNet (Lin et al., 2017) on any `ResNetBackbone`.

The graph is `images -> [preprocessing] -> backbone C3..C5 -> FPN P3..P7
-> two subnets shared across levels -> (B, N, 4 + num_classes)`:

- classification subnet: `head_depth` 3x3 convs + ReLU of `head_width`
  channels, then a 3x3 conv to `A * num_classes` logits whose bias is
  `-log((1 - pi) / pi)` (pi = `prior_probability` = 0.01, the paper's and
  keras-cv's prior, so training starts at ~0.01 foreground probability);
- box subnet: the same tower (own weights), then a 3x3 conv to `A * 4`
  deltas; all head convs are initialised N(0, 0.01) as in the paper.

Each level's outputs are reshaped to `(B, h * w * A, .)` and concatenated
level-major, matching `AnchorGenerator`'s anchor order; the last layer
("predictions") is float32 under any dtype policy, box deltas first, then
class logits. The input size must be static: anchors are constants.

Models imported from torchvision (`keras_resnet.convert.from_torch`) set
the options that reproduce it: `anchor_layout="torchvision"`,
`fpn_extra_padding="symmetric"`, `box_variance=(1, 1, 1, 1)`,
`head_norm_epsilon=1e-5`, and torchvision's post-processing as
`decoder_args`.

Targets come from `make_label_encoder()`, the loss is
`keras_resnet.models.retinanet.RetinaNetLoss`, and `make_decoder()` /
`make_inference_model()` / `predict_detections()` turn raw outputs into
boxes with class-wise NMS (see `keras_resnet.models.retinanet.decoder`).
"""

import inspect
import math

import keras
from keras import layers

from keras_resnet.layers.fpn import EXTRA_LEVEL_PADDINGS, EXTRA_LEVEL_SOURCES, FPN
from keras_resnet.models.retinanet.anchors import (
    ANCHOR_LAYOUTS,
    DEFAULT_ASPECT_RATIOS,
    DEFAULT_SCALES,
    AnchorGenerator,
)
from keras_resnet.models.retinanet.boxes import BOX_VARIANCE
from keras_resnet.models.retinanet.decoder import DetectionDecoder
from keras_resnet.models.retinanet.encoder import RetinaNetLabelEncoder
from keras_resnet.models.task import Task
from keras_resnet.models.task_weights import is_task_preset, task_model_from_catalogue
from keras_resnet.tiling import (
    DEFAULT_OVERLAP,
    DEFAULT_TILE_BATCH,
    detect_tiled,
    keras_detect_function,
    model_tile,
)
from keras_resnet_settings.errors import ConfigError
from keras_resnet_settings.registry import DETECTION

HEAD_NORMS = (None, "group")
# DetectionDecoder arguments a detector may carry as its defaults (`decoder_args`).
DECODER_DEFAULT_ARGS = ("score_threshold", "iou_threshold", "max_detections", "pre_nms_top_k", "top_k_per_level")
# Keras' GroupNormalization epsilon, the head's default.
GROUP_NORM_EPSILON = 1e-3


def _check_backbone(backbone, min_level, max_level):
    """The backbone levels the FPN uses; each must have stride 2**level."""
    if not isinstance(backbone, keras.Model) or not hasattr(backbone, "feature_info"):
        raise ConfigError(f"backbone must be a ResNetBackbone, got {type(backbone).__name__}.")
    height, width = backbone.input_shape[1:3]
    if height is None or width is None:
        raise ConfigError(
            f"RetinaNetDetector needs a static input size (anchors are constants); the backbone's input shape is "
            f"{backbone.input_shape[1:]}. Build it with input_shape=(height, width, 3)."
        )
    strides = {int(info["name"][1:]): info["stride"] for info in backbone.feature_info}
    top = min(max(strides), max_level)
    levels = list(range(min_level, top + 1))
    wrong = {f"C{level}": strides.get(level) for level in levels if strides.get(level) != 2**level}
    if wrong or not levels:
        raise ConfigError(
            f"Levels {min_level}..{max_level} need backbone features C{min_level}..C{top} at strides "
            f"2**level; got strides {wrong or strides}. Dilated backbones (output_stride) and the CIFAR "
            "stem are not supported."
        )
    return [f"C{level}" for level in levels]


def _conv(filters, name, bias_initializer="zeros", **kwargs):
    return layers.Conv2D(
        filters,
        3,
        padding="same",
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
        bias_initializer=bias_initializer,
        name=name,
        **kwargs,
    )


class _Subnet:
    """A tower of convs (+ optional GroupNorm) + ReLU and an output conv, shared across levels."""

    def __init__(self, name, depth, width, outputs, norm, bias_initializer="zeros", norm_epsilon=GROUP_NORM_EPSILON):
        self.convs = [_conv(width, f"{name}_conv{i + 1}", use_bias=norm is None) for i in range(depth)]
        groups = math.gcd(32, width)
        self.norms = [
            layers.GroupNormalization(groups, epsilon=norm_epsilon, name=f"{name}_gn{i + 1}")
            if norm == "group" else None
            for i in range(depth)
        ]
        self.relu = layers.ReLU(name=f"{name}_relu")
        self.output = _conv(outputs, f"{name}_output", bias_initializer=bias_initializer, dtype="float32")

    def __call__(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = conv(x)
            if norm is not None:
                x = norm(x)
            x = self.relu(x)
        return self.output(x)


@keras.saving.register_keras_serializable(package="keras_resnet")
class RetinaNetDetector(Task):
    """RetinaNet: a one-stage dense detector on top of any `ResNetBackbone`.

    With a preprocessing layer inside (e.g. `ImageNormalization`) the model
    takes raw pixels 0..255, like `ResNetClassifier`. Boxes everywhere are
    xyxy absolute pixels of the model input.

    Args:
        backbone: a `ResNetBackbone` with a static input size (its
            `image_shape`, e.g. `(512, 512, 3)`) and natural strides.
        num_classes: number of object classes (no background class).
        fpn_width: channels of the FPN levels.
        min_level, max_level: pyramid levels (3..7: strides 8..128).
        head_depth: 3x3 conv layers in each subnet before its output conv.
        head_width: channels of those convs; None uses `fpn_width`.
        head_norm: None (plain conv + ReLU, the paper) or "group"
            (GroupNorm, 32 groups or fewer, shared across levels).
        head_norm_epsilon: the GroupNorm epsilon (Keras' 1e-3; PyTorch's
            is 1e-5).
        anchor_sizes: base anchor size per level; None: `4 * stride`.
        aspect_ratios: anchor width / height ratios.
        anchor_scales: anchor size multipliers per location.
        anchor_layout: "keras_cv" or "torchvision" (`AnchorGenerator`'s
            `layout`: order, centres and rounding of the anchors).
        extra_levels_from: "C5" (the paper) or "P5": source of P6.
        fpn_extra_padding: "same" (TensorFlow) or "symmetric" (PyTorch):
            the padding of P6's and P7's stride-2 convs (see `FPN`).
        prior_probability: initial foreground probability of the
            classification output (sets its bias).
        box_variance: divisors of the box deltas (encoder, loss, decoder).
        preprocessing: None, or a Keras layer applied to the input images.
        decoder_args: None or a dict of `DetectionDecoder` arguments
            (score_threshold, iou_threshold, max_detections,
            pre_nms_top_k, top_k_per_level): the defaults of
            `make_decoder` and so of `predict_detections`, tiled
            prediction and exports; arguments given there override them.
        class_names: None or one name per class (kept in the config, e.g.
            the COCO names of imported torchvision weights).
        name: model name.

    Example:
    >>> backbone = ResNetBackbone.from_preset("resnet18", input_shape=(64, 64, 3))
    >>> model = RetinaNetDetector(backbone, num_classes=3, fpn_width=64, head_depth=2)
    >>> model.predict(np.zeros((1, 64, 64, 3)), verbose=0).shape  # 774 anchors, 4 + 3
    (1, 774, 7)
    >>> detections = model.predict_detections(np.zeros((1, 64, 64, 3)))
    >>> sorted(detections)
    ['boxes', 'classes', 'num_detections', 'scores']
    >>> torchvision_like = RetinaNetDetector(backbone, 3, fpn_width=64, head_depth=2, anchor_layout="torchvision",
    ...     extra_levels_from="P5", fpn_extra_padding="symmetric", box_variance=(1, 1, 1, 1),
    ...     decoder_args={"max_detections": 300, "top_k_per_level": True})
    >>> torchvision_like.make_decoder().max_detections
    300
    """

    def __init__(
        self,
        backbone,
        num_classes,
        fpn_width=256,
        min_level=3,
        max_level=7,
        head_depth=4,
        head_width=None,
        head_norm=None,
        anchor_sizes=None,
        aspect_ratios=DEFAULT_ASPECT_RATIOS,
        anchor_scales=DEFAULT_SCALES,
        extra_levels_from="C5",
        prior_probability=0.01,
        box_variance=BOX_VARIANCE,
        preprocessing=None,
        head_norm_epsilon=GROUP_NORM_EPSILON,
        anchor_layout="keras_cv",
        fpn_extra_padding="same",
        decoder_args=None,
        class_names=None,
        name="retinanet",
        **kwargs,
    ):
        num_classes, fpn_width, head_depth = int(num_classes), int(fpn_width), int(head_depth)
        head_width = fpn_width if head_width is None else int(head_width)
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}.")
        if fpn_width < 1 or head_width < 1 or head_depth < 0:
            raise ConfigError(
                f"fpn_width and head_width must be >= 1 and head_depth >= 0, got {fpn_width}, {head_width}, "
                f"{head_depth}."
            )
        if head_norm not in HEAD_NORMS:
            raise ConfigError(f"head_norm={head_norm!r} is not supported; allowed values: {HEAD_NORMS}.")
        if extra_levels_from not in EXTRA_LEVEL_SOURCES:
            raise ConfigError(f"extra_levels_from={extra_levels_from!r}; allowed: {EXTRA_LEVEL_SOURCES}.")
        if not 0.0 < prior_probability < 1.0:
            raise ConfigError(f"prior_probability must be in (0, 1), got {prior_probability}.")
        if len(box_variance) != 4 or any(v <= 0 for v in box_variance):
            raise ConfigError(f"box_variance must be 4 positive values, got {box_variance}.")
        if fpn_extra_padding not in EXTRA_LEVEL_PADDINGS:
            raise ConfigError(f"fpn_extra_padding={fpn_extra_padding!r}; allowed: {EXTRA_LEVEL_PADDINGS}.")
        if anchor_layout not in ANCHOR_LAYOUTS:
            raise ConfigError(f"anchor_layout={anchor_layout!r}; allowed: {ANCHOR_LAYOUTS}.")
        if not float(head_norm_epsilon) > 0.0:
            raise ConfigError(f"head_norm_epsilon must be > 0, got {head_norm_epsilon}.")
        decoder_args = dict(decoder_args or {})
        unknown = sorted(set(decoder_args) - set(DECODER_DEFAULT_ARGS))
        if unknown:
            raise ConfigError(f"decoder_args has unknown keys {unknown}; allowed: {', '.join(DECODER_DEFAULT_ARGS)}.")
        if class_names is not None:
            class_names = [str(name) for name in class_names]
            if len(class_names) != num_classes:
                raise ConfigError(
                    f"class_names has {len(class_names)} names for num_classes={num_classes}; give one per class."
                )
        anchor_generator = AnchorGenerator(
            min_level, max_level, anchor_sizes, aspect_ratios, anchor_scales, layout=anchor_layout
        )
        backbone_levels = _check_backbone(backbone, anchor_generator.min_level, anchor_generator.max_level)
        num_anchors = anchor_generator.num_anchors_per_location

        inputs = keras.Input(shape=backbone.input_shape[1:], name="images")
        x = preprocessing(inputs) if preprocessing is not None else inputs
        features = backbone.feature_extractor(backbone_levels)(x)
        pyramid = FPN(min_level, max_level, fpn_width, extra_levels_from, fpn_extra_padding, name="fpn")(features)
        bias = -math.log((1.0 - prior_probability) / prior_probability)
        classification = _Subnet(
            "classification_head", head_depth, head_width, num_anchors * num_classes, head_norm,
            bias_initializer=keras.initializers.Constant(bias), norm_epsilon=float(head_norm_epsilon),
        )
        box = _Subnet("box_head", head_depth, head_width, num_anchors * 4, head_norm,
                      norm_epsilon=float(head_norm_epsilon))
        class_outputs, box_outputs = [], []
        for level, feature in pyramid.items():
            box_outputs.append(layers.Reshape((-1, 4), name=f"box_{level}_reshape")(box(feature)))
            class_outputs.append(
                layers.Reshape((-1, num_classes), name=f"classification_{level}_reshape")(classification(feature))
            )
        box_outputs = layers.Concatenate(axis=1, dtype="float32", name="box_deltas")(box_outputs)
        class_outputs = layers.Concatenate(axis=1, dtype="float32", name="class_logits")(class_outputs)
        outputs = layers.Concatenate(axis=-1, dtype="float32", name="predictions")([box_outputs, class_outputs])
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)

        image_shape = tuple(backbone.input_shape[1:3])
        if outputs.shape[1] != anchor_generator.num_anchors(image_shape):
            raise ConfigError(
                f"The heads give {outputs.shape[1]} anchors but the anchor grid has "
                f"{anchor_generator.num_anchors(image_shape)} for input {image_shape}: the backbone's feature sizes "
                f"are not ceil(size / stride)."
            )
        self.backbone = backbone
        self.num_classes = num_classes
        self.fpn_width = fpn_width
        self.head_depth = head_depth
        self.head_width = head_width
        self.head_norm = head_norm
        self.head_norm_epsilon = float(head_norm_epsilon)
        self.extra_levels_from = extra_levels_from
        self.fpn_extra_padding = fpn_extra_padding
        self.decoder_args = decoder_args
        self.class_names = class_names
        self.prior_probability = float(prior_probability)
        self.box_variance = tuple(float(v) for v in box_variance)
        self.preprocessing = preprocessing
        self.anchor_generator = anchor_generator
        self.image_shape = image_shape

    @property
    def num_anchors(self):
        """Total anchors N of the model's input size (the output's axis 1)."""
        return self.anchor_generator.num_anchors(self.image_shape)

    def anchors(self):
        """The `(N, 4)` float32 xyxy anchors of the model's input size, in output order."""
        return self.anchor_generator(self.image_shape)

    def make_label_encoder(self, **kwargs):
        """A `RetinaNetLabelEncoder` for this model's anchors (kwargs: IoU thresholds...)."""
        kwargs.setdefault("box_variance", self.box_variance)
        return RetinaNetLabelEncoder(self.anchor_generator, self.image_shape, **kwargs)

    def make_decoder(self, **kwargs):
        """A `DetectionDecoder` for this model (kwargs: thresholds, max_detections, pre_nms_top_k...).

        Arguments not given take the model's `decoder_args`, then the decoder's defaults.
        """
        kwargs = {**self.decoder_args, **kwargs}
        kwargs.setdefault("box_variance", self.box_variance)
        return DetectionDecoder(self.num_classes, self.image_shape, self.anchor_generator, **kwargs)

    def make_inference_model(self, batch_size=None, **decoder_kwargs):
        """A model from images to the decoded dict (boxes, scores, classes, num_detections).

        Args:
            batch_size: None (any batch, decoded with `tf.map_fn`) or a
                static batch size (decoded by an unrolled loop; best for
                TFLite/ONNX export).
            **decoder_kwargs: `DetectionDecoder` arguments.
        """
        inputs = keras.Input(shape=self.input_shape[1:], batch_size=batch_size, name="images")
        outputs = self.make_decoder(**decoder_kwargs)(self(inputs))
        return keras.Model(inputs, outputs, name=f"{self.name}_inference")

    def predict_detections(self, images, batch_size=8, **decoder_kwargs):
        """Decoded detections (a dict of NumPy arrays) for a batch of images.

        The inference model of each set of decoder arguments is built and traced
        once, then reused by later calls (it shares this model's weights).
        """
        key = (repr(sorted(self.decoder_args.items())), repr(sorted(decoder_kwargs.items())))
        cache = self.__dict__.get("_inference_models")
        if cache is None:
            cache = {}
            object.__setattr__(self, "_inference_models", cache)  # untracked: not a sublayer, never saved
        if key not in cache:
            cache[key] = self.make_inference_model(**decoder_kwargs)
        return cache[key].predict(images, batch_size=batch_size, verbose=0)

    def predict_tiled(self, image, tile=None, overlap=DEFAULT_OVERLAP, batch_size=DEFAULT_TILE_BATCH, progress=None,
                      **decoder_kwargs):
        """Detects objects in an image of any size at its own resolution, window by window.

        Windows of the input size slide over the image; their detections are
        shifted to image pixels and merged by class-wise NMS at the decoder's
        `iou_threshold`, keeping its `max_detections` for the whole image.

        Args:
            image: `(h, w, C)` or `(h, w)` raw pixels 0..255, any size.
            tile: None or the input size (the only window a detector takes).
            overlap: fraction of a window shared with its neighbour, in [0, 1).
            batch_size: windows run at a time.
            progress: None (silent) or a progress hook
                (`keras_resnet.predict.progress.terminal_progress()`).
            **decoder_kwargs: `DetectionDecoder` arguments (thresholds, max_detections).

        Returns:
            `{"boxes": float32 (K, 4) xyxy image pixels, "scores", "classes"}`, best first.

        Example:
        >>> found = detector.predict_tiled(aerial_photo, overlap=0.25, score_threshold=0.3)
        """
        detect = keras_detect_function(self, **decoder_kwargs)
        return detect_tiled(
            detect, image, model_tile(self, tile), overlap, batch_size,
            iou_threshold=detect.decoder.iou_threshold, max_detections=detect.decoder.max_detections,
            progress=progress,
        )

    @classmethod
    def from_preset(cls, preset, weights=None, num_classes=None, **kwargs):
        """A detector on a backbone preset, or a task preset with its published COCO weights.

        Args:
            preset: a task preset of the weights catalogue,
                "retinanet_resnet50_fpn" or "retinanet_resnet50_fpn_v2"
                (torchvision's RetinaNet, exactly: anchors, box coder and
                post-processing), or a backbone preset (`keras_resnet.list_presets()`).
            weights: task presets: "coco" (downloaded once, verified and
                cached; `keras-resnet weights` lists them). Backbone presets:
                None or ImageNet backbone weights ("imagenet", a catalogue
                tag or a file), whose normalisation goes in front (the model
                then takes raw pixels 0-255).
            num_classes: task presets: None keeps COCO's 91 ids (80 classes,
                `class_names` set); another number keeps everything but the
                class output conv. Backbone presets: required.
            **kwargs: task presets: `input_shape` (default 800x800), `mean`,
                `std`. Backbone presets: detector arguments (`fpn_width`,
                `anchor_sizes`, ...) and backbone arguments (the rest, e.g. `input_shape`).

        Example:
        >>> coco = RetinaNetDetector.from_preset("retinanet_resnet50_fpn_v2", weights="coco", input_shape=(512, 512, 3))
        >>> mine = RetinaNetDetector.from_preset("resnet50", weights="imagenet", num_classes=3,
        ...                                      input_shape=(512, 512, 3))
        """
        if is_task_preset(preset):
            return task_model_from_catalogue(DETECTION, preset, weights, num_classes=num_classes, **kwargs)
        if num_classes is None:
            raise ValueError(f"RetinaNetDetector.from_preset({preset!r}) needs num_classes")
        backbone, detector_args, _ = cls.backbone_from_preset(preset, kwargs, weights)
        detector_args.setdefault("name", f"{preset}_retinanet")
        return cls(backbone, num_classes, **detector_args)

    def get_config(self):
        return {
            **self.task_config(),
            "fpn_width": self.fpn_width,
            "min_level": self.anchor_generator.min_level,
            "max_level": self.anchor_generator.max_level,
            "head_depth": self.head_depth,
            "head_width": self.head_width,
            "head_norm": self.head_norm,
            "anchor_sizes": self.anchor_generator.sizes,
            "aspect_ratios": self.anchor_generator.aspect_ratios,
            "anchor_scales": self.anchor_generator.scales,
            "extra_levels_from": self.extra_levels_from,
            "prior_probability": self.prior_probability,
            "box_variance": list(self.box_variance),
            "head_norm_epsilon": self.head_norm_epsilon,
            "anchor_layout": self.anchor_generator.layout,
            "fpn_extra_padding": self.fpn_extra_padding,
            "decoder_args": dict(self.decoder_args),
            "class_names": self.class_names,
        }



# The constructor arguments `from_preset` routes to the detector (the rest go to the backbone).
RetinaNetDetector.TASK_ARGS = tuple(
    name for name, parameter in inspect.signature(RetinaNetDetector.__init__).parameters.items()
    if name not in ("self", "backbone", "num_classes") and parameter.kind is parameter.POSITIONAL_OR_KEYWORD
)

__all__ = ["DECODER_DEFAULT_ARGS", "HEAD_NORMS", "RetinaNetDetector"]
