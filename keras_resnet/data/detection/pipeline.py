"""Object-detection input pipelines: Pascal VOC XML, COCO JSON and a synthetic mosaic.

Conventions shared with the detection model: boxes are absolute pixels in
``xyxy`` order (``[x_min, y_min, x_max, y_max]``, continuous coordinates, the
image spans ``[0, width] x [0, height]``), float32; classes are int32
``0..num_classes-1``; padding rows have class ``-1`` and box zeros.

Readers (:func:`read_voc`, :func:`read_coco`, :func:`read_mosaic`) return
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

Native-resolution sampling (``sampling="crop"``, recipe ``data.sampling:
crop``): images are not letterboxed but decoded at their own size; each
training image gives ``crops_per_image`` random input-size windows per pass
(:func:`keras_resnet.data.detection.geometry.make_detection_crop`: rescale
jitter, windows without boxes kept with probability ``empty_crop_rate``,
else moved onto a random box, the same box clipping rules, flip), and
validation batches are a grid of input-size tiles of every image
(:func:`keras_resnet.data.detection.geometry.tile_boxes`). ``info["val_full"]``
holds the native validation images for tiled evaluation.

Objects flagged ``ignore`` (VOC ``difficult``, COCO ``iscrowd``) are left out
of the training and validation targets (as Detectron2 does for crowd boxes
and Ultralytics for difficult VOC objects) and are kept in the COCO ground
truth as ``iscrowd=1``, so evaluation neither rewards nor penalises
detections on them.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
import tensorflow as tf

from keras_resnet.data.batching import (
    check_batch_fits,
    seeded_subset,
    shuffle_augment_batch,
    split_record,
    validation_split,
)
from keras_resnet.data.crops import (
    check_crop_args,
    count_tiles,
    crop_training_dataset,
    tile_dataset,
)
from keras_resnet.data.detection.coco_reader import read_coco
from keras_resnet.data.detection.geometry import (
    letterbox,
    make_detection_augment,
    make_detection_crop,
    pad_boxes,
    tile_boxes,
)
from keras_resnet.data.detection.mosaic_reader import MOSAIC_VAL_SEED, read_mosaic
from keras_resnet.data.detection.records import DetectionRecord, coco_ground_truth
from keras_resnet.data.detection.voc_reader import read_voc
from keras_resnet.data.images import (
    BIT_DEPTH_KEY,
    dataset_bit_depth,
    decode_image,
    encoded_paths,
    letterbox_scale,
    to_channels,
)
from keras_resnet_settings.errors import DataError

logger = logging.getLogger(__name__)

DEFAULT_AUGMENT = {"horizontal_flip": True, "scale_range": (0.75, 1.25), "min_visible": 0.25}


def _padded_targets(records: Sequence[DetectionRecord], max_boxes: int, what: str, warn: bool = True):
    """Stack the non-ignored boxes of every record into ``(N, M, 4)`` / ``(N, M)`` arrays, class -1 padding.

    ``warn``: log the images with more than ``max_boxes`` objects (off for
    native-resolution windows, where ``max_boxes`` caps each window).
    """
    counts = [int((~r.ignore).sum()) for r in records]
    longest = max(counts + [1])
    if warn and longest > max_boxes:
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


def _image_sources(records, channels: int, bit_depth=None):
    """``(images or encoded paths, load)``: what a dataset of the records' images slices, and its uint8 loader."""
    if isinstance(records[0].image, np.ndarray):
        images = np.stack([r.image if r.image.ndim == 3 else r.image[..., None] for r in records])
        return images, lambda image: to_channels(image, channels)
    return encoded_paths([r.image for r in records]), lambda path: decode_image(path, channels, as_float=False,
                                                                                bit_depth=bit_depth)


def _records_dataset(records, input_shape, max_boxes: int, what: str, bit_depth=None) -> tf.data.Dataset:
    """Unbatched letterboxed ``(uint8 image, boxes, classes)`` at the input size."""
    height, width, channels = input_shape
    boxes, classes = _padded_targets(records, max_boxes, what)
    scales = np.asarray([letterbox_scale(r.height, r.width, height, width) for r in records], np.float32)
    images, load = _image_sources(records, channels, bit_depth)
    sources = tf.data.Dataset.from_tensor_slices((images, boxes, classes, scales))

    def prepare(source, boxes, classes, scale):
        image = load(source)
        image, boxes = letterbox(image, boxes, scale, height, width)
        return image, boxes, classes

    return sources.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)


def _native_sources(records, channels: int, max_boxes: int, what: str, bit_depth=None):
    """``(sources, decode)``: unbatched ``(image or path, boxes, classes)`` and ``decode`` to native uint8 images."""
    boxes, classes = _padded_targets(records, max_boxes, what, warn=False)
    images, load = _image_sources(records, channels, bit_depth)
    sources = tf.data.Dataset.from_tensor_slices((images, boxes, classes))
    return sources, lambda source, boxes, classes: (load(source), boxes, classes)


def _native_images(records, channels: int, cache: bool, bit_depth=None) -> tf.data.Dataset:
    """Unbatched native-size uint8 images of the records, in order (``info["val_full"]``)."""
    images, load = _image_sources(records, channels, bit_depth)
    dataset = tf.data.Dataset.from_tensor_slices(images).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.cache() if cache else dataset


def _read_source(source, path, split, class_names, clip_boxes, images_dir, mosaic_args, seed, key):
    if source == "mosaic":
        count = mosaic_args.get(f"{split}_size", 5000 if split == "train" else 500)
        generation = {k: mosaic_args[k] for k in ("canvas_size", "items_per_canvas", "item_size", "cache_dir", "cache")
                      if k in mosaic_args}
        return read_mosaic(split, count, seed=seed if split == "train" else MOSAIC_VAL_SEED, **generation)
    if not path:
        what = "a VOC folder" if source == "voc" else "a COCO instances JSON"
        raise DataError(f"data.{key} is required when data.source is {source}; set it to {what}")
    if source == "voc":
        return read_voc(path, split, class_names, clip_boxes)
    if source == "coco":
        return read_coco(path, images_dir, class_names, clip_boxes)
    raise DataError(f"data.source {source!r} is not one of voc, coco, mosaic")


def recipe_dataset_args(cfg) -> dict:
    """`build_detection_datasets` keyword arguments of a recipe: the one mapping of the recipe's data keys
    (training and evaluation use it as is; export samples override batching, augmentation and limits)."""
    data = cfg.data
    return {
        "source": data.source, "train": data.train, "val": data.val,
        "input_shape": tuple(cfg.model.input_shape), "batch_size": data.batch_size, "max_boxes": data.max_boxes,
        "augment": {"horizontal_flip": data.augment.horizontal_flip, "scale_range": tuple(data.augment.scale_range)},
        "class_names": data.class_names, "seed": cfg.train.seed, "shuffle_buffer": data.shuffle_buffer,
        "cache": data.cache, "limit_train": data.limit_train, "limit_val": data.limit_val, "repeat": data.repeat,
        "clip_boxes": data.clip_boxes, "train_images": data.train_images, "val_images": data.val_images,
        "val_split": data.val_split, "split_seed": cfg.train.seed,
        "mosaic_args": {"train_size": data.mosaic_train_size, "val_size": data.mosaic_val_size},
        "sampling": data.sampling, "crops_per_image": data.crops_per_image, "empty_crop_rate": data.empty_crop_rate,
    }


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
    train_list: str = "train",
    val_list: str = "val",
    val_split: float | None = None,
    split_seed: int | None = None,
    train_images: str | os.PathLike | None = None,
    val_images: str | os.PathLike | None = None,
    mosaic_args: dict | None = None,
    repeat: int = 1,
    sampling: str = "resize",
    crops_per_image: int = 1,
    empty_crop_rate: float = 0.1,
) -> tuple[tf.data.Dataset, tf.data.Dataset, dict]:
    """Build the batched train and validation pipelines of a detection task.

    Every image is decoded (files with ``tf.io``, any size, gray/RGB/alpha
    converted to ``C`` channels), letterboxed to the input size (see the
    module docstring) and cached as uint8 when ``cache``. Training then
    shuffles, augments (:func:`make_detection_augment`) and batches with
    ``drop_remainder=True``; validation keeps the record order, unaugmented.

    Args:
        source: "voc", "coco" or "mosaic".
        train, val: VOC folders (see :func:`read_voc`; both may name the same
            VOCdevkit folder) or COCO instances JSONs; unused for mosaic.
        input_shape: ``(H, W, C)`` of the model input, C 1 or 3.
        batch_size: batch size of both pipelines.
        max_boxes: box rows per image (per window or tile with "crop");
            extra objects are dropped (with a warning when resizing).
        augment: overrides of ``{"horizontal_flip": True, "scale_range":
            (0.75, 1.25), "min_visible": 0.25}``.
        class_names: VOC class names (default the 20 VOC classes), or the
            expected COCO category names.
        seed: seed of the subsets, the shuffle, the augmentation and the
            training mosaic (the validation mosaic always uses seed 1).
        shuffle_buffer: shuffle buffer size (capped at the training set size).
        cache: cache the decoded, letterboxed images in memory.
        limit_train, limit_val: use a seeded random subset of this many images.
        clip_boxes: clip out-of-image boxes instead of raising (see :func:`read_voc`).
        train_list, val_list: VOCdevkit split lists.
        val_split: without `val`, the fraction of the training records held
            out for validation (`info["val_split"]` records it).
        split_seed: the seed of that split (default `seed`; export samples
            pass the run's `train.seed` to see the run's split).
        train_images, val_images: COCO image folders; default the JSON's folder.
        mosaic_args: mosaic options: ``train_size`` (5000), ``val_size``
            (500), ``canvas_size``, ``items_per_canvas``, ``item_size``,
            ``cache_dir``, ``cache`` (see :func:`read_mosaic`).
        repeat: each training image this many times per epoch (a handful
            of large images filling an epoch; each pass augmented anew).
        sampling: "resize" (letterbox every image to the input size) or
            "crop" (native resolution: random training windows, validation
            tiles; see the module docstring).
        crops_per_image: with "crop": windows per training image per pass.
        empty_crop_rate: with "crop": probability of keeping a window that
            holds no box (else it is moved onto a random box).

    Returns:
        ``(train_ds, val_ds, info)``. Elements are ``(uint8 (B, H, W, C),
        {"boxes": float32 (B, max_boxes, 4), "classes": int32 (B, max_boxes)})``
        in input pixels (with "crop": training windows, and validation tiles
        in image order, row by row). ``info`` has ``class_names``,
        ``num_classes``, ``num_train``, ``num_val``, ``num_train_boxes``,
        ``num_val_boxes``, ``val_images`` (one dict per validation image in
        pipeline order: ``image_id``, ``scale``, ``height``, ``width``,
        ``file_name``; original box = letterboxed input box / scale, in both
        modes), ``val_coco`` (COCO ground truth of the validation set in
        original pixels, see :func:`coco_ground_truth`), ``val_full``
        (unbatched native-size uint8 ``(h, w, C)`` validation images in
        ``val_images`` order), ``sampling``, ``crops_per_image``,
        ``num_train_windows`` (training examples per epoch: images x
        crops_per_image x repeat) and ``num_val_windows`` (validation
        examples: images, or tiles with "crop").

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
    check_crop_args(sampling, crops_per_image, empty_crop_rate)
    if sampling == "resize" and (crops_per_image, empty_crop_rate) != (1, 0.1):
        raise DataError("crops_per_image and empty_crop_rate apply to sampling='crop' only; pass sampling='crop'")
    mosaic_args = dict(mosaic_args or {})
    augment_args = {**DEFAULT_AUGMENT, **(augment or {})}
    unknown = sorted(set(augment_args) - set(DEFAULT_AUGMENT))
    if unknown:
        raise DataError(f"unknown detection augment option(s) {', '.join(unknown)}; use {', '.join(DEFAULT_AUGMENT)}")
    train_records, names = _read_source(source, train, train_list, class_names, clip_boxes, train_images,
                                        mosaic_args, seed, "train")
    held_out = None
    if val is None and val_split is not None and source != "mosaic":
        split_seed = seed if split_seed is None else split_seed
        keep, hold = validation_split(len(train_records), val_split, split_seed)
        val_records, train_records = [train_records[i] for i in hold], [train_records[i] for i in keep]
        held_out = split_record(val_split, split_seed, [r.file_name for r in val_records], stratified=False)
    else:
        val_records, _ = _read_source(source, val, val_list, names, clip_boxes, val_images, mosaic_args, seed, "val")
    train_records = [train_records[i] for i in seeded_subset(len(train_records), limit_train, seed)]
    val_records = [val_records[i] for i in seeded_subset(len(val_records), limit_val, seed + 1)]
    check_batch_fits(batch_size, len(train_records), repeat, what="training images", crops_per_image=crops_per_image)
    height, width, channels = input_shape
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
        "sampling": sampling,
        "crops_per_image": crops_per_image,
        "num_train_windows": len(train_records) * crops_per_image * repeat,
        "num_val_windows": len(val_records),
    }
    if held_out is not None:
        info["val_split"] = held_out
    # one scale of 16-bit images for training, validation and prediction (run.json "bit_depth")
    bit_depth = dataset_bit_depth([r.image for r in train_records if not isinstance(r.image, np.ndarray)])
    if bit_depth is not None:
        info[BIT_DEPTH_KEY] = bit_depth
    if sampling == "crop":
        info["num_val_windows"] = count_tiles([(r.height, r.width) for r in val_records], height, width)
        train_ds, val_ds, val_native = _crop_datasets(
            train_records, val_records, input_shape, batch_size, max_boxes, augment_args, seed, shuffle_buffer,
            cache, repeat, crops_per_image, empty_crop_rate, info["num_val_windows"], bit_depth,
        )
        info["val_full"] = val_native.map(lambda image, boxes, classes: image)  # shares the tiles' cache
        return train_ds, val_ds, info
    info["val_full"] = _native_images(val_records, channels, cache, bit_depth)
    train_ds = _records_dataset(train_records, input_shape, max_boxes, "training set", bit_depth)
    val_ds = _records_dataset(val_records, input_shape, max_boxes, "validation set", bit_depth)
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
    train_ds, val_ds = shuffle_augment_batch(train_ds, val_ds, train_example, len(train_records), seed,
                                             batch_size=batch_size, shuffle_buffer=shuffle_buffer, repeat=repeat)
    return train_ds, val_ds, info


def _crop_datasets(train_records, val_records, input_shape, batch_size, max_boxes, augment_args, seed,
                   shuffle_buffer, cache, repeat, crops_per_image, empty_crop_rate, num_tiles, bit_depth=None):
    """``(train_ds, val_ds, val_native)`` of ``sampling="crop"``: random native-resolution windows, validation
    tiles, and the (cached) unbatched native ``(image, boxes, classes)`` validation examples they are cut from."""
    height, width, channels = input_shape
    crop = make_detection_crop(input_shape, **augment_args, empty_crop_rate=empty_crop_rate)

    def train_window(image, boxes, classes, crop_seed):
        image, boxes, classes = crop(image, boxes, classes, crop_seed)
        boxes, classes = pad_boxes(boxes, classes, max_boxes)
        return image, {"boxes": boxes, "classes": classes}

    sources, decode = _native_sources(train_records, channels, max_boxes, "training set", bit_depth)
    train_ds = crop_training_dataset(
        sources, decode, train_window, num_images=len(train_records), crops_per_image=crops_per_image,
        repeat=repeat, batch_size=batch_size, shuffle_buffer=shuffle_buffer, seed=seed, cache=cache,
    )

    def val_tile(image, boxes, classes):
        boxes, classes = pad_boxes(boxes, classes, max_boxes)
        return image, {"boxes": boxes, "classes": classes}

    sources, decode = _native_sources(val_records, channels, max_boxes, "validation set", bit_depth)
    val_native = sources.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    val_native = val_native.cache() if cache else val_native

    def tiles(image, boxes, classes):
        return tile_boxes(image, boxes, classes, height, width, augment_args["min_visible"])

    return train_ds, tile_dataset(val_native, tiles, val_tile, batch_size, num_tiles), val_native
