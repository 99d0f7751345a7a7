"""Import other libraries' ResNets: keras.applications and torchvision/timm.

- `from_keras_applications`: live keras.applications ResNet(V2) models and
  their `.h5` weight files -> our `*_v1`/`*_v2` presets.
- `from_torch`: torchvision/timm state dicts (`.pth`, `.pt`, `.bin`,
  `.safetensors`, dicts, live modules) -> our v1.5, ResNeXt, Wide, -D and SE
  presets, exactly (`torch_parity` / `source_parity` measure it against the
  torch model).
- `convert_source`: either, from a file, with a report (the `keras-resnet
  convert` command).

Every reader of foreign weight files is here (`weight_files`: the formats;
`torch_resnet`, `torch_retinanet`, `torch_segmentation`, `keras_applications`:
the layouts); the models name none of them. Importing this package registers
the ResNet readers with `keras_resnet.models.resnet.pretrained`, so
`ResNetBackbone.from_preset(name, weights=...)` reads the same files
(`import keras_resnet` imports it).
"""

from keras_resnet.convert.api import convert_source
from keras_resnet.convert.keras_applications import (
    KERAS_APPLICATIONS_ARCHS,
    KerasApplicationsWeights,
    from_keras_applications,
)
from keras_resnet.convert.torch import from_torch, source_parity, torch_parity
from keras_resnet.convert.torch_resnet import TORCH_ARCHS, TorchWeights
from keras_resnet.convert.torch_retinanet import detector_from_torch
from keras_resnet.convert.torch_segmentation import segmenter_from_torch
from keras_resnet.convert.weight_files import read_state_dict
from keras_resnet.models.resnet.pretrained import register_weights_reader
from keras_resnet.models.task_weights import register_task_weights_builder
from keras_resnet_settings.errors import ConversionError
from keras_resnet_settings.registry import DETECTION, SEGMENTATION


def detector_from_file(path, arch, **kwargs):
    """`RetinaNetDetector.from_preset`'s builder: a torchvision RetinaNet weight file -> `detector_from_torch`."""
    state, source_name = read_state_dict(path)
    return detector_from_torch(state, source_name, arch=arch, **kwargs)


def segmenter_from_file(path, arch, **kwargs):
    """`ResNetSegmenter.from_preset`'s builder: a torchvision DeepLabV3/FCN weight file -> `segmenter_from_torch`."""
    state, source_name = read_state_dict(path)
    return segmenter_from_torch(state, source_name, arch=arch, **kwargs)


# keras.applications first: TorchWeights also takes any in-memory source.
register_weights_reader(KerasApplicationsWeights)
register_weights_reader(TorchWeights)
register_task_weights_builder(DETECTION, detector_from_file)
register_task_weights_builder(SEGMENTATION, segmenter_from_file)

__all__ = [
    "KERAS_APPLICATIONS_ARCHS",
    "TORCH_ARCHS",
    "ConversionError",
    "convert_source",
    "from_keras_applications",
    "from_torch",
    "source_parity",
    "torch_parity",
]
