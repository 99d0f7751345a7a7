"""Input pipelines for keras_resnet tasks.

Modules: ``images`` (image files: find, read, decode, letterbox), ``common``
(what every pipeline shares), ``crops`` (native-resolution training windows
and validation tiles, ``data.sampling: crop``), ``fashion_mnist``, ``pascal_voc`` (VOC class
names and split lists), and one per task: ``classification``,
``segmentation`` and ``detection`` (packages of readers and a ``pipeline``).
"""

from keras_resnet.data.classification import (
    build_classification_datasets,
    scan_image_folder,
)
from keras_resnet.data.detection import DetectionRecord, build_detection_datasets
from keras_resnet.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    find_fashion_mnist,
    load_fashion_mnist,
    read_idx_gz,
)
from keras_resnet.data.segmentation import build_segmentation_datasets
from keras_resnet_settings.errors import DataError, SegmentationDataError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "DataError",
    "DetectionRecord",
    "SegmentationDataError",
    "build_classification_datasets",
    "build_detection_datasets",
    "build_segmentation_datasets",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx_gz",
    "scan_image_folder",
]
