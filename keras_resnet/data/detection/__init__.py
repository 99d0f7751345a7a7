"""Detection data: VOC and COCO readers, synthetic mosaics, the box-aware tf.data pipeline.

Modules: ``records`` (:class:`DetectionRecord`, shared checks, COCO ground
truth), ``voc_reader``, ``coco_reader``, ``mosaic_reader`` (the readers
:func:`read_voc`, :func:`read_coco`, :func:`read_mosaic`), ``geometry`` (letterbox, box
padding, augmentation) and ``pipeline`` (:func:`build_detection_datasets`).
"""

from keras_resnet.data.detection.coco_reader import COCO_REQUIRED_KEYS, read_coco
from keras_resnet.data.detection.geometry import (
    MIN_BOX_SIDE,
    letterbox,
    make_detection_augment,
    pad_boxes,
)
from keras_resnet.data.detection.mosaic_reader import (
    MOSAIC_CACHE_ENV,
    MOSAIC_CANVAS_SIZE,
    MOSAIC_ITEM_SIZE,
    MOSAIC_ITEMS_PER_CANVAS,
    MOSAIC_VAL_SEED,
    default_mosaic_cache_dir,
    make_detection_mosaic,
    read_mosaic,
)
from keras_resnet.data.detection.pipeline import (
    DEFAULT_AUGMENT,
    build_detection_datasets,
    recipe_dataset_args,
)
from keras_resnet.data.detection.records import (
    BOX_TOLERANCE,
    DetectionRecord,
    coco_ground_truth,
)
from keras_resnet.data.detection.voc_reader import read_voc
from keras_resnet.data.images import letterbox_scale
from keras_resnet.data.pascal_voc import VOC_CLASSES

__all__ = [
    "BOX_TOLERANCE",
    "COCO_REQUIRED_KEYS",
    "DEFAULT_AUGMENT",
    "MIN_BOX_SIDE",
    "MOSAIC_CACHE_ENV",
    "MOSAIC_CANVAS_SIZE",
    "MOSAIC_ITEMS_PER_CANVAS",
    "MOSAIC_ITEM_SIZE",
    "MOSAIC_VAL_SEED",
    "VOC_CLASSES",
    "DetectionRecord",
    "build_detection_datasets",
    "recipe_dataset_args",
    "read_coco",
    "coco_ground_truth",
    "default_mosaic_cache_dir",
    "letterbox",
    "letterbox_scale",
    "make_detection_augment",
    "make_detection_mosaic",
    "read_mosaic",
    "pad_boxes",
    "read_voc",
]
