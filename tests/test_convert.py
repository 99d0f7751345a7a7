"""Import of keras.applications ResNets: live models and .h5 weight files."""

import h5py
import keras
import numpy as np
import pytest

from keras_resnet import ResNetBackbone, ResNetClassifier
from keras_resnet.convert import ConversionError, from_keras_applications
from tests.helpers import randomize_batch_norm

SHAPE = (64, 64, 3)


def write_keras_applications_h5(model, path, suffix=":0"):
    """Writes weights in the legacy layout keras.applications distributes."""
    with h5py.File(path, "w") as f:
        layers_with_weights = [layer for layer in model.layers]
        f.attrs["layer_names"] = [layer.name.encode() for layer in layers_with_weights]
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
        for layer in layers_with_weights:
            group = f.create_group(layer.name)
            names = [f"{layer.name}/{w.path.split('/')[-1]}{suffix}" for w in layer.weights]
            group.attrs["weight_names"] = [n.encode() for n in names]
            for name, weight in zip(names, layer.weights):
                group.create_dataset(name, data=np.asarray(weight.numpy()))


def _relative_max_diff(reference, ours):
    reference, ours = np.asarray(reference), np.asarray(ours)
    return np.abs(reference - ours).max() / np.abs(reference).max()


@pytest.fixture(scope="module", params=["ResNet50", "ResNet50V2"])
def keras_applications_pair(request):
    cls = getattr(keras.applications, request.param)
    with_top = cls(weights=None, input_shape=SHAPE, classifier_activation=None)
    no_top = cls(weights=None, input_shape=SHAPE, include_top=False)
    randomize_batch_norm(with_top, seed=1)
    randomize_batch_norm(no_top, seed=2)
    x = np.random.default_rng(0).uniform(-1.5, 1.5, (2, *SHAPE)).astype("float32")
    return request.param, with_top, no_top, x


def test_live_model_parity(keras_applications_pair):
    name, with_top, no_top, x = keras_applications_pair
    ours = from_keras_applications(with_top)
    assert isinstance(ours, ResNetClassifier)
    assert ours.backbone.version == ("v2" if name.endswith("V2") else "v1")
    assert _relative_max_diff(with_top(x), ours(x)) < 1e-4
    backbone = from_keras_applications(no_top)
    assert isinstance(backbone, ResNetBackbone)
    assert _relative_max_diff(no_top(x), backbone(x)) < 1e-4


@pytest.mark.parametrize("suffix", [":0", ""])
def test_h5_file_parity_with_and_without_top(keras_applications_pair, tmp_path, suffix):
    name, with_top, no_top, x = keras_applications_pair
    top_path = tmp_path / f"{name}_weights.h5"
    notop_path = tmp_path / f"{name}_weights_notop.h5"
    write_keras_applications_h5(with_top, top_path, suffix)
    write_keras_applications_h5(no_top, notop_path, suffix)
    ours = from_keras_applications(str(top_path), input_shape=SHAPE, classifier_activation=None)
    assert _relative_max_diff(with_top(x), ours(x)) < 1e-4
    backbone = from_keras_applications(str(notop_path), input_shape=SHAPE)
    assert isinstance(backbone, ResNetBackbone)
    assert _relative_max_diff(no_top(x), backbone(x)) < 1e-4


def test_include_preprocessing_matches_keras_applications_preprocess_input():
    reference = keras.applications.ResNet50(weights=None, input_shape=SHAPE)
    randomize_batch_norm(reference)
    ours = from_keras_applications(reference, include_preprocessing=True)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, *SHAPE)).astype("float32")
    expected = reference(keras.applications.resnet.preprocess_input(pixels.copy()))
    assert _relative_max_diff(expected, ours(pixels)) < 1e-4


def test_mismatched_arch_and_channels_and_bad_files(tmp_path):
    model = keras.applications.ResNet50(weights=None, input_shape=SHAPE, include_top=False)
    with pytest.raises(ConversionError, match="arch='resnet101' does not match"):
        from_keras_applications(model, arch="resnet101")
    path = tmp_path / "w.h5"
    write_keras_applications_h5(model, path)
    with pytest.raises(ValueError, match=r"input_shape=\(64, 64, 1\) does not fit.*need 3 input channels"):
        from_keras_applications(str(path), input_shape=(64, 64, 1))
    not_h5 = tmp_path / "not_weights.h5"
    not_h5.write_text("hello")
    with pytest.raises(ConversionError, match="not a readable HDF5"):
        from_keras_applications(str(not_h5))
    keras3 = tmp_path / "model.weights.h5"
    model.save_weights(keras3)
    with pytest.raises(ConversionError, match="Keras 3 `.weights.h5`"):
        from_keras_applications(str(keras3))
    with pytest.raises(ConversionError, match="does not exist"):
        from_keras_applications(str(tmp_path / "missing.h5"))
    other = keras.applications.MobileNetV2(weights=None, input_shape=SHAPE, include_top=False)
    with pytest.raises(ConversionError, match="does not look like a keras.applications ResNet"):
        from_keras_applications(other)
