"""A recipe for a folder of one's own images: `keras-resnet train --data FOLDER`, no recipe file needed.

`recipe_for_folder` looks at the folder, decides the task from its layout,
reads what it needs from the files (class names, channels, image sizes, mask
values; image headers only, nothing is decoded) and chooses the rest:

- classification: one subfolder per class (`FOLDER/<class>/*.jpg`), or
  `train/` and `val/` (or `valid/`, `validation/`) holding such subfolders;
- segmentation: `images/` and `masks/` (same stems; mask pixel values are
  class ids, 255 ignored), or `train/` and `val/` holding both;
- detection: images with Pascal VOC XML files beside them (a flat folder, or
  `train/` and `val/`), a VOCdevkit folder, or a COCO instances JSON (in the
  folder or in `annotations/`; images beside it or in `images/`).

Without a validation folder, `data.val_split` holds out 20 % of the images
(stratified by class for classification, seeded). The input size follows the
images (the largest standard size not above the typical image side); small
images of a classifier get the CIFAR-style ResNet-20. The learning rate and
schedule follow the data size and whether `--weights` are pretrained: AdamW,
a one-epoch warm-up and cosine decay, and enough epochs (repeating a handful
of images within an epoch) for at least `MIN_STEPS` optimizer steps. The run
is named after the folder. The whole recipe is written into the run folder
(recipe.yaml), so the run can be repeated or edited.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from keras_resnet_settings.errors import ConfigError
from keras_resnet_settings.registry import (
    CLASSIFICATION,
    DETECTION,
    IGNORE_INDEX,
    SEGMENTATION,
    TASKS,
    TRAINING_IMAGE_EXTENSIONS,
    binary_masks_problem,
)
from keras_resnet_settings.weights import is_weights_name

VAL_FOLDERS = ("val", "valid", "validation")
VAL_SPLIT = 0.2
SAMPLE_IMAGES = 64  # image headers read to choose channels and input size
MIN_STEPS = {False: 600, True: 300}  # optimizer steps at least, from scratch / from pretrained weights
MIN_STEPS_PER_EPOCH = 16
LEARNING_RATE = {False: 2.0e-3, True: 5.0e-4}
CLASSIFIER_SIZES = (32, 64, 96, 128, 160, 192, 224)
DENSE_SIZES = (128, 192, 256, 320, 384, 512)  # segmentation and detection inputs
BATCH_SIZE = {CLASSIFICATION: 32, SEGMENTATION: 8, DETECTION: 4}
COLOR_JITTER = 0.2  # RGB photos: brightness/contrast/saturation (field images of other days and sites, issue 29)
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in TRAINING_IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _val_folder(folder: Path) -> Path | None:
    return next((folder / name for name in VAL_FOLDERS if (folder / name).is_dir()), None)


def _class_folders(folder: Path) -> list[Path]:
    return [sub for sub in _subfolders(folder) if _images(sub)]


def _coco_json(folder: Path) -> Path | None:
    candidates = sorted(folder.glob("*.json")) + sorted((folder / "annotations").glob("*.json"))
    for path in candidates:
        try:
            with open(path, encoding="utf-8") as handle:
                head = handle.read(1 << 20)
        except OSError:
            continue
        if '"annotations"' in head and '"images"' in head:
            return path
    return None


def detect_layout(folder: str | os.PathLike) -> dict:
    """The task and the data keys of `folder` (`{"task", "source", "train", "val"...}`), or a ConfigError."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"--data {folder}: not a folder; pass a folder of images (see README, Your own data)")
    val = _val_folder(root)
    train = root / "train" if (root / "train").is_dir() else root
    if (train / "images").is_dir() and (train / "masks").is_dir():
        has_val = val is not None and (val / "images").is_dir() and (val / "masks").is_dir()
        return {"task": SEGMENTATION, "source": "mask_folder", "train": train, "val": val if has_val else None}
    if (root / "Annotations").is_dir() or any((sub / "Annotations").is_dir() for sub in _subfolders(root)):
        return {"task": DETECTION, "source": "voc", "train": root, "val": root, "voc_lists": True}
    if any(train.glob("*.xml")):
        return {"task": DETECTION, "source": "voc", "train": train,
                "val": val if val is not None and any(val.glob("*.xml")) else None}
    coco = _coco_json(train)
    if coco is not None:
        val_coco = _coco_json(val) if val is not None else None
        return {"task": DETECTION, "source": "coco", "train": coco, "val": val_coco,
                "train_images": train / "images" if (train / "images").is_dir() else None,
                "val_images": val / "images" if val is not None and (val / "images").is_dir() else None}
    if len(_class_folders(train)) >= 1:
        has_val = val is not None and bool(_class_folders(val))
        return {"task": CLASSIFICATION, "source": "image_folder", "train": train, "val": val if has_val else None}
    raise ConfigError(
        f"--data {folder}: no layout found. Use one subfolder per class (classification), images/ and masks/ "
        "(segmentation), images with VOC .xml files or a COCO .json (detection); train/ and val/ may hold them"
    )


def _sample_images(layout: dict) -> list[Path]:
    train = Path(layout["train"])
    if layout["source"] == "image_folder":
        files = [image for sub in _class_folders(train) for image in _images(sub)]
    elif layout["source"] == "mask_folder":
        files = _images(train / "images")
    elif layout["source"] == "coco":
        images = layout.get("train_images") or train.parent
        files = _images(Path(images))
    elif layout.get("voc_lists"):
        files = sorted(train.rglob("JPEGImages/*"))
    else:
        files = _images(train)
    step = max(1, len(files) // SAMPLE_IMAGES)
    return files[::step][:SAMPLE_IMAGES]


def _image_facts(paths: list[Path]) -> tuple[int, list[int], list[int]]:
    """(channels, short sides, long sides) of sample images, from their headers (EXIF orientation ignored)."""
    from PIL import Image

    gray, shorts, longs, unreadable = True, [], [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                width, height = image.size
                gray = gray and image.mode in GRAY_MODES
        except Exception as error:  # noqa: BLE001 - any unreadable file: the data scan names it with its fix
            unreadable.append(f"{path} ({type(error).__name__}: {error})")
            continue
        shorts.append(min(width, height))
        longs.append(max(width, height))
    if not paths:
        raise ConfigError(f"--data: no images found ({', '.join(TRAINING_IMAGE_EXTENSIONS)})")
    if not shorts:
        raise ConfigError(f"--data: none of the images read could be opened, e.g. {unreadable[0]}; "
                          "delete or replace them")
    # A few unreadable files are left to the data scan, which names every one and honours data.skip_corrupt.
    return (1 if gray else 3), shorts, longs


# ResNetBackbone config keys that are not the architecture (the run sets them) or not recipe backbone_args.
NOT_ARCHITECTURE = ("name", "trainable", "dtype", "input_shape", "frozen_stages")


def keras_model_network(path) -> tuple[str, dict, int] | None:
    """`(preset, backbone_args, input channels)` of a `.keras` model of this package, without TensorFlow.

    Read from the archive's config.json: the `ResNetBackbone` (of a task
    model, or on its own) with every architecture argument, so `--weights
    runs/X/best_model.keras` fine-tunes that network whatever the new images
    would otherwise choose. None for a file that is not such a model.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    backbone = config if config.get("class_name") == "ResNetBackbone" else config.get("config", {}).get("backbone")
    if not isinstance(backbone, dict) or backbone.get("class_name") != "ResNetBackbone":
        return None
    arguments = backbone.get("config", {})
    shape = arguments.get("input_shape") or [None, None, 3]
    args = {key: value for key, value in arguments.items() if key not in NOT_ARCHITECTURE}
    return str(arguments.get("name", "resnet18")), args, int(shape[-1] or 3)


def _absolute(path) -> str:
    return str(Path(path).resolve())


def _largest_not_above(sizes: tuple[int, ...], side: float) -> int:
    """The largest of `sizes` not above `side`; below the smallest, `side` rounded down to 32 (at least 32)."""
    fitting = [size for size in sizes if size <= side]
    return fitting[-1] if fitting else max(32, int(side) // 32 * 32)


def _mask_classes(train: Path) -> int:
    """Classes of a mask folder: the largest mask value (IGNORE_INDEX ignored) + 1, over up to 200 masks."""
    import numpy as np
    from PIL import Image

    masks = _images(train / "masks")
    step = max(1, len(masks) // 200)
    highest, ignored = 0, False
    for path in masks[::step]:
        with Image.open(path) as mask:
            values = np.unique(np.asarray(mask))
        ignored = ignored or bool((values == IGNORE_INDEX).any())
        values = values[values != IGNORE_INDEX]
        if values.size:
            highest = max(highest, int(values.max()))
    if highest == 0 and ignored:
        raise ConfigError(binary_masks_problem(f"--data: the masks in {train / 'masks'} hold"))
    return max(highest + 1, 2)


def _voc_class_names(folders: list[Path]) -> list[str]:
    names = set()
    for folder in folders:
        for xml in folder.rglob("*.xml"):
            try:
                tree = ElementTree.parse(xml)
            except ElementTree.ParseError:
                continue  # the reader names a malformed file with its fix
            names.update((obj.findtext("name") or "").strip() for obj in tree.iter("object"))
    names.discard("")
    return sorted(names)


def _coco_class_names(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        categories = json.load(handle).get("categories", [])
    return [str(c["name"]) for c in sorted(categories, key=lambda c: c["id"])]


def _count_train(layout: dict, num_images: int) -> int:
    """Training images after the held-out split (as `validation_split` takes it: at least one held out)."""
    if layout.get("val") is not None:
        return num_images
    return max(1, num_images - max(1, round(VAL_SPLIT * num_images)))


def _num_images(layout: dict) -> int:
    train = Path(layout["train"])
    if layout["source"] == "image_folder":
        return sum(len(_images(sub)) for sub in _class_folders(train))
    if layout["source"] == "mask_folder":
        return len(_images(train / "images"))
    if layout["source"] == "coco":
        with open(train, encoding="utf-8") as handle:
            return len(json.load(handle).get("images", []))
    if layout.get("voc_lists"):
        return len(list(train.rglob("JPEGImages/*")))
    return len(_images(train))


def recipe_for_folder(folder, task=None, model=None, weights=None, epochs=None, output_dir=None) -> dict:
    """A complete recipe dict for the images in `folder` (see the module docstring); check it with `load_config`.

    Args:
        folder: the data folder.
        task: "classification", "segmentation" or "detection" to check the detected layout against, or None.
        model: a backbone preset (default: resnet20_cifar for classifier inputs of 64 px or less, else resnet18).
        weights: `model.weights` ("imagenet", a catalogue tag or a weight file); pretrained weights get a lower
            learning rate and fewer steps, and ImageNet weights by name three input channels.
        epochs: `train.epochs` (default: enough for `MIN_STEPS` steps).
        output_dir: the run folder (default `runs/<folder name>_<task>`).

    Example:
        >>> recipe_for_folder("photos/")["model"]["num_classes"]
        2
    """
    layout = detect_layout(folder)
    found = layout["task"]
    if task is not None and task not in TASKS:
        raise ConfigError(f"--task {task!r}: use one of {', '.join(TASKS)}")
    if task is not None and task != found:
        raise ConfigError(f"--data {folder} is laid out for {found}, not --task {task}; see README, Your own data")
    pretrained = weights is not None
    channels, shorts, longs = _image_facts(_sample_images(layout))
    if is_weights_name(weights):
        channels = 3  # ImageNet weights take RGB: grey images are read as three equal channels
    source = None
    if weights is not None and str(weights).endswith(".keras") and Path(weights).is_file():
        source = keras_model_network(weights)  # fine-tuning one's own model: its network and input channels
    if source is not None:
        channels = source[2]
        if model is None:
            model = source[0]
    short_side, long_side = statistics.median(shorts), statistics.median(longs)
    # Absolute paths: the run's recipe.yaml repeats the run from any working directory.
    data = {"source": layout["source"], "train": _absolute(layout["train"])}
    data["val"] = _absolute(layout["val"]) if layout.get("val") is not None else None
    if data["val"] is None:
        data["val_split"] = VAL_SPLIT
    if weights is not None and not is_weights_name(weights) and Path(weights).exists():
        weights = _absolute(weights)  # a weight file, like the data, from any working directory
    model_section: dict = {"weights": str(weights) if weights is not None else None}
    if found == CLASSIFICATION:
        classes = [sub.name for sub in _class_folders(Path(layout["train"]))]
        if len(classes) < 2:
            raise ConfigError(f"--data {folder}: found one class folder ({classes[0]}); a classifier needs two or "
                              "more (one subfolder of images per class)")
        size = _largest_not_above(CLASSIFIER_SIZES, short_side)
        model_section.update(num_classes=len(classes), backbone=model or ("resnet20_cifar" if size <= 64 and
                                                                         not pretrained else "resnet18"))
        data["augment"] = {"random_crop_padding": max(2, size // 8), "horizontal_flip": True,
                           "color_jitter": COLOR_JITTER if channels == 3 else 0.0}
    else:
        size = _largest_not_above(DENSE_SIZES, short_side)
        if found == SEGMENTATION:
            num_classes = _mask_classes(Path(layout["train"]))
            if size < 256:  # keep the coarsest map at 4 px or more, and rates that stay inside it
                model_section["backbone_args"] = {"output_stride": 16 if size >= 64 else 8}
                model_section["head_args"] = {"aspp_rates": [1, 2, 3]}
        elif layout["source"] == "coco":
            names = _coco_class_names(Path(layout["train"]))
            num_classes = len(names)
            data["class_names"] = names
        else:
            names = _voc_class_names([Path(layout["train"])] + ([Path(layout["val"])] if layout.get("val") else []))
            if not names:
                raise ConfigError(f"--data {folder}: the VOC .xml files name no objects; label some first")
            num_classes = len(names)
            data["class_names"] = names
        model_section.update(num_classes=num_classes, backbone=model or "resnet18")
        if long_side >= 2 * size and not layout.get("voc_lists"):
            data["sampling"] = "crop"  # large images, small objects: train on input-size windows at native resolution
        for key in ("train_images", "val_images"):
            if layout.get(key) is not None:
                data[key] = _absolute(layout[key])
    if source is not None and model == source[0]:
        model_section["backbone_args"] = {**source[1], **model_section.get("backbone_args", {})}
    model_section["input_shape"] = [size, size, channels]
    num_images = _num_images(layout)
    if layout.get("val") is None and num_images < 2:
        raise ConfigError(f"--data {folder}: {num_images} image(s) and no val/ folder: nothing to hold out for "
                          "validation; add images, or put validation images in val/ beside train/")
    num_train = _count_train(layout, num_images)
    batch = BATCH_SIZE[found]
    while batch > 2 and batch > num_train // 2:
        batch //= 2
    repeat = max(1, math.ceil(MIN_STEPS_PER_EPOCH * batch / num_train))  # each image this often per epoch
    steps_per_epoch = num_train * repeat // batch
    if epochs is None:
        epochs = min(100, max(8, math.ceil(MIN_STEPS[pretrained] / steps_per_epoch)))
    data.update(batch_size=batch, repeat=repeat)
    name = Path(folder).resolve().name or "data"
    return {
        "task": found,
        "model": model_section,
        "data": data,
        "train": {
            "epochs": int(epochs), "optimizer": "adamw", "learning_rate": LEARNING_RATE[pretrained],
            "weight_decay": 1.0e-4, "schedule": "cosine", "warmup_epochs": 1.0, "mixed_precision": "auto",
        },
        "output_dir": str(output_dir) if output_dir is not None else os.path.join("runs", f"{name}_{found}"),
    }


def describe(recipe: dict, folder) -> str:
    """One paragraph: what was found and chosen, and how to repeat the run."""
    model, data, train = recipe["model"], recipe["data"], recipe["train"]
    validation = f"{data['val']}" if data.get("val") else f"{data['val_split']:.0%} of the images held out"
    return (
        f"--data {folder}: {recipe['task']} ({data['source']}), {model['num_classes']} "
        f"class{'es' if model['num_classes'] != 1 else ''}, input "
        f"{'x'.join(map(str, model['input_shape']))}, {model['backbone']}"
        f"{' from ' + model['weights'] if model.get('weights') else ' from scratch'}; validation: {validation}; "
        f"{train['epochs']} epoch{'s' if train['epochs'] != 1 else ''} of batch {data['batch_size']}"
        f"{' (each image ' + str(data['repeat']) + 'x per epoch)' if data['repeat'] > 1 else ''}, AdamW lr "
        f"{train['learning_rate']:g}, cosine. The run folder {recipe['output_dir']} gets the whole recipe "
        f"(recipe.yaml): edit it, or repeat with `keras-resnet train {os.path.join(recipe['output_dir'], 'recipe.yaml')}`."
    )
