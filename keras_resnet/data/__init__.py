"""Input pipelines for keras_resnet tasks."""

from keras_resnet.data.classification import (
    FASHION_MNIST_CLASSES,
    DataError,
    build_classification_datasets,
    find_fashion_mnist,
    load_fashion_mnist,
    read_idx_gz,
    scan_image_folder,
)
from keras_resnet.data.detection.pipeline import (
    DetectionRecord,
    build_detection_datasets,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "DataError",
    "DetectionRecord",
    "build_classification_datasets",
    "build_detection_datasets",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx_gz",
    "scan_image_folder",
]
