"""Export of `RetinaNetDetector` models: SavedModel, TFLite and ONNX with NMS inside, or raw outputs.

`keras_resnet.export.api.export_model` hands detectors (a detection run dir, a
`RetinaNetDetector` `.keras` file or model) to `export_detector`. The
detector's decoder settings (score/IoU thresholds, `max_detections`,
`pre_nms_top_k`) come from the run's `run.json` ("decoder"), overridden by
`decoder_args`. Every artefact takes float32 raw pixels 0..255, NHWC, at the
model size: images letterboxed as in validation (scaled by `s = min(H / h,
W / w)` keeping the aspect ratio, bilinear with antialiasing, rounded to
uint8, padded bottom/right with 0); boxes of the model input map back to
the original image by `box / s` (clipped to it). `letterbox_images` does it
for a batch; the SavedModel's `serving_default` does it inside.

Two output layouts (`detection_outputs`):

* "decoded" (default): NMS inside. Outputs "boxes" `(B, K, 4)` float32
  xyxy pixels of the model input, "scores" `(B, K)` float32 sigmoid scores,
  "classes" `(B, K)` int32 (-1 for padding rows, whose boxes and scores are
  0) and "num_detections" `(B,)` int32, sorted by score, `K =
  max_detections`. The graph is the model followed by `DetectionDecoder`:
  top-k (anchor, class) candidates, box decoding, clipping, class-wise NMS
  by one NON_MAX_SUPPRESSION_V5 over class-offset boxes. All of it is TFLite
  builtins (no Flex ops) and plain ONNX (NonMaxSuppression). A static batch
  decodes image by image in an unrolled graph; a dynamic batch loops
  (TFLite WHILE, ONNX Loop).
* "raw": the model's output "raw" `(B, N, 4 + C)`: per anchor the box deltas
  `(dx, dy, dw, dh)` then C class logits. Decode with
  `DetectionDecoder.from_config(metadata["detection"]["decoder"])` (the
  metadata JSON holds its config: anchors, variance, thresholds), which is
  what `load_exported_model` does for raw artefacts.

The SavedModel always has both: `serving_default` (uint8 images `[N, h, w,
C]` of any size, letterboxed inside; returns boxes in the pixels of the
images given, with scores, classes, num_detections), `serve_float`
(float32 at the model size -> decoded, boxes in model-input pixels) and
`serve_raw` (float32 at the model size -> "raw").

Quantized TFLite (float16, dynamic, int8) quantizes the network only: the
backbone, FPN and heads (outputs "box_deltas" and "class_logits") are
converted with the quantization, the tail (concatenation, and for decoded
outputs the decoder and NMS) is converted in float32 on its own, and the
two flatbuffers are joined into one model (`graft_tflite`): the tail's
inputs are the network's (dequantized) outputs. Letting the converter
quantize the decoder puts the decoded boxes (and the class offsets of the
NMS trick) into int8, a step of about 1 px per 256 px of image and of
several pixels once offset, which breaks NMS; TFLite's `denylisted_nodes`
did not keep the fused decoder ops in float. int8 is full-integer
(`TFLITE_BUILTINS_INT8`) over the network with float32 input and outputs.

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

import datetime
import json
import shutil
from pathlib import Path

import numpy as np

from keras_resnet.data.images import LETTERBOX_TEXT, letterbox_images
from keras_resnet.export import api as base

keras = base.keras
tf = base.tf

DETECTION = "detection"
DETECTION_OUTPUTS = ("decoded", "raw")
RAW_NAME = "raw"
DECODED_NAMES = ("boxes", "scores", "classes", "num_detections")
HEAD_NAMES = ("box_deltas", "class_logits")
DECODER_ARGS = ("score_threshold", "iou_threshold", "max_detections", "pre_nms_top_k")
SCORE_MARGIN = 1e-3
BOX_TOLERANCE = 1.0
AGREEMENT_IOUS = (0.5, 0.9)
CONFIDENT_SCORE = 0.5
DEFAULT_DETECTION_INT8_MIN_AGREEMENT = 0.9



# --------------------------------------------------------------------------- model helpers


def is_detector(model) -> bool:
    """True for a `RetinaNetDetector` (anything with `make_decoder` and an anchor generator)."""
    return hasattr(model, "make_decoder") and hasattr(model, "anchor_generator")


def detector_at_size(model, input_size):
    """The detector rebuilt at another input size with the same weights (anchors follow the size)."""
    if input_size is None:
        return model
    input_size = tuple(int(v) for v in input_size)
    if len(input_size) != 2 or min(input_size) < 1:
        raise ValueError(f"input_size must be two positive ints (H W), got {input_size}")
    height, width, channels = model.input_shape[1:]
    if (height, width) == input_size:
        return model
    config = model.get_config()
    config["backbone"]["config"]["input_shape"] = [*input_size, channels]
    resized = type(model).from_config(config)
    resized.set_weights(model.get_weights())
    return resized


def make_decoder(model, run_info: dict | None = None, decoder_args: dict | None = None):
    """The model's `DetectionDecoder` with the run's decoder settings, overridden by `decoder_args`."""
    settings = dict((run_info or {}).get("decoder") or {})
    for key, value in (decoder_args or {}).items():
        if key not in DECODER_ARGS:
            raise ValueError(f"unknown decoder argument {key!r}; allowed: {', '.join(DECODER_ARGS)}")
        if value is not None:
            settings[key] = value
    return model.make_decoder(**{k: v for k, v in settings.items() if k in DECODER_ARGS})


def decoder_from_config(config: dict):
    """A `DetectionDecoder` from the "decoder" config of an export's metadata."""
    from keras_resnet.models.retinanet.decoder import DetectionDecoder

    config = {key: value for key, value in config.items() if key not in ("name", "trainable", "dtype")}
    return DetectionDecoder(**config)


def _head_model(model):
    """images -> {"box_deltas": (B, N, 4), "class_logits": (B, N, C)}: the detector before its last concat."""
    outputs = {name: model.get_layer(name).output for name in HEAD_NAMES}
    return keras.Model(model.input, outputs, name=f"{model.name}_heads")


def _image_spec(model, batch_size):
    return tf.TensorSpec([batch_size, *model.input_shape[1:]], tf.float32, name=base.INPUT_NAME)


def outputs_fn(model, decoder, detection_outputs: str):
    """images -> the export's outputs: the decoded dict or {"raw": ...}."""

    def decoded(images):
        return decoder(model(images, training=False))

    def raw(images):
        return {RAW_NAME: model(images, training=False)}

    return decoded if detection_outputs == "decoded" else raw


# --------------------------------------------------------------------------- SavedModel


def write_saved_model(model, decoder, directory: Path, batch_size) -> None:
    """SavedModel with `serving_default` (uint8, any size, letterbox inside), `serve_float`, `serve_raw`."""
    height, width, channels = model.input_shape[1:]
    decoded = outputs_fn(model, decoder, "decoded")

    def serve_uint8(images):
        letterboxed, scale = letterbox_images(images, height, width)
        outputs = decoded(letterboxed)
        size = tf.cast(tf.shape(images)[1:3], tf.float32)
        limits = tf.stack([size[1], size[0], size[1], size[0]])
        boxes = tf.minimum(outputs["boxes"] / scale, limits)
        return {**outputs, "boxes": boxes}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        serve_uint8,
        input_signature=[tf.TensorSpec([None, None, None, channels], tf.uint8, name=base.INPUT_NAME)],
    )
    archive.add_endpoint("serve_float", decoded, input_signature=[_image_spec(model, batch_size)])
    archive.add_endpoint(
        "serve_raw", outputs_fn(model, decoder, "raw"), input_signature=[_image_spec(model, batch_size)]
    )
    archive.write_out(str(directory), verbose=False)


# --------------------------------------------------------------------------- TFLite


def convert_tflite(model, decoder, detection_outputs, batch_size, quantize, calibration_images=None) -> bytes:
    """The detector as TFLite builtins: the whole graph in float32, or a quantized network + float tail.

    See the module docstring. With a dynamic batch the decoder loops
    (`WHILE` subgraphs), which `graft_tflite` carries over.
    """
    if quantize == "none":
        return base.tflite_bytes(
            outputs_fn(model, decoder, detection_outputs), [_image_spec(model, batch_size)], track=model
        )
    heads = _head_model(model)
    network = base.tflite_bytes(
        lambda images: heads(images, training=False), [_image_spec(model, batch_size)], track=heads,
        quantize=quantize, calibration_images=calibration_images, batch_size=batch_size,
    )
    num_anchors, num_classes = int(model.output_shape[1]), int(model.num_classes)

    def tail(box_deltas, class_logits):
        raw = tf.concat([box_deltas, class_logits], axis=-1)
        return decoder(raw) if detection_outputs == "decoded" else {RAW_NAME: raw}

    tail_bytes = base.tflite_bytes(
        tail,
        [
            tf.TensorSpec([batch_size, num_anchors, 4], tf.float32, name=HEAD_NAMES[0]),
            tf.TensorSpec([batch_size, num_anchors, num_classes], tf.float32, name=HEAD_NAMES[1]),
        ],
    )
    return graft_tflite(network, tail_bytes)


def _schema():
    from tensorflow.lite.python import schema_py_generated as schema

    return schema


def _read_tflite(model_bytes):
    schema = _schema()
    return schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(model_bytes, 0))


def graft_tflite(first: bytes, second: bytes) -> bytes:
    """One TFLite model: `first`, then `second` fed by `first`'s outputs of the same signature names.

    Both models have one signature. `second`'s inputs must all be outputs of
    `first` (matched by signature name); the result takes `first`'s inputs
    and returns `second`'s outputs. Buffers, operator codes, tensors and
    operators of `second` are appended to `first` (its control-flow
    subgraphs too, with WHILE / IF subgraph indices moved).
    """
    import flatbuffers

    schema = _schema()
    a, b = _read_tflite(first), _read_tflite(second)
    if len(a.signatureDefs or []) != 1 or len(b.signatureDefs or []) != 1:
        raise ValueError("graft_tflite needs models with exactly one signature each")
    main_a, main_b = a.subgraphs[0], b.subgraphs[0]
    signature_a, signature_b = a.signatureDefs[0], b.signatureDefs[0]
    a_outputs = {entry.name.decode(): entry.tensorIndex for entry in signature_a.outputs}
    b_inputs = {entry.name.decode(): entry.tensorIndex for entry in signature_b.inputs}
    missing = sorted(set(b_inputs) - set(a_outputs))
    if missing:
        raise ValueError(f"graft_tflite: inputs {missing} of the second model are not outputs of the first")

    buffer_offset = len(a.buffers)
    a.buffers.extend(b.buffers)

    def code_key(code):
        return code.builtinCode, code.deprecatedBuiltinCode, code.customCode, code.version

    codes = {code_key(code): index for index, code in enumerate(a.operatorCodes)}
    code_map = {}
    for index, code in enumerate(b.operatorCodes):
        code_map[index] = codes.setdefault(code_key(code), len(a.operatorCodes))
        if code_map[index] == len(a.operatorCodes):
            a.operatorCodes.append(code)
    subgraph_offset = len(a.subgraphs) - 1  # b's subgraph k >= 1 becomes a's subgraph k + offset

    def move_operator(operator, tensor_map):
        operator.opcodeIndex = code_map[operator.opcodeIndex]
        operator.inputs = [tensor_map[i] if i >= 0 else i for i in operator.inputs]
        operator.outputs = [tensor_map[i] for i in operator.outputs]
        if operator.intermediates is not None and len(operator.intermediates):
            operator.intermediates = [tensor_map[i] for i in operator.intermediates]
        options = operator.builtinOptions
        if isinstance(options, schema.WhileOptionsT):
            options.condSubgraphIndex += subgraph_offset
            options.bodySubgraphIndex += subgraph_offset
        elif isinstance(options, schema.IfOptionsT):
            options.thenSubgraphIndex += subgraph_offset
            options.elseSubgraphIndex += subgraph_offset
        elif isinstance(options, schema.CallOnceOptionsT):
            options.initSubgraphIndex += subgraph_offset
        elif options is not None and any("subgraph" in name.lower() for name in vars(options)):
            raise ValueError(f"graft_tflite: unsupported control-flow options {type(options).__name__}")

    def move_tensors(subgraph, tensors, tensor_map):
        for index, tensor in enumerate(tensors):
            if index in tensor_map:
                continue
            tensor.buffer = tensor.buffer + buffer_offset if tensor.buffer else 0
            tensor_map[index] = len(subgraph.tensors)
            subgraph.tensors.append(tensor)

    tensor_map = {b_inputs[name]: a_outputs[name] for name in b_inputs}
    move_tensors(main_a, main_b.tensors, tensor_map)
    for operator in main_b.operators:
        move_operator(operator, tensor_map)
        main_a.operators.append(operator)
    for subgraph in b.subgraphs[1:]:
        identity = {}
        tensors, subgraph.tensors = subgraph.tensors, []
        move_tensors(subgraph, tensors, identity)
        for operator in subgraph.operators:
            move_operator(operator, identity)
        a.subgraphs.append(subgraph)
    for entry in signature_b.outputs:
        entry.tensorIndex = tensor_map[entry.tensorIndex]
    signature_a.outputs = list(signature_b.outputs)
    main_a.outputs = [entry.tensorIndex for entry in signature_a.outputs]
    builder = flatbuffers.Builder(1024)
    builder.Finish(a.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def tflite_ops(model_bytes: bytes) -> list[str]:
    """Sorted operator names of a TFLite model (builtins by name; "CUSTOM:<code>" for custom/Flex ops)."""
    schema = _schema()
    model = _read_tflite(model_bytes)
    names = {value: key for key, value in vars(schema.BuiltinOperator).items() if not key.startswith("_")}
    ops = set()
    for subgraph in model.subgraphs:
        for operator in subgraph.operators:
            code = model.operatorCodes[operator.opcodeIndex]
            builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
            if builtin == schema.BuiltinOperator.CUSTOM:
                ops.add(f"CUSTOM:{(code.customCode or b'').decode()}")
            else:
                ops.add(names.get(builtin, str(builtin)))
    return sorted(ops)


# --------------------------------------------------------------------------- parity


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


def judge(figures: dict, format: str, quantize: str, int8_min_agreement: float) -> None:
    """Adds `criterion` and `passed` to detection parity figures (in place)."""
    raw = figures.get("raw")
    if quantize == "none":
        criterion = (
            f"every Keras detection above score_threshold + {figures['score_margin']:g} matched (same class, box "
            f"within {figures['box_tolerance']:g} px, score within {figures['score_margin']:g}), no extra detection"
        )
        passed = figures["unmatched_keras"] == 0 and figures["unmatched_export"] == 0
        if raw is not None:
            criterion += f"; raw outputs relative max diff <= {base.FLOAT_RELATIVE_TOLERANCE:g}"
            passed = passed and raw["relative_max_diff"] <= base.FLOAT_RELATIVE_TOLERANCE
        for check in figures.get("checks", {}).values():
            check_passed = check["unmatched_keras"] == 0 and check["unmatched_export"] == 0
            if "relative_max_diff" in check:
                check_passed = check_passed and check["relative_max_diff"] <= base.FLOAT_RELATIVE_TOLERANCE
            passed = passed and check_passed
    elif quantize == "int8":
        criterion = (
            f"Keras detections above score_threshold + {figures['score_margin']:g} matched by class at IoU >= 0.5: "
            f">= {int8_min_agreement:g}"
        )
        passed = figures["agreement_iou50"] >= int8_min_agreement
    else:
        criterion, passed = "reported only", True
    figures["criterion"] = criterion
    figures["passed"] = bool(passed)


def raw_figures(reference: np.ndarray, exported: np.ndarray) -> dict:
    max_abs_diff = float(np.max(np.abs(np.asarray(exported, np.float64) - reference)))
    scale = float(np.max(np.abs(reference)))
    return {"max_abs_diff": max_abs_diff, "relative_max_diff": max_abs_diff / scale if scale > 0 else max_abs_diff}


def coco_map(outputs: dict, info: dict) -> float | None:
    """COCO mAP@[.5:.95] of decoded detections (model-input pixels) against a recipe's validation ground truth."""
    from keras_resnet.models.retinanet.evaluation import (
        coco_evaluate,
        detections_to_original,
    )

    count = len(outputs["num_detections"])
    rows = detections_to_original(outputs["boxes"], outputs["scores"], outputs["classes"],
                                  info["val_images"][:count], outputs["num_detections"])
    return coco_evaluate(info["val_coco"], rows, info["class_names"])["mAP"]


# --------------------------------------------------------------------------- sample images


def recipe_samples(recipe_path: str, input_shape, split: str, count: int):
    """Up to `count` un-augmented letterboxed images of a detection recipe's split, and the data info.

    The validation split is the recipe's own (a mosaic recipe's validation
    canvases; a seeded subset when larger); the training split is
    un-augmented (a mosaic's is generated at `count` canvases).

    Returns:
        `(float32 images (n, H, W, C), info)` with `info` from
        `build_detection_datasets` (its `val_images` / `val_coco` describe
        the validation images returned, in order).
    """
    from keras_resnet.config import load_config
    from keras_resnet.data.detection.pipeline import build_detection_datasets

    cfg = load_config(recipe_path)
    data = cfg["data"]
    mosaic_args = {
        "train_size": count if split == "train" else 1,
        "val_size": data.get("mosaic_val_size") or 500,
    }
    train, val, info = build_detection_datasets(
        data["source"],
        data["train"],
        data["val"],
        input_shape=tuple(int(v) for v in input_shape),
        batch_size=1,
        max_boxes=data.get("max_boxes", 100),
        augment={"horizontal_flip": False, "scale_range": (1.0, 1.0)},
        class_names=data.get("class_names"),
        seed=base.SAMPLE_SEED,
        shuffle_buffer=1,
        cache=False,
        limit_train=count if split == "train" else 1,
        limit_val=count,
        clip_boxes=data.get("clip_boxes", False),
        train_images=data.get("train_images"),
        val_images=data.get("val_images"),
        mosaic_args=mosaic_args,
    )
    dataset = train if split == "train" else val
    images = np.concatenate([batch.numpy() for batch, _ in dataset.take(count)]).astype(np.float32)
    return images, info


def folder_samples(folder: str, input_shape, count: int) -> np.ndarray:
    """Up to `count` letterboxed images of a folder (recursive; a seeded sample when there are more)."""
    from keras_resnet.data.images import find_image_files, read_image

    files = find_image_files(folder)
    if len(files) > count:
        keep = np.sort(np.random.default_rng(base.SAMPLE_SEED).choice(len(files), count, replace=False))
        files = [files[i] for i in keep]
    height, width, channels = input_shape
    return np.concatenate(
        [letterbox_images(read_image(path, channels)[None], height, width)[0].numpy() for path in files]
    )


def _is_detection_recipe(path) -> bool:
    from keras_resnet.config import load_config

    try:
        return load_config(str(path))["task"] == DETECTION
    except Exception:  # not a readable recipe: the caller reports it
        return False


def calibration_samples(calibration, source, input_shape, count: int):
    """`(images, description)` calibrating int8: a recipe's training split or a folder (letterboxed)."""
    if calibration is None:
        if source.recipe_path is None:
            raise ValueError(
                "int8 quantization needs calibration images: pass calibration= a recipe YAML or an image folder"
            )
        calibration = source.recipe_path
    if not Path(calibration).exists():
        raise ValueError(f"calibration path {calibration} does not exist; pass a recipe YAML or an image folder")
    if base._is_recipe(calibration):
        if not _is_detection_recipe(calibration):
            raise ValueError(f"calibration recipe {calibration} is not a detection recipe")
        images, _ = recipe_samples(str(calibration), input_shape, "train", count)
        return images, f"training images of {calibration} (letterboxed, un-augmented)"
    if not Path(calibration).is_dir():
        raise ValueError(f"calibration {calibration} is neither a recipe YAML nor an image folder")
    return folder_samples(str(calibration), input_shape, count), f"letterboxed images in {calibration}"


def parity_samples(calibration, source, input_shape, count: int):
    """`(images, description, info or None)` compared with Keras; info holds ground truth for mAP."""
    from keras_resnet.config import ConfigError
    from keras_resnet.data.classification import DataError

    recipe = calibration if base._is_recipe(calibration) else None
    if recipe is not None:
        if not _is_detection_recipe(recipe):
            raise ValueError(f"calibration recipe {recipe} is not a detection recipe")
        images, info = recipe_samples(str(recipe), input_shape, "val", count)
        return images, f"validation images of {recipe}", info
    if calibration is not None:
        return folder_samples(str(calibration), input_shape, count), f"letterboxed images in {calibration}", None
    random_text = f"random uniform 0..255 images (seed {base.SAMPLE_SEED})"
    if source.recipe_path is not None:
        try:
            images, info = recipe_samples(source.recipe_path, input_shape, "val", count)
            return images, f"validation images of {source.recipe_path}", info
        except (ConfigError, DataError, KeyError) as error:
            return base._random_images(input_shape, count), f"{random_text}; run recipe data unavailable: {error}", None
    return base._random_images(input_shape, count), random_text, None


# --------------------------------------------------------------------------- Keras reference


def keras_reference(model, decoder, images: np.ndarray):
    """Keras' raw outputs and decoded detections (the decoder on the raw outputs), in chunks."""
    raw_fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    decode_fn = tf.function(decoder.call, input_signature=[
        tf.TensorSpec([None, *model.output_shape[1:]], tf.float32)
    ])
    raws, decoded = [], []
    for batch, _ in base._batches(images, None):
        raw = raw_fn(tf.constant(batch))
        raws.append(raw.numpy())
        decoded.append({key: value.numpy() for key, value in decode_fn(raw).items()})
    return np.concatenate(raws), {key: np.concatenate([d[key] for d in decoded]) for key in DECODED_NAMES}


def _saved_model_checks(model, decoder, path: Path, images, reference, raw_reference, topk) -> dict:
    """serving_default (uint8, rounded images at the model size) and serve_raw figures."""
    loaded = tf.saved_model.load(str(path))
    pixels = np.clip(np.round(images), 0, 255)
    uint8_raw, uint8_reference = keras_reference(model, decoder, pixels.astype(np.float32))
    serve = loaded.signatures["serving_default"]
    chunks = [serve(**{base.INPUT_NAME: tf.constant(batch.astype(np.uint8))}) for batch, _ in
              base._batches(pixels, None)]
    outputs = {key: np.concatenate([c[key].numpy() for c in chunks]) for key in DECODED_NAMES}
    serving = detection_parity(uint8_reference, outputs, decoder, topk_cuts(uint8_raw, decoder))
    serve_raw = loaded.signatures["serve_raw"]
    fixed = serve_raw.structured_input_signature[1][base.INPUT_NAME].shape[0]
    raw = np.concatenate([
        serve_raw(**{base.INPUT_NAME: tf.constant(batch)})[RAW_NAME].numpy()[:count]
        for batch, count in base._batches(images, fixed)
    ])
    return {"serving_default": serving, "serve_raw": raw_figures(raw_reference, raw)}


# --------------------------------------------------------------------------- export


def _parity_line(format, quantize, figures, sample_source) -> str:
    label = format if format != "tflite" else f"tflite {'fp32' if quantize == 'none' else quantize}"
    verdict = "ok" if figures["passed"] else "FAILED"
    text = (
        f"parity {label}: {figures['matched']}/{figures['compared']} Keras detections matched exactly "
        f"(max box diff {figures['max_box_diff']:.3g} px, score {figures['max_score_diff']:.3g}), "
        f"{figures['unmatched_export']} extra; agreement IoU>=0.5 {100 * figures['agreement_iou50']:.1f}%, "
        f"IoU>=0.9 {100 * figures['agreement_iou90']:.1f}% "
        f"(confident: {100 * figures['confident_agreement_iou50']:.1f}% / "
        f"{100 * figures['confident_agreement_iou90']:.1f}% of {figures['confident']})"
    )
    if "raw" in figures:
        text += f"; raw relative diff {figures['raw']['relative_max_diff']:.3g}"
    if figures.get("keras_mAP") is not None:
        text += f"; mAP Keras {figures['keras_mAP']:.4f} export {figures['export_mAP']:.4f}"
    return f"{text} on {figures['images']} {sample_source} [{figures['criterion']}: {verdict}]"


def _outputs_metadata(decoder, detection_outputs, batch, num_anchors, num_classes) -> list[dict]:
    if detection_outputs == "raw":
        return [{
            "name": RAW_NAME, "dtype": "float32", "shape": [batch, num_anchors, 4 + num_classes],
            "values": "per anchor: box deltas (dx, dy, dw, dh) then class logits; decode with the 'decoder' config",
        }]
    k = decoder.max_detections
    return [
        {"name": "boxes", "dtype": "float32", "shape": [batch, k, 4],
         "values": "xyxy (x_min, y_min, x_max, y_max) pixels of the model input, clipped; 0 for padding rows"},
        {"name": "scores", "dtype": "float32", "shape": [batch, k], "values": "sigmoid scores, sorted descending"},
        {"name": "classes", "dtype": "int32", "shape": [batch, k], "values": "class index; -1 for padding rows"},
        {"name": "num_detections", "dtype": "int32", "shape": [batch], "values": "valid rows per image"},
    ]


def export_detector(
    source,
    format: str,
    quantize: str,
    calibration,
    input_size,
    fixed_batch,
    output,
    parity_samples_count: int,
    calibration_samples_count: int,
    int8_min_agreement: float | None,
    name: str | None,
    detection_outputs: str = "decoded",
    decoder_args: dict | None = None,
) -> dict:
    """`export_model` for a `RetinaNetDetector` source (see the module docstring); same return dict."""
    if detection_outputs not in DETECTION_OUTPUTS:
        raise ValueError(
            f"detection_outputs={detection_outputs!r} is not supported; allowed: {', '.join(DETECTION_OUTPUTS)}"
        )
    if int8_min_agreement is None:
        int8_min_agreement = DEFAULT_DETECTION_INT8_MIN_AGREEMENT
    with base._step("loading the Keras detector"):
        policies = {layer.dtype_policy.name for layer in base._walk_layers(source.model)}
        model = detector_at_size(base.as_float32(source.model), input_size)
        decoder = make_decoder(model, source.run_info, decoder_args)
    input_shape = tuple(model.input_shape[1:])
    name = name or source.name
    output_dir = Path(output) if output is not None else Path("saved_models") / name
    path = base._artefact_path(output_dir, name, format, quantize)
    if format in ("tflite", "onnx") and detection_outputs == "raw":
        path = path.with_name(f"{path.stem}_raw{path.suffix}")

    calibration_text = None
    if quantize == "int8":
        with base._step("loading calibration images"):
            calibration_images, calibration_text = calibration_samples(
                calibration, source, input_shape, int(calibration_samples_count)
            )
    with base._step("loading parity images"):
        images, sample_source, info = parity_samples(calibration, source, input_shape, int(parity_samples_count))
    with base._step("running the Keras detector"):
        raw_reference, reference = keras_reference(model, decoder, images)
        topk = topk_cuts(raw_reference, decoder)

    output_dir.mkdir(parents=True, exist_ok=True)
    label = format if quantize == "none" else f"{format} {quantize}"
    ops = None
    with base._step(f"converting to {label}: {path}"):
        if format == "saved_model":
            if path.exists():
                if not (path / "saved_model.pb").is_file():
                    raise ValueError(f"{path} exists and is not a SavedModel; choose another output folder")
                shutil.rmtree(path)
            write_saved_model(model, decoder, path, fixed_batch)
        elif format == "tflite":
            calibration_input = calibration_images if quantize == "int8" else None
            model_bytes = convert_tflite(model, decoder, detection_outputs, fixed_batch, quantize, calibration_input)
            ops = tflite_ops(model_bytes)
            custom = [op for op in ops if op.startswith("CUSTOM") or op.startswith("FLEX")]
            if custom:
                raise ValueError(
                    f"the TFLite detector needs non-builtin ops {custom}; it would not run on stock TFLite"
                )
            path.write_bytes(model_bytes)
        else:
            base._convert_onnx_fn(
                outputs_fn(model, decoder, detection_outputs), _image_spec(model, fixed_batch),
                DECODED_NAMES if detection_outputs == "decoded" else (RAW_NAME,), path, fixed_batch,
            )

    metadata = _metadata(source, model, decoder, format, quantize, path, input_shape, fixed_batch,
                         detection_outputs if format != "saved_model" else "decoded", policies)
    metadata_path = Path(str(path) + base.METADATA_SUFFIX)
    metadata_path.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")  # load_exported_model reads it

    with base._step(f"checking {label} against Keras"):
        exported = base.load_exported_model(path)
        outputs = exported.predict_outputs(images)
        figures = detection_parity(reference, outputs, decoder, topk)
        if RAW_NAME in outputs:
            figures["raw"] = raw_figures(raw_reference, outputs[RAW_NAME])
        if format == "saved_model":
            figures["checks"] = _saved_model_checks(model, decoder, path, images, reference, raw_reference, topk)
            figures["raw"] = figures["checks"].pop("serve_raw")
        if info is not None:
            figures["keras_mAP"] = coco_map(reference, info)
            figures["export_mAP"] = coco_map(outputs, info)
            figures["mAP_diff"] = figures["export_mAP"] - figures["keras_mAP"]
        figures["sample_source"] = sample_source
        judge(figures, format, quantize, int8_min_agreement)

    metadata["parity"] = figures
    if ops is not None:
        metadata["tflite_ops"] = ops
    if quantize == "int8":
        metadata["int8"] = {
            "ops": "network (backbone, FPN, heads) full-integer TFLITE_BUILTINS_INT8; "
            "concatenation, decoder and NMS float32 (grafted)",
            "io": "float32 input and outputs; quantize/dequantize ops inside the model",
            "calibration": calibration_text,
            "calibration_samples": int(len(calibration_images)),
            "min_agreement": int8_min_agreement,
        }
    metadata_path.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    print(_parity_line(format, quantize, figures, sample_source), flush=True)
    if not figures["passed"]:
        raise base.ExportParityError(
            f"{path} fails its parity check against Keras ({figures['criterion']}): "
            f"{figures['unmatched_keras']} Keras detections unmatched, {figures['unmatched_export']} extra, "
            f"agreement at IoU >= 0.5 {figures['agreement_iou50']:.3f}"
            + (f", raw relative diff {figures['raw']['relative_max_diff']:.3g}" if "raw" in figures else "")
        )
    return {
        "format": format,
        "quantize": quantize,
        "task": DETECTION,
        "detection_outputs": metadata["detection_outputs"],
        "path": str(path),
        "metadata_path": str(metadata_path),
        "input_shape": list(input_shape),
        "batch_size": metadata["batch_size"],
        "parity": figures,
    }


def _metadata(source, model, decoder, format, quantize, path, input_shape, fixed_batch, detection_outputs,
              policies) -> dict:
    batch = fixed_batch if fixed_batch is not None else "N"
    num_anchors, num_classes = int(model.output_shape[1]), int(model.num_classes)
    outputs = _outputs_metadata(decoder, detection_outputs, batch, num_anchors, num_classes)
    class_names = source.class_names or [str(i) for i in range(num_classes)]
    metadata = {
        "format": format,
        "quantization": quantize,
        "artefact": path.name,
        "source_model": str(Path(source.path).resolve()) if source.path else None,
        "model_name": model.name,
        "preset": source.run_info.get("preset"),
        "task": DETECTION,
        "detection_outputs": detection_outputs,
        "source_dtype_policies": sorted(policies),
        "input_shape": list(input_shape),
        "batch_size": fixed_batch if fixed_batch is not None else "dynamic",
        "input": {"name": base.INPUT_NAME, "dtype": "float32", "format": base.INPUT_FORMAT,
                  "resize": LETTERBOX_TEXT},
        "output": outputs[0],
        "outputs": outputs,
        "preprocessing": base.find_preprocessing(model) or source.run_info.get("preprocessing"),
        "num_classes": num_classes,
        "class_names": class_names,
        "detection": {
            "decoder": {key: value for key, value in decoder.get_config().items()
                        if key not in ("name", "trainable", "dtype")},
            "num_anchors": num_anchors,
            "box_format": "xyxy pixels of the model input",
            "decode": (
                "top pre_nms_top_k (anchor, class) logits; sigmoid; deltas * box_variance; centre = anchor centre + "
                "(dx, dy) * anchor size; size = exp(min((dw, dh), log(1000/16))) * anchor size; clip to the image; "
                "class-wise NMS (iou_threshold, score_threshold, max_detections) by one NonMaxSuppressionV5 over "
                "boxes offset by class * (max(H, W) + 1)"
            ),
            "nms": "inside the model" if detection_outputs == "decoded" else (
                "not in the model: keras_resnet.export.detection.decoder_from_config(metadata['detection']"
                "['decoder']) decodes 'raw'"
            ),
        },
        "tool_versions": base._tool_versions(format),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if format == "saved_model":
        metadata["signatures"] = {
            "serving_default": "uint8 images [N, h, w, C] of any size, letterboxed inside to the model size -> "
            "{boxes (xyxy pixels of the images given), scores, classes (int32), num_detections (int32)}",
            "serve_float": f"{base.INPUT_FORMAT} at the model size (letterboxed) -> "
            "{boxes (model-input pixels), scores, classes, num_detections}",
            "serve_raw": f"{base.INPUT_FORMAT} at the model size -> {{raw}}",
        }
    return metadata


__all__ = [
    "DETECTION",
    "DETECTION_OUTPUTS",
    "decoder_from_config",
    "detection_parity",
    "export_detector",
    "graft_tflite",
    "is_detector",
    "tflite_ops",
]
