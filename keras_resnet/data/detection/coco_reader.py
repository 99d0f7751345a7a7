"""COCO instances JSON detection annotations."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from keras_resnet.data.detection.records import (
    BoxIssues,
    DetectionRecord,
    check_box,
    checked_image_size,
)
from keras_resnet.data.scanning import progress
from keras_resnet_settings.errors import DataError

COCO_REQUIRED_KEYS = {
    "images": ("id", "file_name"),
    "annotations": ("image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


def _check_coco_keys(coco, path: Path) -> None:
    if not isinstance(coco, dict):
        raise DataError(f"{path} is not a COCO instances JSON (top level is not an object)")
    for key, item_keys in COCO_REQUIRED_KEYS.items():
        if key not in coco:
            raise DataError(
                f"{path} has no {key!r} key; a COCO instances JSON needs 'images', 'annotations' and 'categories'"
            )
        for index, item in enumerate(coco[key]):
            missing = [k for k in item_keys if k not in item]
            if missing:
                raise DataError(
                    f"{path} {key}[{index}] has no {missing[0]!r} key; every {key[:-1]} needs "
                    f"{', '.join(item_keys)}"
                )


def read_coco(
    annotations: str | os.PathLike,
    images: str | os.PathLike | None = None,
    class_names: Sequence[str] | None = None,
    clip_boxes: bool = False,
) -> tuple[list[DetectionRecord], list[str]]:
    """Read a COCO instances JSON and its image folder.

    Boxes ``[x, y, w, h]`` become ``[x, y, x + w, y + h]``; category ids,
    sorted, map to contiguous class ids ``0..K-1`` (names kept). ``iscrowd``
    annotations are kept with ``ignore=True``; images without annotations
    are kept (images without objects).

    Args:
        annotations: the instances JSON (``annotations/instances_val2017.json``).
        images: folder that ``file_name`` is relative to; default the JSON's folder.
        class_names: if given, the category names (sorted by id) must equal it.
        clip_boxes: as in :func:`read_voc`.

    Returns:
        ``(records, class_names)``.

    Raises:
        DataError: unreadable JSON, a missing key, an annotation whose image
            or category is not listed, a missing or unreadable image file,
            or a bad box (unless ``clip_boxes``); the message names the JSON.

    Example:
    >>> records, names = read_coco("coco/annotations/instances_val2017.json", "coco/val2017")
    """
    path = Path(annotations)
    try:
        coco = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(
            f"cannot read COCO JSON {path} ({error}); point data.train / data.val at the instances JSON"
        ) from None
    _check_coco_keys(coco, path)
    folder = Path(images) if images is not None else path.parent
    if not coco["images"]:
        raise DataError(f"COCO JSON {path} lists no images; it is an empty dataset")
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    names = [str(c["name"]) for c in categories]
    if class_names is not None and list(class_names) != names:
        raise DataError(
            f"{path} categories ({', '.join(names)}) differ from class_names ({', '.join(class_names)}); "
            "use the same categories in train and val, or fix class_names"
        )
    class_of = {c["id"]: index for index, c in enumerate(categories)}
    by_image = {image["id"]: [] for image in coco["images"]}
    for ann in coco["annotations"]:
        if ann["image_id"] not in by_image:
            raise DataError(
                f"{path} annotation {ann.get('id', '?')} is for image_id {ann['image_id']}, which is not in "
                "'images'; add the image or remove the annotation"
            )
        if ann["category_id"] not in class_of:
            raise DataError(
                f"{path} annotation {ann.get('id', '?')} has category_id {ann['category_id']}, which is not in "
                "'categories'; add the category or fix the annotation"
            )
        by_image[ann["image_id"]].append(ann)
    issues = BoxIssues(path)
    records = []
    for image in progress(coco["images"], f"checking {len(coco['images'])} images of {path}"):
        file = folder / image["file_name"]
        width, height = checked_image_size(file, f"{path} image {image['id']}")
        boxes, classes, ignore = [], [], []
        for ann in by_image[image["id"]]:
            try:
                x, y, w, h = (float(v) for v in ann["bbox"])
            except (TypeError, ValueError):
                raise DataError(
                    f"{path} annotation {ann.get('id', '?')} bbox {ann['bbox']!r} is not [x, y, width, height]; "
                    "fix the annotation"
                ) from None
            where = f"{path} annotation {ann.get('id', '?')} (image {image['file_name']})"
            box = check_box((x, y, x + w, y + h), f"bbox [{x:g}, {y:g}, {w:g}, {h:g}]", where, width, height,
                             clip_boxes, issues)
            if box is not None:
                boxes.append(box)
                classes.append(class_of[ann["category_id"]])
                ignore.append(bool(ann.get("iscrowd", 0)))
        records.append(DetectionRecord(str(file), np.reshape(boxes, (-1, 4)), classes, image["id"], height, width,
                                       ignore))
    issues.log()
    return records, names
