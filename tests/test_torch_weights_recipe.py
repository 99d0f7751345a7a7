"""Pretrained weights of other libraries in recipes: the source's normalisation, not the data's.

A recipe whose `model.weights` is a torchvision/timm state dict or a
keras.applications `.h5` fine-tunes features that expect the normalisation
they were trained with; the model must apply that one (and run.json say so),
not the training set's mean/std. Also: what a timm `pretrained_cfg` records
(interpolation, crop_pct), from a live module or the hub's `config.json`.
"""

import json

import keras
import numpy as np
import pytest

from keras_resnet import ResNetClassifier
from keras_resnet.config import load_config
from keras_resnet.convert.torch_resnet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TorchWeights,
)
from keras_resnet.training.backbones import build_model_from_config, preprocessing_info
from keras_resnet_settings.errors import ConfigError, ConversionError
from tests.test_convert_torch import fixture, formula

# Training-set statistics of 0..255 pixels, far from any pretrained normalisation.
DATA_INFO = {"mean": [90.0, 100.0, 110.0], "std": [40.0, 50.0, 60.0]}
TIMM_CFG = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "input_size": [3, 160, 176],
            "interpolation": "bicubic", "crop_pct": 0.95}


@pytest.fixture(scope="module")
def resnet18_state():
    """torchvision resnet18's state dict (the fixture's layout, formula weights)."""
    return formula.state_dict_for(fixture("torchvision_resnet18"))


def write_state(state, folder, name="model.safetensors"):
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    save_file(state, str(path))
    return path


def recipe(weights, backbone="resnet18", input_shape=(32, 32, 3)):
    return load_config({"model": {"backbone": backbone, "backbone_args": {}, "input_shape": list(input_shape),
                                  "num_classes": 2, "weights": str(weights), "freeze_stages": -1}})


class FakeTimmModule:
    """What from_torch reads of a timm module: `state_dict()` and `pretrained_cfg` (no torch needed)."""

    def __init__(self, state, pretrained_cfg):
        self._state, self.pretrained_cfg = state, pretrained_cfg

    def state_dict(self):
        return self._state


def test_timm_pretrained_cfg_records_interpolation_and_crop(resnet18_state, tmp_path):
    weights = TorchWeights(FakeTimmModule(resnet18_state, TIMM_CFG))
    assert (weights.interpolation, weights.crop_pct, weights.input_size) == ("bicubic", 0.95, (160, 176))
    assert weights.preprocessing_info()["crop_pct"] == 0.95
    plain = TorchWeights(resnet18_state)  # torchvision: its defaults, no crop recorded
    assert (plain.interpolation, plain.crop_pct, plain.preprocessing_source) == ("bilinear", None, None)
    assert plain.mean == IMAGENET_MEAN and "crop_pct" not in plain.preprocessing_info()
    # timm's hub layout: config.json beside model.safetensors (new form, and the older flat one).
    path = write_state(resnet18_state, tmp_path / "hub")
    (tmp_path / "hub" / "config.json").write_text(json.dumps({"architecture": "resnet18", "pretrained_cfg": TIMM_CFG}))
    hub = TorchWeights(path)
    assert (hub.mean, hub.interpolation, hub.crop_pct) == ((0.5, 0.5, 0.5), "bicubic", 0.95)
    assert "config.json" in hub.preprocessing_source
    (tmp_path / "hub" / "config.json").write_text(json.dumps({"architecture": "resnet18", **TIMM_CFG}))
    assert TorchWeights(path).std == (0.25, 0.25, 0.25)
    (tmp_path / "hub" / "config.json").write_text(json.dumps({"model_type": "bert"}))  # not timm's: ignored
    assert TorchWeights(path).interpolation == "bilinear"
    (tmp_path / "hub" / "config.json").write_text("{not json")
    with pytest.raises(ConversionError, match=r"config.json \(beside the weights\) is not readable JSON"):
        TorchWeights(path)


def test_recipe_with_torch_weights_normalises_as_the_weights_were_trained(resnet18_state, tmp_path, capsys):
    info = dict(DATA_INFO)
    model = build_model_from_config(recipe(write_state(resnet18_state, tmp_path / "tv")), info, ResNetClassifier,
                                    "classifier")
    norm = model.preprocessing
    np.testing.assert_allclose(norm.mean, IMAGENET_MEAN)
    np.testing.assert_allclose(norm.std, IMAGENET_STD)
    assert norm.scale == pytest.approx(1 / 255)
    # the weights are loaded and the model sees what torchvision sees: same backbone features
    pixels = formula.input_pixels((1, 32, 32, 3))
    features = model.backbone(formula.normalise(pixels))
    np.testing.assert_allclose(model.backbone(norm(pixels)), features, rtol=1e-4, atol=1e-4)
    run_json = preprocessing_info(info)
    assert run_json["mean"] == list(IMAGENET_MEAN) and run_json["interpolation"] == "bilinear"
    assert "torchvision" in run_json["source"] and run_json["input_range"] == [0, 255]
    assert "input normalisation: (pixels x 0.00392157 - [0.485, 0.456, 0.406])" in capsys.readouterr().out
    # a timm file with its hub config.json: the cfg's mean/std
    hub = write_state(resnet18_state, tmp_path / "timm")
    (tmp_path / "timm" / "config.json").write_text(json.dumps({"architecture": "resnet18", "pretrained_cfg": TIMM_CFG}))
    info = dict(DATA_INFO)
    model = build_model_from_config(recipe(hub), info, ResNetClassifier, "classifier")
    assert model.preprocessing.std == [0.25, 0.25, 0.25]
    assert preprocessing_info(info)["interpolation"] == "bicubic" and preprocessing_info(info)["crop_pct"] == 0.95
    # without model.weights: the training set's statistics, as before
    info = dict(DATA_INFO)
    cfg = recipe("")
    model = build_model_from_config(cfg, info, ResNetClassifier, "classifier")
    assert model.preprocessing.mean == DATA_INFO["mean"] and model.preprocessing.scale == 1.0
    assert preprocessing_info(info)["source"] == "training set statistics"


def test_recipe_with_keras_applications_h5_uses_its_caffe_mode(tmp_path):
    from tests.test_convert import write_keras_applications_h5

    path = tmp_path / "resnet50_weights_notop.h5"
    write_keras_applications_h5(keras.applications.ResNet50(weights=None, include_top=False,
                                                            input_shape=(32, 32, 3)), path)
    info = dict(DATA_INFO)
    model = build_model_from_config(recipe(path, backbone="resnet50_v1"), info, ResNetClassifier, "classifier")
    assert model.preprocessing.mean == [103.939, 116.779, 123.68] and model.preprocessing.reverse_channels
    assert preprocessing_info(info)["reverse_channels"] is True
    assert "keras.applications resnet50" in preprocessing_info(info)["source"]


def test_recipe_weights_errors_are_one_line(resnet18_state, tmp_path):
    path = write_state(resnet18_state, tmp_path / "tv")
    with pytest.raises(ConfigError, match=r"^model.weights .* needs 3 input channels but model.input_shape has 1; "
                                          r"set model.input_shape to \[height, width, 3\].$"):
        build_model_from_config(recipe(path, input_shape=(32, 32, 1)), dict(DATA_INFO), ResNetClassifier, "c")
    with pytest.raises(ConfigError, match=r"^model.weights: .*preset 'resnet34' does not match"):
        build_model_from_config(recipe(path, backbone="resnet34"), dict(DATA_INFO), ResNetClassifier, "c")
    with pytest.raises(ConfigError, match=r"^model.weights file .*missing.pth does not exist.$"):
        build_model_from_config(recipe(tmp_path / "missing.pth"), dict(DATA_INFO), ResNetClassifier, "c")


@pytest.mark.slow  # a whole (1-epoch) training run of resnet18
def test_train_run_with_torch_weights_says_which_normalisation(resnet18_state, tmp_path, capsys):
    from keras_resnet.cli import main
    from tests.training.test_classification import make_toy_folders, write_recipe

    weights = write_state(resnet18_state, tmp_path / "tv")
    path = write_recipe(tmp_path / "r.yaml", *make_toy_folders(tmp_path / "toy", per_class=8), tmp_path / "run",
                        epochs=1)
    overrides = ["model.backbone=resnet18", "model.backbone_args={}", "model.input_shape=[16,16,3]",
                 f"model.weights={weights}"]
    assert main(["train", str(path), "--set", *overrides]) == 0
    assert "input normalisation: (pixels x 0.00392157 - [0.485, 0.456, 0.406])" in capsys.readouterr().out
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_json["preprocessing"]["mean"] == list(IMAGENET_MEAN)
    assert "torchvision" in run_json["preprocessing"]["source"]
    model = keras.saving.load_model(tmp_path / "run" / "best_model.keras")
    assert model.get_layer("normalization").std == list(IMAGENET_STD)


def test_converted_model_and_its_export_metadata_carry_the_timm_interpolation(resnet18_state):
    from keras_resnet.convert import from_torch
    from keras_resnet.export.keras_model import find_preprocessing

    model = from_torch(FakeTimmModule(resnet18_state, TIMM_CFG))
    config = model.get_config()["preprocessing"]["config"]
    assert (config["interpolation"], config["crop_pct"]) == ("bicubic", 0.95)
    restored = ResNetClassifier.from_config(model.get_config())
    assert restored.preprocessing.get_config()["interpolation"] == "bicubic"
    assert find_preprocessing(model)["interpolation"] == "bicubic"
    plain = from_torch(resnet18_state).get_config()["preprocessing"]["config"]
    assert "interpolation" not in plain and "crop_pct" not in plain  # torchvision: nothing extra recorded
