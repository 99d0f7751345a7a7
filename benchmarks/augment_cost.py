"""CPU per batch of the classification training pipeline: image-by-image augmentation against whole batches.

Issue 31: on 2 cores the input pipeline competes with the train step for the
same CPU; for the time budget's fallback network (ResNet-10 at quarter
width) it cost 15-25 % of the step rate (`benchmarks/utilisation.py
--models fallback fallback_data`). Until this change every image went
through its own `map` call (a seed split, a pad and crop, a flip, a coin
and, for the erased ones, a rectangle: a dozen ops per image); now
`keras_resnet.data.classification.make_augment` takes a whole batch and
draws every image's parameters as vectors, one seed per batch.

This script builds both pipelines on the Fashion-MNIST training images
(shuffle, the recipe's augmentation: crop padding 2, flip, erasing 0.1,
batch 128, one-hot), times CPU per batch in one process, interleaved (4
rounds of 100 batches), and compares what the two produce (they draw
different random numbers, so the images differ; their statistics must not):
the mean image, the fraction of pixels changed by erasing, the flip rate
and the crop offsets seen through a marker pixel.

    python benchmarks/augment_cost.py
"""

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_resnet.data import classification  # noqa: E402
from keras_resnet.data.batching import shuffle_augment_batch  # noqa: E402
from keras_resnet.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from keras_resnet_settings.recipe import AugmentSettings  # noqa: E402

AUGMENT = AugmentSettings(random_crop_padding=2, horizontal_flip=True, random_erasing=0.1)
BATCH = 128


def erase_rectangle(image, seeds):
    """`(inside, noise)` of the former image-by-image erasing: the rectangle's mask and its noise, from
    `seeds[1:5]` of a 5-way split."""
    height, width, channels = image.shape
    area = tf.random.stateless_uniform([], seeds[1], *classification.ERASE_AREA_RANGE) * (height * width)
    aspect = tf.exp(tf.random.stateless_uniform([], seeds[2], *np.log(classification.ERASE_ASPECT_RANGE)))
    erase_h = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32), 1, height)
    erase_w = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32), 1, width)
    corner = tf.random.stateless_uniform([2], seeds[3])
    top = tf.cast(corner[0] * tf.cast(height - erase_h + 1, tf.float32), tf.int32)
    left = tf.cast(corner[1] * tf.cast(width - erase_w + 1, tf.float32), tf.int32)
    rows = tf.range(height)[:, tf.newaxis, tf.newaxis]
    cols = tf.range(width)[tf.newaxis, :, tf.newaxis]
    inside = (rows >= top) & (rows < top + erase_h) & (cols >= left) & (cols < left + erase_w)
    return inside, tf.random.stateless_uniform([height, width, channels], seeds[4], 0.0, 255.0)


def erase_per_image(image, seed, probability):
    """The former per-image `_random_erase` (b8bc651 until the batched one): rectangle and noise drawn only
    for an erased image, under a `tf.cond`."""
    seeds = tf.random.experimental.stateless_split(seed, num=5)

    def erase():
        inside, noise = erase_rectangle(image, seeds)
        return tf.where(inside, noise, image)

    return tf.cond(tf.random.stateless_uniform([], seeds[0]) < probability, erase, lambda: image)


def augment_per_image(image, label, seed):
    """The former per-image `make_augment` of the recipe's settings (crop, flip, erasing)."""
    crop_seed, flip_seed, erase_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=3))
    padding = AUGMENT.random_crop_padding
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    image = tf.image.stateless_random_crop(padded, image.shape, seed=crop_seed)
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return erase_per_image(image, erase_seed, AUGMENT.random_erasing), label


def pipeline(images, labels, batched):
    source = tf.data.Dataset.from_tensor_slices((images, labels)).cache()
    augment = classification.make_augment(AUGMENT, images.shape[1:]) if batched else augment_per_image
    train, _ = shuffle_augment_batch(source, source.take(1), augment, len(images), 0, batch_size=BATCH,
                                     shuffle_buffer=10000, augment_batches=batched)
    return train.map(lambda x, y: (x, tf.one_hot(y, 10)), num_parallel_calls=tf.data.AUTOTUNE).repeat()


def statistics(dataset, batches):
    """Mean image, erased pixel fraction, flip rate and crop offsets over `batches` batches of constant images
    with one marker pixel (so every change is visible)."""
    images = np.concatenate([x for x, _ in dataset.take(batches).as_numpy_iterator()])
    base = images.copy()
    erased = ~np.isin(images, (0.0, 100.0, 200.0))  # noise: neither padding, background nor the marker
    marker = np.argwhere(images[..., 0] == 200.0)
    per_image = {index: (row, col) for index, row, col in marker}
    offsets = np.array([per_image[i] for i in range(len(images)) if i in per_image])
    flipped = offsets[:, 1] > 14  # the marker sits at column 6 of 28: beyond the middle means flipped
    rows = offsets[:, 0] - 10  # row 10: the crop's vertical offset, -2..2
    del base
    return {
        "mean pixel": float(images.mean()),
        "erased pixels": float(erased.mean()),
        "images with erasing": float(erased.reshape(len(images), -1).any(1).mean()),
        "flip rate": float(flipped.mean()),
        "crop row offset mean / sd": (float(rows.mean()), float(rows.std())),
        "marker visible": len(offsets) / len(images),
    }


def cpu_per_batch(iterators, warmup, rounds=4, batches=100):
    """Median CPU ms per batch of each iterator, timed in interleaved rounds after `warmup` batches; printed."""
    for iterator in iterators.values():
        for _ in range(warmup):
            next(iterator)
    times = {name: [] for name in iterators}
    for _ in range(rounds):
        for name, iterator in iterators.items():
            start = time.process_time()
            for _ in range(batches):
                next(iterator)
            times[name].append((time.process_time() - start) / batches * 1e3)
    medians = {name: float(np.median(values)) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name}: {medians[name]:.2f} ms CPU per batch of {BATCH} (rounds {', '.join(f'{v:.1f}' for v in values)})")
    return medians


def main():
    (x_train, y_train), _ = load_fashion_mnist()
    x_train = x_train.astype("float32")[..., np.newaxis]
    y_train = y_train.astype("int32")
    marked = np.full((BATCH * 40, 28, 28, 1), 100.0, np.float32)
    marked[:, 10, 6] = 200.0
    marked_labels = np.zeros(len(marked), np.int32)
    for batched in (False, True):
        name = "whole batches (now)" if batched else "image by image (before)"
        stats = statistics(pipeline(marked, marked_labels, batched), 40)
        print(f"{name}: " + ", ".join(f"{key} {value if isinstance(value, float) else value}"
                                      for key, value in stats.items()), flush=True)
    iterators = {"image by image (before)": iter(pipeline(x_train, y_train, False)),
                 "whole batches (now)": iter(pipeline(x_train, y_train, True))}
    medians = cpu_per_batch(iterators, warmup=20)
    before, now = medians.values()
    print(f"before / now: {before / now:.2f}x")


if __name__ == "__main__":
    main()
