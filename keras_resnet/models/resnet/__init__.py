"""ResNet family: the configurable backbone, its preset table, the classifier."""

from keras_resnet.models.resnet.backbone import ResNetBackbone
from keras_resnet.models.resnet.classifier import ResNetClassifier
from keras_resnet.models.resnet.presets import PRESETS, get_preset_config, list_presets

__all__ = ["PRESETS", "ResNetBackbone", "ResNetClassifier", "get_preset_config", "list_presets"]
