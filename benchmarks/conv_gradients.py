"""Do the convolution gradients really run at half the forward's rate? (issue 31; answer measured: no)

The train-step profiles (`utilisation.py --profile`) put the backward passes
of the convolutions at ~68 % of a ResNet step and, per op-second, at about
half the forward's FLOP rate. That figure sums op time over TensorFlow's two
executor threads, which run ops concurrently, so it cannot tell a slow kernel
from two kernels sharing the cores. This times each kernel alone, 3x3 stride-1
convolutions of the shapes that dominate the tasks (RetinaNet/DeepLabV3+
ResNet-50 stages and FPN/head convs at 512x512 batch 2; the default recipe's
stages at 28x28 batch 128), float32:

* `fwd`: `tf.nn.conv2d`;
* `backprop_input`: `Conv2DBackpropInput` (what the input gradient runs);
* `backprop_input_as_fwd`: the same gradient as a forward convolution of the
  output gradient with the kernel flipped in space and its channels swapped
  (equal for stride 1 with SAME padding; checked, max abs diff printed): a
  way round a slow backprop-input kernel, if there were one;
* `backprop_filter`: `Conv2DBackpropFilter` (the kernel gradient);
* `backprop_filter_im2col`: the same as one matmul of the 3x3 patches
  (`tf.image.extract_patches`) with the output gradient;
* `backprop_filter_as_fwd`: the same as a forward convolution of the padded
  input, batch and channels swapped, with the output gradient as an HxW
  kernel (VALID: a 3x3 output).

Each in its own `tf.function`, interleaved, `--rounds` rounds of median-of-6
calls; prints ms and GFLOP/s (2 x MACs / s) per shape, each route's time over
the forward's, and the largest difference between routes of one gradient
(relative to its largest value).

    python benchmarks/conv_gradients.py
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/conv_gradients.py
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

# (batch, height, width, channels in, channels out): 3x3, stride 1.
SHAPES = [
    (2, 128, 128, 64, 64),  # ResNet-50 stage 1 at 512
    (2, 64, 64, 128, 128),  # stage 2
    (2, 32, 32, 256, 256),  # stage 3
    (2, 64, 64, 256, 256),  # FPN P3 output / RetinaNet head convs on P3
    (128, 14, 14, 32, 32),  # the default recipe's first stage (half width, 28x28 input)
    (128, 7, 7, 64, 64),  # its second stage
    (128, 14, 14, 16, 16),  # the budget's fallback network (quarter width): first stage
    (128, 7, 7, 32, 32),  # its second stage
]


def kernels(shape):
    """The four timed functions of one shape, and the max abs diff of the two backprop-input routes."""
    batch, height, width, cin, cout = shape
    x = tf.random.normal((batch, height, width, cin))
    w = tf.random.normal((3, 3, cin, cout))
    g = tf.random.normal((batch, height, width, cout))
    strides = [1, 1, 1, 1]
    functions = {
        "fwd": tf.function(lambda: tf.nn.conv2d(x, w, 1, "SAME")),
        "backprop_input": tf.function(lambda: tf.raw_ops.Conv2DBackpropInput(
            input_sizes=tf.shape(x), filter=w, out_backprop=g, strides=strides, padding="SAME")),
        "backprop_input_as_fwd": tf.function(lambda: tf.nn.conv2d(
            g, tf.transpose(tf.reverse(w, [0, 1]), [0, 1, 3, 2]), 1, "SAME")),
        "backprop_filter": tf.function(lambda: tf.raw_ops.Conv2DBackpropFilter(
            input=x, filter_sizes=tf.shape(w), out_backprop=g, strides=strides, padding="SAME")),
    }

    def filter_im2col():
        patches = tf.image.extract_patches(x, [1, 3, 3, 1], [1, 1, 1, 1], [1, 1, 1, 1], "SAME")
        product = tf.matmul(tf.reshape(patches, [-1, 9 * cin]), tf.reshape(g, [-1, cout]), transpose_a=True)
        return tf.reshape(product, [3, 3, cin, cout])

    def filter_as_fwd():
        padded = tf.transpose(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]), [3, 1, 2, 0])  # cin, H+2, W+2, batch
        kernel = tf.transpose(g, [1, 2, 0, 3])  # H, W, batch, cout
        return tf.transpose(tf.nn.conv2d(padded, kernel, 1, "VALID"), [1, 2, 0, 3])

    functions["backprop_filter_im2col"] = tf.function(filter_im2col)
    functions["backprop_filter_as_fwd"] = tf.function(filter_as_fwd)
    diff = max(float(tf.reduce_max(tf.abs(functions[a]() - functions[b]()) / tf.reduce_max(tf.abs(functions[a]()))))
               for a, b in (("backprop_input", "backprop_input_as_fwd"), ("backprop_filter", "backprop_filter_im2col"),
                            ("backprop_filter", "backprop_filter_as_fwd")))
    return functions, diff


def median_seconds(function, calls=6):
    function().numpy()  # trace
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        function().numpy()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"TensorFlow {tf.__version__}, ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '(native)')}, "
          f"load average {os.getloadavg()[0]:.2f}")
    for shape in SHAPES:
        functions, diff = kernels(shape)
        times = {name: [] for name in functions}
        for _ in range(args.rounds):
            for name, function in functions.items():
                times[name].append(median_seconds(function))
        macs = np.prod(shape) * 9
        cells = [f"{name} {np.median(t) * 1e3:.1f} ms ({2 * macs / np.median(t) / 1e9:.0f} GFLOP/s)"
                 for name, t in times.items()]
        ratios = ", ".join(f"{name}/fwd {np.median(times[name]) / np.median(times['fwd']):.2f}"
                           for name in functions if name != "fwd")
        print(f"{shape}: {'; '.join(cells)}; {ratios}; routes differ by {diff:.1e} (relative max)", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
