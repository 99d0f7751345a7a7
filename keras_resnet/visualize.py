"""Pictures a person looks at: class-colour masks, overlays, boxes with labels.

Shared by training (prediction examples in a run folder) and prediction
(`<stem>_overlay.png`, `<stem>_boxes.png`). Pure numpy/PIL; imports nothing
else from keras_resnet.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

OVERLAY_ALPHA = 0.5
IGNORE_COLOR = (255, 255, 255)


def color_palette(num_classes: int) -> np.ndarray:
    """The Pascal VOC colour map: `(num_classes, 3)` uint8, class 0 black.

    Colours come from the bits of the class index, so they are distinct
    and stable whatever the number of classes (up to 256).
    """
    palette = np.zeros((num_classes, 3), np.uint8)
    for index in range(num_classes):
        value, red, green, blue = index, 0, 0, 0
        for shift in range(7, -1, -1):
            red |= ((value >> 0) & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[index] = (red, green, blue)
    return palette


def colorize_mask(mask: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """`(H, W)` class indices -> `(H, W, 3)` uint8 colours; ignored pixels white."""
    mask = np.asarray(mask)
    palette = color_palette(num_classes)
    colors = palette[np.clip(mask, 0, num_classes - 1)]
    colors[mask == ignore_index] = IGNORE_COLOR
    return colors


def overlay_mask(image: np.ndarray, mask: np.ndarray, num_classes: int, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Blend the mask's colours over an image (`(H, W)`, `(H, W, 1)` or `(H, W, 3)`, 0..255).

    Returns:
        `(H, W, 3)` uint8: `(1 - alpha) * image + alpha * colour`.
    """
    image = np.asarray(image, np.float32)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    blended = (1 - alpha) * image + alpha * colorize_mask(mask, num_classes).astype(np.float32)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def save_index_mask(mask: np.ndarray, path: str | os.PathLike, num_classes: int) -> None:
    """Write class indices as a palette PNG (mode "P"; 16-bit grayscale above 256 classes)."""
    if num_classes <= 256:
        image = Image.fromarray(np.asarray(mask, np.uint8), mode="P")
        image.putpalette(color_palette(256).ravel().tolist())
    else:
        image = Image.fromarray(np.asarray(mask, np.uint16))
    image.save(path)


BOX_LINE_WIDTH = 2


def _box_colors(num_classes):
    # The VOC palette without its black background entry: one colour per class.
    return [tuple(int(c) for c in color) for color in color_palette(num_classes + 1)[1:]]


def draw_detections(image, boxes, scores, classes, class_names, num_detections=None, min_score=0.0):
    """Draws boxes with "name score" labels on a copy of `image`, the most confident on top.

    Args:
        image: `(H, W)`, `(H, W, 1)` or `(H, W, 3)` pixels 0..255.
        boxes: `(K, 4)` xyxy pixels of `image`.
        scores, classes: `(K,)`; rows with a negative class are padding.
        class_names: names indexed by class id.
        num_detections: optional count of valid rows.
        min_score: detections below this score are not drawn.

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
    order = np.argsort(np.asarray(scores[:count]), kind="stable")  # low scores first, high scores drawn over them
    for box, score, cls in zip(np.asarray(boxes)[order], np.asarray(scores)[order], np.asarray(classes)[order]):
        if cls < 0 or score < min_score:
            continue
        color = colors[int(cls) % len(colors)]
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle((x0, y0, x1, y1), outline=color, width=BOX_LINE_WIDTH)
        label = f"{class_names[int(cls)]} {float(score):.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), label)
        text_top = max(0.0, y0 - (bottom - top) - 2)
        draw.rectangle((x0, text_top, x0 + (right - left) + 2, text_top + (bottom - top) + 2), fill=color)
        luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        draw.text((x0 + 1, text_top), label, fill=(0, 0, 0) if luminance > 128 else (255, 255, 255))
    return canvas


def plot_detections(images, outputs, class_names, path, min_score=0.3):
    """Saves the images with their decoded detections (score >= `min_score`) side by side as one PNG."""
    panels = [
        draw_detections(images[i], outputs["boxes"][i], outputs["scores"][i], outputs["classes"][i], class_names,
                        outputs["num_detections"][i], min_score=min_score)
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
