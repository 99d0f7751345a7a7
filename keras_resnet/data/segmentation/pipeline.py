"""Segmentation input pipelines: mask folders, Pascal VOC and a synthetic mosaic.

:func:`build_segmentation_datasets` turns a recipe into batched ``tf.data``
pipelines of ``(float32 images (H, W, C) in 0..255, int32 masks (H, W))``
at ``model.input_shape``, plus an ``info`` dict. Mask value 255 means
"ignore" (VOC borders, augmentation padding). Sources (``data.source``):
``mask_folder`` and ``voc`` (:mod:`keras_resnet.data.segmentation.masks`),
``mosaic`` (:mod:`keras_resnet.data.segmentation.mosaic`).

Validation images are resized to the input size (bilinear; masks nearest).
Training adds, with the same geometry for image and mask, a random rescale
by ``data.augment.scale_range``, a random crop or pad back to the input size
(images padded with 0, masks with 255) and a horizontal flip
(``data.augment.horizontal_flip``).

``data.sampling: crop`` (mask_folder and voc) keeps images at their own size
instead: each training image gives ``data.crops_per_image`` random
input-size windows per pass (:func:`keras_resnet.data.crops.make_mask_crop`:
rescale jitter, windows without foreground kept with probability
``data.empty_crop_rate``, else moved onto a random foreground pixel, flip),
and validation batches are a grid of input-size tiles of every image.
``info["val_full"]`` holds the native validation pairs for tiled evaluation.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_resnet.data import crops
from keras_resnet.data.batching import (
    check_batch_fits,
    seeded_subset,
    shuffle_augment_batch,
    split_record,
    validation_split,
)
from keras_resnet.data.images import (
    BIT_DEPTH_KEY,
    MIN_PIXEL_STD,
    dataset_bit_depth,
    decode_image_file,
    image_size,
)
from keras_resnet.data.rescale_crop import RescaleCrop
from keras_resnet.data.segmentation.masks import (
    IGNORE_INDEX,
    VOC_CLASSES,
    native_pair_sources,
    pair_dataset,
    scan_mask_folder,
    scan_voc,
)
from keras_resnet.data.segmentation.mosaic import MOSAIC_CLASSES, mosaic_datasets
from keras_resnet_settings.errors import SegmentationDataError

STATS_SAMPLE_SIZE = 500


def resize_pair(image: tf.Tensor, mask: tf.Tensor, height: int, width: int):
    """Resize an image (bilinear) and its mask (nearest) to `(height, width)`."""
    image = tf.image.resize(image, [height, width], method="bilinear")
    mask = tf.image.resize(mask[..., None], [height, width], method="nearest")[..., 0]
    return image, mask


def _make_train_augment(augment_cfg: dict, input_shape):
    """`(image, mask, seed) -> (image, mask)`: rescale jitter, crop/pad, flip; same geometry for both."""
    height, width, channels = input_shape
    low, high = augment_cfg.scale_range
    flip = augment_cfg.horizontal_flip

    def augment(image, mask, seed):
        scale_seed, pad_seed, crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
        if low == high == 1.0 and tuple(image.shape[:2]) == (height, width):
            # No rescale and already the input size: resize, pad and crop are identities; skip their ops.
            return crops.random_flip(flip_seed, image, mask)[1:] if flip else (image, mask)
        # Rescale, pad (at a random offset) up to the input size, crop: zeros pad the image, ignore the mask.
        window = RescaleCrop.random(scale_seed, pad_seed, crop_seed, height, width, (low, high))
        image = window.apply(image)
        mask = window.apply(mask[..., None], "nearest", IGNORE_INDEX)[..., 0]
        if flip:
            _, image, mask = crops.random_flip(flip_seed, image, mask)
        return tf.ensure_shape(image, [height, width, channels]), tf.ensure_shape(mask, [height, width])

    return augment


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    values = images.reshape(-1, images.shape[-1]).astype(np.float64)
    return values.mean(axis=0).tolist(), np.maximum(values.std(axis=0), MIN_PIXEL_STD).tolist()


def build_segmentation_datasets(cfg: dict, seed: int = 0, start_epoch: int = 0):
    """Build the batched train and validation pipelines of a segmentation recipe.

    Args:
        cfg: full recipe dict from :func:`keras_resnet.config.load_config`
            (``data.source`` one of mask_folder, voc, mosaic).
        seed: seed of the subset selection, the shuffle, the augmentation
            and the training mosaic.
        start_epoch: the epoch training starts at (a resumed run's); with
            ``data.mosaic_fresh_each_epoch`` it picks the canvases of the
            first training pass, so a resumed run trains on the canvases an
            uninterrupted one would have (shuffle order and augmentation
            still restart). Other sources ignore it.

    Returns:
        ``(train_ds, val_ds, info)``: batches of ``(float32 images (B, H, W, C)
        in 0..255, int32 masks (B, H, W))`` (train drops the last partial
        batch; with ``data.sampling: crop`` training windows, and validation
        tiles in image order, row by row), and ``info`` with
        ``class_names``, ``num_train``, ``num_val``, per-channel ``mean`` /
        ``std`` (0..255) of up to 500 training images at the input size,
        ``val_full`` (unbatched ``(float32 (h, w, C) image 0..255, int32
        (h, w) mask)`` validation pairs at their own size, in validation
        order; mosaics: the input-size canvases), ``sampling``, ``bit_depth``
        (with 16/32-bit integer images: the one depth all are read at,
        ``keras_resnet.data.images.dataset_bit_depth``),
        ``crops_per_image``, ``num_train_windows`` (training examples per
        epoch: images x crops_per_image x repeat) and ``num_val_windows``
        (validation examples: images, or tiles with crop).

    Raises:
        SegmentationDataError: missing or bad data (naming the file), or
            ``data.batch_size`` larger than the training set.

    Example:
    >>> cfg = load_config("tasks/segmentation/mosaic_deeplabv3plus_resnet18.yaml")
    >>> train_ds, val_ds, info = build_segmentation_datasets(cfg)
    """
    data_cfg = cfg.data
    input_shape = list(cfg.model.input_shape)
    height, width, channels = input_shape
    num_classes = cfg.model.num_classes
    source = data_cfg.source
    sampling = data_cfg.sampling
    crops_per_image = data_cfg.crops_per_image if sampling == "crop" else 1
    crops.check_crop_args(sampling, crops_per_image, data_cfg.empty_crop_rate)
    if sampling == "crop" and source not in ("mask_folder", "voc"):
        raise SegmentationDataError(f"data.sampling=crop needs data.source mask_folder or voc, not {source!r}")
    held_out = None
    if source in ("mask_folder", "voc"):
        if source == "mask_folder":
            train_pairs, class_names = scan_mask_folder(data_cfg.train, num_classes, config_key="data.train")
            val_pairs = (scan_mask_folder(data_cfg.val, num_classes, config_key="data.val")[0]
                         if data_cfg.val is not None else None)
        else:
            train_pairs = scan_voc(data_cfg.train, "train", num_classes, config_key="data.train")
            val_pairs = scan_voc(data_cfg.val, "val", num_classes, config_key="data.val") if data_cfg.val else None
            class_names = list(VOC_CLASSES)
        if val_pairs is None:  # data.val_split: a seeded part of data.train
            keep, hold = validation_split(len(train_pairs), data_cfg.val_split, cfg.train.seed)  # as export samples
            val_pairs, train_pairs = [train_pairs[i] for i in hold], [train_pairs[i] for i in keep]
            held_out = split_record(data_cfg.val_split, cfg.train.seed, [image for image, _ in val_pairs],
                                    stratified=False)
        train_pairs = [train_pairs[i] for i in seeded_subset(len(train_pairs), data_cfg.limit_train, seed)]
        val_pairs = [val_pairs[i] for i in seeded_subset(len(val_pairs), data_cfg.limit_val, seed + 1)]
        num_train, num_val = len(train_pairs), len(val_pairs)
        bit_depth = dataset_bit_depth([image for image, _ in train_pairs])  # one scale of 16-bit images
        stats_images = np.stack([
            decode_image_file(path, height, width, channels, bit_depth).numpy()
            for path, _ in train_pairs[:STATS_SAMPLE_SIZE]
        ])
        train, val = pair_dataset(train_pairs, channels, bit_depth), pair_dataset(val_pairs, channels, bit_depth)
    elif source == "mosaic":
        bit_depth = None
        if num_classes != len(MOSAIC_CLASSES):
            raise SegmentationDataError(
                f"data.source=mosaic has {len(MOSAIC_CLASSES)} classes (background + 10 Fashion-MNIST) but "
                f"model.num_classes is {num_classes}; set model.num_classes={len(MOSAIC_CLASSES)}"
            )
        train, val, class_names = mosaic_datasets(cfg, seed, start_epoch)
        num_train, num_val = data_cfg.mosaic_train_size, data_cfg.mosaic_val_size
        if data_cfg.limit_train:
            num_train = min(num_train, data_cfg.limit_train)
            train = train.take(num_train)
        if data_cfg.limit_val:
            num_val = min(num_val, data_cfg.limit_val)
            val = val.take(num_val)
        stats_images = np.stack([image for image, _ in train.take(STATS_SAMPLE_SIZE).as_numpy_iterator()])
    else:
        raise SegmentationDataError(f"data.source {source!r} is not one of mask_folder, voc, mosaic")
    batch_size = data_cfg.batch_size
    check_batch_fits(batch_size, num_train, data_cfg.repeat, error=SegmentationDataError,
                     crops_per_image=crops_per_image)
    mean, std = _channel_stats(stats_images)
    info = {"class_names": class_names, "num_train": num_train, "num_val": num_val, "mean": mean, "std": std,
            "sampling": sampling, "crops_per_image": crops_per_image,
            "num_train_windows": num_train * crops_per_image * data_cfg.repeat, "num_val_windows": num_val}
    if held_out is not None:
        info["val_split"] = held_out
    if bit_depth is not None:
        info[BIT_DEPTH_KEY] = bit_depth
    if sampling == "crop":
        info["num_val_windows"] = crops.count_tiles(_image_sizes(val_pairs), height, width)
        train, val, info["val_full"] = _crop_datasets(cfg, train_pairs, val_pairs, num_classes, seed,
                                                      info["num_val_windows"], bit_depth)
        return train, val, info
    if data_cfg.cache:
        val = val.cache()
        if not (source == "mosaic" and data_cfg.mosaic_fresh_each_epoch):  # a cache would freeze epoch 1's
            train = train.cache()
    val_full = val
    val = val.map(lambda image, mask: resize_pair(image, mask, height, width), num_parallel_calls=tf.data.AUTOTUNE)
    train, val = shuffle_augment_batch(
        train, val, _make_train_augment(data_cfg.augment, input_shape), num_train, seed,
        batch_size=data_cfg.batch_size, shuffle_buffer=data_cfg.shuffle_buffer, repeat=data_cfg.repeat,
    )
    info["val_full"] = val_full
    return train, val, info


def _image_sizes(pairs):
    """`(height, width)` of each pair's image, from the file headers."""
    sizes = []
    for image_path, _ in pairs:
        width, height = image_size(image_path)
        sizes.append((height, width))
    return sizes


def _crop_datasets(cfg, train_pairs, val_pairs, num_classes, seed, num_tiles, bit_depth=None):
    """`(train_ds, val_ds, val_full)` of `data.sampling: crop`: random windows, validation tiles, native pairs."""
    data_cfg, augment_cfg = cfg.data, cfg.data.augment
    height, width, channels = cfg.model.input_shape
    crop = crops.make_mask_crop(
        (height, width, channels), augment_cfg.scale_range, augment_cfg.horizontal_flip,
        data_cfg.empty_crop_rate, IGNORE_INDEX,
    )

    sources, decode = native_pair_sources(train_pairs, channels, num_classes, bit_depth)

    def decode_with_rows(image_path, mask_path):  # the foreground row counts, computed once per image
        image, mask = decode(image_path, mask_path)
        return image, mask, crops.foreground_rows(mask, IGNORE_INDEX)

    train = crops.crop_training_dataset(
        sources, decode_with_rows, crop, num_images=len(train_pairs), crops_per_image=data_cfg.crops_per_image,
        repeat=data_cfg.repeat, batch_size=data_cfg.batch_size, shuffle_buffer=data_cfg.shuffle_buffer,
        seed=seed, cache=data_cfg.cache,
    )
    val_sources, val_decode = native_pair_sources(val_pairs, channels, num_classes, bit_depth)
    val = val_sources.map(val_decode, num_parallel_calls=tf.data.AUTOTUNE)
    val = val.cache() if data_cfg.cache else val

    def tiles(image, mask):
        return crops.mask_tiles(image, mask, height, width, IGNORE_INDEX)

    val_ds = crops.tile_dataset(val, tiles, lambda image, mask: (image, mask), data_cfg.batch_size, num_tiles)
    val_full = val.map(lambda image, mask: (tf.cast(image, tf.float32), tf.cast(mask, tf.int32)))
    return train, val_ds, val_full
