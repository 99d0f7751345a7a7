"""Pascal VOC: the class names and split lists shared by the segmentation and detection readers."""

from __future__ import annotations

from pathlib import Path

from keras_resnet_settings.errors import DataError

# The 20 object classes, in VOC order (detection class ids 0..19).
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# Segmentation masks: 0 is the background, object class i is i + 1.
VOC_SEGMENTATION_CLASSES = ("background",) + VOC_CLASSES


def read_split_ids(list_file: Path, missing: str, error: type[DataError] = DataError) -> list[str]:
    """The image ids of an ``ImageSets/*/<split>.txt`` list: the first word of each non-blank line.

    Raises:
        error: with the message ``missing`` when ``list_file`` does not exist.
    """
    if not list_file.is_file():
        raise error(missing)
    return [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
