"""The FPN computes what it says: lateral 1x1 convs, nearest 2x upsampling, addition, 3x3 output convs.

Both implementations (`apply_fpn`, used by the segmenter's FPN head, and the
`FPN` layer, used by RetinaNet) are checked against a NumPy FPN with the
same, explicitly set weights on C3 (8x8), C4 (4x4), C5 (2x2) inputs:

* identity 1x1 laterals and centre-tap identity 3x3 output convs: P3 is
  exactly C3 + up(C4 + up(C5)) and P4 is C4 + up(C5);
* random laterals (with biases) and random output convs: every P level
  matches the NumPy computation;
* P3 changes when only C5 changes (the top-down path reaches the finest level).
"""

import keras
import numpy as np
import pytest

from keras_resnet.layers.fpn import FPN, apply_fpn

WIDTH = 4
SHAPES = {"C3": (8, 8, WIDTH), "C4": (4, 4, 3), "C5": (2, 2, 5)}


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    return {level: rng.normal(0, 1, (2, *shape)).astype(np.float32) for level, shape in SHAPES.items()}


def upsample(x):
    """Nearest 2x: output pixel i takes input pixel i // 2."""
    return np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)


def conv3x3_same(x, kernel, bias):
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    height, width = x.shape[1:3]
    out = np.zeros((*x.shape[:3], kernel.shape[-1]))
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("nhwc,cd->nhwd", padded[:, dy : dy + height, dx : dx + width], kernel[dy, dx])
    return out + bias


def numpy_fpn(features, weights):
    """`weights[level] = (lateral kernel, lateral bias, output kernel, output bias)`."""
    laterals = {
        level: np.einsum("nhwc,cd->nhwd", features[level], weights[level][0][0, 0]) + weights[level][1]
        for level in SHAPES
    }
    merged = {"C5": laterals["C5"]}
    merged["C4"] = laterals["C4"] + upsample(merged["C5"])
    merged["C3"] = laterals["C3"] + upsample(merged["C4"])
    return {level.replace("C", "P"): conv3x3_same(merged[level], *weights[level][2:]) for level in SHAPES}


def identity_weights():
    weights = {}
    for level, (_, _, channels) in SHAPES.items():
        lateral = np.zeros((1, 1, channels, WIDTH), np.float32)
        lateral[0, 0, : min(channels, WIDTH), : min(channels, WIDTH)] = np.eye(min(channels, WIDTH))
        output = np.zeros((3, 3, WIDTH, WIDTH), np.float32)
        output[1, 1] = np.eye(WIDTH)
        weights[level] = (lateral, np.zeros(WIDTH, np.float32), output, np.zeros(WIDTH, np.float32))
    return weights


def random_weights(seed=1):
    rng = np.random.default_rng(seed)
    return {
        level: (
            rng.normal(0, 0.5, (1, 1, channels, WIDTH)).astype(np.float32),
            rng.normal(0, 0.5, WIDTH).astype(np.float32),
            rng.normal(0, 0.3, (3, 3, WIDTH, WIDTH)).astype(np.float32),
            rng.normal(0, 0.5, WIDTH).astype(np.float32),
        )
        for level, (_, _, channels) in SHAPES.items()
    }


def build_apply_fpn(weights):
    tensors = {level: keras.Input(shape) for level, shape in SHAPES.items()}
    outputs = apply_fpn(tensors, levels=("C3", "C4", "C5"), width=WIDTH, name="fpn")
    model = keras.Model(tensors, outputs)
    for level, (lateral, lateral_bias, output, output_bias) in weights.items():
        model.get_layer(f"fpn_lateral_{level}").set_weights([lateral, lateral_bias])
        model.get_layer(f"fpn_output_{level}").set_weights([output, output_bias])
    return lambda features: {key: np.asarray(value) for key, value in model(features).items()}


def build_fpn_layer(weights):
    layer = FPN(min_level=3, max_level=5, width=WIDTH)
    layer.build({level: (None, *shape) for level, shape in SHAPES.items()})
    for index, level in enumerate(SHAPES):  # lateral_convs / output_convs are C3, C4, C5 in order
        lateral, lateral_bias, output, output_bias = weights[level]
        layer.lateral_convs[index].set_weights([lateral, lateral_bias])
        layer.output_convs[index].set_weights([output, output_bias])
    return lambda features: {key: np.asarray(value) for key, value in layer(features).items()}


BUILDERS = {"apply_fpn": build_apply_fpn, "FPN": build_fpn_layer}


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_identity_fpn_is_lateral_plus_upsampled_sum(builder):
    features = inputs()
    outputs = BUILDERS[builder](identity_weights())(features)
    c3, c4, c5 = features["C3"], features["C4"][..., :3], features["C5"][..., :WIDTH]
    c4 = np.concatenate([c4, np.zeros((*c4.shape[:3], WIDTH - 3), np.float32)], axis=-1)
    np.testing.assert_allclose(outputs["P5"], c5, atol=1e-5)
    np.testing.assert_allclose(outputs["P4"], c4 + upsample(c5), atol=1e-5)
    np.testing.assert_allclose(outputs["P3"], c3 + upsample(c4 + upsample(c5)), atol=1e-5)


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_fpn_matches_numpy_with_fixed_random_weights(builder):
    weights = random_weights()
    features = inputs()
    outputs = BUILDERS[builder](weights)(features)
    expected = numpy_fpn(features, weights)
    for level in ("P3", "P4", "P5"):
        np.testing.assert_allclose(outputs[level], expected[level], atol=1e-4, err_msg=level)


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_p3_changes_when_only_c5_changes(builder):
    run = BUILDERS[builder](random_weights())
    features = inputs()
    changed = dict(features, C5=features["C5"] + 1.0)
    before, after = run(features)["P3"], run(changed)["P3"]
    assert np.max(np.abs(after - before)) > 1e-2
