"""Semantic segmentation: `ResNetSegmenter` (DeepLabV3+ or semantic FPN head), its losses and metrics."""

from keras_resnet.models.segmentation.losses import (
    CombinedSegmentationLoss,
    DiceLoss,
    SegmentationCrossEntropy,
    make_segmentation_loss,
)
from keras_resnet.models.segmentation.metrics import (
    PixelAccuracy,
    SegmentationMeanIoU,
    confusion_to_iou,
)
from keras_resnet.models.segmentation.segmenter import ResNetSegmenter

__all__ = [
    "CombinedSegmentationLoss",
    "DiceLoss",
    "PixelAccuracy",
    "ResNetSegmenter",
    "SegmentationCrossEntropy",
    "SegmentationMeanIoU",
    "confusion_to_iou",
    "make_segmentation_loss",
]
