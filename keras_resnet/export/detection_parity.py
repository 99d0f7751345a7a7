"""Parity of a detector's export with Keras: detections matched box by box, agreement, COCO mAP.

Parity (`detection_parity`): Keras decodes its own raw outputs with the same
decoder. Per image, a detection is compared when its score exceeds the
cut `score_threshold + margin` (margin 1e-3), raised to the lowest kept
score + margin for an image with `max_detections` detections and to the
score of the `pre_nms_top_k`-th candidate + margin when that candidate
clears the threshold (ties at those boundaries may legitimately differ).
Float exports must match every Keras detection above the cut with an
export detection of the same class, box within 1 px (max abs coordinate
difference) and score within the margin, and have no unmatched detection
above the cut; raw outputs (raw artefacts, SavedModel `serve_raw`) must
be within 1e-4 relative max difference. All exports report the
agreement: the fraction of Keras detections above the cut matched by class
with IoU >= 0.5 and >= 0.9 (greedy, by score), over all of them and over
the confident ones (score >= 0.5); and, with the ground truth of a
detection recipe's validation split, the COCO mAP of Keras and of the
export. int8 passes when the IoU >= 0.5 agreement (all compared Keras
detections) reaches `int8_min_agreement` (default 0.9); float16 and
dynamic are reported only.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_resnet.export.signatures import DETECTION_NAMES, batches
from keras_resnet.models.retinanet.evaluation import (
    coco_evaluate,
    detections_to_original,
)

SCORE_MARGIN = 1e-3
BOX_TOLERANCE = 1.0
AGREEMENT_IOUS = (0.5, 0.9)
CONFIDENT_SCORE = 0.5


def keras_reference(model, decoder, images: np.ndarray):
    """Keras' raw outputs and decoded detections (the decoder on the raw outputs), in chunks."""
    raw_fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    decode_fn = tf.function(decoder.call, input_signature=[
        tf.TensorSpec([None, *model.output_shape[1:]], tf.float32)
    ])
    raws, decoded = [], []
    for batch, _ in batches(images, None):
        raw = raw_fn(tf.constant(batch))
        raws.append(raw.numpy())
        decoded.append({key: value.numpy() for key, value in decode_fn(raw).items()})
    return np.concatenate(raws), {key: np.concatenate([d[key] for d in decoded]) for key in DETECTION_NAMES}


def _iou(box, boxes):
    """IoU of one xyxy box with `(K, 4)` boxes."""
    x0, y0 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x1, y1 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _valid(outputs, index):
    count = int(outputs["num_detections"][index])
    classes = np.asarray(outputs["classes"][index][:count])
    keep = classes >= 0
    return (
        np.asarray(outputs["boxes"][index][:count], np.float64)[keep],
        np.asarray(outputs["scores"][index][:count], np.float64)[keep],
        classes[keep],
    )


def topk_cuts(raw: np.ndarray, decoder) -> np.ndarray:
    """Per image, the sigmoid score of the `pre_nms_top_k`-th (anchor, class) candidate (0 when all are kept)."""
    logits = np.asarray(raw[..., 4:], np.float64).reshape(len(raw), -1)
    k = decoder.pre_nms_top_k
    if k >= logits.shape[1]:
        return np.zeros(len(raw))
    kth = np.partition(logits, logits.shape[1] - k, axis=1)[:, logits.shape[1] - k]
    return 1.0 / (1.0 + np.exp(-kth))


def detection_parity(reference: dict, exported: dict, decoder, topk_scores=None, margin=SCORE_MARGIN,
                     box_tolerance=BOX_TOLERANCE, confident_score=CONFIDENT_SCORE) -> dict:
    """Compares an export's decoded detections with Keras', image by image (see the module docstring).

    Args:
        reference, exported: decoded dicts (boxes, scores, classes,
            num_detections) over the same images.
        decoder: the `DetectionDecoder` both used (its thresholds).
        topk_scores: per image, the score of the `pre_nms_top_k`-th
            candidate (`topk_cuts` of Keras' raw outputs), or None.
        margin: scores within this of a cut are not compared; also the
            largest score difference of an exact match.
        box_tolerance: largest box coordinate difference (pixels) of an exact match.
        confident_score: score of the "confident" agreement subset.

    Returns:
        Figures: images, keras_detections / export_detections (all valid
        rows), compared / export_compared (Keras' / the export's detections
        above the cuts), matched, unmatched_keras, unmatched_export (an
        export detection above the cut may match a Keras detection just
        under it), max_box_diff / max_score_diff (over exact matches),
        agreement_iou50 / agreement_iou90 (fractions of compared Keras
        detections matched by class at that IoU), confident,
        confident_agreement_iou50 / _iou90, score_margin, box_tolerance.
    """
    images = len(reference["num_detections"])
    totals = dict.fromkeys(("keras_detections", "export_detections", "compared", "export_compared", "matched",
                            "unmatched_keras", "unmatched_export", "confident"), 0)
    agreed = {iou: 0 for iou in AGREEMENT_IOUS}
    confident_agreed = {iou: 0 for iou in AGREEMENT_IOUS}
    max_box, max_score = 0.0, 0.0
    for index in range(images):
        k_boxes, k_scores, k_classes = _valid(reference, index)
        e_boxes, e_scores, e_classes = _valid(exported, index)
        totals["keras_detections"] += len(k_scores)
        totals["export_detections"] += len(e_scores)
        cut = decoder.score_threshold + margin
        if len(k_scores) >= decoder.max_detections or len(e_scores) >= decoder.max_detections:
            lowest = min(k_scores.min() if len(k_scores) else 1.0, e_scores.min() if len(e_scores) else 1.0)
            cut = max(cut, lowest + margin)
        if topk_scores is not None and topk_scores[index] >= decoder.score_threshold:
            cut = max(cut, float(topk_scores[index]) + margin)
        k_strong, e_strong = k_scores > cut, e_scores > cut
        totals["compared"] += int(k_strong.sum())
        totals["export_compared"] += int(e_strong.sum())
        # exact matches: same class, box within tolerance, score within the margin
        used = np.zeros(len(e_scores), bool)
        for i in range(len(k_scores)):
            candidates = np.flatnonzero((e_classes == k_classes[i]) & ~used)
            if not len(candidates):
                if k_strong[i]:
                    totals["unmatched_keras"] += 1
                continue
            distance = np.abs(e_boxes[candidates] - k_boxes[i]).max(axis=1)
            best = candidates[np.argmin(distance)]
            ok = distance.min() <= box_tolerance and abs(e_scores[best] - k_scores[i]) <= margin
            if ok:
                used[best] = True
                if k_strong[i]:
                    totals["matched"] += 1
                    max_box = max(max_box, float(distance.min()))
                    max_score = max(max_score, float(abs(e_scores[best] - k_scores[i])))
            elif k_strong[i]:
                totals["unmatched_keras"] += 1
        totals["unmatched_export"] += int((e_strong & ~used).sum())
        # agreement: greedy by Keras score, same class, IoU threshold
        for iou in AGREEMENT_IOUS:
            taken = np.zeros(len(e_scores), bool)
            for i in np.flatnonzero(k_strong):
                candidates = np.flatnonzero((e_classes == k_classes[i]) & ~taken)
                if not len(candidates):
                    continue
                overlaps = _iou(k_boxes[i], e_boxes[candidates])
                if overlaps.max() >= iou:
                    taken[candidates[np.argmax(overlaps)]] = True
                    agreed[iou] += 1
                    confident_agreed[iou] += int(k_scores[i] >= confident_score)
        totals["confident"] += int((k_strong & (k_scores >= confident_score)).sum())
    figures = {"images": images, **totals, "max_box_diff": max_box, "max_score_diff": max_score}
    for iou in AGREEMENT_IOUS:
        key = f"iou{int(round(100 * iou))}"
        figures[f"agreement_{key}"] = agreed[iou] / totals["compared"] if totals["compared"] else 1.0
        figures[f"confident_agreement_{key}"] = (
            confident_agreed[iou] / totals["confident"] if totals["confident"] else 1.0
        )
    figures.update({"score_margin": margin, "box_tolerance": box_tolerance, "confident_score": confident_score})
    return figures


def coco_map(outputs: dict, info: dict) -> float | None:
    """COCO mAP@[.5:.95] of decoded detections (model-input pixels) against a recipe's validation ground truth."""
    count = len(outputs["num_detections"])
    rows = detections_to_original(outputs["boxes"], outputs["scores"], outputs["classes"],
                                  info["val_images"][:count], outputs["num_detections"])
    return coco_evaluate(info["val_coco"], rows, info["class_names"])["mAP"]
