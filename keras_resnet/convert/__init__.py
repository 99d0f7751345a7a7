"""Import other libraries' ResNets: keras.applications and torchvision/timm.

- `from_keras_applications`: live keras.applications ResNet(V2) models and
  their `.h5` weight files -> our `*_v1`/`*_v2` presets.
- `from_torch`: torchvision/timm state dicts (`.pth`, `.pt`, `.bin`,
  `.safetensors`, dicts, live modules) -> our v1.5, ResNeXt, Wide, -D and SE
  presets, exactly (`torch_parity` / `source_parity` measure it against the
  torch model).
- `convert_source`: either, from a file, with a report (the `keras-resnet
  convert` command).

The weight layouts themselves live with the model family
(`keras_resnet.models.resnet.torch_weights`, `.keras_applications`), so that
`ResNetBackbone.from_preset(name, weights=...)` reads the same files.
"""

from keras_resnet.convert.api import convert_source
from keras_resnet.convert.keras_applications import from_keras_applications
from keras_resnet.convert.torch import from_torch, source_parity, torch_parity
from keras_resnet.models.resnet.keras_applications import KERAS_APPLICATIONS_ARCHS
from keras_resnet.models.resnet.torch_weights import TORCH_ARCHS
from keras_resnet_settings.errors import ConversionError

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
