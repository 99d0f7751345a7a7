"""torchvision and timm ResNets (state dicts, files, live modules) as our models.

`from_torch` reads a state dict once, infers the architecture from its keys and
shapes (or takes `arch=`), builds the preset of the same architecture and loads
it exactly (`keras_resnet.convert.torch_resnet`): a `ResNetClassifier`
whose outputs are the torch model's logits, with the source's normalisation
inside (raw pixels 0-255 in), or a `ResNetBackbone`.

`torch_parity` measures how far ours is from a live torch module;
`source_parity` from the torchvision/timm model of a state dict, built (no
download) in a child Python by `torch_reference.py`. Both need torch.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from keras_resnet.convert import torch_reference, torch_retinanet, torch_segmentation
from keras_resnet.convert.torch_resnet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TORCH_ARCHS,
    TorchWeights,
)
from keras_resnet.convert.weight_files import read_state_dict
from keras_resnet.models.resnet.backbone import ResNetBackbone
from keras_resnet.models.resnet.classifier import ResNetClassifier
from keras_resnet_settings.errors import ConversionError

DEFAULT_INPUT_SIZE = (224, 224)


TORCH_WEIGHT_KINDS = (TorchWeights, torch_segmentation.TorchSegmentationWeights, torch_retinanet.TorchRetinaNetWeights)


def read_torch_weights(source, arch=None):
    """The weights of a torch source, read once: a torchvision DeepLabV3/FCN, RetinaNet or ResNet state dict.

    Args:
        source: as `from_torch`'s (a reader returned here passes through).
        arch: the source model's name, or None to infer it.

    Returns:
        A `TorchSegmentationWeights`, `TorchRetinaNetWeights` or
        `TorchWeights`, by the state dict's keys.
    """
    if isinstance(source, TORCH_WEIGHT_KINDS):
        return source
    state, source_name = read_state_dict(source)
    if torch_segmentation.is_segmentation_state(state):
        return torch_segmentation.TorchSegmentationWeights(state, source_name, arch)
    if torch_retinanet.is_retinanet_state(state):
        return torch_retinanet.TorchRetinaNetWeights(state, source_name, arch)
    return TorchWeights(source, arch, state_dict=(state, source_name))


def from_torch(source, arch=None, include_top=None, num_classes=None, input_shape=None, mean=None, std=None):
    """Converts a torchvision or timm ResNet to ours, exactly.

    Args:
        source: a state dict file (`.pth`, `.pt`, `.bin`: read without
            PyTorch by `keras_resnet.convert.torch_pickle`, tensors only;
            `.safetensors`), a dict of NumPy arrays or torch tensors, or a live
            `torch.nn.Module`. `{"state_dict": ...}`/`{"model": ...}`
            wrappers and a "module." prefix are removed.
        arch: the source model's name: torchvision `resnet18` ...
            `resnet152`, `resnext50_32x4d`, `resnext101_32x8d`,
            `resnext101_64x4d`, `wide_resnet50_2`, `wide_resnet101_2`; timm
            the same plus `resnet200`, `resnet18d` ... `resnet101d`,
            `seresnet50` (pretrained tags allowed: "resnet50.a1_in1k").
            Inferred from keys and shapes when None; when given, it must
            agree with them.
        include_top: True for a classifier, False for a backbone; None: a
            classifier when the state dict has `fc.*` (or `num_classes` is
            given).
        num_classes: classes of the classifier; None keeps the source's.
            Another number keeps the backbone weights and makes a fresh head.
        input_shape: `(height, width, channels)`; defaults to a timm module's
            `pretrained_cfg` input size, else 224x224, with the weights'
            channels.
        mean, std: the source's normalisation of 0..1 pixels, per channel;
            default: a timm module's `pretrained_cfg`, else ImageNet's
            (torchvision and most timm weights; timm's `*.ra4_e3600_*`
            weights use 0.5 and 0.5).

    Returns:
        A `ResNetClassifier` (logits, no softmax; the source's normalisation
        of raw pixels 0-255 inside, recorded in its config and exports) or a
        `ResNetBackbone` (taking normalised images, as every backbone).
        torchvision DeepLabV3/FCN state dicts (`backbone.*` and
        `classifier.*` keys; arch `deeplabv3_resnet50` ... `fcn_resnet101`)
        give a `ResNetSegmenter`: see
        `keras_resnet.convert.torch_segmentation.segmenter_from_torch`.
        torchvision RetinaNet state dicts (`backbone.body.*` and `head.*`
        keys; arch `retinanet_resnet50_fpn`, `retinanet_resnet50_fpn_v2`)
        give a `RetinaNetDetector` with torchvision's anchors, box coder and
        post-processing: see
        `keras_resnet.convert.torch_retinanet.detector_from_torch`.

    Example:
    >>> model = from_torch("resnet50.pth")               # torch.save(resnet50(weights=...).state_dict(), ...)
    >>> model = from_torch("model.safetensors", arch="resnet50d.ra2_in1k")
    """
    weights = read_torch_weights(source, arch)
    if isinstance(weights, torch_segmentation.TorchSegmentationWeights):  # torchvision DeepLabV3/FCN
        return torch_segmentation.segmenter_from_torch(
            weights, num_classes=num_classes, input_shape=input_shape, mean=mean, std=std, include_top=include_top,
        )
    if isinstance(weights, torch_retinanet.TorchRetinaNetWeights):  # torchvision RetinaNet
        if include_top is not None:
            raise ConversionError(
                f"include_top={include_top} applies to classifiers and segmenters; {weights.source_name} is a "
                "torchvision RetinaNet and converts to a RetinaNetDetector (its .backbone is the ResNet): drop it."
            )
        return torch_retinanet.detector_from_torch(
            weights, num_classes=num_classes, input_shape=input_shape, mean=mean, std=std
        )
    if mean is not None:
        weights.mean = tuple(float(v) for v in mean)
    if std is not None:
        weights.std = tuple(float(v) for v in std)
    has_head = weights.num_classes is not None
    if include_top is None:
        include_top = has_head or num_classes is not None
    if include_top and not has_head and num_classes is None:
        raise ConversionError(
            f"include_top=True, but {weights.source_name} has no fc.* keys (a headless backbone); "
            "pass num_classes for a fresh head, or include_top=False."
        )
    if not include_top and num_classes is not None:
        raise ConversionError(f"num_classes={num_classes} needs a classifier; drop include_top=False.")
    if input_shape is None:
        input_shape = (*(weights.input_size or DEFAULT_INPUT_SIZE), weights.input_channels)
    if not include_top:
        return ResNetBackbone.from_preset(weights.preset, weights=weights, input_shape=tuple(input_shape))
    return ResNetClassifier.from_preset(
        weights.preset,
        num_classes=num_classes or weights.num_classes,
        weights=weights,
        input_shape=tuple(input_shape),
        activation=None,
    )


def _parity_inputs(model, batch_size, seed):
    """Random raw pixels, the normalised images torch gets (NHWC) and what `model` gets."""
    defaults = (*DEFAULT_INPUT_SIZE, 3)
    height, width, channels = (size or default for size, default in zip(model.input_shape[1:], defaults))
    pixels = np.random.default_rng(seed).uniform(0, 255, (batch_size, height, width, channels)).astype("float32")
    preprocessing = model.preprocessing if isinstance(model, ResNetClassifier) else None
    if preprocessing is not None:
        return np.asarray(preprocessing(pixels), dtype="float32"), pixels
    normalised = ((pixels / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).astype("float32")
    return normalised, normalised


def _compare(model, reference, ours):
    if reference.ndim == 4:
        reference = reference.transpose(0, 2, 3, 1)
    difference = float(np.abs(reference - ours).max())
    batch, height, width = ours.shape[0], *model.input_shape[1:3]
    return {
        "max_abs_diff": difference,
        "max_rel_diff": difference / max(float(np.abs(reference).max()), 1e-12),
        "images": f"{batch} random images of {height or DEFAULT_INPUT_SIZE[0]}x{width or DEFAULT_INPUT_SIZE[1]}",
        "output": "logits" if isinstance(model, ResNetClassifier) else "last feature map",
    }


def torch_parity(model, module, batch_size=2, seed=0):
    """How far `model` (ours: a classifier or a backbone) is from the live torch `module` on random images.

    A classifier gets raw pixels 0..255 and the module the same pixels
    normalised by the classifier's preprocessing; a backbone and the
    module's feature layers get ImageNet-normalised images. (In one process,
    import torch and torchvision/timm before TensorFlow: triton, which they
    import, crashes a process that loaded TensorFlow first.)

    Returns:
        `{"max_abs_diff", "max_rel_diff", "images", "output"}` (relative: over the largest reference value).
    """
    import torch

    normalised, ours_input = _parity_inputs(model, batch_size, seed)
    ours = np.asarray(model(ours_input))
    with torch.no_grad():
        x = torch.from_numpy(normalised.transpose(0, 3, 1, 2).copy())
        reference = module(x) if isinstance(model, ResNetClassifier) else torch_reference.features(module, x)
    return _compare(model, reference.numpy(), ours)


def source_parity(model, weights, batch_size=2, seed=0):
    """`torch_parity` against the torchvision (else timm) model of `weights` (a `TorchWeights`).

    The torch model runs in a child Python without TensorFlow
    (`keras_resnet/convert/torch_reference.py`), built from the state dict
    without downloading anything.

    Returns:
        `(result, name)` ("torchvision resnet50"), or `(None, reason)` when
        torch or the architecture's libraries are not installed.
    """
    from safetensors.numpy import save_file

    normalised, ours_input = _parity_inputs(model, batch_size, seed)
    classifier = isinstance(model, ResNetClassifier)
    with tempfile.TemporaryDirectory() as folder:
        save_file({key: np.ascontiguousarray(value) for key, value in weights.state.items()},
                  os.path.join(folder, "state.safetensors"))
        np.save(os.path.join(folder, "input.npy"), normalised.transpose(0, 3, 1, 2).copy())
        # `-c` with the script's text, in the temporary folder: the script's own folder would put this module
        # (keras_resnet/convert/torch.py) first on sys.path, in place of torch.
        command = [sys.executable, "-c", Path(torch_reference.__file__).read_text(), folder, weights.arch,
                   TORCH_ARCHS[weights.arch].replace(" ", ""), str(weights.num_classes or 0),
                   "logits" if classifier else "features"]
        child = subprocess.run(command, capture_output=True, text=True, check=False, cwd=folder)
        if child.returncode == torch_reference.MISSING:
            return None, child.stdout.strip()
        if child.returncode != 0:
            raise ConversionError(f"the torch reference model failed: {(child.stderr or child.stdout).strip()[-300:]}")
        reference = np.load(os.path.join(folder, "output.npy"))
    return _compare(model, reference, np.asarray(model(ours_input))), child.stdout.strip()


__all__ = ["from_torch", "source_parity", "torch_parity"]
