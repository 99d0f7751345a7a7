"""Building blocks below every model: core layers, residual blocks, the FPN.

- `core`: `DropPath`, `ZeroPadChannels`, `ImageNormalization`, `FusedBatchNormalization`.
- `blocks`: basic and bottleneck residual blocks, shortcuts, squeeze-and-excitation.
- `fpn`: the feature pyramid network (`FPN` layer and `apply_fpn` for the functional API).
"""

from keras_resnet.layers.core import (
    DropPath,
    FusedBatchNormalization,
    ImageNormalization,
    ZeroPadChannels,
)
from keras_resnet.layers.fpn import FPN

__all__ = ["DropPath", "FPN", "FusedBatchNormalization", "ImageNormalization", "ZeroPadChannels"]
