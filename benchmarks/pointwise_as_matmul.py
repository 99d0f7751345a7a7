"""Would 1x1 convolutions train faster as matrix products? (issue 31; answer measured: no)

The backward passes of convolutions are ~68 % of a ResNet train step on CPU
and run at about half the forward's rate; a stride-1 1x1 convolution is a
matmul over `N*H*W` rows, so its gradients could go through `tf.matmul`.

* `--layers`: one layer alone, forward + both gradients of `sum(y^2)`, for 8
  ResNet-50 bottleneck shapes at batch 16, conv2d against matmul, 7
  interleaved rounds of 5 calls; prints each shape's ms and matmul/conv.
* default: the whole ResNet-50 train step (`utilisation.build_resnet50`,
  batch 16) with every 1x1 conv routed through `tf.matmul` (strided ones on
  the subsampled input; a patch
  of Keras' `BaseConv.convolution_op` active while that model is traced)
  against the plain model, 4 interleaved rounds of 4 steps.

    python benchmarks/pointwise_as_matmul.py --layers
    python benchmarks/pointwise_as_matmul.py --size 160
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).parent))  # utilisation

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

SHAPES = [(16, 40, 40, 256, 64), (16, 40, 40, 64, 256), (16, 20, 20, 512, 128), (16, 20, 20, 128, 512),
          (16, 10, 10, 1024, 256), (16, 10, 10, 256, 1024), (16, 5, 5, 2048, 512), (16, 5, 5, 512, 2048)]


def pointwise_matmul(x, kernel):
    """A 1x1, stride-1 convolution of NHWC `x` with a `(1, 1, Cin, Cout)` kernel as one matmul."""
    shape = tf.shape(x)
    y = tf.matmul(tf.reshape(x, [-1, x.shape[-1]]), tf.reshape(kernel, [kernel.shape[2], kernel.shape[3]]))
    return tf.reshape(y, tf.concat([shape[:-1], [kernel.shape[3]]], 0))


def _gradient_step(op):
    @tf.function
    def step(x, kernel):
        with tf.GradientTape() as tape:
            tape.watch(x)
            tape.watch(kernel)
            y = op(x, kernel)
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, [x, kernel])
    return step


def layers():
    conv = _gradient_step(lambda x, kernel: tf.nn.conv2d(x, kernel, 1, "SAME"))
    matmul = _gradient_step(pointwise_matmul)
    for shape in SHAPES:
        batch, height, width, cin, cout = shape
        x = tf.random.normal([batch, height, width, cin])
        kernel = tf.random.normal([1, 1, cin, cout]) * 0.05
        conv(x, kernel), matmul(x, kernel)
        times = {"conv": [], "matmul": []}
        for _ in range(7):
            for name, step in (("conv", conv), ("matmul", matmul)):
                start = time.perf_counter()
                for _ in range(5):
                    step(x, kernel)
                times[name].append((time.perf_counter() - start) / 5)
        a, b = np.median(times["conv"]), np.median(times["matmul"])
        print(f"{shape}: conv {a * 1e3:.2f} ms, matmul {b * 1e3:.2f} ms, matmul/conv {b / a:.2f}", flush=True)


def whole_model(size):
    import utilisation
    from keras.src.layers.convolutional.base_conv import BaseConv

    original = BaseConv.convolution_op
    routed = {"on": False}

    def convolution_op(self, inputs, kernel):
        if (routed["on"] and self.rank == 2 and tuple(self.kernel_size) == (1, 1)
                and tuple(self.dilation_rate) == (1, 1) and self.groups == 1 and self.data_format == "channels_last"):
            step_y, step_x = self.strides  # a strided 1x1 conv (projection shortcut): the subsampled input
            return pointwise_matmul(inputs[:, ::step_y, ::step_x, :], kernel)
        return original(self, inputs, kernel)

    BaseConv.convolution_op = convolution_op
    rng = np.random.default_rng(0)
    models = {}
    for name, on in (("conv", False), ("matmul", True)):
        routed["on"] = on  # read when the train step is traced (the first fit)
        model, data = utilisation.build_resnet50(size)(16, rng)
        model.fit(data, steps_per_epoch=2, epochs=1, verbose=0)
        models[name] = (model, data)
    routed["on"] = False
    times = {name: [] for name in models}
    for round_index in range(4):
        for name, (model, data) in models.items():
            start = time.perf_counter()
            model.fit(data, steps_per_epoch=4, epochs=1, verbose=0)
            times[name].append((time.perf_counter() - start) / 4)
            print(f"round {round_index + 1} {name}: {times[name][-1]:.3f} s/step", flush=True)
    conv, matmul = np.median(times["conv"]), np.median(times["matmul"])
    print(f"ResNet-50 {size}, batch 16: conv {conv:.3f} s/step, matmul {matmul:.3f} s/step, matmul/conv "
          f"{matmul / conv:.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", action="store_true", help="single layers instead of the whole train step")
    parser.add_argument("--size", type=int, default=160)
    args = parser.parse_args()
    layers() if args.layers else whole_model(args.size)


if __name__ == "__main__":
    main()
