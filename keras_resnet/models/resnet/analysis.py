"""Model statistics: parameters and multiply-accumulates (MACs), and the preset table's figures.

`keras-resnet models` prints the figures of `preset_figures.json` (beside this
file) without building any model; after changing `presets.py`, rebuild it with

    python -m keras_resnet.models.resnet.analysis --write-figures

(tests/models/test_preset_figures.py checks it against PRESETS and built models).
"""

import argparse
import json
import math
from pathlib import Path

import keras

from keras_resnet.models.resnet.classifier import ResNetClassifier
from keras_resnet.models.resnet.presets import PRESETS
from keras_resnet_settings.errors import ConfigError

FIGURES_PATH = Path(__file__).with_name("preset_figures.json")


def count_trainable_params(model):
    """Number of trainable scalars (what torchvision calls parameters)."""
    return int(sum(math.prod(w.shape) for w in model.trainable_weights))


def count_macs(model):
    """Multiply-accumulates of one forward pass of a single image.

    Counts Conv2D (`H_out * W_out * C_out * k_h * k_w * C_in / groups`) and
    Dense layers, recursing into nested models; these are the FLOPs that
    torchvision and the ResNet papers report (ResNet-50: ~4.1 G). The model
    must have a fixed input size.
    """
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += count_macs(layer)
        elif isinstance(layer, keras.layers.Conv2D):
            out_shape = layer.output.shape
            if None in out_shape[1:3]:
                raise ConfigError(f"count_macs needs a fixed input size; {model.name} has {model.input_shape}.")
            kh, kw = layer.kernel_size
            in_channels = layer.input.shape[-1]
            total += out_shape[1] * out_shape[2] * layer.filters * kh * kw * in_channels // layer.groups
        elif isinstance(layer, keras.layers.Dense):
            total += layer.input.shape[-1] * layer.units
    return int(total)


def preset_figures(names=None):
    """Per preset: descriptions, input size, classes, trainable params and MACs of its classifier.

    ImageNet presets are measured at 224x224 with 1000 classes, `*_cifar` ones
    at 32x32 with 10 classes. `names` defaults to every preset, in table order.
    """
    figures = {}
    for name in PRESETS if names is None else names:
        size, classes = (32, 10) if name.endswith("_cifar") else (224, 1000)
        model = ResNetClassifier.from_preset(name, num_classes=classes, input_shape=(size, size, 3))
        figures[name] = {
            "description": PRESETS[name]["description"],
            "short": PRESETS[name]["short"],
            "input_size": size,
            "num_classes": classes,
            "trainable_params": count_trainable_params(model),
            "macs": count_macs(model),
        }
    return figures


def write_preset_figures(path=FIGURES_PATH):
    """Rebuild every preset and write its figures as JSON (what `keras-resnet models` prints)."""
    Path(path).write_text(json.dumps(preset_figures(), indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Model statistics of the presets.")
    parser.add_argument("--write-figures", action="store_true", help=f"rebuild {FIGURES_PATH.name} from PRESETS")
    if parser.parse_args().write_figures:
        write_preset_figures()
        print(f"wrote {FIGURES_PATH}")
    else:
        parser.print_help()
