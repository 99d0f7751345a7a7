"""The names every layer of keras_resnet agrees on: tasks, their data sources and heads.

One table, read by the recipe schema (`config`), the models (a segmenter's
heads), and the task dispatch of `training.runner` and `export.api`. Adding
a task or a head starts here. This module imports nothing.
"""

CLASSIFICATION = "classification"
SEGMENTATION = "segmentation"
DETECTION = "detection"
TASKS = (CLASSIFICATION, SEGMENTATION, DETECTION)

SOURCES_BY_TASK = {
    CLASSIFICATION: ("fashion_mnist", "image_folder"),
    SEGMENTATION: ("mask_folder", "voc", "mosaic"),
    DETECTION: ("voc", "coco", "mosaic"),
}

SEGMENTATION_HEADS = ("deeplabv3plus", "fpn", "deeplabv3", "fcn")
DETECTION_HEADS = ("retinanet",)
HEADS_BY_TASK = {SEGMENTATION: SEGMENTATION_HEADS, DETECTION: DETECTION_HEADS}

__all__ = [
    "CLASSIFICATION",
    "DETECTION",
    "DETECTION_HEADS",
    "HEADS_BY_TASK",
    "SEGMENTATION",
    "SEGMENTATION_HEADS",
    "SOURCES_BY_TASK",
    "TASKS",
]
