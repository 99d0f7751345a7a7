"""keras_resnet: residual networks for Keras 3 (TensorFlow backend)."""

__version__ = "0.1.0"

from keras_resnet.backbones import ResNetBackbone
from keras_resnet.classifier import ResNetClassifier
from keras_resnet.detection.retinanet import RetinaNetDetector
from keras_resnet.layers import DropPath, FusedBatchNormalization, ImageNormalization, ZeroPadChannels
from keras_resnet.necks import FPN
from keras_resnet.presets import PRESETS, list_presets

__all__ = [
    "ResNetBackbone",
    "ResNetClassifier",
    "RetinaNetDetector",
    "FPN",
    "DropPath",
    "FusedBatchNormalization",
    "ImageNormalization",
    "ZeroPadChannels",
    "PRESETS",
    "list_presets",
]
