"""Parity of an export with its Keras model: figures, the pass/fail judgement, the parity line.

Float exports (SavedModel, ONNX, TFLite fp32) must match Keras to a relative
max difference (max |diff| / max |Keras output|) of `FLOAT_RELATIVE_TOLERANCE`
(segmenters: of the per-pixel probabilities; detectors: see
`keras_resnet.export.detection`); float16 and dynamic-range TFLite are
reported only; int8 has each task's own criterion. A failed check raises
`ExportParityError` after the artefact and its metadata (with `"passed":
false`) are written.
"""

from __future__ import annotations

import numpy as np

from keras_resnet.models.segmentation.metrics import confusion_to_iou

FLOAT_RELATIVE_TOLERANCE = 1e-4


def difference_figures(reference: np.ndarray, exported: np.ndarray) -> dict:
    """Max abs diff and relative max diff (max |diff| / max |reference|) of two arrays."""
    max_abs_diff = float(np.max(np.abs(np.asarray(exported, np.float64) - reference)))
    scale = float(np.max(np.abs(reference)))
    return {"max_abs_diff": max_abs_diff, "relative_max_diff": max_abs_diff / scale if scale > 0 else max_abs_diff}


def parity_figures(reference: np.ndarray, exported: np.ndarray) -> dict:
    """Max abs diff, relative max diff and top-1 agreement of two probability arrays.

    Args:
        reference: Keras outputs `(N, classes)`.
        exported: the export's outputs on the same images.
    """
    agreement = np.argmax(exported, axis=-1) == np.argmax(reference, axis=-1)
    return {
        **difference_figures(reference, exported),
        "top1_agreement": float(np.mean(agreement)),
        "top1_disagreements": int(np.sum(~agreement)),
        "samples": int(len(reference)),
    }


class SegmentationParity:
    """A segmenter export's parity with Keras, accumulated over chunks of images.

    Compares per-pixel probabilities (max abs / relative max diff) and the
    argmax masks: pixel agreement, and the mIoU of the export's masks taken
    against Keras' masks as the truth (classes absent from both left out).

    Args:
        num_classes: classes of the masks.
    """

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)
        self.max_abs_diff = 0.0
        self.scale = 0.0
        self.logit_scale = None  # the largest |logit| of a logits model (see `softmax_tolerance`)
        self.samples = 0
        self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)

    def update(self, reference, exported, reference_mask, exported_mask) -> None:
        """Adds a chunk: Keras and export probabilities `(n, H, W, classes)` and masks `(n, H, W)`."""
        self.max_abs_diff = max(self.max_abs_diff, float(np.max(np.abs(exported.astype(np.float64) - reference))))
        self.scale = max(self.scale, float(np.max(np.abs(reference))))
        keras_mask = np.asarray(reference_mask, np.int64).ravel()
        export_mask = np.clip(np.asarray(exported_mask, np.int64).ravel(), 0, self.num_classes - 1)
        self.confusion += np.bincount(
            keras_mask * self.num_classes + export_mask, minlength=self.num_classes**2
        ).reshape(self.num_classes, self.num_classes)
        self.samples += len(reference)

    def add_logits(self, logits) -> None:
        """Records the Keras logits' magnitude of a chunk (models whose probabilities the export adds)."""
        self.logit_scale = max(self.logit_scale or 0.0, float(np.max(np.abs(logits))))

    def figures(self) -> dict:
        pixels = int(self.confusion.sum())
        agreeing = int(np.trace(self.confusion))
        _, mask_miou = confusion_to_iou(self.confusion)
        return {
            "max_abs_diff": self.max_abs_diff,
            "relative_max_diff": self.max_abs_diff / self.scale if self.scale > 0 else self.max_abs_diff,
            "pixel_agreement": agreeing / max(pixels, 1),
            "pixel_disagreements": pixels - agreeing,
            "pixels": pixels,
            "mask_miou": mask_miou,
            "samples": self.samples,
            **({} if self.logit_scale is None else {"logit_scale": self.logit_scale,
                                                    "probability_tolerance": softmax_tolerance(self.logit_scale)}),
        }


def segmentation_parity_figures(reference, exported, reference_mask=None, exported_mask=None) -> dict:
    """Max abs diff, relative max diff, pixel agreement and mask mIoU of two segmenters' outputs.

    Args:
        reference: Keras probabilities `(N, H, W, classes)`.
        exported: the export's probabilities on the same images.
        reference_mask, exported_mask: `(N, H, W)` class masks; the argmax
            of the probabilities when None.
    """
    reference, exported = np.asarray(reference), np.asarray(exported)
    parity = SegmentationParity(reference.shape[-1])
    parity.update(
        reference,
        exported,
        np.argmax(reference, axis=-1) if reference_mask is None else reference_mask,
        np.argmax(exported, axis=-1) if exported_mask is None else exported_mask,
    )
    return parity.figures()


def within_tolerance(figures: dict) -> bool:
    """True when figures' relative max diff is within `FLOAT_RELATIVE_TOLERANCE`, or within the
    `probability_tolerance` that the model's logits allow (`softmax_tolerance`)."""
    return figures["relative_max_diff"] <= max(FLOAT_RELATIVE_TOLERANCE, figures.get("probability_tolerance", 0.0))


def softmax_tolerance(logit_scale: float) -> float:
    """How far softmax probabilities may move when the logits they come from move by the float tolerance.

    A softmax is 1/2-Lipschitz from the logits' max norm to each probability
    (`sum_j |dp_i/dz_j| = 2 p_i (1 - p_i) <= 1/2`), so logits that agree to
    `FLOAT_RELATIVE_TOLERANCE` of their largest magnitude give probabilities
    within `FLOAT_RELATIVE_TOLERANCE * logit_scale / 2`. With logits of 1e5 (an
    untrained deep segmenter) float32 rounding alone moves near-tied
    probabilities by tenths: comparing them to 1e-4 would refuse a correct export.
    """
    return FLOAT_RELATIVE_TOLERANCE * float(logit_scale) / 2.0


def float_criterion() -> str:
    return f"relative max diff <= {FLOAT_RELATIVE_TOLERANCE:g}"


def relative_diff_rule(figures: dict) -> tuple[str, bool]:
    """A classifier's or segmenter's float criterion: its outputs and every extra check within tolerance."""
    passed = within_tolerance(figures)
    for check in figures.get("checks", {}).values():
        passed = passed and within_tolerance(check) and check.get("top_class_matches_argmax", True)
    criterion = float_criterion()
    if "probability_tolerance" in figures and figures["probability_tolerance"] > FLOAT_RELATIVE_TOLERANCE:
        criterion = (f"relative max diff <= {figures['probability_tolerance']:.3g} (softmax of logits up to "
                     f"{figures['logit_scale']:.3g} within {FLOAT_RELATIVE_TOLERANCE:g})")
    return criterion, passed


def enforce_parity_gate(figures: dict, quantize: str, float_rule, int8_rule) -> None:
    """Adds `criterion` and `passed` to parity figures (in place).

    Float exports are judged by `float_rule`, int8 by `int8_rule` (both
    `figures -> (criterion, passed)`); float16 and dynamic are reported only.
    """
    if quantize == "none":
        criterion, passed = float_rule(figures)
    elif quantize == "int8":
        criterion, passed = int8_rule(figures)
    else:
        criterion, passed = "reported only", True
    figures["criterion"] = criterion
    figures["passed"] = bool(passed)


def artefact_label(format: str, quantize: str) -> str:
    """"saved_model", "onnx", "tflite fp32", "tflite int8"...: how parity lines name an artefact."""
    return format if format != "tflite" else f"tflite {'fp32' if quantize == 'none' else quantize}"


def difference_text(figures: dict) -> str:
    return f"max|diff| {figures['max_abs_diff']:.3g}, relative {figures['relative_max_diff']:.3g}"


def parity_line(format: str, quantize: str, figures: dict, summary: str, count: int, sample_source: str) -> str:
    """`parity <artefact>: <summary> on <count> <sample source> [<criterion>: ok|FAILED]`."""
    verdict = "ok" if figures["passed"] else "FAILED"
    return (
        f"parity {artefact_label(format, quantize)}: {summary} on {count} {sample_source} "
        f"[{figures['criterion']}: {verdict}]"
    )
