"""torchvision and timm ResNet state dicts, mapped onto our presets.

torchvision's and timm's ResNets share one key layout (`conv1`, `bn1`,
`layerS.B.convI`/`bnI`, `downsample`, `fc`; timm adds the deep stem
`conv1.0/1/3/4/6`, the average-pool shortcut `downsample.1/2` and SE modules
`se.fc1/fc2`), and our v1.5 presets are the same networks: BN epsilon 1e-5,
stride in the 3x3, symmetric padding, the `AvgPool2d(2, 2, ceil_mode=True,
count_include_pad=False)` shortcut of ResNet-D. Loading maps each of our
layers to its key, transposes kernels (conv OIHW -> HWIO, grouped convs
HW(I/groups)O; Linear (out, in) -> (in, out)) and checks both ways: every key
is used (`num_batches_tracked` aside), every weight is set, shapes are equal.

`TorchWeights` reads a state dict once and infers its architecture from the
keys and shapes (blocks per stage, basic or bottleneck, conv groups and width,
deep stem, average-pool shortcut, SE); it has the interface of
`keras_resnet.models.resnet.pretrained`. It also reads how the source
preprocesses images: a timm `pretrained_cfg` (a live module's attribute, or
the `config.json` that timm's Hugging Face hub layout keeps beside
`model.safetensors` / `pytorch_model.bin`) gives mean, std, input size,
resize interpolation and crop fraction; without one, torchvision's defaults
(ImageNet mean/std, bilinear) apply.
"""

import json
import os
import re

import keras
import numpy as np

from keras_resnet.convert.weight_files import (
    SAFETENSORS_SUFFIX,
    TORCH_SUFFIXES,
    is_torch_file,
    read_state_dict,
)
from keras_resnet.layers.core import ImageNormalization
from keras_resnet.models.resnet.presets import get_preset_config
from keras_resnet_settings.errors import ConversionError

# Source model name (torchvision / timm; timm names may carry a pretrained tag, "resnet50.a1_in1k") -> the
# library that defines it. Each name is also the name of our preset with the same architecture.
TORCH_ARCHS = {
    "resnet18": "torchvision, timm",
    "resnet34": "torchvision, timm",
    "resnet50": "torchvision, timm",
    "resnet101": "torchvision, timm",
    "resnet152": "torchvision, timm",
    "resnet200": "timm",
    "resnet18d": "timm",
    "resnet34d": "timm",
    "resnet50d": "timm",
    "resnet101d": "timm",
    "resnext50_32x4d": "torchvision, timm",
    "resnext101_32x8d": "torchvision, timm",
    "resnext101_64x4d": "torchvision, timm",
    "wide_resnet50_2": "torchvision, timm",
    "wide_resnet101_2": "torchvision, timm",
    "seresnet50": "timm",
}
# torchvision's and timm's preprocessing of these weights: ImageNet mean/std on 0..1 pixels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's resize default, and the one our exports use; a timm pretrained_cfg may say "bicubic".
DEFAULT_INTERPOLATION = "bilinear"
# timm's Hugging Face hub layout: this file beside the weights holds {"architecture", "pretrained_cfg": {...}}.
TIMM_CONFIG_FILE = "config.json"
HEAD = "fc"
IGNORED_SUFFIXES = (".num_batches_tracked",)
_STEM_KEYS = {"stem_1_conv": "conv1.0", "stem_1_bn": "conv1.1", "stem_2_conv": "conv1.3", "stem_2_bn": "conv1.4"}
_BLOCK_LAYER = re.compile(r"conv(\d+)_block(\d+)_(?:(\d)_(conv|bn)|se_(reduce|expand))$")
_FEATURES = (
    ("blocks", "blocks per stage"),
    ("bottleneck", "bottleneck blocks"),
    ("width", "inner width of the first stage"),
    ("groups", "conv groups"),
    ("deep_stem", "deep 3x3 stem"),
    ("avg_down", "average-pool shortcuts"),
    ("se", "squeeze-and-excitation"),
)


def normalise_arch(arch) -> str:
    """`"timm/resnet50.a1_in1k"` -> `"resnet50"`; a ConversionError for a name not in TORCH_ARCHS."""
    name = str(arch).strip().lower().rsplit("/", 1)[-1].split(".", 1)[0]
    if name not in TORCH_ARCHS:
        raise ConversionError(
            f"arch={arch!r} is not a torchvision/timm ResNet we import; allowed: {', '.join(TORCH_ARCHS)} "
            "(timm names may carry a pretrained tag, e.g. resnet50.a1_in1k)."
        )
    return name


def preset_features(preset):
    """The architecture features of a preset that a state dict shows (see `state_features`)."""
    config = get_preset_config(preset)
    cardinality = config.get("cardinality", 1)
    multiplier = config.get("width_multiplier", 1.0)
    bottleneck = config["block_type"] == "bottleneck"
    if bottleneck:  # the bottleneck block's rule (keras_resnet.layers.blocks)
        width = int(64 * multiplier * config.get("base_width", 64) / 64.0) * cardinality
    else:
        width = int(64 * multiplier)
    return {
        "blocks": list(config["stackwise_num_blocks"]),
        "bottleneck": bottleneck,
        "width": width,
        "groups": cardinality,
        "deep_stem": config.get("stem_type") == "deep",
        "avg_down": config.get("shortcut_type") == "D",
        "se": config.get("se_ratio") is not None,
    }


def state_features(state, source_name):
    """Blocks per stage, block type, width, groups, stem, shortcut and SE read from keys and shapes."""
    blocks = []
    for stage in range(1, 5):
        indices = {int(m.group(1)) for key in state if (m := re.match(rf"layer{stage}\.(\d+)\.", key))}
        if not indices:
            raise ConversionError(
                f"{source_name} does not look like a torchvision/timm ResNet state dict: it has no "
                f"layer{stage}.* keys (its first keys: {', '.join(list(state)[:3])})."
            )
        blocks.append(max(indices) + 1)
    bottleneck = "layer1.0.conv3.weight" in state
    inner = state.get("layer1.0.conv2.weight" if bottleneck else "layer1.0.conv1.weight")
    if inner is None or inner.ndim != 4:
        raise ConversionError(f"{source_name} has no 4-D layer1.0.conv1/conv2 weight: not a ResNet state dict.")
    shortcut = state.get("layer1.0.downsample.1.weight", state.get("layer2.0.downsample.1.weight"))
    return {
        "blocks": blocks,
        "bottleneck": bottleneck,
        "width": int(inner.shape[0]),
        "groups": int(inner.shape[0] // max(inner.shape[1], 1)) if bottleneck else 1,
        "deep_stem": "conv1.0.weight" in state,
        "avg_down": shortcut is not None and shortcut.ndim == 4,
        "se": "layer1.0.se.fc1.weight" in state,
    }


def describe_features(features) -> str:
    parts = [f"blocks {features['blocks']}", "bottleneck" if features["bottleneck"] else "basic blocks",
             f"width {features['width']}"]
    if features["groups"] > 1:
        parts.append(f"{features['groups']} groups")
    parts += [text for key, text in _FEATURES[4:] if features[key]]
    return ", ".join(parts)


def read_pretrained_cfg(source):
    """A timm `pretrained_cfg` for `source`, and where it came from; `({}, None)` when there is none.

    Args:
        source: a live module (its `pretrained_cfg` attribute) or a weight
            file path (the `config.json` beside it, timm's hub layout: a
            `pretrained_cfg` entry, or the older flat form with
            `architecture` and `mean` at the top level). Anything else, or
            a `config.json` of another kind (no such entries), has none.

    Raises:
        ConversionError: a `config.json` beside the weights that is not readable JSON.
    """
    config = getattr(source, "pretrained_cfg", None)
    if isinstance(config, dict) and config:
        return dict(config), "the module's pretrained_cfg"
    if not isinstance(source, (str, os.PathLike)):
        return {}, None
    path = os.path.join(os.path.dirname(os.path.abspath(os.fspath(source))), TIMM_CONFIG_FILE)
    if not os.path.isfile(path):
        return {}, None
    try:
        with open(path, encoding="utf-8") as stream:
            hub_config = json.load(stream)
    except (OSError, ValueError) as error:
        raise ConversionError(
            f"{path} (beside the weights) is not readable JSON ({error}); fix or move it, timm's hub layout "
            "keeps the weights' pretrained_cfg there."
        ) from None
    if not isinstance(hub_config, dict):
        return {}, None
    if isinstance(hub_config.get("pretrained_cfg"), dict):
        return dict(hub_config["pretrained_cfg"]), f"{path} (pretrained_cfg)"
    if "architecture" in hub_config and "mean" in hub_config:
        return dict(hub_config), f"{path} (pretrained_cfg)"
    return {}, None


def torch_key(layer_name, avg_down=False, deep_stem=False):
    """The state-dict prefix of our layer `layer_name` ("conv2_block1_1_conv" -> "layer1.0.conv1").

    `avg_down` and `deep_stem`: the backbone has ResNet-D shortcuts / the deep stem.
    """
    if layer_name == "conv1_conv":
        return "conv1.6" if deep_stem else "conv1"
    if layer_name in _STEM_KEYS:
        return _STEM_KEYS[layer_name]
    if layer_name == "conv1_bn":
        return "bn1"
    if layer_name == "predictions":
        return HEAD
    match = _BLOCK_LAYER.match(layer_name)
    if match is None:
        return None
    stage, block, index, kind, se = match.groups()
    prefix = f"layer{int(stage) - 1}.{int(block) - 1}"
    if se:
        return f"{prefix}.se.{'fc1' if se == 'reduce' else 'fc2'}"
    if index == "0":  # shortcut: B is (conv, bn); D is (avg-pool, conv, bn)
        return f"{prefix}.downsample.{int(kind == 'bn') + int(avg_down)}"
    return f"{prefix}.{kind}{index}"


def variable_keys(layer):
    """(suffix, to_ours, to_torch_shape) for each weight of `layer`, in `layer.weights` order."""
    if isinstance(layer, keras.layers.BatchNormalization):
        return [(s, None, None) for s in (".weight", ".bias", ".running_mean", ".running_var")]
    if isinstance(layer, keras.layers.Conv2D):
        kernel = (".weight", (2, 3, 1, 0), (3, 2, 0, 1))  # OIHW -> HWIO and back
        return [kernel, (".bias", None, None)]
    if isinstance(layer, keras.layers.Dense):
        return [(".weight", (1, 0), (1, 0)), (".bias", None, None)]
    raise ConversionError(f"Cannot convert layer {layer.name!r} of type {type(layer).__name__}.")


class TorchWeights:
    """A torchvision or timm ResNet state dict, read once, with the preset it fits.

    Args:
        source: a `.pth`/`.pt`/`.bin` or `.safetensors` path, a dict of
            arrays or tensors, or a live `torch.nn.Module` (see
            `keras_resnet.convert.weight_files.read_state_dict`).
        arch: the source model's name (`TORCH_ARCHS`, timm tags allowed);
            inferred from keys and shapes when None.
        preset: a preset to prefer when several fit the keys (from_preset's).
        state_dict: `(state, name)` that `read_state_dict(source)` already
            returned, so the file is not read again (`source` still gives a
            timm `pretrained_cfg` or the `config.json` beside the file).

    Attributes:
        preset, arch: our preset and the source name (equal here).
        num_classes: rows of `fc.weight`, None without a head.
        mean, std: the source's normalisation of 0..1 pixels (a timm
            `pretrained_cfg`, else ImageNet's).
        input_size: `(height, width)` of a timm `pretrained_cfg`, else None.
        interpolation: the resize the source's weights were evaluated with:
            a timm `pretrained_cfg`'s ("bicubic", ...), else torchvision's
            "bilinear".
        crop_pct: the centre-crop fraction of a timm `pretrained_cfg`
            (e.g. 0.95), else None (none recorded).
        preprocessing_source: where mean/std/interpolation came from: the
            module's `pretrained_cfg`, a `config.json` beside the file, or
            None (the torchvision defaults).
    """

    format = "torch"

    KINDS = f"a torchvision/timm state dict ({', '.join(TORCH_SUFFIXES)}, {SAFETENSORS_SUFFIX})"

    @classmethod
    def accepts(cls, source) -> bool:
        """A torch weight file, or an in-memory source (a dict of arrays, a torch module)."""
        return is_torch_file(source) if isinstance(source, (str, os.PathLike)) else True

    @classmethod
    def read(cls, source, arch=None, preset=None):
        return cls(source, arch, preset)

    def __init__(self, source, arch=None, preset=None, state_dict=None):
        self.state, self.source_name = state_dict if state_dict is not None else read_state_dict(source)
        self.features = state_features(self.state, self.source_name)
        if arch is not None:
            self.arch = normalise_arch(arch)
            expected = preset_features(self.arch)
            wrong = [f"{text}: {self.features[key]} (not {expected[key]})"
                     for key, text in _FEATURES if self.features[key] != expected[key]]
            if wrong:
                raise ConversionError(
                    f"arch={arch!r} does not match {self.source_name}: its keys and shapes show {'; '.join(wrong)}; "
                    f"they look like {self._candidates_text()}."
                )
        else:
            self.arch = self._infer(preset)
        self.preset = self.arch
        fc = self.state.get(f"{HEAD}.weight")
        self.num_classes = int(fc.shape[0]) if fc is not None else None
        config, self.preprocessing_source = read_pretrained_cfg(source)
        self.mean = tuple(float(v) for v in config.get("mean") or IMAGENET_MEAN)
        self.std = tuple(float(v) for v in config.get("std") or IMAGENET_STD)
        self.input_size = tuple(int(v) for v in config["input_size"][-2:]) if config.get("input_size") else None
        self.interpolation = str(config.get("interpolation") or DEFAULT_INTERPOLATION)
        self.crop_pct = float(config["crop_pct"]) if config.get("crop_pct") is not None else None
        self.input_channels = int(self._stem_kernel().shape[1])

    def _candidates(self):
        return [name for name in TORCH_ARCHS if preset_features(name) == self.features]

    def _candidates_text(self):
        candidates = self._candidates()
        return " or ".join(candidates) if candidates else f"no preset of ours ({describe_features(self.features)})"

    def _infer(self, preferred):
        candidates = self._candidates()
        if len(candidates) == 1:
            return candidates[0]
        if preferred in candidates:
            return preferred
        if candidates:
            raise ConversionError(
                f"{self.source_name} fits several architectures ({', '.join(candidates)}); pass arch= to pick one."
            )
        raise ConversionError(
            f"{self.source_name} is a ResNet state dict with {describe_features(self.features)}, which no preset "
            f"of ours has; supported: {', '.join(TORCH_ARCHS)}."
        )

    def _stem_kernel(self):
        return self.state["conv1.0.weight" if self.features["deep_stem"] else "conv1.weight"]

    def describe(self) -> str:
        layout = f"{TORCH_ARCHS[self.arch]} layout: {describe_features(self.features)}"
        return f"{self.arch} ({layout}) -> preset {self.preset}"

    def preprocessing(self, name="preprocessing"):
        """The source's normalisation of raw 0..255 pixels, as an in-model `ImageNormalization`.

        A timm `pretrained_cfg`'s interpolation and crop_pct are recorded on it
        (its config, export metadata); torchvision's defaults are not.
        """
        stated = {"interpolation": self.interpolation, "crop_pct": self.crop_pct} if self.preprocessing_source else {}
        return ImageNormalization(mean=list(self.mean), std=list(self.std), scale=1.0 / 255.0, name=name, **stated)

    def preprocessing_info(self) -> dict:
        """The source's preprocessing as run.json / export metadata record it.

        `{"mean", "std", "scale", "reverse_channels", "interpolation"}` (mean and
        std of 0..1 pixels, applied after x `scale`), `crop_pct` when the
        source gives one, and `from`: where the figures came from.
        """
        info = {"mean": list(self.mean), "std": list(self.std), "scale": 1.0 / 255.0, "reverse_channels": False,
                "interpolation": self.interpolation}
        if self.crop_pct is not None:
            info["crop_pct"] = self.crop_pct
        info["from"] = self.preprocessing_source or "torchvision's defaults (ImageNet mean/std, bilinear)"
        return info

    def _assignments(self, layers, avg_down=False, deep_stem=False):
        """[(layer, values)] for `layers`, the keys used, and the problems found."""
        assignments, used, missing, shapes = [], set(), [], []
        for layer in layers:
            if not layer.weights:
                continue
            prefix = torch_key(layer.name, avg_down, deep_stem)
            if prefix is None:
                raise ConversionError(f"Layer {layer.name!r} has no torchvision/timm counterpart.")
            values = []
            for variable, (suffix, to_ours, to_torch) in zip(layer.weights, variable_keys(layer)):
                key = prefix + suffix
                value = self.state.get(key)
                if value is None:
                    missing.append(key)
                    continue
                used.add(key)
                value = np.asarray(value, dtype="float32")
                ours = tuple(variable.shape)
                if to_ours is not None and value.ndim == len(to_ours):
                    value = value.transpose(to_ours)
                if value.shape != ours:
                    expected = tuple(ours[i] for i in to_torch) if to_torch else ours
                    shapes.append(f"{key} {tuple(np.shape(self.state[key]))} (ours needs {expected})")
                values.append(value)
            assignments.append((layer, values))
        return assignments, used, missing, shapes

    def _check(self, target, missing, unused, shapes):
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} keys ({', '.join(missing[:3])})")
        if unused:
            problems.append(f"{len(unused)} keys our model does not use ({', '.join(unused[:3])})")
        if shapes:
            problems.append(f"{len(shapes)} shapes differ: {'; '.join(shapes[:3])}")
        if problems:
            raise ConversionError(
                f"{self.source_name} does not fit {target}: {'; '.join(problems)}. Its keys and shapes look like "
                f"{self._candidates_text()}."
            )

    def load_backbone(self, backbone):
        """Sets every weight of `backbone` from the state dict, both ways checked (the head's keys aside)."""
        if backbone.image_shape[-1] != self.input_channels:
            raise ConversionError(
                f"input_shape={tuple(backbone.image_shape)} does not fit {self.source_name}: its weights need "
                f"{self.input_channels} input channels; use input_shape=(height, width, {self.input_channels})."
            )
        assignments, used, missing, shapes = self._assignments(
            backbone.layers, avg_down=backbone.shortcut_type == "D", deep_stem=backbone.stem_type == "deep"
        )
        unused = [key for key in self.state if key not in used and not key.endswith(IGNORED_SUFFIXES)
                  and not key.startswith(f"{HEAD}.")]
        self._check(f"backbone {backbone.name!r}", missing, unused, shapes)
        for layer, values in assignments:
            layer.set_weights(values)

    def load_head(self, dense):
        """Sets `dense` (the classifier's "predictions" layer) from `fc.weight`/`fc.bias`."""
        assignments, _, missing, shapes = self._assignments([dense])
        self._check(f"the {dense.units}-class head", missing, [], shapes)
        for layer, values in assignments:
            layer.set_weights(values)


__all__ = [
    "DEFAULT_INTERPOLATION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TORCH_ARCHS",
    "TorchWeights",
    "normalise_arch",
    "read_pretrained_cfg",
    "torch_key",
]
