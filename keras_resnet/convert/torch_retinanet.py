"""torchvision RetinaNets (state dicts) as our `RetinaNetDetector`: the same detections.

torchvision's `retinanet_resnet50_fpn` and `retinanet_resnet50_fpn_v2` are a
ResNet-50 (`backbone.body.*`: layer2..layer4 feed the FPN), an FPN
(`backbone.fpn.*`: 1x1 `inner_blocks`, nearest top-down upsampling to the
lateral's size, 3x3 `layer_blocks`, and `LastLevelP6P7`: P6 a 3x3 stride-2
conv, P7 the same on ReLU(P6)) and two subnets shared across levels
(`head.classification_head.*`, `head.regression_head.*`: 4x conv3x3 + ReLU,
then `cls_logits` (A * K) and `bbox_reg` (A * 4)). What differs between the
two, and how our detector expresses each:

| | v1 (`retinanet_resnet50_fpn`) | v2 (`retinanet_resnet50_fpn_v2`) |
|---|---|---|
| P6 from | P5 (`LastLevelP6P7(256, 256)`) | C5 (`LastLevelP6P7(2048, 256)`) |
| head convs | conv + bias, ReLU | conv, GroupNorm(32, eps 1e-5), ReLU |
| backbone BN eps | 0.0 (COCO_V1: `overwrite_eps`) | 1e-5 |

and what both share: `extra_levels_from="P5"`/`"C5"`, `head_norm="group"`
with `head_norm_epsilon=1e-5`, `fpn_extra_padding="symmetric"` (PyTorch pads
a stride-2 conv by one pixel on every side), `anchor_layout="torchvision"`
(`AnchorGenerator`: ratio-major order, sides `int(size * 2**(k/3))`, rounded
half-sides, centres at `(H // h) * i`, no half-stride offset), aspect ratios
`(2, 1, 0.5)` in our width / height (torchvision's `(0.5, 1, 2)` are height
/ width), `box_variance=(1, 1, 1, 1)` (its `BoxCoder` weights; the clip
`log(1000 / 16)` and `w = x2 - x1` are ours too) and its post-processing as
the detector's `decoder_args`: score > 0.05, the top 1000 (anchor, class)
pairs per level, class-wise NMS at IoU 0.5, 300 detections.

torchvision resizes each image (shorter side to 800, longer at most 1333,
bilinear), normalises it and pads the batch to a multiple of 32; our
detector takes a fixed input size and normalises inside. For the same
detections, give it images at its input size (letterboxed: what
`keras-resnet predict` and the exports do) with sides that are multiples
of 32; torchvision then neither resizes nor pads. Boxes are in input pixels.

Class indices are torchvision's: 91 for its COCO weights, index 0
"__background__" (never a target in training, so never detected in
practice) and "N/A" for the COCO ids that have no category; the detector
carries the names (`class_names`).

`detector_from_torch` builds the detector and loads every weight, checking
the state dict both ways; `keras_resnet.convert.from_torch` sends such state
dicts here. `detection_source_parity` runs torchvision's own model on the
same state dict (a child Python, `torch_retinanet_reference.py`) and compares
raw outputs and detections (`match_detections`).
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from keras_resnet.convert import torch_retinanet_reference
from keras_resnet.convert.torch_resnet import TorchWeights, variable_keys
from keras_resnet.models.resnet.backbone import ResNetBackbone
from keras_resnet.models.retinanet.anchors import DEFAULT_SCALES
from keras_resnet.models.retinanet.detector import RetinaNetDetector
from keras_resnet_settings.errors import ConversionError

# torchvision's RetinaNet builders: the features their state dicts show and the BatchNorm eps they run with.
RETINANET_ARCHS = {
    "retinanet_resnet50_fpn": {"head_norm": None, "extra_levels_from": "P5", "bn_epsilon": 0.0},
    "retinanet_resnet50_fpn_v2": {"head_norm": "group", "extra_levels_from": "C5", "bn_epsilon": 1e-5},
}
# torchvision's `_default_anchorgen` and `RetinaNet` post-processing defaults.
ANCHOR_SIZES = (32.0, 64.0, 128.0, 256.0, 512.0)
ASPECT_RATIOS = (2.0, 1.0, 0.5)  # width / height; torchvision's (0.5, 1.0, 2.0) are height / width
TORCHVISION_DECODER = {
    "score_threshold": 0.05,
    "iou_threshold": 0.5,
    "max_detections": 300,
    "pre_nms_top_k": 1000,
    "top_k_per_level": True,
}
GROUP_NORM_EPSILON = 1e-5  # torch.nn.GroupNorm's
DEFAULT_INPUT_SIZE = (800, 800)  # torchvision's min_size; a multiple of 32
BODY, FPN_PREFIX, HEAD = "backbone.body.", "backbone.fpn.", "head."
CLASS_HEAD, BOX_HEAD = "head.classification_head", "head.regression_head"
IGNORED_SUFFIXES = (".num_batches_tracked",)
# torchvision's COCO category names by label index (torchvision.models._meta._COCO_CATEGORIES).
COCO_CATEGORIES = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag",
    "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop",
    "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
# torchvision's version-1 key layouts (its COCO_V1 file): `fpn.inner_blocks.0.weight` and the head's
# Sequential(conv, ReLU, ...) `conv.0/2/4/6.weight`; its `_load_from_state_dict` upgrades them, so do we.
_OLD_FPN = re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks)\.(\d+)\.(weight|bias)$")
_OLD_HEAD = re.compile(r"^(head\.(?:classification|regression)_head\.conv)\.(\d+)\.(weight|bias)$")


def is_retinanet_state(state) -> bool:
    """True for a torchvision RetinaNet-like state dict: `backbone.body.*` and `head.*` keys."""
    keys = [str(key) for key in state]
    return any(key.startswith(BODY) for key in keys) and any(key.startswith(HEAD) for key in keys)


def upgrade_keys(state):
    """torchvision's version-1 FPN and head keys renamed as its current modules name them."""
    upgraded = {}
    for key, value in state.items():
        if match := _OLD_FPN.match(key):
            key = f"{match.group(1)}.{match.group(2)}.0.{match.group(3)}"
        elif match := _OLD_HEAD.match(key):
            key = f"{match.group(1)}.{int(match.group(2)) // 2}.0.{match.group(3)}"
        upgraded[key] = value
    return upgraded


def _count(state, pattern):
    indices = {int(m.group(1)) for key in state if (m := re.match(pattern, key))}
    return max(indices) + 1 if indices else 0


def normalise_arch(arch) -> str:
    """`"torchvision/retinanet_resnet50_fpn"` -> `"retinanet_resnet50_fpn"`; a ConversionError for other names."""
    name = str(arch).strip().lower().rsplit("/", 1)[-1]
    if name not in RETINANET_ARCHS:
        raise ConversionError(
            f"arch={arch!r} is not a torchvision RetinaNet we import; allowed: {', '.join(RETINANET_ARCHS)}."
        )
    return name


class TorchRetinaNetWeights:
    """A torchvision RetinaNet state dict, read once, with what its keys and shapes show.

    Args:
        state: the flat `{key: np.ndarray}` state dict (`read_state_dict`).
        source_name: its name for messages (a path).
        arch: "retinanet_resnet50_fpn" or "retinanet_resnet50_fpn_v2";
            inferred from the keys when None, else checked against them.

    Attributes:
        arch: the torchvision builder whose layout the keys have.
        backbone: the `TorchWeights` of `backbone.body.*` (its preset: resnet50).
        fpn_width, head_depth, head_norm, extra_levels_from, num_anchors,
        num_classes: read from the shapes.
    """

    def __init__(self, state, source_name="the state dict", arch=None):
        state = upgrade_keys(state)
        self.state, self.source_name = state, source_name
        if not is_retinanet_state(state):
            raise ConversionError(
                f"{source_name} is not a torchvision RetinaNet state dict: it needs backbone.body.* and head.* keys "
                f"(its first keys: {', '.join(list(state)[:3])})."
            )
        other = [key for key in state if not key.startswith((BODY, FPN_PREFIX, HEAD))]
        if other:
            raise ConversionError(
                f"{source_name} has {len(other)} keys outside backbone.body/backbone.fpn/head ({', '.join(other[:3])}):"
                " not a torchvision RetinaNet state dict."
            )
        self.backbone = TorchWeights({key[len(BODY):]: value for key, value in state.items() if key.startswith(BODY)})
        self.backbone.source_name = f"{source_name} (backbone.body.*)"
        self.fpn_levels = _count(state, r"backbone\.fpn\.inner_blocks\.(\d+)\.")
        required = [f"{FPN_PREFIX}inner_blocks.0.0.weight", f"{FPN_PREFIX}extra_blocks.p6.weight",
                    f"{FPN_PREFIX}extra_blocks.p7.weight", f"{CLASS_HEAD}.cls_logits.weight",
                    f"{BOX_HEAD}.bbox_reg.weight"]
        missing = [key for key in required if key not in state]
        if missing:
            raise ConversionError(f"{source_name} is not a torchvision RetinaNet state dict: it has no {missing[0]}.")
        if self.fpn_levels != 3:
            raise ConversionError(
                f"{source_name} has an FPN on {self.fpn_levels} backbone stages; torchvision's RetinaNet (and ours) "
                "uses layer2..layer4 (returned_layers=[2, 3, 4])."
            )
        self.fpn_width = int(state[f"{FPN_PREFIX}inner_blocks.0.0.weight"].shape[0])
        p6_inputs = int(state[f"{FPN_PREFIX}extra_blocks.p6.weight"].shape[1])
        # LastLevelP6P7 takes P5 when its in_channels equal its out_channels, else C5.
        self.extra_levels_from = "P5" if p6_inputs == self.fpn_width else "C5"
        self.head_depth = _count(state, rf"{re.escape(CLASS_HEAD)}\.conv\.(\d+)\.0\.weight")
        box_depth = _count(state, rf"{re.escape(BOX_HEAD)}\.conv\.(\d+)\.0\.weight")
        if box_depth != self.head_depth:
            raise ConversionError(
                f"{source_name}: the classification head has {self.head_depth} convs and the regression head "
                f"{box_depth}; ours share one depth."
            )
        self.head_norm = "group" if f"{CLASS_HEAD}.conv.0.1.weight" in state else None
        self.num_anchors = int(state[f"{BOX_HEAD}.bbox_reg.weight"].shape[0]) // 4
        if self.num_anchors != 9:
            raise ConversionError(
                f"{source_name} predicts {self.num_anchors} anchors per location; only torchvision's default anchor "
                "generator (3 sizes x 3 aspect ratios = 9) is supported."
            )
        self.num_classes = int(state[f"{CLASS_HEAD}.cls_logits.weight"].shape[0]) // self.num_anchors
        inferred = self._infer_arch()
        if arch is not None:
            self.arch = normalise_arch(arch)
            expected = RETINANET_ARCHS[self.arch]
            wrong = [f"{key} {self._features()[key]!r} (not {expected[key]!r})"
                     for key in ("head_norm", "extra_levels_from") if self._features()[key] != expected[key]]
            if wrong:
                raise ConversionError(
                    f"arch={arch!r} does not match {source_name}: its keys show {'; '.join(wrong)}; they look like "
                    f"{inferred or 'no torchvision builder'}."
                )
        elif inferred is None:
            raise ConversionError(
                f"{source_name} is a RetinaNet with head_norm={self.head_norm!r} and P6 from "
                f"{self.extra_levels_from}, which no torchvision builder has; pass arch= to convert it as one "
                f"of {', '.join(RETINANET_ARCHS)}."
            )
        else:
            self.arch = inferred

    def _features(self):
        return {"head_norm": self.head_norm, "extra_levels_from": self.extra_levels_from}

    def _infer_arch(self):
        for name, expected in RETINANET_ARCHS.items():
            if all(self._features()[key] == expected[key] for key in ("head_norm", "extra_levels_from")):
                return name
        return None

    def describe(self) -> str:
        head = "GroupNorm heads" if self.head_norm else "plain conv heads"
        return (
            f"torchvision {self.arch} ({self.backbone.arch} backbone, FPN width {self.fpn_width}, P6 from "
            f"{self.extra_levels_from}, {self.head_depth}-conv {head}, {self.num_anchors} anchors per location, "
            f"{self.num_classes} classes)"
        )


def _set(layer, prefix, state, used, problems, suffixes=None):
    """Sets `layer`'s weights from `prefix.weight`/`.bias` (GroupNorm: gamma, beta), recording keys and problems."""
    keys = suffixes or variable_keys(layer)
    values = []
    for variable, (suffix, to_ours, to_torch) in zip(layer.weights, keys):
        key = prefix + suffix
        if key not in state:
            problems.append(f"missing {key}")
            return
        used.add(key)
        value = np.asarray(state[key], dtype="float32")
        if to_ours is not None and value.ndim == len(to_ours):
            value = value.transpose(to_ours)
        if value.shape != tuple(variable.shape):
            ours = tuple(variable.shape)
            expected = tuple(ours[i] for i in to_torch) if to_torch else ours
            problems.append(f"{key} {tuple(np.shape(state[key]))} (ours needs {expected})")
            return
        values.append(value)
    layer.set_weights(values)


def load_detector(detector, weights, fresh_class_output=False):
    """Sets `detector`'s FPN and head weights from `weights` (a `TorchRetinaNetWeights`), both ways checked.

    The backbone is loaded by `weights.backbone.load_backbone`. With
    `fresh_class_output`, `cls_logits` is not loaded (a fresh class output).
    """
    state, used, problems = weights.state, set(), []
    fpn = detector.get_layer("fpn")
    for index, (lateral, output) in enumerate(zip(fpn.lateral_convs, fpn.output_convs)):
        _set(lateral, f"{FPN_PREFIX}inner_blocks.{index}.0", state, used, problems)
        _set(output, f"{FPN_PREFIX}layer_blocks.{index}.0", state, used, problems)
    for conv, name in zip(fpn.extra_convs, ("p6", "p7")):
        _set(conv, f"{FPN_PREFIX}extra_blocks.{name}", state, used, problems)
    group_norm = [(".weight", None, None), (".bias", None, None)]
    for ours, theirs, output in (("classification_head", CLASS_HEAD, "cls_logits"),
                                 ("box_head", BOX_HEAD, "bbox_reg")):
        for index in range(detector.head_depth):
            _set(detector.get_layer(f"{ours}_conv{index + 1}"), f"{theirs}.conv.{index}.0", state, used, problems)
            if detector.head_norm == "group":
                _set(detector.get_layer(f"{ours}_gn{index + 1}"), f"{theirs}.conv.{index}.1", state, used, problems,
                     group_norm)
        if not (fresh_class_output and output == "cls_logits"):
            _set(detector.get_layer(f"{ours}_output"), f"{theirs}.{output}", state, used, problems)
    skipped = (f"{CLASS_HEAD}.cls_logits.",) if fresh_class_output else ()
    unused = [key for key in state if key.startswith((FPN_PREFIX, HEAD)) and key not in used
              and not key.endswith(IGNORED_SUFFIXES) and not key.startswith(skipped)]
    if unused:
        problems.append(f"{len(unused)} keys our detector does not use ({', '.join(unused[:3])})")
    if problems:
        raise ConversionError(
            f"{weights.source_name} does not fit our {weights.arch}: {'; '.join(problems[:3])}"
            f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}."
        )


def detector_from_torch(state, source_name="the state dict", arch=None, num_classes=None, input_shape=None,
                        mean=None, std=None, bn_epsilon=None):
    """Converts a torchvision RetinaNet state dict to a `RetinaNetDetector` with torchvision's detections.

    The detector takes raw pixels 0-255 (torchvision's normalisation inside)
    at a fixed size and carries torchvision's anchors, box coder and
    post-processing (see the module docstring), so `predict_detections`,
    tiled prediction and exports give its detections: the same classes
    (torchvision's label indices; `class_names` holds the COCO names for its
    91-class weights, index 0 "__background__" unused), boxes within a pixel
    and scores within 1e-3 on images of a side that is a multiple of 32.

    Args:
        state: the flat `{key: np.ndarray}` state dict (`read_state_dict`),
            or a `TorchRetinaNetWeights`.
        source_name: its name for messages (a path).
        arch: "retinanet_resnet50_fpn" (v1) or "retinanet_resnet50_fpn_v2";
            inferred from the keys when None, else checked against them.
        num_classes: None keeps the state dict's classes (91 for COCO).
            Another number keeps the backbone, FPN, box subnet and the class
            subnet's conv tower, and makes a fresh class output conv
            (torchvision's prior-probability bias).
        input_shape: `(height, width, 3)`, default 800x800; sides that are
            multiples of 32 give torchvision's detections (it pads to them).
        mean, std: the normalisation of 0..1 pixels; default ImageNet's
            (torchvision's `image_mean`, `image_std`).
        bn_epsilon: the backbone's BatchNorm epsilon; None: 0.0 for v1
            (torchvision runs its COCO_V1 weights with
            `FrozenBatchNorm2d(eps=0.0)`), 1e-5 for v2. A v1 model you
            trained from `weights_backbone` (or from scratch) ran with 1e-5.

    Returns:
        A `RetinaNetDetector` named after `arch`.

    Example:
    >>> model = detector_from_torch(*read_state_dict("retinanet_resnet50_fpn_coco-eeacb38b.pth"),
    ...                             input_shape=(800, 1216, 3))
    >>> found = model.predict_detections(images)  # boxes, scores, classes (COCO ids 1..90), num_detections
    >>> [model.class_names[c] for c in found["classes"][0, :found["num_detections"][0]]]
    """
    weights = state if isinstance(state, TorchRetinaNetWeights) else TorchRetinaNetWeights(state, source_name, arch)
    if mean is not None:
        weights.backbone.mean = tuple(float(v) for v in mean)
    if std is not None:
        weights.backbone.std = tuple(float(v) for v in std)
    if bn_epsilon is None:
        bn_epsilon = RETINANET_ARCHS[weights.arch]["bn_epsilon"]
    if input_shape is None:
        input_shape = (*DEFAULT_INPUT_SIZE, weights.backbone.input_channels)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or any(d is None for d in input_shape[:2]):
        raise ConversionError(
            f"input_shape={input_shape} must be a fixed (height, width, channels): the detector's anchors are "
            "constants; e.g. input_shape=(800, 800, 3)."
        )
    num_classes = weights.num_classes if num_classes is None else int(num_classes)
    fresh = num_classes != weights.num_classes
    backbone = ResNetBackbone.from_preset(weights.backbone.preset, input_shape=input_shape,
                                          bn_epsilon=float(bn_epsilon))
    weights.backbone.load_backbone(backbone)
    class_names = list(COCO_CATEGORIES) if not fresh and num_classes == len(COCO_CATEGORIES) else None
    detector = RetinaNetDetector(
        backbone,
        num_classes,
        fpn_width=weights.fpn_width,
        head_depth=weights.head_depth,
        head_norm=weights.head_norm,
        head_norm_epsilon=GROUP_NORM_EPSILON,
        anchor_sizes=ANCHOR_SIZES,
        aspect_ratios=ASPECT_RATIOS,
        anchor_scales=DEFAULT_SCALES,
        anchor_layout="torchvision",
        extra_levels_from=weights.extra_levels_from,
        fpn_extra_padding="symmetric",
        box_variance=(1.0, 1.0, 1.0, 1.0),
        preprocessing=weights.backbone.preprocessing(),
        decoder_args=dict(TORCHVISION_DECODER),
        class_names=class_names,
        name=weights.arch,
    )
    load_detector(detector, weights, fresh_class_output=fresh)
    return detector


def match_detections(reference, ours, score_threshold=0.05, score_tolerance=1e-3, box_tolerance=1.0, iou=0.5):
    """Pairs two sets of detections one to one: same class, nearest box, in the reference's score order.

    A reference detection's partner is the unpaired detection of ours of its
    class whose corners are nearest (the largest coordinate difference), if
    that is within `box_tolerance` or their IoU is at least `iou` (boxes
    clipped flat at the image border have no area, so IoU alone misses them).

    Args:
        reference, ours: dicts with "boxes" (K, 4) xyxy, "scores" (K,),
            "classes" (K,) (or "labels").
        score_threshold: the detectors' threshold; unpaired detections
            within `score_tolerance` of it are "near the threshold", not
            missing or extra.
        score_tolerance: see `score_threshold`.
        box_tolerance: pixels; nearer boxes pair whatever their IoU.
        iou: the lowest IoU of a pair farther apart than `box_tolerance`.

    Returns:
        dict: "pairs" (count), "max_box_diff" (pixels), "max_score_diff",
        "missing" (reference detections without a partner), "extra" (ours
        without one), "near_threshold" (unpaired ones within the tolerance).

    Example:
    >>> match_detections(torchvision_detections, {k: v[0, :n] for k, v in ours.items()})["missing"]
    0
    """
    def arrays(found):
        classes = found["classes"] if "classes" in found else found["labels"]
        return (np.asarray(found["boxes"], "float64").reshape(-1, 4), np.asarray(found["scores"], "float64"),
                np.asarray(classes, "int64"))

    ref_boxes, ref_scores, ref_classes = arrays(reference)
    our_boxes, our_scores, our_classes = arrays(ours)
    taken = np.zeros(len(our_scores), bool)
    box_diffs, score_diffs, missing, near = [], [], 0, 0
    for index in np.argsort(-ref_scores, kind="stable"):
        candidates = np.flatnonzero(~taken & (our_classes == ref_classes[index]))
        distances = np.abs(our_boxes[candidates] - ref_boxes[index]).max(axis=1)
        nearest = candidates[int(np.argmin(distances))] if len(candidates) else None
        if nearest is None or (distances.min() > box_tolerance and _iou(ref_boxes[index], our_boxes[[nearest]])[0] < iou):
            if ref_scores[index] < score_threshold + score_tolerance:
                near += 1
            else:
                missing += 1
            continue
        taken[nearest] = True
        box_diffs.append(float(distances.min()))
        partner = nearest
        score_diffs.append(abs(float(ref_scores[index] - our_scores[partner])))
    unpaired = our_scores[~taken]
    near_extra = int((unpaired < score_threshold + score_tolerance).sum())
    return {
        "pairs": len(box_diffs),
        "max_box_diff": max(box_diffs, default=0.0),
        "max_score_diff": max(score_diffs, default=0.0),
        "missing": missing,
        "extra": len(unpaired) - near_extra,
        "near_threshold": near + near_extra,
    }


def _iou(box, boxes):
    top_left = np.maximum(box[:2], boxes[:, :2])
    bottom_right = np.minimum(box[2:], boxes[:, 2:])
    intersection = np.prod(np.clip(bottom_right - top_left, 0, None), axis=1)
    area = np.prod(np.clip(box[2:] - box[:2], 0, None))
    areas = np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None), axis=1)
    return intersection / np.maximum(area + areas - intersection, 1e-12)


def detections_of(found, index=0):
    """Image `index` of a decoded batch (`predict_detections`' dict) without its padding rows."""
    count = int(found["num_detections"][index])
    return {key: np.asarray(found[key][index, :count]) for key in ("boxes", "scores", "classes")}


def detection_source_parity(model, weights, seed=0, python=None):
    """Ours against torchvision's own RetinaNet of `weights` on one random image, in a child Python.

    Args:
        model: the `RetinaNetDetector` of `weights`, with the source's classes.
        weights: a `TorchRetinaNetWeights`.
        seed: of the random image (raw pixels 0..255 at the model's size).
        python: the child's interpreter (one with torch and torchvision, no
            TensorFlow needed); default this one.

    Returns:
        `(result, name)`: result holds "max_rel_diff" of the raw outputs
        (box deltas and class logits, over the largest reference value) and
        `match_detections`' figures; `(None, reason)` when torch or
        torchvision is not installed.
    """
    from safetensors.numpy import save_file

    height, width, channels = model.input_shape[1:]
    pixels = np.floor(np.random.default_rng(seed).uniform(0, 256, (1, height, width, channels))).astype("float32")
    norm = model.preprocessing
    with tempfile.TemporaryDirectory() as folder:
        save_file({key: np.ascontiguousarray(value) for key, value in weights.state.items()},
                  os.path.join(folder, "state.safetensors"))
        np.save(os.path.join(folder, "pixels.npy"), pixels)
        command = [python or sys.executable, "-c", Path(torch_retinanet_reference.__file__).read_text(), folder,
                   weights.arch, repr(model.backbone.bn_epsilon), str(weights.num_classes),
                   ",".join(map(str, norm.mean)), ",".join(map(str, norm.std))]
        child = subprocess.run(command, capture_output=True, text=True, check=False, cwd=folder)
        if child.returncode == torch_retinanet_reference.MISSING:
            return None, child.stdout.strip()
        if child.returncode != 0:
            raise ConversionError(
                f"the torchvision reference model failed: {(child.stderr or child.stdout).strip()[-300:]}"
            )
        with np.load(os.path.join(folder, "output.npz")) as data:
            reference = {key: data[key] for key in data.files}
    raw = np.asarray(model(pixels))
    expected = np.concatenate([reference["box_regression"], reference["cls_logits"]], axis=-1)
    result = {"max_rel_diff": float(np.abs(raw[0] - expected).max() / max(float(np.abs(expected).max()), 1e-12)),
              "detections": len(reference["scores"]),
              "image": f"a random {height}x{width} image"}
    # The model's decoder on its raw outputs: what predict_detections and the exports run.
    result.update(match_detections(reference, detections_of(model.make_decoder()(raw))))
    return result, child.stdout.strip()


def report_lines(model, weights):
    """The `keras-resnet convert` report of a RetinaNet conversion: source, head, parity."""
    lines = [f"source: {weights.describe()}"]
    if model.num_classes != weights.num_classes:
        return [*lines, f"head: a fresh {model.num_classes}-class output conv (the source's cls_logits is not used)",
                "parity: not measured (a fresh class output)"]
    result, name = detection_source_parity(model, weights)
    if result is None:
        return [*lines, f"parity: not measured ({name})"]
    return [*lines, (
        f"parity with {name}: max relative diff of the raw outputs {result['max_rel_diff']:.3g}; "
        f"{result['pairs']} of {result['detections']} detections paired (max box diff "
        f"{result['max_box_diff']:.3g} px, max score diff {result['max_score_diff']:.3g}), {result['missing']} "
        f"missing, {result['extra']} extra on {result['image']}"
    )]


__all__ = [
    "COCO_CATEGORIES",
    "RETINANET_ARCHS",
    "TORCHVISION_DECODER",
    "TorchRetinaNetWeights",
    "detection_source_parity",
    "detections_of",
    "detector_from_torch",
    "is_retinanet_state",
    "load_detector",
    "match_detections",
    "report_lines",
    "upgrade_keys",
]
