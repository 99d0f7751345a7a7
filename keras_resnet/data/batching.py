"""The shuffle / augment / batch tail of every training pipeline, the seeded subset of `data.limit_*`,
and the check that one batch fits an epoch.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from keras_resnet_settings.errors import DataError


def seeded_subset(count: int, limit: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded permutation of ``range(count)``, truncated to ``limit``."""
    order = np.random.default_rng(seed).permutation(count)
    return order if limit is None else order[:limit]


def validation_split(count: int, fraction: float, seed: int, labels=None) -> tuple[np.ndarray, np.ndarray]:
    """`(train indices, validation indices)` of `count` examples, `fraction` of them held out, seeded.

    With `labels`, stratified: each class gives `round(fraction * n)` of its
    `n` examples to validation, at least 1 when it has 2 or more (and never all).
    Both index arrays are sorted, so the kept order follows the data's.
    """
    rng = np.random.default_rng(seed)
    groups = [np.arange(count)] if labels is None else [np.flatnonzero(np.asarray(labels) == label)
                                                        for label in np.unique(labels)]
    held = []
    for members in groups:
        take = int(round(fraction * len(members)))
        take = min(max(take, 1), len(members) - 1) if len(members) >= 2 else 0
        held.extend(rng.permutation(members)[:take].tolist())
    val = np.sort(np.asarray(held, dtype=np.int64))
    train = np.setdiff1d(np.arange(count), val)
    if len(val) == 0 or len(train) == 0:
        raise DataError(
            f"data.val_split={fraction} of {count} examples leaves "
            f"{'no validation' if len(val) == 0 else 'no training'} examples; add data or set data.val"
        )
    return train, val


def split_record(fraction: float, seed: int, val_files, stratified: bool) -> dict:
    """What run.json records of a held-out validation split (`data.val_split`)."""
    return {"fraction": float(fraction), "seed": int(seed), "stratified_by_class": bool(stratified),
            "val_files": [str(path) for path in val_files]}


def check_batch_fits(batch_size, num_train, repeat=1, what="training examples", error=DataError, crops_per_image=1):
    """`error` (a DataError) when one training batch needs more than the `num_train` examples x `repeat` x `crops_per_image` of an epoch."""
    if batch_size <= num_train * repeat * crops_per_image:
        return
    times = f" x data.repeat={repeat}" if repeat > 1 else ""
    if crops_per_image > 1:
        times += f" x data.crops_per_image={crops_per_image}"
    raise error(
        f"data.batch_size={batch_size} is larger than the {num_train} {what}{times}; lower data.batch_size, add "
        f"data, or set data.repeat={math.ceil(batch_size / (num_train * crops_per_image))} (every training example "
        "that many times per epoch, each time augmented anew)"
    )


def shuffle_augment_batch(train, val, augment, num_train, seed, *, batch_size, shuffle_buffer, repeat=1,
                          augment_batches=False):
    """The tail of every training pipeline: shuffle, seeded augmentation, batching.

    Args:
        train, val: unbatched (and possibly cached) datasets of examples.
        augment: `(*example, seed) -> example`, tf ops only; the seed is a
            per-example `[2]` int64 tensor that changes every epoch. With
            `augment_batches`, it gets whole batches instead (every tensor of
            the example with a leading batch axis) and one seed per batch.
        num_train: training examples (caps the shuffle buffer).
        seed: shuffle and augmentation seed.
        batch_size, shuffle_buffer: `data.batch_size`, `data.shuffle_buffer`.
        repeat: each example this many times per epoch (`data.repeat`).
        augment_batches: batch first, then augment each batch in one call
            (vectorised augmentation: far fewer ops per image than per-example calls).

    Returns:
        `(train, val)`: train shuffled, augmented and batched with
        `drop_remainder=True`; val batched; both prefetched.
    """
    if repeat > 1:
        train = train.repeat(repeat)
    train = train.shuffle(min(shuffle_buffer, num_train * repeat), seed=seed,
                          reshuffle_each_iteration=True)
    augment_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    if augment_batches:
        train = train.batch(batch_size, drop_remainder=True)
    train = tf.data.Dataset.zip((train, augment_seeds)).map(
        lambda example, augment_seed: augment(*example, augment_seed),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    if not augment_batches:
        train = train.batch(batch_size, drop_remainder=True)
    train = train.prefetch(tf.data.AUTOTUNE)
    return train, val.batch(batch_size).prefetch(tf.data.AUTOTUNE)
