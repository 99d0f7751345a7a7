"""CPU per batch of random erasing in the input pipeline: none, drawn for every image, drawn only when erased.

Issue 31: the default recipe's pipeline takes ~20 ms CPU per batch of 128.
This times, in one process and interleaved (4 rounds of 100 batches of 128
random 28x28x1 images, probability 0.1): no erasing; the former
`_random_erase` (rectangle and noise drawn for every image, `tf.where` with
the coin), reproduced below; and its successor (a `tf.cond`, reproduced in
`augment_cost.erase_per_image`; both image by image, since replaced by the
batched `keras_resnet.data.classification.random_erase`: see
`benchmarks/augment_cost.py`). Both give the same images (checked here on
3000 images at p = 0.1, 0.5, 1).

    python benchmarks/erase_cost.py
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from augment_cost import cpu_per_batch, erase_per_image, erase_rectangle  # noqa: E402

PROBABILITY = 0.1


def erase_every_image(image, seed, probability):
    """The former `_random_erase`: every draw made for every image, the coin applied in the final `tf.where`."""
    seeds = tf.random.experimental.stateless_split(seed, num=5)
    apply = tf.random.stateless_uniform([], seeds[0]) < probability
    inside, noise = erase_rectangle(image, seeds)
    return tf.where(inside & apply, noise, image)


def pipeline(images, erase):
    seeds = tf.data.Dataset.random(seed=3).batch(2)
    examples = tf.data.Dataset.zip((tf.data.Dataset.from_tensor_slices(images), seeds))
    return examples.map(erase, num_parallel_calls=tf.data.AUTOTUNE).batch(128).prefetch(2).repeat()


def main():
    images = np.random.default_rng(0).uniform(0, 255, (60000, 28, 28, 1)).astype("float32")
    for probability in (0.1, 0.5, 1.0):
        sample = images[:3000]
        before = np.stack(list(pipeline(sample, lambda x, s: erase_every_image(x, s, probability)).unbatch()
                               .take(3000).as_numpy_iterator()))
        after = np.stack(list(pipeline(sample, lambda x, s: erase_per_image(x, s, probability))
                              .unbatch().take(3000).as_numpy_iterator()))
        print(f"p={probability}: identical images {np.array_equal(before, after)}")
    candidates = {
        "no erasing": lambda x, s: x,
        "drawn for every image (before)": lambda x, s: erase_every_image(x, s, PROBABILITY),
        "drawn when erased (tf.cond, image by image)": lambda x, s: erase_per_image(x, s, PROBABILITY),
    }
    iterators = {name: iter(pipeline(images, erase)) for name, erase in candidates.items()}
    cpu_per_batch(iterators, warmup=10)

if __name__ == "__main__":
    main()
