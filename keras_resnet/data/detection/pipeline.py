"""Object-detection input pipelines: Pascal VOC XML, COCO JSON and a synthetic mosaic.

Conventions shared with the detection model: boxes are absolute pixels in
``xyxy`` order (``[x_min, y_min, x_max, y_max]``, continuous coordinates, the
image spans ``[0, width] x [0, height]``), float32; classes are int32
``0..num_classes-1``; padding rows have class ``-1`` and box zeros.

Readers (:func:`voc`, :func:`coco`, :func:`mosaic`) return
``(records, class_names)``: one :class:`DetectionRecord` per image with its
boxes in original-image pixels. :func:`build_detection_datasets` turns two of
them into batched ``tf.data`` pipelines of
``(uint8 images (B, H, W, C), {"boxes": (B, max_boxes, 4) float32,
"classes": (B, max_boxes) int32})`` at the model input size.

Resize policy (validation and prediction): letterbox. The image is scaled by
``s = min(H / height, W / width)`` keeping its aspect ratio and padded with 0
at the bottom and right; boxes are multiplied by ``s``. Dividing model-input
boxes by ``s`` maps them back to the original image
(:func:`keras_resnet.models.retinanet.evaluation.boxes_to_original`).

Training adds, inside ``tf.data``: a random rescale of the letterboxed image
by ``augment["scale_range"]``, a random crop or zero pad back to the input
size, and a random horizontal flip; boxes move with the pixels, are clipped
to the image, and are dropped when less than ``augment["min_visible"]`` of
their area stays visible or when narrower or shorter than 2 px.

Objects flagged ``ignore`` (VOC ``difficult``, COCO ``iscrowd``) are left out
of the training and validation targets (as Detectron2 does for crowd boxes
and Ultralytics for difficult VOC objects) and are kept in the COCO ground
truth as ``iscrowd=1``, so evaluation neither rewards nor penalises
detections on them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import xml.etree.ElementTree as ElementTree
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf
from PIL import Image

from keras_resnet.data.classification import (
    FASHION_MNIST_CLASSES,
    DataError,
    _progress,
    _seeded_subset,
    load_fashion_mnist,
    shuffle_augment_batch,
)
from keras_resnet.data.images import TRAINING_IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
COCO_REQUIRED_KEYS = {
    "images": ("id", "file_name"),
    "annotations": ("image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}
# Coordinates at most this far outside the image are clipped silently (annotation rounding).
BOX_TOLERANCE = 1.0
MIN_BOX_SIDE = 2.0  # training boxes narrower or shorter than this (input pixels) are dropped
DEFAULT_AUGMENT = {"horizontal_flip": True, "scale_range": (0.75, 1.25), "min_visible": 0.25}
# Mosaic generation. Sizes are the side of the square 28x28 item after resizing, in canvas pixels.
MOSAIC_CANVAS_SIZE = 256
MOSAIC_ITEM_SIZE = (20, 112)
MOSAIC_ITEMS_PER_CANVAS = (1, 6)
MOSAIC_THRESHOLD = 16  # resized item pixels brighter than this are pasted; the rest stay 0
MOSAIC_MAX_IOU = 0.3  # a placement overlapping a placed item's box by more IoU is rejected
MOSAIC_MAX_COVER = 0.5  # ... and one covering more than this fraction of the smaller box
MOSAIC_ATTEMPTS = 20  # random positions tried per item before the item is skipped
MOSAIC_VAL_SEED = 1  # the validation mosaic is the same whatever the training seed is
MOSAIC_VERSION = 1  # bump when generation changes, so old caches are not reused
MOSAIC_CACHE_ENV = "KERAS_RESNET_MOSAIC_CACHE"
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


# --------------------------------------------------------------------------- shared checks


def _image_size(path: Path, owner: str) -> tuple[int, int]:
    """``(width, height)`` of an image after a PIL header check, or DataError naming it."""
    if not path.is_file():
        raise DataError(f"{owner} refers to image {path}, which does not exist; add the image or remove the annotation")
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
    except Exception as error:  # PIL raises many exception types for bad files
        raise DataError(
            f"unreadable image {path} ({type(error).__name__}: {error}); fix or delete it and its annotation"
        ) from None
    return size


class _BoxIssues:
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


def _check_box(box, shown: str, where: str, width: int, height: int, clip: bool, issues: _BoxIssues):
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


# --------------------------------------------------------------------------- Pascal VOC


def _voc_layout(root: Path) -> Path | None:
    """The VOC20xx folder of a VOCdevkit-style ``root``, or None for a flat folder."""
    if (root / "Annotations").is_dir():
        return root
    years = sorted(p for p in root.iterdir() if p.is_dir() and (p / "Annotations").is_dir())
    if len(years) > 1:
        raise DataError(
            f"{root} holds several VOC folders ({', '.join(p.name for p in years)}); "
            "point the path at one of them"
        )
    return years[0] if years else None


def _voc_entries(root: Path, split: str) -> list[tuple[Path, Path | None]]:
    """``(xml, image or None)`` pairs in list order: a VOC20xx split, or every XML of a flat folder."""
    year = _voc_layout(root)
    if year is not None:
        list_file = year / "ImageSets" / "Main" / f"{split}.txt"
        if not list_file.is_file():
            raise DataError(
                f"{year} is a VOC folder but has no split list {list_file}; create it (one image id a line) "
                "or choose another split"
            )
        ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
        entries = []
        for image_id in ids:
            xml = year / "Annotations" / f"{image_id}.xml"
            if not xml.is_file():
                raise DataError(f"{list_file} lists {image_id} but its annotation {xml} is missing; add it")
            entries.append((xml, year / "JPEGImages" / f"{image_id}.jpg"))
        return entries
    files = [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    images = {p.stem: p for p in sorted(files) if p.suffix.lower() in TRAINING_IMAGE_EXTENSIONS}
    xmls = sorted(p for p in files if p.suffix.lower() == ".xml")
    entries = [(xml, images.pop(xml.stem, None)) for xml in xmls]
    if images and entries:
        logger.warning(
            "%d images in %s have no XML annotation and are used as images without objects (e.g. %s)",
            len(images), root, next(iter(images.values())).name,
        )
    return entries + [(None, image) for image in images.values()] if entries else []


def _xml_number(node, tag: str, xml: Path, what: str) -> float:
    text = node.findtext(tag)
    try:
        return float(text)
    except (TypeError, ValueError):
        raise DataError(f"{xml} {what} has no numeric <{tag}> (found {text!r}); fix the annotation") from None


def _read_voc_xml(xml: Path, image: Path | None, class_index: dict, clip: bool, issues: _BoxIssues):
    try:
        tree = ElementTree.parse(xml).getroot()
    except (ElementTree.ParseError, OSError) as error:
        raise DataError(f"unreadable VOC annotation {xml} ({error}); fix or delete it") from None
    if image is None or not image.is_file():
        # Fall back on the file the XML names, in the image folder (VOCdevkit) or beside the XML (flat).
        named = (tree.findtext("filename") or "").strip()
        folder = xml.parent if image is None else image.parent
        if named and (folder / named).is_file():
            image = folder / named
        elif image is None:
            raise DataError(
                f"annotation {xml} has no image: no {xml.stem}.<{'|'.join(e[1:] for e in TRAINING_IMAGE_EXTENSIONS)}> "
                f"beside it; add the image or remove the annotation"
            )
    width, height = _image_size(image, f"annotation {xml}")
    boxes, classes, ignore = [], [], []
    for index, obj in enumerate(tree.findall("object")):
        name = (obj.findtext("name") or "").strip()
        where = f"{xml} object {index} ({name})"
        if name not in class_index:
            raise DataError(
                f"{where}: class {name!r} is not in class_names ({', '.join(class_index)}); "
                "add it to class_names (data.class_names) or fix the annotation"
            )
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DataError(f"{where} has no <bndbox>; fix the annotation")
        raw = [_xml_number(bndbox, tag, xml, f"object {index}") for tag in ("xmin", "ymin", "xmax", "ymax")]
        shown = "xmin={:g} ymin={:g} xmax={:g} ymax={:g}".format(*raw)
        # VOC pixels are 1-based and inclusive: pixel columns xmin..xmax span [xmin - 1, xmax).
        box = _check_box((raw[0] - 1, raw[1] - 1, raw[2], raw[3]), shown, where, width, height, clip, issues)
        if box is not None:
            boxes.append(box)
            classes.append(class_index[name])
            ignore.append((obj.findtext("difficult") or "0").strip() == "1")
    return str(image), boxes, classes, ignore, width, height


def voc(
    root: str | os.PathLike,
    split: str = "train",
    class_names: Sequence[str] | None = None,
    clip_boxes: bool = False,
) -> tuple[list[DetectionRecord], list[str]]:
    """Read Pascal VOC XML annotations.

    Two layouts are accepted:

    - VOCdevkit: ``root`` is a year folder (``VOC2007``) holding
      ``Annotations/``, ``JPEGImages/`` and ``ImageSets/Main/<split>.txt``, or
      a ``VOCdevkit`` folder holding exactly one such year folder. Images are
      listed by the split file.
    - flat: ``root`` holds images and VOC XML files of the same stem (any
      image extension). ``split`` is not used. Images without an XML are
      kept as images without objects (with a warning); an XML's image may
      also be named by its ``<filename>``.

    VOC coordinates are 1-based inclusive pixel indices; a box
    ``xmin, ymin, xmax, ymax`` becomes the continuous 0-based box
    ``[xmin - 1, ymin - 1, xmax, ymax]`` (a box over the whole image is
    ``[0, 0, width, height]``). ``difficult`` objects are kept with
    ``ignore=True``.

    Args:
        root: VOC year folder, VOCdevkit folder, or flat folder.
        split: split list name for the VOCdevkit layout ("train", "val", "trainval", "test").
        class_names: class names in id order; default the 20 VOC classes.
        clip_boxes: clip boxes that leave the image (more than 1 px) and drop
            inverted or empty ones, with a warning, instead of raising.

    Returns:
        ``(records, class_names)``.

    Raises:
        DataError: missing or empty folder, an unknown class name, a bad or
            out-of-image box (unless ``clip_boxes``), an annotation without
            its image, or an unreadable image; the message names the file.

    Example:
    >>> records, names = voc("VOCdevkit/VOC2007", split="val")
    >>> records[0].boxes  # float32 (N, 4) xyxy in image pixels
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"VOC folder {root} does not exist; point it at VOCdevkit/VOC20xx or a folder of images + XML")
    class_names = list(VOC_CLASSES if class_names is None else class_names)
    class_index = {name: index for index, name in enumerate(class_names)}
    entries = _voc_entries(root, split)
    if not entries:
        raise DataError(
            f"VOC folder {root} has no annotations: expected Annotations/ + ImageSets/Main/{split}.txt, "
            "or images with VOC .xml files of the same name"
        )
    issues = _BoxIssues(root)
    records = []
    for image_id, (xml, image) in enumerate(_progress(entries, f"reading {len(entries)} annotations in {root}"), 1):
        if xml is None:
            width, height = _image_size(image, f"folder {root}")
            records.append(DetectionRecord(str(image), np.zeros((0, 4)), [], image_id, height, width))
            continue
        path, boxes, classes, ignore, width, height = _read_voc_xml(xml, image, class_index, clip_boxes, issues)
        records.append(DetectionRecord(path, np.reshape(boxes, (-1, 4)), classes, image_id, height, width, ignore))
    issues.log()
    return records, class_names


# --------------------------------------------------------------------------- COCO


def _check_coco_keys(data, path: Path) -> None:
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a COCO instances JSON (top level is not an object)")
    for key, item_keys in COCO_REQUIRED_KEYS.items():
        if key not in data:
            raise DataError(
                f"{path} has no {key!r} key; a COCO instances JSON needs 'images', 'annotations' and 'categories'"
            )
        for index, item in enumerate(data[key]):
            missing = [k for k in item_keys if k not in item]
            if missing:
                raise DataError(
                    f"{path} {key}[{index}] has no {missing[0]!r} key; every {key[:-1]} needs "
                    f"{', '.join(item_keys)}"
                )


def coco(
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
        clip_boxes: as in :func:`voc`.

    Returns:
        ``(records, class_names)``.

    Raises:
        DataError: unreadable JSON, a missing key, an annotation whose image
            or category is not listed, a missing or unreadable image file,
            or a bad box (unless ``clip_boxes``); the message names the JSON.

    Example:
    >>> records, names = coco("coco/annotations/instances_val2017.json", "coco/val2017")
    """
    path = Path(annotations)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(
            f"cannot read COCO JSON {path} ({error}); point data.train / data.val at the instances JSON"
        ) from None
    _check_coco_keys(data, path)
    folder = Path(images) if images is not None else path.parent
    if not data["images"]:
        raise DataError(f"COCO JSON {path} lists no images; it is an empty dataset")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    names = [str(c["name"]) for c in categories]
    if class_names is not None and list(class_names) != names:
        raise DataError(
            f"{path} categories ({', '.join(names)}) differ from class_names ({', '.join(class_names)}); "
            "use the same categories in train and val, or fix class_names"
        )
    class_of = {c["id"]: index for index, c in enumerate(categories)}
    by_image = {image["id"]: [] for image in data["images"]}
    for ann in data["annotations"]:
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
    issues = _BoxIssues(path)
    records = []
    for image in _progress(data["images"], f"checking {len(data['images'])} images of {path}"):
        file = folder / image["file_name"]
        width, height = _image_size(file, f"{path} image {image['id']}")
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
            box = _check_box((x, y, x + w, y + h), f"bbox [{x:g}, {y:g}, {w:g}, {h:g}]", where, width, height,
                             clip_boxes, issues)
            if box is not None:
                boxes.append(box)
                classes.append(class_of[ann["category_id"]])
                ignore.append(bool(ann.get("iscrowd", 0)))
        records.append(DetectionRecord(str(file), np.reshape(boxes, (-1, 4)), classes, image["id"], height, width,
                                       ignore))
    issues.log()
    return records, names


# --------------------------------------------------------------------------- mosaic


def _placement_ok(candidates: np.ndarray, placed: np.ndarray) -> np.ndarray:
    """Which candidate boxes ``(A, 4)`` overlap no placed box ``(P, 4)`` too much."""
    if not len(placed):
        return np.ones(len(candidates), bool)
    top_left = np.maximum(candidates[:, None, :2], placed[None, :, :2])
    bottom_right = np.minimum(candidates[:, None, 2:], placed[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=-1)
    area_c = np.prod(candidates[:, 2:] - candidates[:, :2], axis=-1)[:, None]
    area_p = np.prod(placed[:, 2:] - placed[:, :2], axis=-1)[None, :]
    iou = inter / (area_c + area_p - inter)
    cover = inter / np.minimum(area_c, area_p)
    return ((iou <= MOSAIC_MAX_IOU) & (cover <= MOSAIC_MAX_COVER)).all(axis=1)


def make_detection_mosaic(
    items: np.ndarray,
    labels: np.ndarray,
    count: int,
    canvas_size: int = MOSAIC_CANVAS_SIZE,
    items_per_canvas: tuple[int, int] = MOSAIC_ITEMS_PER_CANVAS,
    item_size: tuple[int, int] = MOSAIC_ITEM_SIZE,
    seed: int = 0,
):
    """Paste 28x28 items on black canvases and box each one exactly.

    Each canvas gets ``items_per_canvas`` (inclusive range) items. An item is
    resized (bilinear) to a square side drawn log-uniformly from
    ``item_size``; its pixels brighter than 16 are pasted (later items on
    top), the rest are left 0. Its box is the tight box of the pasted pixels,
    so every canvas pixel outside all boxes is 0 and every box edge touches
    a nonzero pixel. Up to 20 random positions are tried per item; a
    position is rejected when the item's box has IoU > 0.3 with a placed
    box, or covers more than half of the smaller of the two boxes; an item
    with no valid position is skipped (the first item of a canvas always fits).

    Args:
        items: uint8 ``(M, 28, 28)`` images (Fashion-MNIST).
        labels: ``(M,)`` class ids.
        count: number of canvases.
        canvas_size: canvas side in pixels.
        items_per_canvas: ``(min, max)`` items per canvas.
        item_size: ``(min, max)`` item side in pixels, at most ``canvas_size``.
        seed: generator seed; the same arguments give the same arrays.

    Returns:
        ``(images uint8 (count, S, S), boxes float32 (T, 4) xyxy, classes
        int32 (T,), offsets int64 (count + 1,))``: canvas ``i`` has boxes
        ``boxes[offsets[i]:offsets[i + 1]]``.

    Example:
    >>> (x, y), _ = load_fashion_mnist()
    >>> images, boxes, classes, offsets = make_detection_mosaic(x, y, 100, seed=0)
    """
    low, high = item_size
    if not 1 <= low <= high <= canvas_size:
        raise DataError(f"mosaic item_size {list(item_size)} must satisfy 1 <= min <= max <= canvas_size={canvas_size}")
    if not 1 <= items_per_canvas[0] <= items_per_canvas[1]:
        raise DataError(f"mosaic items_per_canvas {list(items_per_canvas)} must satisfy 1 <= min <= max")
    rng = np.random.default_rng(seed)
    images = np.zeros((count, canvas_size, canvas_size), np.uint8)
    boxes, classes, offsets = [], [], [0]
    per_canvas = rng.integers(items_per_canvas[0], items_per_canvas[1] + 1, count)
    for canvas in _progress(range(count), f"generating {count} mosaic canvases"):
        placed = np.zeros((0, 4))
        for _ in range(per_canvas[canvas]):
            index = int(rng.integers(len(items)))
            size = int(round(np.exp(rng.uniform(np.log(low), np.log(high)))))
            corners = rng.integers(0, canvas_size - size + 1, (MOSAIC_ATTEMPTS, 2))
            patch = np.asarray(Image.fromarray(items[index]).resize((size, size), Image.BILINEAR))
            painted = patch > MOSAIC_THRESHOLD
            rows, cols = np.flatnonzero(painted.any(axis=1)), np.flatnonzero(painted.any(axis=0))
            if not len(rows):
                continue
            tight = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
            candidates = np.concatenate([corners[:, ::-1], corners[:, ::-1]], axis=1) + tight
            valid = np.flatnonzero(_placement_ok(candidates, placed))
            if not len(valid):
                continue
            top, left = corners[valid[0]]
            region = images[canvas, top : top + size, left : left + size]
            region[painted] = patch[painted]
            placed = np.vstack([placed, candidates[valid[0]]])
            classes.append(int(labels[index]))
        boxes.extend(placed)
        offsets.append(offsets[-1] + len(placed))
    return (
        images,
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(classes, np.int32),
        np.asarray(offsets, np.int64),
    )


def default_mosaic_cache_dir() -> Path:
    """``$KERAS_RESNET_MOSAIC_CACHE``, else ``$KERAS_HOME`` (or ``~/.keras``) ``/datasets/detection-mosaic``."""
    override = os.environ.get(MOSAIC_CACHE_ENV)
    if override:
        return Path(override)
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(keras_home) / "datasets" / "detection-mosaic"


def _mosaic_arrays(split, count, canvas_size, items_per_canvas, item_size, seed, cache_dir, cache):
    if split not in ("train", "val"):
        raise DataError(f"mosaic split {split!r} is not train or val")
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    items, labels = (x_train, y_train) if split == "train" else (x_test, y_test)
    params = {
        "version": MOSAIC_VERSION, "split": split, "count": count, "canvas_size": canvas_size,
        "items_per_canvas": list(items_per_canvas), "item_size": list(item_size), "seed": seed,
        "threshold": MOSAIC_THRESHOLD, "max_iou": MOSAIC_MAX_IOU, "max_cover": MOSAIC_MAX_COVER,
        "attempts": MOSAIC_ATTEMPTS,
        # The items themselves, so a different copy of Fashion-MNIST never reuses a cache.
        "items_crc": zlib.crc32(np.ascontiguousarray(items)) ^ zlib.crc32(np.ascontiguousarray(labels)),
    }
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir or default_mosaic_cache_dir()) / f"{split}_{count}x{canvas_size}_{key}.npz"
    if cache and path.is_file():
        try:
            with np.load(path) as stored:
                return tuple(stored[name] for name in ("images", "boxes", "classes", "offsets"))
        except (OSError, ValueError, KeyError, zlib.error) as error:
            logger.warning("ignoring unreadable mosaic cache %s (%s); regenerating it", path, error)
    arrays = make_detection_mosaic(items, labels, count, canvas_size, items_per_canvas, item_size, seed)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
        np.savez(partial, **dict(zip(("images", "boxes", "classes", "offsets"), arrays)))
        os.replace(partial, path)
    return arrays


def mosaic(
    split: str = "train",
    count: int = 5000,
    canvas_size: int = MOSAIC_CANVAS_SIZE,
    items_per_canvas: tuple[int, int] = MOSAIC_ITEMS_PER_CANVAS,
    item_size: tuple[int, int] = MOSAIC_ITEM_SIZE,
    seed: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
) -> tuple[list[DetectionRecord], list[str]]:
    """A seeded synthetic detection set of Fashion-MNIST items on black canvases.

    See :func:`make_detection_mosaic` for the generation. The train split
    pastes Fashion-MNIST training items, the val split test items. The
    arrays are cached in ``cache_dir`` as an ``.npz`` whose name is a hash of
    every generation parameter and of the items.

    Args:
        split: "train" or "val".
        count: number of canvases.
        canvas_size, items_per_canvas, item_size: see :func:`make_detection_mosaic`.
        seed: generator seed; default 0 for train and 1 for val.
        cache_dir: cache folder; default :func:`default_mosaic_cache_dir`.
        cache: read and write the cache.

    Returns:
        ``(records, class_names)``: records hold grayscale uint8 ``(S, S)``
        canvases; class names are the 10 Fashion-MNIST classes.

    Example:
    >>> records, names = mosaic("val", count=500)
    """
    seed = (0 if split == "train" else MOSAIC_VAL_SEED) if seed is None else seed
    images, boxes, classes, offsets = _mosaic_arrays(
        split, count, canvas_size, items_per_canvas, item_size, seed, cache_dir, cache
    )
    records = [
        DetectionRecord(images[i], boxes[offsets[i] : offsets[i + 1]], classes[offsets[i] : offsets[i + 1]],
                        i + 1, canvas_size, canvas_size)
        for i in range(count)
    ]
    return records, list(FASHION_MNIST_CLASSES)


# --------------------------------------------------------------------------- geometry (tf)


def letterbox_scale(height: int, width: int, input_height: int, input_width: int) -> float:
    """The letterbox factor ``min(input_height / height, input_width / width)``."""
    return min(input_height / height, input_width / width)


def letterbox(image: tf.Tensor, boxes: tf.Tensor, scale: tf.Tensor, input_height: int, input_width: int):
    """Resize ``image`` (any size) by ``scale`` and pad bottom/right with 0 to the input size.

    Args:
        image: uint8 ``(h, w, C)``.
        boxes: float32 ``(N, 4)`` xyxy in image pixels.
        scale: the factor from :func:`letterbox_scale`.
        input_height, input_width: output size.

    Returns:
        ``(uint8 (input_height, input_width, C) image, boxes * scale)``.
    """
    channels = image.shape[-1]
    size = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.cast(scale, tf.float32)
    new_size = tf.cast(tf.round(size * scale), tf.int32)
    new_size = tf.clip_by_value(new_size, 1, [input_height, input_width])
    resized = tf.image.resize(image, new_size, method="bilinear", antialias=True)
    resized = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
    padded = tf.image.pad_to_bounding_box(resized, 0, 0, input_height, input_width)
    return tf.ensure_shape(padded, [input_height, input_width, channels]), boxes * scale


def _to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """uint8 ``(h, w, 1|2|3|4)`` -> ``(h, w, channels)``: drops alpha, converts gray <-> RGB."""
    if image.shape[-1] is not None:  # arrays: the channel count is static
        image = image[..., :3] if image.shape[-1] >= 3 else image[..., :1]
        if image.shape[-1] == channels:
            return image
        return tf.image.grayscale_to_rgb(image) if channels == 3 else tf.image.rgb_to_grayscale(image)
    image = image[..., : tf.where(tf.shape(image)[-1] >= 3, 3, 1)]
    gray = lambda: tf.ensure_shape(image, [None, None, 1])  # noqa: E731
    rgb = lambda: tf.ensure_shape(image, [None, None, 3])  # noqa: E731
    is_gray = tf.equal(tf.shape(image)[-1], 1)
    if channels == 3:
        image = tf.cond(is_gray, lambda: tf.image.grayscale_to_rgb(gray()), rgb)
    else:
        image = tf.cond(is_gray, gray, lambda: tf.image.rgb_to_grayscale(rgb()))
    return tf.ensure_shape(image, [None, None, channels])


def pad_boxes(boxes: tf.Tensor, classes: tf.Tensor, max_boxes: int):
    """Move valid rows (class >= 0) first and pad/truncate to ``max_boxes`` (class -1, box 0)."""
    valid = classes >= 0
    boxes, classes = tf.boolean_mask(boxes, valid)[:max_boxes], tf.boolean_mask(classes, valid)[:max_boxes]
    pad = max_boxes - tf.shape(classes)[0]
    boxes = tf.pad(boxes, [[0, pad], [0, 0]])
    classes = tf.pad(classes, [[0, pad]], constant_values=-1)
    return tf.ensure_shape(boxes, [max_boxes, 4]), tf.ensure_shape(classes, [max_boxes])


def make_detection_augment(
    input_shape: Sequence[int],
    horizontal_flip: bool = True,
    scale_range: Sequence[float] = (0.75, 1.25),
    min_visible: float = 0.25,
):
    """Build the training augmentation ``(image, boxes, classes, seed) -> (image, boxes, classes)``.

    The input-size image is rescaled by a random factor in ``scale_range``,
    padded with 0 at a random offset when smaller than the input size,
    randomly cropped back to it, and flipped left-right with probability
    0.5 when ``horizontal_flip``. Boxes get the same transform and are
    clipped to the image; a box is dropped (class -1) when less than
    ``min_visible`` of its rescaled area remains or when it is under 2 px
    wide or high. Rows are not compacted here (see :func:`pad_boxes`).

    Args:
        input_shape: ``(H, W, C)`` of the images.
        horizontal_flip: random left-right flip.
        scale_range: ``(low, high)`` rescale factors.
        min_visible: fraction of a box's area that must stay in the crop.

    Returns:
        The augmentation function; ``seed`` is a ``[2]`` int tensor.

    Example:
    >>> augment = make_detection_augment((256, 256, 3))
    >>> image, boxes, classes = augment(image, boxes, classes, tf.constant([1, 2]))
    """
    height, width, channels = input_shape
    low, high = scale_range

    def augment(image, boxes, classes, seed):
        scale_seed, pad_seed, crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
        scale = tf.random.stateless_uniform([], scale_seed, low, high)
        scaled_h = tf.maximum(1, tf.cast(tf.round(height * scale), tf.int32))
        scaled_w = tf.maximum(1, tf.cast(tf.round(width * scale), tf.int32))
        image = tf.image.resize(image, [scaled_h, scaled_w], method="bilinear")
        factors = tf.cast(tf.stack([scaled_w / width, scaled_h / height] * 2), tf.float32)
        boxes = boxes * factors
        padded_h, padded_w = tf.maximum(scaled_h, height), tf.maximum(scaled_w, width)
        pad_fraction = tf.random.stateless_uniform([2], pad_seed)
        pad_top = tf.cast(pad_fraction[0] * tf.cast(padded_h - scaled_h + 1, tf.float32), tf.int32)
        pad_left = tf.cast(pad_fraction[1] * tf.cast(padded_w - scaled_w + 1, tf.float32), tf.int32)
        image = tf.image.pad_to_bounding_box(image, pad_top, pad_left, padded_h, padded_w)
        crop_fraction = tf.random.stateless_uniform([2], crop_seed)
        top = tf.cast(crop_fraction[0] * tf.cast(padded_h - height + 1, tf.float32), tf.int32)
        left = tf.cast(crop_fraction[1] * tf.cast(padded_w - width + 1, tf.float32), tf.int32)
        image = image[top : top + height, left : left + width]
        shift = tf.cast(tf.stack([pad_left - left, pad_top - top] * 2), tf.float32)
        boxes = boxes + shift
        clipped = tf.clip_by_value(boxes, 0.0, tf.constant([width, height, width, height], tf.float32))
        area = tf.reduce_prod(boxes[:, 2:] - boxes[:, :2], axis=-1)
        sides = clipped[:, 2:] - clipped[:, :2]
        keep = (
            (classes >= 0)
            & (tf.reduce_prod(sides, axis=-1) >= min_visible * area)
            & tf.reduce_all(sides >= MIN_BOX_SIDE, axis=-1)
        )
        boxes = tf.where(keep[:, None], clipped, 0.0)
        classes = tf.where(keep, classes, -1)
        if horizontal_flip:
            flipped = tf.random.stateless_uniform([], flip_seed) < 0.5
            image = tf.cond(flipped, lambda: tf.reverse(image, [1]), lambda: image)
            mirrored = tf.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=-1)
            boxes = tf.where(flipped & keep[:, None], mirrored, boxes)
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        return tf.ensure_shape(image, [height, width, channels]), boxes, classes

    return augment


# --------------------------------------------------------------------------- datasets


def coco_ground_truth(records: Sequence[DetectionRecord], class_names: Sequence[str]) -> dict:
    """COCO-format ground truth (original pixels) of ``records``, for :func:`coco_evaluate`.

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


def _padded_targets(records: Sequence[DetectionRecord], max_boxes: int, what: str):
    """Stack the non-ignored boxes of every record into ``(N, M, 4)`` / ``(N, M)`` arrays, class -1 padding."""
    counts = [int((~r.ignore).sum()) for r in records]
    longest = max(counts + [1])
    if longest > max_boxes:
        logger.warning(
            "%s: %d images have more than max_boxes=%d objects (up to %d); the extra boxes are dropped; "
            "raise max_boxes (data.max_boxes) to keep them", what, sum(c > max_boxes for c in counts), max_boxes,
            longest,
        )
    boxes = np.zeros((len(records), longest, 4), np.float32)
    classes = np.full((len(records), longest), -1, np.int32)
    for index, (record, count) in enumerate(zip(records, counts)):
        keep = ~record.ignore
        boxes[index, :count] = record.boxes[keep]
        classes[index, :count] = record.classes[keep]
    return boxes, classes


def _records_dataset(records, input_shape, max_boxes: int, what: str) -> tf.data.Dataset:
    """Unbatched letterboxed ``(uint8 image, boxes, classes)`` at the input size."""
    height, width, channels = input_shape
    boxes, classes = _padded_targets(records, max_boxes, what)
    scales = np.asarray([letterbox_scale(r.height, r.width, height, width) for r in records], np.float32)
    if isinstance(records[0].image, np.ndarray):
        images = np.stack([r.image if r.image.ndim == 3 else r.image[..., None] for r in records])
        sources = tf.data.Dataset.from_tensor_slices((images, boxes, classes, scales))
        load = lambda image: image  # noqa: E731
    else:
        paths = np.asarray([r.image for r in records])
        sources = tf.data.Dataset.from_tensor_slices((paths, boxes, classes, scales))
        load = lambda path: tf.io.decode_image(tf.io.read_file(path), channels=0, expand_animations=False)  # noqa: E731

    def prepare(source, boxes, classes, scale):
        image = _to_channels(load(source), channels)
        image, boxes = letterbox(image, boxes, scale, height, width)
        return image, boxes, classes

    return sources.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)


def _read_source(source, path, split, class_names, clip_boxes, images_dir, mosaic_args, seed, key):
    if source == "mosaic":
        count = mosaic_args.get(f"{split}_size", 5000 if split == "train" else 500)
        generation = {k: mosaic_args[k] for k in ("canvas_size", "items_per_canvas", "item_size", "cache_dir", "cache")
                      if k in mosaic_args}
        return mosaic(split, count, seed=seed if split == "train" else MOSAIC_VAL_SEED, **generation)
    if not path:
        what = "a VOC folder" if source == "voc" else "a COCO instances JSON"
        raise DataError(f"data.{key} is required when data.source is {source}; set it to {what}")
    if source == "voc":
        return voc(path, split, class_names, clip_boxes)
    if source == "coco":
        return coco(path, images_dir, class_names, clip_boxes)
    raise DataError(f"data.source {source!r} is not one of voc, coco, mosaic")


def build_detection_datasets(
    source: str = "mosaic",
    train: str | os.PathLike | None = None,
    val: str | os.PathLike | None = None,
    *,
    input_shape: Sequence[int] = (256, 256, 3),
    batch_size: int = 16,
    max_boxes: int = 100,
    augment: dict | None = None,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    shuffle_buffer: int = 2000,
    cache: bool = True,
    limit_train: int | None = None,
    limit_val: int | None = None,
    clip_boxes: bool = False,
    train_split: str = "train",
    val_split: str = "val",
    train_images: str | os.PathLike | None = None,
    val_images: str | os.PathLike | None = None,
    mosaic_args: dict | None = None,
) -> tuple[tf.data.Dataset, tf.data.Dataset, dict]:
    """Build the batched train and validation pipelines of a detection task.

    Every image is decoded (files with ``tf.io``, any size, gray/RGB/alpha
    converted to ``C`` channels), letterboxed to the input size (see the
    module docstring) and cached as uint8 when ``cache``. Training then
    shuffles, augments (:func:`make_detection_augment`) and batches with
    ``drop_remainder=True``; validation keeps the record order, unaugmented.

    Args:
        source: "voc", "coco" or "mosaic".
        train, val: VOC folders (see :func:`voc`; both may name the same
            VOCdevkit folder) or COCO instances JSONs; unused for mosaic.
        input_shape: ``(H, W, C)`` of the model input, C 1 or 3.
        batch_size: batch size of both pipelines.
        max_boxes: box rows per image; extra objects are dropped with a warning.
        augment: overrides of ``{"horizontal_flip": True, "scale_range":
            (0.75, 1.25), "min_visible": 0.25}``.
        class_names: VOC class names (default the 20 VOC classes), or the
            expected COCO category names.
        seed: seed of the subsets, the shuffle, the augmentation and the
            training mosaic (the validation mosaic always uses seed 1).
        shuffle_buffer: shuffle buffer size (capped at the training set size).
        cache: cache the decoded, letterboxed images in memory.
        limit_train, limit_val: use a seeded random subset of this many images.
        clip_boxes: clip out-of-image boxes instead of raising (see :func:`voc`).
        train_split, val_split: VOCdevkit split lists.
        train_images, val_images: COCO image folders; default the JSON's folder.
        mosaic_args: mosaic options: ``train_size`` (5000), ``val_size``
            (500), ``canvas_size``, ``items_per_canvas``, ``item_size``,
            ``cache_dir``, ``cache`` (see :func:`mosaic`).

    Returns:
        ``(train_ds, val_ds, info)``. Elements are ``(uint8 (B, H, W, C),
        {"boxes": float32 (B, max_boxes, 4), "classes": int32 (B, max_boxes)})``
        in input pixels. ``info`` has ``class_names``, ``num_classes``,
        ``num_train``, ``num_val``, ``num_train_boxes``, ``num_val_boxes``,
        ``val_images`` (one dict per validation image in pipeline order:
        ``image_id``, ``scale``, ``height``, ``width``, ``file_name``;
        original box = input box / scale) and ``val_coco`` (COCO ground truth
        of the validation set in original pixels, see :func:`coco_ground_truth`).

    Raises:
        DataError: bad or missing data (naming the file), or ``batch_size``
            larger than the training set.

    Example:
    >>> train_ds, val_ds, info = build_detection_datasets("mosaic", input_shape=(256, 256, 1))
    >>> images, targets = next(iter(train_ds))
    """
    input_shape = tuple(int(v) for v in input_shape)
    if len(input_shape) != 3 or input_shape[2] not in (1, 3):
        raise DataError(f"input_shape {list(input_shape)} must be [height, width, channels] with 1 or 3 channels")
    mosaic_args = dict(mosaic_args or {})
    augment_args = {**DEFAULT_AUGMENT, **(augment or {})}
    unknown = sorted(set(augment_args) - set(DEFAULT_AUGMENT))
    if unknown:
        raise DataError(f"unknown detection augment option(s) {', '.join(unknown)}; use {', '.join(DEFAULT_AUGMENT)}")
    train_records, names = _read_source(source, train, train_split, class_names, clip_boxes, train_images,
                                        mosaic_args, seed, "train")
    val_records, _ = _read_source(source, val, val_split, names, clip_boxes, val_images, mosaic_args, seed, "val")
    train_records = [train_records[i] for i in _seeded_subset(len(train_records), limit_train, seed)]
    val_records = [val_records[i] for i in _seeded_subset(len(val_records), limit_val, seed + 1)]
    if batch_size > len(train_records):
        raise DataError(
            f"batch_size={batch_size} is larger than the {len(train_records)} training images; "
            "lower data.batch_size or add data"
        )
    train_ds = _records_dataset(train_records, input_shape, max_boxes, "training set")
    val_ds = _records_dataset(val_records, input_shape, max_boxes, "validation set")
    if cache:
        train_ds, val_ds = train_ds.cache(), val_ds.cache()
    augment_fn = make_detection_augment(input_shape, **augment_args)

    def train_example(image, boxes, classes, augment_seed):
        image, boxes, classes = augment_fn(image, boxes, classes, augment_seed)
        boxes, classes = pad_boxes(boxes, classes, max_boxes)
        return image, {"boxes": boxes, "classes": classes}

    def val_example(image, boxes, classes):
        boxes, classes = pad_boxes(boxes, classes, max_boxes)
        return image, {"boxes": boxes, "classes": classes}

    val_ds = val_ds.map(val_example, num_parallel_calls=tf.data.AUTOTUNE)
    data_cfg = {"batch_size": batch_size, "shuffle_buffer": shuffle_buffer}
    train_ds, val_ds = shuffle_augment_batch(train_ds, val_ds, train_example, data_cfg, len(train_records), seed)
    height, width, _ = input_shape
    info = {
        "class_names": list(names),
        "num_classes": len(names),
        "num_train": len(train_records),
        "num_val": len(val_records),
        "num_train_boxes": int(sum(len(r.classes) for r in train_records)),
        "num_val_boxes": int(sum(len(r.classes) for r in val_records)),
        "val_images": [
            {"image_id": int(r.image_id), "scale": letterbox_scale(r.height, r.width, height, width),
             "height": int(r.height), "width": int(r.width), "file_name": r.file_name}
            for r in val_records
        ],
        "val_coco": coco_ground_truth(val_records, names),
    }
    return train_ds, val_ds, info
