"""Custom layers used by keras_resnet models.

Every layer here is registered with Keras serialization so that models
containing them survive `.keras` save/load round trips, and each is built
from plain keras ops so that it exports to SavedModel, TFLite and ONNX
(`FusedBatchNormalization` uses a TensorFlow op in training steps only; its
inference path is Keras' own).
"""

import keras
from keras import ops

from keras_resnet_settings.errors import ConfigError

PACKAGE = "keras_resnet"


def mean_over_replicas(value):
    """`value` averaged over the replicas of the tf.distribute step computing it (unchanged outside one).

    A loss normalised by a count taken over the batch (positive anchors,
    labelled pixels) must use the count of the global batch, not of each
    replica's share: with the mean count as normaliser, Keras' per-replica
    loss scaling and gradient sum give exactly the one-device loss
    `sum(losses) / count(global batch)`. No gradient flows through the count.

    Example:
    >>> float(mean_over_replicas(ops.convert_to_tensor(3.0)))  # one device: unchanged
    3.0
    """
    if keras.backend.backend() != "tensorflow":
        return value
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.MEAN, tf.stop_gradient(value))


@keras.saving.register_keras_serializable(package=PACKAGE)
class DropPath(keras.layers.Layer):
    """Stochastic depth: drops the whole residual branch per sample.

    During training each sample's branch is zeroed with probability `rate`
    and the kept ones are scaled by `1 / (1 - rate)`; at inference the layer
    is the identity (Huang et al., 2016).

    Args:
        rate: float in [0, 1), probability of dropping the branch.
        seed: optional int seed.
    """

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ConfigError(f"DropPath rate must be in [0, 1), got {rate}.")
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        if not training or self.rate == 0.0:
            return inputs
        keep = 1.0 - self.rate
        shape = (ops.shape(inputs)[0],) + (1,) * (len(inputs.shape) - 1)
        noise = keras.random.uniform(shape, seed=self.seed_generator, dtype=inputs.dtype)
        mask = ops.floor(noise + ops.cast(keep, inputs.dtype))
        return inputs * mask / ops.cast(keep, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ZeroPadChannels(keras.layers.Layer):
    """Zero-pads the channel axis: the parameter-free option-A shortcut.

    He et al. (2015) use it in the CIFAR networks: the identity shortcut is
    subsampled spatially and its extra channels are zeros.

    Args:
        pad: total number of zero channels to add (split evenly before and
            after the existing channels).
    """

    def __init__(self, pad, **kwargs):
        super().__init__(**kwargs)
        self.pad = int(pad)

    def call(self, inputs):
        before = self.pad // 2
        return ops.pad(inputs, [[0, 0], [0, 0], [0, 0], [before, self.pad - before]])

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (input_shape[-1] + self.pad,)

    def get_config(self):
        return {**super().get_config(), "pad": self.pad}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ImageNormalization(keras.layers.Layer):
    """Turns raw pixel values (0-255) into the network's input range.

    Lives inside task models so that users of a model, or of its exports,
    feed raw pixels and never need to know the training preprocessing.
    `y = (x[..., channel_order] * scale - mean) / std`.

    Args:
        mean: per-channel mean (in the scaled range), a float or a list.
        std: per-channel standard deviation, a float or a list.
        scale: multiplier applied first (e.g. 1/255).
        reverse_channels: flip RGB to BGR first (keras.applications "caffe"
            mode).
        interpolation, crop_pct: recorded, not applied: how the source of
            pretrained weights resized and cropped its images ("bicubic",
            0.95 from a timm `pretrained_cfg`); None when not stated.
    """

    def __init__(self, mean=0.0, std=1.0, scale=1.0, reverse_channels=False, interpolation=None, crop_pct=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.mean = [float(v) for v in mean] if isinstance(mean, (list, tuple)) else float(mean)
        self.std = [float(v) for v in std] if isinstance(std, (list, tuple)) else float(std)
        stds = self.std if isinstance(self.std, list) else [self.std]
        if any(s <= 0 for s in stds):
            raise ConfigError(f"ImageNormalization std must be > 0, got {self.std}.")
        self.scale = float(scale)
        self.reverse_channels = bool(reverse_channels)
        self.interpolation = None if interpolation is None else str(interpolation)
        self.crop_pct = None if crop_pct is None else float(crop_pct)

    @classmethod
    def from_mode(cls, mode, **kwargs):
        """keras.applications preprocessing modes: 'caffe', 'tf', 'torch'."""
        if mode == "caffe":
            return cls(mean=[103.939, 116.779, 123.68], std=1.0, reverse_channels=True, **kwargs)
        if mode == "tf":
            return cls(mean=1.0, std=1.0, scale=1.0 / 127.5, **kwargs)
        if mode == "torch":
            return cls(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], scale=1.0 / 255.0, **kwargs)
        raise ConfigError(f"Unknown preprocessing mode {mode!r}; allowed: 'caffe', 'tf', 'torch'.")

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.reverse_channels:
            x = ops.flip(x, axis=-1)
        if self.scale != 1.0:
            x = x * self.scale
        mean = ops.convert_to_tensor(self.mean, dtype=self.compute_dtype)
        std = ops.convert_to_tensor(self.std, dtype=self.compute_dtype)
        return (x - mean) / std

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "mean": self.mean,
            "std": self.std,
            "scale": self.scale,
            "reverse_channels": self.reverse_channels,
            **({"interpolation": self.interpolation} if self.interpolation is not None else {}),
            **({"crop_pct": self.crop_pct} if self.crop_pct is not None else {}),
        }


# FusedBatchNormV3 on GPUs (cuDNN) needs epsilon above 1e-5 in double precision; TensorFlow's own
# `fused_batch_norm` clamps to the same value.
_FUSED_MIN_EPSILON = 1.001e-5


@keras.saving.register_keras_serializable(package=PACKAGE)
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """BatchNormalization whose training step runs TensorFlow's fused kernel.

    Keras 3's `BatchNormalization` computes the batch moments and the
    normalisation with separate ops, in float32 even under a mixed policy.
    On the TensorFlow backend this layer runs the training-mode forward pass
    as one `FusedBatchNormV3` op instead (oneDNN on CPUs, cuDNN on GPUs;
    bfloat16/float16 inputs stay in their dtype, statistics in float32), and
    so does its gradient. Everything else is `keras.layers.BatchNormalization`:
    the same weights and config, the same inference maths (so exports are
    unchanged), and the same moving-statistics update (biased batch variance,
    `moving = moving * momentum + batch * (1 - momentum)`). It falls back to
    the Keras computation where the fused kernel does not apply: other
    backends, inputs that are not 4-D channels-last, masks, renorm, synchronized BN, or inference.

    The training-mode epsilon is at least 1.001e-5 (cuDNN's limit, as in
    `tf.compat.v1.nn.fused_batch_norm`); inference uses `epsilon` as given.

    Example:
    >>> bn = FusedBatchNormalization(epsilon=1e-5, momentum=0.9)
    >>> y = bn(keras.random.normal((8, 16, 16, 32)), training=True)
    """

    def _can_fuse(self, inputs):
        if keras.backend.backend() != "tensorflow" or len(inputs.shape) != 4:
            return False
        if self.renorm or getattr(self, "synchronized", False):
            return False
        return self.axis % 4 == 3  # channels last (TF's CPU kernel has no NCHW)

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or mask is not None or not self._can_fuse(inputs):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        x = inputs
        if x.dtype not in (tf.float32, tf.bfloat16, tf.float16):
            x = tf.cast(x, tf.float32)
        channels = x.shape[3]
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones((channels,), tf.float32)
        beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros((channels,), tf.float32)
        empty = tf.constant([], tf.float32)
        y, mean, corrected_variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=gamma, offset=beta, mean=empty, variance=empty,
            epsilon=max(float(self.epsilon), _FUSED_MIN_EPSILON), exponential_avg_factor=1.0,
            data_format="NHWC", is_training=True,
        )
        # The kernel returns the variance with Bessel's correction; Keras' moving variance uses the
        # biased one.
        count = tf.cast(tf.size(x) // tf.shape(x)[3], tf.float32)
        variance = corrected_variance * tf.maximum(count - 1.0, 0.0) / tf.maximum(count, 1.0)
        mean, variance = tf.stop_gradient(mean), tf.stop_gradient(variance)
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return tf.cast(y, self.compute_dtype)
