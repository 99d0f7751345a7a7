"""FusedBatchNormalization against keras.layers.BatchNormalization."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_resnet import ResNetBackbone
from keras_resnet.layers.core import FusedBatchNormalization


def _pair(shape, policy, **kwargs):
    keras.mixed_precision.set_global_policy(policy)
    reference = keras.layers.BatchNormalization(**kwargs)
    fused = FusedBatchNormalization(**kwargs)
    for layer in (reference, fused):
        layer.build(shape)
    rng = np.random.default_rng(1)
    weights = [rng.uniform(0.5, 1.5, shape[-1]), rng.normal(0, 0.3, shape[-1]),
               rng.normal(0, 0.3, shape[-1]), rng.uniform(0.5, 2.0, shape[-1])]
    reference.set_weights(weights)
    fused.set_weights(weights)
    return reference, fused


def _train_step(layer, x, upstream):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
    grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
    return y, [g.numpy() for g in grads]


@pytest.mark.parametrize("policy, out_tol", [("float32", 1e-5), ("mixed_bfloat16", 3e-2)])
def test_fused_training_step_matches_keras_batch_norm(policy, out_tol):
    shape = (6, 5, 7, 4)
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, shape).astype("float32")
    upstream = rng.normal(size=shape).astype("float32")
    reference, fused = _pair(shape, policy, epsilon=1e-3, momentum=0.9)
    y_ref, grads_ref = _train_step(reference, x, upstream)
    y_fused, grads_fused = _train_step(fused, x, upstream)
    assert y_fused.dtype == y_ref.dtype
    out_diff = np.abs(np.float32(y_ref) - np.float32(y_fused)).max()
    assert out_diff < out_tol, out_diff
    # The moving statistics get the biased batch variance, as Keras does (the kernel's is corrected).
    np.testing.assert_allclose(fused.moving_mean.numpy(), reference.moving_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(fused.moving_variance.numpy(), reference.moving_variance.numpy(), atol=1e-6)
    for name, g_ref, g_fused in zip(("x", "gamma", "beta"), grads_ref, grads_fused):
        rel = np.abs(g_ref - g_fused).max() / np.abs(g_ref).max()
        assert rel < (1e-5 if policy == "float32" else 2e-2), (name, rel)


def test_fused_inference_frozen_and_fallbacks_equal_keras():
    shape = (4, 3, 3, 5)
    x = np.random.default_rng(2).normal(size=shape).astype("float32")
    reference, fused = _pair(shape, "float32", epsilon=1e-5, momentum=0.99)
    np.testing.assert_array_equal(fused(x, training=False).numpy(), reference(x, training=False).numpy())
    # Frozen: inference maths in training and no statistics update.
    fused.trainable = False
    before = fused.moving_mean.numpy().copy()
    np.testing.assert_array_equal(fused(x, training=True).numpy(), reference(x, training=False).numpy())
    np.testing.assert_array_equal(fused.moving_mean.numpy(), before)
    # 2-D inputs (after a Dense layer) take Keras' own path.
    flat = np.random.default_rng(3).normal(size=(8, 5)).astype("float32")
    dense_ref, dense_fused = _pair((8, 5), "float32")
    np.testing.assert_allclose(dense_fused(flat, training=True).numpy(), dense_ref(flat, training=True).numpy(),
                               atol=1e-6)


def test_backbone_uses_fused_batch_norm_and_round_trips(tmp_path):
    backbone = ResNetBackbone.from_preset("resnet18", input_shape=(32, 32, 3), stackwise_num_filters=[8, 8, 16, 16])
    norms = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and all(isinstance(layer, FusedBatchNormalization) for layer in norms)
    x = np.random.default_rng(4).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    backbone(x, training=True)  # moves the statistics away from their initial values
    path = tmp_path / "backbone.keras"
    backbone.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.get_layer(norms[0].name), FusedBatchNormalization)
    diff = max(np.abs(a - b).max() for a, b in zip(keras.tree.flatten(backbone(x)), keras.tree.flatten(loaded(x))))
    assert diff == 0.0, diff
