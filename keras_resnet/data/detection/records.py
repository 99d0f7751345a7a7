"""Detection records: one image and its boxes, the checks every reader shares, COCO ground truth.

Conventions shared with the detection model: boxes are absolute pixels in
``xyxy`` order (``[x_min, y_min, x_max, y_max]``, continuous coordinates, the
image spans ``[0, width] x [0, height]``), float32; classes are int32
``0..num_classes-1``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from keras_resnet.data.images import image_problem, image_size
from keras_resnet_settings.errors import DataError

logger = logging.getLogger(__name__)

# Coordinates at most this far outside the image are clipped silently (annotation rounding).
BOX_TOLERANCE = 1.0
MAX_LISTED_ISSUES = 10



@dataclass
class DetectionRecord:
    """One image and its objects, boxes in original-image pixels.

    Attributes:
        image: image file path, or a uint8 array ``(H, W)`` / ``(H, W, C)``.
        boxes: float32 ``(N, 4)`` xyxy boxes in original-image pixels.
        classes: int32 ``(N,)`` class ids ``0..K-1``.
        image_id: integer id (the COCO id, else 1-based position in the set).
        height, width: original image size in pixels.
        ignore: bool ``(N,)``: VOC ``difficult`` / COCO ``iscrowd`` objects.
    """

    image: str | np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    image_id: int
    height: int
    width: int
    ignore: np.ndarray = field(default=None)

    def __post_init__(self):
        self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        self.classes = np.asarray(self.classes, np.int32).reshape(-1)
        self.ignore = np.zeros(len(self.classes), bool) if self.ignore is None else np.asarray(self.ignore, bool)

    @property
    def file_name(self) -> str:
        return self.image if isinstance(self.image, str) else f"mosaic_{self.image_id}"


def checked_image_size(path: Path, owner: str) -> tuple[int, int]:
    """``(width, height)`` of an image after a full decode check (`image_problem`), or DataError naming it."""
    if not path.is_file():
        raise DataError(f"{owner} refers to image {path}, which does not exist; add the image or remove the annotation")
    problem = image_problem(str(path))
    if problem:
        raise DataError(f"unreadable image {path} ({problem}); delete or replace it, or remove its annotation")
    return image_size(path)


class BoxIssues:
    """Collects clipped / dropped box notes and logs them once, as one warning."""

    def __init__(self, source):
        self.source, self.notes = source, []

    def add(self, note: str) -> None:
        self.notes.append(note)

    def log(self) -> None:
        if self.notes:
            listed = "\n  ".join(self.notes[:MAX_LISTED_ISSUES])
            more = len(self.notes) - MAX_LISTED_ISSUES
            logger.warning(
                "%s: %d boxes clipped or dropped:\n  %s%s", self.source, len(self.notes), listed,
                f"\n  ... and {more} more" if more > 0 else "",
            )


def check_box(box, shown: str, where: str, width: int, height: int, clip: bool, issues: BoxIssues):
    """Validate one xyxy box; returns the (clipped) box, or None when it is degenerate and dropped."""
    x0, y0, x1, y1 = box
    problem = None
    if x1 < x0 or y1 < y0:
        problem = "has x_max < x_min or y_max < y_min"
    elif x0 < -BOX_TOLERANCE or y0 < -BOX_TOLERANCE or x1 > width + BOX_TOLERANCE or y1 > height + BOX_TOLERANCE:
        problem = f"lies outside the {width}x{height} image"
    if problem and not clip:
        raise DataError(
            f"{where}: box {shown} {problem}; fix the annotation, or pass clip_boxes=True "
            "(data.clip_boxes=true) to clip boxes to the image and drop degenerate ones"
        )
    clipped = (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height))
    if clipped[2] - clipped[0] <= 0 or clipped[3] - clipped[1] <= 0:
        issues.add(f"{where}: dropped degenerate box {shown}")
        return None
    if problem:
        issues.add(f"{where}: clipped box {shown} to {[round(v, 2) for v in clipped]}")
    return clipped


def coco_ground_truth(records: Sequence[DetectionRecord], class_names: Sequence[str]) -> dict:
    """COCO-format ground truth (original pixels) of ``records``, for :func:`keras_resnet.models.retinanet.evaluation.coco_evaluate`.

    Category ids are the contiguous class ids; ``ignore`` objects become
    ``iscrowd=1``; annotation ids start at 1 (pycocotools needs nonzero ids).
    """
    images, annotations = [], []
    for record in records:
        images.append({"id": int(record.image_id), "width": int(record.width), "height": int(record.height),
                       "file_name": record.file_name})
        for box, cls, ignore in zip(record.boxes.tolist(), record.classes.tolist(), record.ignore.tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({
                "id": len(annotations) + 1, "image_id": int(record.image_id), "category_id": int(cls),
                "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": int(ignore),
            })
    categories = [{"id": index, "name": name} for index, name in enumerate(class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}
