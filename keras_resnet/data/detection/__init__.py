"""Detection data: VOC and COCO readers, synthetic mosaics, the box-aware tf.data pipeline."""

from keras_resnet.data.detection.pipeline import (
    DetectionRecord,
    build_detection_datasets,
)

__all__ = ["DetectionRecord", "build_detection_datasets"]
