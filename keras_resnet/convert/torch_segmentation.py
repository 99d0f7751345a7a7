"""torchvision DeepLabV3 and FCN ResNets (state dicts) as our `ResNetSegmenter`, exactly.

torchvision's `deeplabv3_resnet50/101` and `fcn_resnet50/101` are a ResNet
with `replace_stride_with_dilation=[False, True, True]` (output stride 8; the
first block of a dilated stage keeps the previous dilation, the 3x3 convs pad
by their dilation: what `ResNetBackbone(output_stride=8)` does) and a head on
its last feature map, resized bilinearly (`align_corners=False`, TF's
half-pixel resize) to the input size:

- `DeepLabHead`: ASPP (1x1; 3x3 at rates 12, 24, 36; image pooling), a 1x1
  projection with Dropout(0.5), a 3x3 conv and the 1x1 classifier: our head
  "deeplabv3";
- `FCNHead`: a 3x3 conv to in_channels // 4, Dropout(0.1) and the 1x1
  classifier: our head "fcn".

Keys: `backbone.*` (the ResNet without `fc`: loaded by
`keras_resnet.convert.torch_resnet.TorchWeights`), `classifier.*` (the
head, mapped below) and `aux_classifier.*`: the FCNHead on layer3 that
torchvision trains with (aux_loss=True, in its published checkpoints) and
whose output the "out" masks do not use; it is dropped, with a note.

`segmenter_from_torch` builds the segmenter (raw pixels 0-255 in, ImageNet
normalisation inside) and loads every weight, checking the state dict both
ways. `keras_resnet.convert.from_torch` sends such state dicts here.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from keras_resnet.convert import torch_segmentation_reference
from keras_resnet.convert.torch_resnet import (
    IGNORED_SUFFIXES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TORCH_ARCHS,
    TorchWeights,
    describe_features,
    normalise_arch,
    preset_features,
    variable_keys,
)
from keras_resnet.layers.core import ImageNormalization
from keras_resnet.models.resnet.backbone import ResNetBackbone
from keras_resnet.models.segmentation.segmenter import ResNetSegmenter
from keras_resnet_settings.errors import ConversionError

# The torchvision models (backbone resnet50 / resnet101); other backbones of `TORCH_ARCHS` load too when the keys fit.
SEGMENTATION_ARCHS = ("deeplabv3_resnet50", "deeplabv3_resnet101", "fcn_resnet50", "fcn_resnet101")
HEADS = {"deeplabv3": "DeepLabHead", "fcn": "FCNHead"}
TORCHVISION_RATES = (12, 24, 36)  # DeepLabHead's atrous_rates
OUTPUT_STRIDE = 8  # replace_stride_with_dilation=[False, True, True]
DEFAULT_INPUT_SIZE = (520, 520)  # torchvision's eval transform resizes to 520
BACKBONE, CLASSIFIER, AUX = "backbone.", "classifier.", "aux_classifier."
# The key that shows each head (and the one the other head would have).
_HEAD_KEYS = {"deeplabv3": "classifier.0.convs.0.0.weight", "fcn": "classifier.0.weight"}


def is_segmentation_state(state) -> bool:
    """True for a torchvision DeepLabV3/FCN state dict: `backbone.*` and `classifier.*` keys, no `backbone.body.*`.

    (`backbone.body.*` is torchvision's detection layout: a ResNet inside an FPN.)
    """
    keys = [str(key) for key in state]
    return (
        any(key.startswith(BACKBONE) for key in keys)
        and any(key.startswith(CLASSIFIER) for key in keys)
        and not any(key.startswith(f"{BACKBONE}body.") for key in keys)
    )


def split_arch(arch):
    """`"deeplabv3_resnet50"` -> `("deeplabv3", "resnet50")`; a ConversionError for other names."""
    name = str(arch).strip().lower().rsplit("/", 1)[-1]
    head, _, backbone = name.partition("_")
    if head in HEADS and backbone:
        try:
            return head, normalise_arch(backbone)
        except ConversionError:
            pass
    raise ConversionError(
        f"arch={arch!r} is not a torchvision segmentation model we import; allowed: {', '.join(SEGMENTATION_ARCHS)} "
        f"(deeplabv3_ or fcn_ and a ResNet of from_torch: {', '.join(TORCH_ARCHS)})."
    )


def head_keys(head, rates=TORCHVISION_RATES, include_classifier=True):
    """`{our layer name: torch key prefix}` of a "deeplabv3" or "fcn" head (`rates`: our ASPP rates, in order)."""
    if head == "fcn":
        keys = {"fcn_conv": "classifier.0", "fcn_bn": "classifier.1"}
    else:
        keys = {"aspp_1x1_conv": "classifier.0.convs.0.0", "aspp_1x1_bn": "classifier.0.convs.0.1"}
        for index, rate in enumerate(rates, start=1):
            keys[f"aspp_rate{rate}_conv"] = f"classifier.0.convs.{index}.0"
            keys[f"aspp_rate{rate}_bn"] = f"classifier.0.convs.{index}.1"
        pool = len(rates) + 1  # ASPPPooling: (AdaptiveAvgPool2d, conv, BN, ReLU)
        keys.update({
            "aspp_pool_1x1_conv": f"classifier.0.convs.{pool}.1", "aspp_pool_1x1_bn": f"classifier.0.convs.{pool}.2",
            "aspp_projection_conv": "classifier.0.project.0", "aspp_projection_bn": "classifier.0.project.1",
            "head_refine_conv": "classifier.1", "head_refine_bn": "classifier.2",
        })
    if include_classifier:
        keys["classifier"] = "classifier.4"
    return keys


def load_head(model, state, head, rates=TORCHVISION_RATES, include_classifier=True, source_name="the state dict"):
    """Sets the head layers of `model` (found by name, see `head_keys`) from the `classifier.*` keys of `state`.

    Every `classifier.*` key must be used (the final `classifier.4.*` aside
    when `include_classifier` is False: a fresh classifier) and every weight
    set, with equal shapes; a ConversionError names what differs.

    Args:
        model: a Keras model holding the head's layers (a `ResNetSegmenter`
            with `head`, or a bare head built with `apply_deeplabv3_head` /
            `apply_fcn_head` and a 1x1 conv named "classifier").
        state: a flat `{key: np.ndarray}` torchvision state dict.
        head: "deeplabv3" or "fcn".
        rates: the model's ASPP rates, in order (torchvision's by default).
        include_classifier: also load the 1x1 classifier (`classifier.4`).
        source_name: the state dict's name for messages.

    Example:
    >>> load_head(segmenter, state, "deeplabv3", rates=segmenter.aspp_rates)
    """
    assignments, used, missing, shapes = [], set(), [], []
    for layer_name, prefix in head_keys(head, rates, include_classifier).items():
        layer = model.get_layer(layer_name)
        values = []
        for variable, (suffix, to_ours, to_torch) in zip(layer.weights, variable_keys(layer)):
            key = prefix + suffix
            if key not in state:
                missing.append(key)
                continue
            used.add(key)
            value = np.asarray(state[key], dtype="float32")
            if to_ours is not None and value.ndim == len(to_ours):
                value = value.transpose(to_ours)
            if value.shape != tuple(variable.shape):
                expected = tuple(tuple(variable.shape)[i] for i in to_torch) if to_torch else tuple(variable.shape)
                shapes.append(f"{key} {tuple(np.shape(state[key]))} (ours needs {expected})")
            values.append(value)
        assignments.append((layer, values))
    skipped = () if include_classifier else ("classifier.4.",)
    unused = [key for key in state if key.startswith(CLASSIFIER) and key not in used
              and not key.endswith(IGNORED_SUFFIXES) and not key.startswith(skipped)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys ({', '.join(missing[:3])})")
    if unused:
        problems.append(f"{len(unused)} keys our head does not use ({', '.join(unused[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} shapes differ: {'; '.join(shapes[:3])}")
    if problems:
        raise ConversionError(f"{source_name} does not fit our {head!r} head ({HEADS[head]}): {'; '.join(problems)}.")
    for layer, values in assignments:
        layer.set_weights(values)


def _features_diff(have, want):
    return "; ".join(f"{key} {have[key]} (not {want[key]})" for key in have if have[key] != want[key])


class TorchSegmentationWeights:
    """A torchvision DeepLabV3 / FCN state dict, read once: its head, backbone and classes.

    Args:
        state: the flat `{key: np.ndarray}` state dict (`read_state_dict`).
        source_name: its name for messages (a path).
        arch: "deeplabv3_resnet50", "deeplabv3_resnet101", "fcn_resnet50",
            "fcn_resnet101" (or deeplabv3_/fcn_ and another ResNet of
            `TORCH_ARCHS`); inferred from the keys when None, else checked.

    Attributes:
        head: "deeplabv3" or "fcn"; backbone: a `TorchWeights` of the
            `backbone.*` keys (its `preset`: our backbone preset); arch:
            `f"{head}_{backbone.arch}"`; num_classes: rows of
            `classifier.4.weight`; head_width: channels of the head's convs;
            aux: the state dict has `aux_classifier.*` keys (not loaded);
            mean, std: ImageNet's; notes: lines for a conversion report.

    Example:
    >>> weights = TorchSegmentationWeights(*read_state_dict("deeplabv3_resnet50_coco.pth"))
    >>> weights.arch, weights.num_classes
    ('deeplabv3_resnet50', 21)
    """

    format = "torch"

    def __init__(self, state, source_name="the state dict", arch=None):
        self.state, self.source_name = state, source_name
        if not is_segmentation_state(state):
            raise ConversionError(
                f"{source_name} is not a torchvision DeepLabV3/FCN state dict: it needs backbone.* and classifier.* "
                f"keys (its first keys: {', '.join(list(state)[:3])})."
            )
        wanted_head, wanted_backbone = split_arch(arch) if arch is not None else (None, None)
        self.head = self._infer_head(arch, wanted_head, wanted_backbone)
        backbone_state = {key[len(BACKBONE):]: value for key, value in state.items() if key.startswith(BACKBONE)}
        try:
            self.backbone = TorchWeights(backbone_state, preset=wanted_backbone)
        except ConversionError as error:
            raise ConversionError(f"{source_name}: its backbone.* keys are not a ResNet we import: {error}") from None
        self.backbone.source_name = f"{source_name} (backbone.* keys)"
        if wanted_backbone is not None and self.backbone.arch != wanted_backbone:
            raise ConversionError(
                f"arch={arch!r} does not match {source_name}: its backbone.* keys show "
                f"{_features_diff(self.backbone.features, preset_features(wanted_backbone))}, a "
                f"{self.backbone.arch} backbone; use arch='{self.head}_{self.backbone.arch}'."
            )
        self.arch = f"{self.head}_{self.backbone.arch}"
        self.preset = self.backbone.preset
        classifier = state.get("classifier.4.weight")
        if classifier is None or np.ndim(classifier) != 4:
            raise ConversionError(f"{source_name} has no 4-D classifier.4.weight (the {HEADS[self.head]}'s 1x1 conv).")
        self.num_classes = int(classifier.shape[0])
        self.head_width = int(np.shape(state[_HEAD_KEYS[self.head]])[0])
        if self.head == "deeplabv3":
            branches = {key.split(".")[3] for key in state if key.startswith("classifier.0.convs.")}
            if len(branches) != len(TORCHVISION_RATES) + 2:
                raise ConversionError(
                    f"{source_name} has an ASPP of {len(branches)} branches (classifier.0.convs.*); ours has "
                    f"{len(TORCHVISION_RATES) + 2}: a 1x1 conv, three atrous convs and image pooling."
                )
        self.aux = any(key.startswith(AUX) for key in state)
        unknown = [key for key in state if not key.startswith((BACKBONE, CLASSIFIER, AUX))]
        if unknown:
            raise ConversionError(
                f"{source_name} has {len(unknown)} keys outside backbone.*, classifier.* and aux_classifier.* "
                f"({', '.join(unknown[:3])}): not a torchvision DeepLabV3/FCN state dict."
            )
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.notes = []
        if self.aux:
            self.notes.append(
                "aux_classifier: not loaded (torchvision's training-only FCNHead on layer3; the masks do not use it)"
            )

    def _infer_head(self, arch, wanted, wanted_backbone):
        found = [head for head, key in _HEAD_KEYS.items() if key in self.state]
        if len(found) == 2:
            raise ConversionError(
                f"{self.source_name} has the keys of both heads ({_HEAD_KEYS['deeplabv3']}: DeepLabHead; "
                f"{_HEAD_KEYS['fcn']}: FCNHead); it is not one torchvision DeepLabV3/FCN model."
            )
        if not found:
            classifier_keys = [key for key in self.state if key.startswith(CLASSIFIER)]
            raise ConversionError(
                f"{self.source_name} has neither {_HEAD_KEYS['deeplabv3']} (DeepLabHead) nor {_HEAD_KEYS['fcn']} "
                f"(FCNHead); its classifier keys: {', '.join(classifier_keys[:3])}."
            )
        head = found[0]
        if wanted is not None and wanted != head:
            raise ConversionError(
                f"arch={arch!r} does not match {self.source_name}: it has {_HEAD_KEYS[head]} ({HEADS[head]}), not "
                f"{_HEAD_KEYS[wanted]} ({HEADS[wanted]}); use arch='{head}_{wanted_backbone}' or leave arch out."
            )
        return head

    def describe(self) -> str:
        head = HEADS[self.head] + (f", ASPP rates {TORCHVISION_RATES}" if self.head == "deeplabv3" else "")
        backbone = describe_features(self.backbone.features)
        layout = f"torchvision layout: {head}, {self.num_classes} classes, backbone {backbone}"
        return f"{self.arch} ({layout}) -> ResNetSegmenter head {self.head!r} on preset {self.preset} (output stride 8)"

    def preprocessing(self, name="preprocessing"):
        """ImageNet's normalisation of raw 0..255 pixels (torchvision's), as an in-model `ImageNormalization`."""
        return ImageNormalization(mean=list(self.mean), std=list(self.std), scale=1.0 / 255.0, name=name)


def segmenter_from_torch(
    state, source_name="the state dict", arch=None, num_classes=None, input_shape=None, mean=None, std=None,
    include_top=None,
):
    """Converts a torchvision DeepLabV3 / FCN ResNet state dict to a `ResNetSegmenter`, exactly.

    The segmenter takes raw pixels 0-255 (torchvision's ImageNet
    normalisation inside) and outputs torchvision's "out" logits, NHWC: the
    same masks on the same image. Its backbone is the preset of the
    `backbone.*` keys at output stride 8 (torchvision's dilation), its head
    "deeplabv3" (ASPP rates 12, 24, 36) or "fcn" with the state dict's widths.
    `aux_classifier.*` (torchvision's training-only head) is not loaded.

    Args:
        state: the flat `{key: np.ndarray}` state dict (`read_state_dict`),
            or a `TorchSegmentationWeights`.
        source_name: its name for messages (a path).
        arch: "deeplabv3_resnet50", "deeplabv3_resnet101", "fcn_resnet50" or
            "fcn_resnet101" (deeplabv3_/fcn_ and another from_torch ResNet
            work too); inferred from keys and shapes when None, else checked.
        num_classes: classes of the segmenter; None keeps the state dict's
            (21 for torchvision's COCO-with-VOC-labels weights). Another
            number keeps the backbone and head weights and makes a fresh final
            1x1 classifier.
        input_shape: `(height, width, 3)`; default 520x520 (torchvision's
            eval size); height/width may be None (any size; exports need
            fixed sizes).
        mean, std: the normalisation of 0..1 pixels; default ImageNet's.
        include_top: False returns the dilated `ResNetBackbone` (output
            stride 8, normalised images in) instead; None/True the segmenter.

    Returns:
        A `ResNetSegmenter` (logits, `activation=None`) named after `arch`,
        or a `ResNetBackbone` with `include_top=False`.

    Example:
    >>> state, name = read_state_dict("deeplabv3_resnet50_coco.pth")
    >>> model = segmenter_from_torch(state, name)      # torch.save(deeplabv3_resnet50(weights=...).state_dict(), ...)
    >>> masks = model.predict(images_0_255).argmax(-1)  # torchvision's masks
    """
    weights = state
    if not isinstance(weights, TorchSegmentationWeights):
        weights = TorchSegmentationWeights(state, source_name, arch)
    if mean is not None:
        weights.mean = tuple(float(v) for v in mean)
    if std is not None:
        weights.std = tuple(float(v) for v in std)
    if input_shape is None:
        input_shape = (*DEFAULT_INPUT_SIZE, weights.backbone.input_channels)
    backbone = ResNetBackbone.from_preset(
        weights.preset, weights=weights.backbone, input_shape=tuple(input_shape), output_stride=OUTPUT_STRIDE
    )
    if include_top is False:
        if num_classes is not None:
            raise ConversionError(f"num_classes={num_classes} needs a segmenter; drop include_top=False.")
        return backbone
    num_classes = weights.num_classes if num_classes is None else int(num_classes)
    model = ResNetSegmenter(
        backbone,
        num_classes,
        head=weights.head,
        preprocessing=weights.preprocessing(),
        head_width=weights.head_width,
        aspp_rates=list(TORCHVISION_RATES) if weights.head == "deeplabv3" else None,
        name=weights.arch,
    )
    load_head(model, weights.state, weights.head, include_classifier=num_classes == weights.num_classes,
              source_name=weights.source_name)
    return model


def segmentation_source_parity(model, weights, batch_size=1, seed=0):
    """How far `model` (from `segmenter_from_torch`) is from torchvision's model of `weights`, on random images.

    torchvision's `torchvision.models.segmentation.<arch>` is built from the
    state dict (no download) in a child Python without TensorFlow
    (`torch_segmentation_reference.py`; torchvision imports triton, which
    crashes a process that loaded TensorFlow first) and gets the raw pixels
    normalised by the model's own preprocessing.

    Args:
        model: a `ResNetSegmenter` with the state dict's classes.
        weights: its `TorchSegmentationWeights`.
        batch_size, seed: the random images (raw pixels 0..255, the model's
            input size; 520x520 where it has none).

    Returns:
        `(result, name)`: `{"max_abs_diff", "max_rel_diff", "mask_agreement",
        "images", "output"}` and "torchvision deeplabv3_resnet50", or
        `(None, reason)` when torch, safetensors or torchvision is missing.

    Example:
    >>> result, name = segmentation_source_parity(model, weights)
    >>> result["max_rel_diff"] < 1e-4 and result["mask_agreement"] == 1.0
    True
    """
    from safetensors.numpy import save_file

    defaults = (*DEFAULT_INPUT_SIZE, weights.backbone.input_channels)
    height, width, channels = (size or default for size, default in zip(model.input_shape[1:], defaults))
    pixels = np.random.default_rng(seed).uniform(0, 255, (batch_size, height, width, channels)).astype("float32")
    normalised = np.asarray(model.preprocessing(pixels), dtype="float32")
    with tempfile.TemporaryDirectory() as folder:
        save_file({key: np.ascontiguousarray(value) for key, value in weights.state.items()},
                  os.path.join(folder, "state.safetensors"))
        np.save(os.path.join(folder, "input.npy"), normalised.transpose(0, 3, 1, 2).copy())
        # `-c` with the script's text, in the temporary folder (as `torch.source_parity`).
        command = [sys.executable, "-c", Path(torch_segmentation_reference.__file__).read_text(), folder,
                   weights.arch, str(weights.num_classes), "1" if weights.aux else "0"]
        child = subprocess.run(command, capture_output=True, text=True, check=False, cwd=folder)
        if child.returncode == torch_segmentation_reference.MISSING:
            return None, child.stdout.strip()
        if child.returncode != 0:
            raise ConversionError(f"the torch reference model failed: {(child.stderr or child.stdout).strip()[-300:]}")
        reference = np.load(os.path.join(folder, "output.npy")).transpose(0, 2, 3, 1)
    ours = np.asarray(model(pixels))
    difference = float(np.abs(reference - ours).max())
    return {
        "max_abs_diff": difference,
        "max_rel_diff": difference / max(float(np.abs(reference).max()), 1e-12),
        "mask_agreement": float((reference.argmax(-1) == ours.argmax(-1)).mean()),
        "images": f"{batch_size} random images of {height}x{width}",
        "output": "logits",
    }, child.stdout.strip()


def report_lines(model, weights):
    """The `keras-resnet convert` report of a segmentation conversion: source, notes, fresh classifier, parity."""
    lines = [f"source: {weights.describe()}", *weights.notes]
    if not isinstance(model, ResNetSegmenter):
        return [*lines, "parity: not measured for a backbone (include_top=False)"]
    if model.num_classes != weights.num_classes:
        return [*lines, f"head: a fresh {model.num_classes}-class classifier (the source's classifier.4 is not used)",
                "parity: not measured (a fresh classifier)"]
    result, name = segmentation_source_parity(model, weights)
    if result is None:
        return [*lines, f"parity: not measured ({name})"]
    return [*lines, (
        f"parity with {name}: max abs diff of the {result['output']} {result['max_abs_diff']:.3g} "
        f"(relative {result['max_rel_diff']:.3g}), masks {100 * result['mask_agreement']:.4g}% equal "
        f"on {result['images']}"
    )]


__all__ = [
    "SEGMENTATION_ARCHS",
    "TorchSegmentationWeights",
    "head_keys",
    "is_segmentation_state",
    "load_head",
    "report_lines",
    "segmentation_source_parity",
    "segmenter_from_torch",
]
