"""Segmentation data: mask folders, Pascal VOC, a synthetic mosaic, the mask-aware tf.data pipeline."""

from keras_resnet.data.segmentation.masks import (
    IGNORE_INDEX,
    VOC_CLASSES,
    decode_pair,
    pair_dataset,
    scan_mask_folder,
    scan_voc,
)
from keras_resnet.data.segmentation.mosaic import (
    MOSAIC_CLASSES,
    make_mosaic,
    mosaic_datasets,
)
from keras_resnet.data.segmentation.pipeline import (
    build_segmentation_datasets,
    resize_pair,
)
from keras_resnet_settings.errors import SegmentationDataError

__all__ = [
    "IGNORE_INDEX",
    "MOSAIC_CLASSES",
    "VOC_CLASSES",
    "SegmentationDataError",
    "build_segmentation_datasets",
    "decode_pair",
    "make_mosaic",
    "mosaic_datasets",
    "pair_dataset",
    "resize_pair",
    "scan_mask_folder",
    "scan_voc",
]
