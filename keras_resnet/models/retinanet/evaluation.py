"""COCO-style box evaluation with pycocotools, and the map from model input back to image pixels.

Detections are rows ``(image_id, x_min, y_min, x_max, y_max, score,
class_id)`` in original-image pixels; the ground truth is a COCO dict whose
category ids are the contiguous class ids (as built by
:func:`keras_resnet.data.detection.coco_ground_truth`, ``info["val_coco"]``
of :func:`keras_resnet.data.detection.pipeline.build_detection_datasets`).
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Sequence

import numpy as np

# COCOeval.stats indices of the reported summary numbers.
SUMMARY_STATS = {"mAP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "AR100": 8}


def boxes_to_original(boxes: np.ndarray, scale: float, height: int, width: int) -> np.ndarray:
    """Map xyxy boxes from letterboxed model-input pixels back to the original image.

    Args:
        boxes: ``(..., 4)`` xyxy boxes in model-input pixels.
        scale: the image's letterbox factor (``info["val_images"][i]["scale"]``).
        height, width: original image size; boxes are clipped to it.

    Returns:
        float32 ``(..., 4)`` boxes in original-image pixels.
    """
    boxes = np.asarray(boxes, np.float32) / np.float32(scale)
    return np.clip(boxes, 0.0, np.array([width, height, width, height], np.float32))


def detections_to_original(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    images: Sequence[dict],
    num_detections: np.ndarray | None = None,
) -> np.ndarray:
    """Turn a batch of decoded detections into evaluation rows in original pixels.

    Args:
        boxes: ``(B, N, 4)`` xyxy boxes in model-input pixels.
        scores: ``(B, N)`` confidences.
        classes: ``(B, N)`` class ids; rows with a negative class are padding.
        images: ``B`` dicts with ``image_id``, ``scale``, ``height``, ``width``
            (the matching slice of ``info["val_images"]``).
        num_detections: optional ``(B,)`` count of valid rows per image.

    Returns:
        float64 ``(K, 7)`` rows ``(image_id, x_min, y_min, x_max, y_max, score, class_id)``.

    Example:
    >>> out = decoder(model(images))  # DetectionDecoder: boxes, scores, classes, num_detections
    >>> rows = detections_to_original(out["boxes"], out["scores"], out["classes"],
    ...                               info["val_images"][:len(images)], out["num_detections"])
    """
    boxes, scores, classes = np.asarray(boxes), np.asarray(scores), np.asarray(classes)
    rows = []
    for index, image in enumerate(images):
        valid = classes[index] >= 0
        if num_detections is not None:
            valid &= np.arange(classes.shape[1]) < int(np.asarray(num_detections)[index])
        original = boxes_to_original(boxes[index][valid], image["scale"], image["height"], image["width"])
        block = np.empty((int(valid.sum()), 7))
        block[:, 0] = image["image_id"]
        block[:, 1:5] = original
        block[:, 5] = scores[index][valid]
        block[:, 6] = classes[index][valid]
        rows.append(block)
    return np.concatenate(rows) if rows else np.zeros((0, 7))


def _coco_from_dict(ground_truth: dict):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = copy.deepcopy(ground_truth)
    coco.dataset.setdefault("info", {})
    coco.createIndex()
    return coco


def coco_evaluate(ground_truth: dict, detections, class_names: Sequence[str]) -> dict:
    """COCO box AP of ``detections`` against ``ground_truth`` (pycocotools ``COCOeval``).

    Ground-truth objects with ``iscrowd=1`` (VOC difficult, COCO crowd) are
    ignored: detections on them count neither as true nor false positives.
    pycocotools' printing is captured, not shown.

    Args:
        ground_truth: COCO dict (images, annotations, categories) in original
            pixels with category ids ``0..K-1``.
        detections: ``(K, 7)`` array-like of ``(image_id, x_min, y_min,
            x_max, y_max, score, class_id)`` rows in original pixels.
        class_names: names of class ids ``0..K-1``.

    Returns:
        ``{"mAP": AP@[.5:.95], "AP50", "AP75", "APs", "APm", "APl", "AR100",
        "per_class": {name: AP@[.5:.95]}}`` as floats. A number that is not
        defined (no ground-truth object of that class, or of that size) is
        ``None``, never NaN. With no detections every defined number is 0.0.

    Raises:
        ValueError: a detection row is not 7 numbers, or names an image id
            that is not in the ground truth.

    Example:
    >>> metrics = coco_evaluate(info["val_coco"], rows, info["class_names"])
    >>> metrics["mAP"], metrics["per_class"]["Bag"]
    """
    from pycocotools.cocoeval import COCOeval

    rows = np.asarray(detections, np.float64).reshape(-1, 7) if len(detections) else np.zeros((0, 7))
    known = {image["id"] for image in ground_truth["images"]}
    unknown = sorted({int(i) for i in rows[:, 0]} - known)
    if unknown:
        raise ValueError(f"detections name image ids {unknown[:5]} that are not in the ground truth")
    category_ids = [category["id"] for category in ground_truth["categories"]]
    present = {ann["category_id"] for ann in ground_truth["annotations"] if not ann.get("iscrowd", 0)}
    if not len(rows):
        metrics = {key: (0.0 if present else None) for key in SUMMARY_STATS}
        # pycocotools' area ranges (both ends inclusive).
        for key, (low, high) in {"APs": (0, 32**2), "APm": (32**2, 96**2), "APl": (96**2, 1e10)}.items():
            sized = [a for a in ground_truth["annotations"]
                     if not a.get("iscrowd", 0) and low <= a.get("area", a["bbox"][2] * a["bbox"][3]) <= high]
            metrics[key] = 0.0 if sized else None
        metrics["per_class"] = {name: (0.0 if cid in present else None) for cid, name in zip(category_ids, class_names)}
        return metrics
    results = [
        {"image_id": int(r[0]), "category_id": int(r[6]), "bbox": [r[1], r[2], r[3] - r[1], r[4] - r[2]],
         "score": float(r[5])}
        for r in rows
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = _coco_from_dict(ground_truth)
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    metrics = {key: (float(stats[i]) if stats[i] >= 0 else None) for key, i in SUMMARY_STATS.items()}
    # precision: [IoU thresholds, recall points, categories, area ranges, max dets]; area "all", 100 dets.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    per_class = {}
    for column, name in enumerate(class_names[: len(evaluator.params.catIds)]):
        values = precision[:, :, column]
        values = values[values > -1]
        per_class[name] = float(values.mean()) if values.size else None
    metrics["per_class"] = per_class
    return metrics
