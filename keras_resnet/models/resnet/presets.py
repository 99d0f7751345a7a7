"""Named backbone configurations: a table, not code.

Each entry is `{"description": ..., "short": ..., "config": {...ResNetBackbone args}}`;
`short` is the description that `keras-resnet models` prints (`--wide`: the long
one).
Adding a variant is adding a row. Reference parameter counts (1000-class
head, trainable) are in `REFERENCE_PARAMS` and checked by the tests.
"""

import copy
import difflib

from keras_resnet_settings.errors import ConfigError

_DEPTHS = {
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
    101: ("bottleneck", [3, 4, 23, 3]),
    152: ("bottleneck", [3, 8, 36, 3]),
    200: ("bottleneck", [3, 24, 36, 3]),
}

# keras.applications layout: conv biases, BN epsilon 1.001e-5, momentum 0.99.
_KERAS_APPLICATIONS = dict(use_conv_bias=True, bn_epsilon=1.001e-5, bn_momentum=0.99)


def _imagenet(depth, **config):
    block_type, blocks = _DEPTHS[depth]
    return {"block_type": block_type, "stackwise_num_blocks": list(blocks), "version": "v1.5", **config}


def _cifar(depth):
    blocks = (depth - 2) // 6
    return {
        "block_type": "basic",
        "stackwise_num_blocks": [blocks] * 3,
        "stackwise_num_filters": [16, 32, 64],
        "stem_type": "cifar",
        "shortcut_type": "A",
        "version": "v1",
    }


PRESETS = {
    **{
        f"resnet{d}": {
            "description": f"ResNet-{d} v1.5 (stride in 3x3; torchvision layout)",
            "short": "v1.5, torchvision layout",
            "config": _imagenet(d),
        }
        for d in (18, 34, 50, 101, 152, 200)
    },
    **{
        f"resnet{d}_v1": {
            "description": f"ResNet-{d} v1 (keras.applications ResNet{d} layout, conv biases)",
            "short": "v1, keras.applications layout",
            "config": _imagenet(d, version="v1", **_KERAS_APPLICATIONS),
        }
        for d in (50, 101, 152)
    },
    **{
        f"resnet{d}_v2": {
            "description": f"ResNet-{d} v2, pre-activation (keras.applications ResNet{d}V2 layout)",
            "short": "pre-activation, keras.applications",
            "config": _imagenet(d, version="v2", **_KERAS_APPLICATIONS),
        }
        for d in (50, 101, 152)
    },
    **{
        f"resnet{d}d": {
            "description": f"ResNet-{d}-D: deep 3x3 stem and average-pool shortcuts (Bag of Tricks)",
            "short": "deep stem, avg-pool shortcuts",
            "config": _imagenet(d, stem_type="deep", shortcut_type="D"),
        }
        for d in (18, 34, 50, 101)
    },
    "resnext50_32x4d": {
        "description": "ResNeXt-50 32x4d (Xie et al., 2017)",
        "short": "ResNeXt 32x4d",
        "config": _imagenet(50, cardinality=32, base_width=4),
    },
    "resnext101_32x8d": {
        "description": "ResNeXt-101 32x8d (Xie et al., 2017)",
        "short": "ResNeXt 32x8d",
        "config": _imagenet(101, cardinality=32, base_width=8),
    },
    "resnext101_64x4d": {
        "description": "ResNeXt-101 64x4d (Xie et al., 2017)",
        "short": "ResNeXt 64x4d",
        "config": _imagenet(101, cardinality=64, base_width=4),
    },
    "wide_resnet50_2": {
        "description": "Wide ResNet-50-2: bottleneck width x2 (Zagoruyko & Komodakis, 2016)",
        "short": "Wide ResNet, bottleneck width x2",
        "config": _imagenet(50, width_multiplier=2.0),
    },
    "wide_resnet101_2": {
        "description": "Wide ResNet-101-2: bottleneck width x2",
        "short": "Wide ResNet, bottleneck width x2",
        "config": _imagenet(101, width_multiplier=2.0),
    },
    "seresnet50": {
        "description": "SE-ResNet-50, squeeze-and-excitation ratio 1/16 (Hu et al., 2018)",
        "short": "squeeze-and-excitation, ratio 1/16",
        "config": _imagenet(50, se_ratio=1.0 / 16),
    },
    **{
        f"resnet{d}_cifar": {
            "description": f"ResNet-{d} for CIFAR (He et al., 2015, Sec. 4.2; option-A shortcuts)",
            "short": "CIFAR, option-A shortcuts",
            "config": _cifar(d),
        }
        for d in (20, 32, 44, 56, 110, 1202)
    },
}

# Trainable parameters with a 1000-class head (ImageNet presets, torchvision /
# keras.applications / timm) or a 10-class head (CIFAR presets, paper Table 6).
REFERENCE_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
    "resnet50_v1": 25_583_592,
    "resnet18d": 11_708_744,
    "resnet34d": 21_816_904,
    "resnet50d": 25_576_264,
    "resnet101d": 44_568_392,
    "resnext101_64x4d": 83_455_272,
    "seresnet50": 28_088_024,
    "resnet20_cifar": 270_000,
    "resnet32_cifar": 460_000,
    "resnet44_cifar": 660_000,
    "resnet56_cifar": 850_000,
    "resnet110_cifar": 1_700_000,
    "resnet1202_cifar": 19_400_000,
}


def list_presets():
    """Names of all backbone presets, in table order."""
    return list(PRESETS)


def get_preset_config(name):
    """A fresh copy of a preset's `ResNetBackbone` arguments.

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    if name not in PRESETS:
        raise ConfigError(unknown_preset_message(name, list_presets()))
    return copy.deepcopy(PRESETS[name]["config"])


def preset_description(name):
    if name not in PRESETS:
        raise ConfigError(unknown_preset_message(name, list_presets()))
    return PRESETS[name]["description"]


def unknown_preset_message(name, names):
    close = difflib.get_close_matches(str(name), names, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return f"Unknown preset {name!r}.{hint} Valid presets: {', '.join(names)}."
