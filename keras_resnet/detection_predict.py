"""Boxes from a trained `RetinaNetDetector`, drawn onto the images.

`predict_boxes` runs a `.keras` detector (or a training run folder) on
image files of any size: each image is converted to the model's channel
count and letterboxed to the model's input size (scaled to fit keeping its
aspect ratio, padded bottom/right with 0, the same transform as
validation), detected and NMS-ed inside the graph (`DetectionDecoder`),
and the boxes are mapped back to the original image's pixels. For each
image it prints the detections and writes

    <stem>_boxes.png     the original image with boxes, class names and scores
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from keras_resnet.segmentation_predict import color_palette

BOX_LINE_WIDTH = 2


def _box_colors(num_classes):
    # The VOC palette without its black background entry: one colour per class.
    return [tuple(int(c) for c in color) for color in color_palette(num_classes + 1)[1:]]


def draw_detections(image, boxes, scores, classes, class_names, num_detections=None):
    """Draws boxes with "name score" labels on a copy of `image`.

    Args:
        image: `(H, W)`, `(H, W, 1)` or `(H, W, 3)` pixels 0..255.
        boxes: `(K, 4)` xyxy pixels of `image`.
        scores, classes: `(K,)`; rows with a negative class are padding.
        class_names: names indexed by class id.
        num_detections: optional count of valid rows.

    Returns:
        A PIL RGB image.
    """
    pixels = np.clip(np.asarray(image, np.float32), 0, 255).astype(np.uint8)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    canvas = Image.fromarray(pixels).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    colors = _box_colors(len(class_names))
    count = len(classes) if num_detections is None else int(num_detections)
    for box, score, cls in zip(boxes[:count], scores[:count], classes[:count]):
        if cls < 0:
            continue
        color = colors[int(cls) % len(colors)]
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle((x0, y0, x1, y1), outline=color, width=BOX_LINE_WIDTH)
        label = f"{class_names[int(cls)]} {float(score):.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), label)
        text_top = max(0.0, y0 - (bottom - top) - 2)
        draw.rectangle((x0, text_top, x0 + (right - left) + 2, text_top + (bottom - top) + 2), fill=color)
        draw.text((x0 + 1, text_top), label, fill=(0, 0, 0))
    return canvas


def plot_detections(images, outputs, class_names, path):
    """Saves the images with their decoded detections side by side as one PNG."""
    panels = [
        draw_detections(images[i], outputs["boxes"][i], outputs["scores"][i], outputs["classes"][i], class_names,
                        outputs["num_detections"][i])
        for i in range(len(images))
    ]
    width = sum(panel.width for panel in panels) + 4 * (len(panels) - 1)
    sheet = Image.new("RGB", (width, max(panel.height for panel in panels)), (255, 255, 255))
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, 0))
        x += panel.width + 4
    sheet.save(path)
    return path


def _load_detector(model_path):
    """(detector, class_names, decoder_args) from a `.keras` file or a run folder."""
    import keras

    path = Path(model_path)
    run_info = {}
    if path.is_dir():
        run_json = path / "run.json"
        if run_json.exists():
            run_info = json.loads(run_json.read_text())
        path = path / "best_model.keras"
    if not path.exists():
        raise FileNotFoundError(f"no detector at {path}; pass a .keras file or a detection run's output_dir")
    model = keras.saving.load_model(path, compile=False)
    if not hasattr(model, "make_decoder"):
        raise ValueError(f"{path} is a {type(model).__name__}, not a RetinaNetDetector")
    class_names = run_info.get("class_names") or [str(i) for i in range(model.num_classes)]
    return model, class_names, run_info.get("decoder", {})


def _letterboxed(path, height, width, channels):
    try:
        image = Image.open(path)
        image.load()
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}; pass a PNG/JPEG/BMP file") from None
    image = image.convert("L" if channels == 1 else "RGB")
    scale = min(height / image.height, width / image.width)
    resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                           Image.BILINEAR)
    canvas = np.zeros((height, width, channels), np.uint8)
    pixels = np.asarray(resized).reshape(resized.height, resized.width, channels)
    canvas[: pixels.shape[0], : pixels.shape[1]] = pixels
    return np.asarray(image), canvas, scale


def predict_boxes(model_path, image_paths, output_dir, score_threshold=None, max_detections=None):
    """Detects objects in image files and writes `<stem>_boxes.png` per image.

    Args:
        model_path: a `.keras` RetinaNetDetector or a detection run's output_dir.
        image_paths: image files of any size.
        output_dir: folder for the PNGs (created).
        score_threshold, max_detections: override the run's decoder settings.

    Returns:
        One dict per image: `{"image", "output", "detections": [{"class", "score", "box"}]}`
        with boxes as `[x_min, y_min, x_max, y_max]` in the original image's pixels.
    """
    model, class_names, decoder_args = _load_detector(model_path)
    decoder_args = dict(decoder_args)
    if score_threshold is not None:
        decoder_args["score_threshold"] = score_threshold
    if max_detections is not None:
        decoder_args["max_detections"] = max_detections
    inference = model.make_inference_model(**decoder_args)
    height, width, channels = model.input_shape[1:]
    os.makedirs(output_dir, exist_ok=True)
    results = []
    for image_path in image_paths:
        original, letterboxed, scale = _letterboxed(image_path, height, width, channels)
        outputs = inference.predict(letterboxed[None], verbose=0)
        count = int(outputs["num_detections"][0])
        boxes = outputs["boxes"][0, :count] / scale
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, original.shape[1])
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, original.shape[0])
        scores, classes = outputs["scores"][0, :count], outputs["classes"][0, :count]
        output = Path(output_dir) / f"{Path(image_path).stem}_boxes.png"
        draw_detections(original, boxes, scores, classes, class_names).save(output)
        results.append({
            "image": str(image_path),
            "output": str(output),
            "detections": [
                {"class": class_names[int(c)], "score": round(float(s), 4), "box": [round(float(v), 1) for v in b]}
                for b, s, c in zip(boxes, scores, classes)
            ],
        })
    return results
