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

# What the training data scans list (all decoded by PIL: keras_resnet.data.images.read_image), and what
# `train --data` samples to choose a recipe.
TRAINING_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")

# The mask value meaning "ignore" (VOC object borders, augmentation padding): no loss, no metric.
IGNORE_INDEX = 255


def binary_masks_problem(masks_hold: str) -> str:
    """The one message for masks that hold only 0 and IGNORE_INDEX (`--data` and the mask-folder reader).

    `masks_hold` begins it: "every mask in X holds", "the masks in X hold".
    """
    return (
        f"{masks_hold} only 0 and {IGNORE_INDEX}, and {IGNORE_INDEX} means 'ignore' (VOC borders), so the "
        "foreground would never be learned; write binary masks with the foreground as 1 (class ids 0, 1, ...), "
        f"e.g. with numpy: (mask == {IGNORE_INDEX}).astype('uint8')"
    )


__all__ = [
    "IGNORE_INDEX",
    "binary_masks_problem",
    "CLASSIFICATION",
    "DETECTION",
    "DETECTION_HEADS",
    "HEADS_BY_TASK",
    "SEGMENTATION",
    "SEGMENTATION_HEADS",
    "SOURCES_BY_TASK",
    "TASKS",
    "TRAINING_IMAGE_EXTENSIONS",
]
