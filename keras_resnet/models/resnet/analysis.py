"""Model statistics: parameters and multiply-accumulates (MACs)."""

import math

import keras

from keras_resnet.errors import ConfigError


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
