"""Training throughput (images/s) of one preset on synthetic data, for a given dtype policy.

Used to choose the Fashion-MNIST recipe settings in BENCHMARKS.md (bf16 vs
float32, XLA, batch size, backbone variants). Random 0..255 images, 5 warm-up
steps, then 40 timed steps of `fit`.

    python benchmarks/train_throughput.py POLICY JIT PRESET SIZE BATCH ['{backbone overrides}']
    python benchmarks/train_throughput.py mixed_bfloat16 0 resnet20_cifar 28 128
    python benchmarks/train_throughput.py float32 1 resnet18 28 128 "{'stem_type': 'cifar'}"
"""

import ast
import sys
import time

import keras
import numpy as np
import tensorflow as tf


def main():
    policy, jit, preset, size, batch = sys.argv[1], sys.argv[2] == "1", sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    overrides = ast.literal_eval(sys.argv[6]) if len(sys.argv) > 6 else {}
    keras.mixed_precision.set_global_policy(policy)
    import keras_resnet as kr

    model = kr.ResNetClassifier.from_preset(preset, num_classes=10, input_shape=(size, size, 1), **overrides)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="sparse_categorical_crossentropy",
                  jit_compile=jit)
    x = np.random.rand(batch * 20, size, size, 1).astype("float32") * 255
    y = np.random.randint(0, 10, batch * 20)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).cache().repeat()
    model.fit(dataset, steps_per_epoch=5, epochs=1, verbose=0)
    start = time.time()
    model.fit(dataset, steps_per_epoch=40, epochs=1, verbose=0)
    print(f"{policy} jit={jit} {preset} {size} bs={batch} {overrides}: {40 * batch / (time.time() - start):.0f} img/s")


if __name__ == "__main__":
    main()
