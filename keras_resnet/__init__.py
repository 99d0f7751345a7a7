"""keras_resnet: residual networks for Keras 3 (TensorFlow backend).

Importing the package registers every serialisable class (layers, models,
losses, metrics, the learning-rate schedule), so a `.keras` file saved by
keras_resnet loads with `keras.saving.load_model` after `import keras_resnet`.
"""

__version__ = "0.1.0"

from keras_resnet import convert  # noqa: F401  (registers the weight-file readers with from_preset)
from keras_resnet.layers import (
    FPN,
    DropPath,
    FusedBatchNormalization,
    ImageNormalization,
    ZeroPadChannels,
)
from keras_resnet.models.resnet import (
    PRESETS,
    ResNetBackbone,
    ResNetClassifier,
    list_presets,
)
from keras_resnet.models.retinanet import RetinaNetDetector
from keras_resnet.models.segmentation import ResNetSegmenter
from keras_resnet.quantization import quantize_aware
from keras_resnet.training.schedules import WarmupSchedule

__all__ = [
    "ResNetBackbone",
    "ResNetClassifier",
    "RetinaNetDetector",
    "ResNetSegmenter",
    "quantize_aware",
    "FPN",
    "DropPath",
    "FusedBatchNormalization",
    "ImageNormalization",
    "ZeroPadChannels",
    "WarmupSchedule",
    "PRESETS",
    "list_presets",
]
