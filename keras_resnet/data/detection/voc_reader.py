"""Pascal VOC XML detection annotations: VOCdevkit split lists or a flat folder of images + XML."""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Sequence

import numpy as np

from keras_resnet.data.detection.records import (
    BoxIssues,
    DetectionRecord,
    check_box,
    checked_image_size,
)
from keras_resnet.data.images import TRAINING_IMAGE_EXTENSIONS
from keras_resnet.data.pascal_voc import VOC_CLASSES, read_split_ids
from keras_resnet.data.scanning import progress
from keras_resnet_settings.errors import DataError

logger = logging.getLogger(__name__)


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
        missing = (
            f"{year} is a VOC folder but has no split list {list_file}; create it (one image id a line) "
            "or choose another split"
        )
        ids = read_split_ids(list_file, missing)
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


def _read_voc_xml(xml: Path, image: Path | None, class_index: dict, clip: bool, issues: BoxIssues):
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
    width, height = checked_image_size(image, f"annotation {xml}")
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
        box = check_box((raw[0] - 1, raw[1] - 1, raw[2], raw[3]), shown, where, width, height, clip, issues)
        if box is not None:
            boxes.append(box)
            classes.append(class_index[name])
            ignore.append((obj.findtext("difficult") or "0").strip() == "1")
    return str(image), boxes, classes, ignore, width, height


def read_voc(
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
    >>> records, names = read_voc("VOCdevkit/VOC2007", split="val")
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
    issues = BoxIssues(root)
    records = []
    for image_id, (xml, image) in enumerate(progress(entries, f"reading {len(entries)} annotations in {root}"), 1):
        if xml is None:
            width, height = checked_image_size(image, f"folder {root}")
            records.append(DetectionRecord(str(image), np.zeros((0, 4)), [], image_id, height, width))
            continue
        path, boxes, classes, ignore, width, height = _read_voc_xml(xml, image, class_index, clip_boxes, issues)
        records.append(DetectionRecord(path, np.reshape(boxes, (-1, 4)), classes, image_id, height, width, ignore))
    issues.log()
    return records, class_names
