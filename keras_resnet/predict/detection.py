"""Boxes from a trained `RetinaNetDetector` or its exports, drawn onto the images.

`predict_boxes` runs a `.keras` detector (or a training run folder), or a
detector exported by `keras_resnet.export.export_model` (SavedModel dir, `.tflite`,
`.onnx`; decoded or raw outputs), on image files of any size: each image
is converted to the model's channel count (PIL "L" or "RGB") and
letterboxed to the model's input size with `letterbox_images` (scaled to
fit keeping its aspect ratio, bilinear with antialiasing, rounded, padded
bottom/right with 0: the transform of the validation pipeline and of the
SavedModel's `serving_default`), detected and NMS-ed (`DetectionDecoder`,
inside the graph of decoded exports), and the boxes are mapped back to the
original image's pixels (`box / scale`, clipped). For each image it writes

    <stem>_boxes.png     the original image with boxes, class names and scores

Class names come from the run's `run.json` or the export's metadata JSON.

With `tile` ("auto", or the model input side) large images are not
letterboxed but run at their own resolution in windows of the model input
(`keras_resnet.predict.tiling`): each window's detections are shifted to
image pixels, clipped, and merged across windows by class-wise NMS at the
decoder's IoU threshold.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from keras_resnet.atomic_files import read_json
from keras_resnet.data.images import (
    find_image_files,
    letterbox_images,
    read_image,
    recorded_bit_depth,
)
from keras_resnet.export.loading import as_exported_model
from keras_resnet.export.signatures import RAW_NAME
from keras_resnet.models.retinanet.decoder import decoder_from_config
from keras_resnet.predict.progress import terminal_progress
from keras_resnet.predict.tiling import decoder_setting, tile_plan
from keras_resnet.runs import (
    BEST_MODEL_FILE,
    RUN_INFO_FILE,
    load_keras_model,
    read_run_info,
)
from keras_resnet.tiling import DEFAULT_TILE_BATCH, detect_tiled
from keras_resnet.visualize import draw_detections
from keras_resnet_settings.errors import ModelError
from keras_resnet_settings.registry import DETECTION


def load_detector(model_path, score_threshold=None, max_detections=None):
    """A detection runner for any model form.

    Args:
        model_path: a `.keras` RetinaNetDetector, a detection run dir, a
            detector export (SavedModel dir, `.tflite`, `.onnx`) or an
            `ExportedModel`.
        score_threshold, max_detections: override the decoder settings of a
            `.keras` model or raw export; a decoded export has them built
            in, so they only filter its detections (a lower threshold than
            the built-in one has no effect).

    Returns:
        `(input_shape, class_names, run)`: `run(float32 (N, H, W, C))`
        returns the decoded dict of NumPy arrays (boxes in model-input pixels).
    """
    return _open_detector(model_path, score_threshold, max_detections)[:3]


def _open_detector(model_path, score_threshold=None, max_detections=None):
    """`load_detector`'s `(input_shape, class_names, run)` and the run.json or export metadata."""
    overrides = {"score_threshold": score_threshold, "max_detections": max_detections}
    exported = as_exported_model(model_path)
    if exported is not None:
        if exported.task != DETECTION:
            raise ModelError(f"{exported.path} is not a detector (its task is {exported.task})")
        num_classes = exported.num_classes
        class_names = exported.class_names or [str(i) for i in range(num_classes or 0)]
        decoder_config = (exported.metadata.get("detection") or {}).get("decoder") or {}
        built_in = RAW_NAME not in exported.output_names or exported.metadata.get("detection_outputs") != "raw"
        if not built_in and any(v is not None for v in overrides.values()):
            decoder = decoder_from_config({**decoder_config, **{k: v for k, v in overrides.items() if v is not None}})

            def run(images):
                raw = exported.predict(images)
                return {key: value.numpy() for key, value in decoder(raw).items()}

            return exported.input_shape, class_names, run, exported.metadata

        def run(images):
            outputs = exported.predict_outputs(images)
            return _filter(outputs, score_threshold, max_detections)

        return exported.input_shape, class_names, run, exported.metadata

    model, class_names, run_info = _load_detector(model_path)
    decoder_args = run_info.get("decoder", {})
    decoder_args = {**decoder_args, **{k: v for k, v in overrides.items() if v is not None}}
    inference = model.make_inference_model(**decoder_args)

    def run(images):
        return {key: np.asarray(value) for key, value in inference.predict_on_batch(images).items()}

    return model.input_shape[1:], class_names, run, run_info


def _filter(outputs, score_threshold, max_detections):
    """Decoded outputs with detections under `score_threshold` and past `max_detections` made padding."""
    if score_threshold is None and max_detections is None:
        return outputs
    outputs = {key: np.array(value) for key, value in outputs.items()}
    rows = np.arange(outputs["scores"].shape[1])[None]
    keep = rows < outputs["num_detections"][:, None]
    if score_threshold is not None:
        keep &= outputs["scores"] >= score_threshold
    if max_detections is not None:
        keep &= rows < max_detections
    # detections are sorted by score, so the kept ones stay a prefix
    outputs["num_detections"] = keep.sum(axis=1).astype(np.int32)
    outputs["boxes"] = np.where(keep[..., None], outputs["boxes"], 0.0).astype(np.float32)
    outputs["scores"] = np.where(keep, outputs["scores"], 0.0).astype(np.float32)
    outputs["classes"] = np.where(keep, outputs["classes"], -1).astype(np.int32)
    return outputs


def _load_detector(model_path):
    """(detector, class_names, run_info) from a `.keras` file or a run folder."""
    path = Path(model_path)
    run_info = {}
    if path.is_dir():
        run_info = read_run_info(path)
        path = path / BEST_MODEL_FILE
    elif (path.parent / RUN_INFO_FILE).is_file():
        run_info = read_json(path.parent / RUN_INFO_FILE)
    if not path.exists():
        raise FileNotFoundError(f"no detector at {path}; pass a .keras file or a detection run's output_dir")
    model = load_keras_model(path)
    if not hasattr(model, "make_decoder"):
        raise ModelError(f"{path} is a {type(model).__name__}, not a RetinaNetDetector")
    class_names = (run_info.get("class_names") or getattr(model, "class_names", None)
                   or [str(i) for i in range(model.num_classes)])
    return model, class_names, run_info


def predict_boxes(model_path, image_paths, output_dir, score_threshold=None, max_detections=None, tile="off",
                  overlap=None, batch_size=DEFAULT_TILE_BATCH):
    """Detects objects in image files and writes `<stem>_boxes.png` per image.

    Args:
        model_path: a `.keras` RetinaNetDetector, a detection run's
            output_dir, or a detector export (SavedModel dir, `.tflite`,
            `.onnx`, or an `ExportedModel`).
        image_paths: image files of any size, or folders (searched recursively).
        output_dir: folder for the PNGs (created).
        score_threshold, max_detections: override the run's decoder
            settings (for a decoded export: filter its detections);
            `max_detections` also caps a tiled image's merged detections.
        tile: "off" (letterbox each image to the model input), "auto"
            (windows of the model input when the run trained on crops,
            `data.sampling: crop`, or the image is at least twice the input
            on a side) or the model input side (an int).
        overlap: tile overlap in [0, 1); None: the run's `data.tile_overlap`
            (run.json or export metadata), else 0.25.
        batch_size: tiles run at a time.

    Returns:
        One dict per image: `{"image", "output", "tiled", "detections": [{"class",
        "class_id", "score", "box"}]}` with boxes as `[x_min, y_min, x_max,
        y_max]` in the original image's pixels.

    Example:
    >>> predict_boxes("runs/mosaic_retinanet_resnet18", ["street.jpg"], "predictions")
    >>> predict_boxes("saved_models/aerial/aerial_fp32.tflite", "photos/", "predictions", tile="auto")
    """

    (height, width, channels), class_names, run, info = _open_detector(model_path, score_threshold, max_detections)
    plan = tile_plan(tile, overlap, (height, width), info, True, model_path)
    merged_max = max_detections or decoder_setting(info, "max_detections", 100)
    bit_depth = recorded_bit_depth(info)  # 16-bit images at the training set's depth
    files = find_image_files(image_paths)
    os.makedirs(output_dir, exist_ok=True)
    results = []
    for image_path in files:
        original = read_image(image_path, channels, bit_depth)
        window = plan.window(*original.shape[:2])
        if window is not None:
            found = detect_tiled(run, original, window, plan.overlap, batch_size,
                                 iou_threshold=decoder_setting(info, "iou_threshold", 0.5), max_detections=merged_max,
                                 progress=terminal_progress())
            boxes, scores, classes = found["boxes"], found["scores"], found["classes"]
        else:
            letterboxed, scale = letterbox_images(original[None], height, width)
            outputs = run(letterboxed.numpy())
            count = int(outputs["num_detections"][0])
            boxes = np.asarray(outputs["boxes"][0, :count], np.float32) / np.float32(float(scale))
            boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, original.shape[1])
            boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, original.shape[0])
            scores, classes = outputs["scores"][0, :count], outputs["classes"][0, :count]
        names = [class_names[int(c)] if 0 <= int(c) < len(class_names) else str(int(c)) for c in classes]
        output = Path(output_dir) / f"{Path(image_path).stem}_boxes.png"
        draw_detections(original, boxes, scores, classes, names_for(class_names, classes)).save(output)
        results.append({
            "image": str(image_path),
            "output": str(output),
            "tiled": window is not None,
            "detections": [
                {"class": name, "class_id": int(c), "score": round(float(s), 4),
                 "box": [round(float(v), 1) for v in b]}
                for b, s, c, name in zip(boxes, scores, classes, names)
            ],
        })
    return results


def names_for(class_names, classes):
    """Class names long enough for every class id in `classes` (ids past the list are named by number)."""
    top = int(np.max(classes)) + 1 if len(classes) else 0
    return list(class_names) + [str(i) for i in range(len(class_names), top)]
