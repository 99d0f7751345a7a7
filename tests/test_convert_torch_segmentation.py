"""Import of torchvision DeepLabV3 / FCN segmenters, checked against real torchvision outputs without torch.

tests/fixtures/torch/segmentation/*.npz hold what torchvision's
`deeplabv3_resnet50/101` and `fcn_resnet50/101` computed
(scripts/make_torch_segmentation_fixtures.py, run in a torch environment) on
weights that the integer formula of scripts/make_torch_fixtures.py defines:
the tests rebuild the same state dicts in NumPy, convert them and compare the
logits and the argmax masks. `deeplabv3_head` is torchvision's DeepLabHead
alone on a feature map larger than its rates (12, 24, 36), which the full
models' small input cannot show. The LIVE test runs torchvision in a child
Python and only where torch and torchvision are installed.
"""

import importlib.util
import os
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_resnet import ResNetBackbone
from keras_resnet.cli import main
from keras_resnet.convert import ConversionError, from_torch
from keras_resnet.convert.torch_segmentation import (
    TORCHVISION_RATES,
    TorchSegmentationWeights,
    is_segmentation_state,
    load_head,
    segmentation_source_parity,
    segmenter_from_torch,
)
from keras_resnet.layers.core import ImageNormalization
from keras_resnet.models.segmentation.segmenter import (
    ResNetSegmenter,
    apply_deeplabv3_head,
)
from tests.helpers import TINY_BACKBONE

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "torch" / "segmentation"
SCRIPT = ROOT / "scripts" / "make_torch_segmentation_fixtures.py"
TOLERANCE = 1e-4  # max abs diff over max abs of the reference
# CI converts the ResNet-50 models; the ResNet-101 ones repeat them with more blocks in layer3 (~5 s more each on
# 2 busy cores). KERAS_RESNET_ALL_PRESETS=1 runs them too.
CI_MODELS = ("deeplabv3_resnet50", "fcn_resnet50")


def _load_script():
    spec = importlib.util.spec_from_file_location("make_torch_segmentation_fixtures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


formula = _load_script()


def fixture(name, folder=FIXTURES):
    with np.load(folder / f"{name}.npz") as data:
        return {key: data[key] for key in data.files}


def layout_state(name):
    """The fixture's state dict as all-zero stand-ins of the right shapes (no memory): for key and shape logic."""
    layout = formula.fixture_layout(fixture(name))
    return {key: np.broadcast_to(np.zeros((), dtype), shape) for key, shape, dtype in layout}


def relative_diff(reference, ours):
    reference, ours = np.asarray(reference), np.asarray(ours)
    assert reference.shape == ours.shape
    return float(np.abs(reference - ours).max() / np.abs(reference).max())


def quietly(function, *args, **kwargs):
    """Calls `function` without the warning that rates (12, 24, 36) reach past a small input's 8x9 feature map."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ASPP rates")
        return function(*args, **kwargs)


def test_every_fixture_is_there_and_small():
    assert sorted(p.stem for p in FIXTURES.glob("*.npz")) == sorted([*formula.MODELS, formula.HEAD])
    assert all(p.stat().st_size < 300_000 for p in FIXTURES.glob("*.npz"))


@pytest.mark.parametrize("name", formula.MODELS)
def test_masks_and_logits_equal_torchvision(name):
    if name not in CI_MODELS and not os.environ.get("KERAS_RESNET_ALL_PRESETS"):
        pytest.skip("ResNet-101 segmenter parity: set KERAS_RESNET_ALL_PRESETS=1 to run it")
    data = fixture(name)
    pixels = data["pixels"]
    np.testing.assert_array_equal(formula.input_pixels(formula.INPUT_SHAPE), pixels)  # the formula reproduces it
    model = quietly(from_torch, formula.state_dict_for(data), input_shape=pixels.shape[1:])
    head = name.split("_")[0]
    assert isinstance(model, ResNetSegmenter) and model.name == name and model.head == head
    assert model.num_classes == 21 and model.activation is None and model.backbone.output_stride == 8
    assert model.aspp_rates == ([12, 24, 36] if head == "deeplabv3" else None)
    logits = np.asarray(model(pixels))
    assert logits.shape == (*pixels.shape[:3], 21)
    diff = relative_diff(data["logits"], logits[:, :: formula.GRID, :: formula.GRID])
    print(f"{name}: logits max relative diff {diff:.2e}")
    assert diff < TOLERANCE
    np.testing.assert_array_equal(logits.argmax(-1), data["mask"])


def test_deeplabv3_head_rates_equal_torchvision():
    data = fixture(formula.HEAD)
    features = keras.Input(formula.HEAD_FEATURES_SHAPE[1:])
    x = apply_deeplabv3_head(features, TORCHVISION_RATES, 256)
    head = keras.Model(features, keras.layers.Conv2D(formula.HEAD_CLASSES, 1, name="classifier")(x))
    load_head(head, formula.state_dict_for(data), "deeplabv3")
    diff = relative_diff(data["logits"], head(formula.head_features()))
    print(f"deeplabv3_head: logits max relative diff {diff:.2e}")
    assert diff < TOLERANCE


@pytest.mark.parametrize("name", formula.MODELS)
def test_the_model_is_inferred_from_keys_and_shapes(name):
    state = layout_state(name)
    assert is_segmentation_state(state)
    weights = TorchSegmentationWeights(state)
    assert (weights.arch, weights.head, weights.preset, weights.num_classes) == (name, *name.split("_"), 21)
    assert weights.head_width == (256 if weights.head == "deeplabv3" else 512)
    assert weights.aux and "aux_classifier: not loaded" in weights.notes[0]
    assert f"-> ResNetSegmenter head {weights.head!r} on preset {weights.preset}" in weights.describe()
    TorchSegmentationWeights(state, arch=name.upper())  # names are case-insensitive


def test_mismatches_name_the_keys():
    deeplab, fcn = layout_state("deeplabv3_resnet50"), layout_state("fcn_resnet50")
    with pytest.raises(ConversionError, match=r"arch='deeplabv3_resnet50' does not match the state dict: it has "
                                              r"classifier.0.weight \(FCNHead\), not classifier.0.convs.0.0.weight"):
        TorchSegmentationWeights(fcn, arch="deeplabv3_resnet50")
    with pytest.raises(ConversionError, match=r"arch='deeplabv3_resnet101' does not match.*backbone.\* keys show "
                                              r"blocks \[3, 4, 6, 3\] \(not \[3, 4, 23, 3\]\).*"
                                              r"use arch='deeplabv3_resnet50'"):
        TorchSegmentationWeights(deeplab, arch="deeplabv3_resnet101")
    with pytest.raises(ConversionError, match="not a torchvision segmentation model we import; allowed: deeplabv3_"):
        TorchSegmentationWeights(deeplab, arch="deeplabv3_mobilenet_v3_large")
    with pytest.raises(ConversionError, match="keys of both heads"):
        TorchSegmentationWeights({**deeplab, "classifier.0.weight": fcn["classifier.0.weight"]})
    with pytest.raises(ConversionError, match=r"1 keys outside backbone.\*.*\(extra.weight\)"):
        TorchSegmentationWeights({**deeplab, "extra.weight": np.zeros(3, "float32")})
    without_pool = {k: v for k, v in deeplab.items() if not k.startswith("classifier.0.convs.4.")}
    with pytest.raises(ConversionError, match="an ASPP of 4 branches"):
        TorchSegmentationWeights(without_pool)
    with pytest.raises(ConversionError, match=r"backbone.\* keys are not a ResNet we import.*no layer4"):
        TorchSegmentationWeights({k: v for k, v in deeplab.items() if not k.startswith("backbone.layer4.")})
    # torchvision's detection layout (a ResNet inside an FPN) and classifiers are not segmentation state dicts.
    assert not is_segmentation_state({"backbone.body.conv1.weight": 0, "classifier.weight": 0})
    assert not is_segmentation_state(fixture("torchvision_resnet18", FIXTURES.parent)["keys"].tolist())


def test_head_keys_are_checked_both_ways():
    data = fixture(formula.HEAD)
    state = formula.state_dict_for(data)
    features = keras.Input(formula.HEAD_FEATURES_SHAPE[1:])
    x = apply_deeplabv3_head(features, TORCHVISION_RATES, 256)
    head = keras.Model(features, keras.layers.Conv2D(formula.HEAD_CLASSES, 1, name="classifier")(x))
    missing = {k: v for k, v in state.items() if k != "classifier.0.project.1.running_var"}
    with pytest.raises(ConversionError, match=r"missing 1 keys \(classifier.0.project.1.running_var\)"):
        load_head(head, missing, "deeplabv3")
    with pytest.raises(ConversionError, match=r"1 keys our head does not use \(classifier.9.weight\)"):
        load_head(head, {**state, "classifier.9.weight": np.zeros(3, "float32")}, "deeplabv3")
    narrow = {**state, "classifier.1.weight": state["classifier.1.weight"][:, :128]}
    with pytest.raises(ConversionError, match=r"classifier.1.weight \(256, 128, 3, 3\) \(ours needs \(256, 256, 3, 3\)"):
        load_head(head, narrow, "deeplabv3")


def fcn_resnet18_state():
    """An FCN head (5 classes) on torchvision's resnet18 layout, formula weights: a small stand-in (no parity)."""
    layout = [(f"backbone.{key}", shape, dtype)
              for key, shape, dtype in formula.fixture_layout(fixture("torchvision_resnet18", FIXTURES.parent))
              if not key.startswith("fc.")]
    layout += [("classifier.0.weight", (128, 512, 3, 3), "float32"), ("classifier.4.bias", (5,), "float32"),
               ("classifier.4.weight", (5, 128, 1, 1), "float32")]
    layout += [(f"classifier.1.{name}", (128,), "float32") for name in ("weight", "bias", "running_mean", "running_var")]
    return {key: formula.tensor_for(key, shape, dtype) for key, shape, dtype in layout}


def test_a_fresh_classifier_keeps_the_backbone_and_head_weights():
    state = fcn_resnet18_state()
    model = from_torch(state, num_classes=3, input_shape=(61, 67, 3), mean=(0.5, 0.5, 0.5))
    assert model.num_classes == 3 and model.get_layer("classifier").kernel.shape == (1, 1, 128, 3)
    np.testing.assert_array_equal(model.get_layer("fcn_conv").kernel, state["classifier.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.backbone.get_layer("conv5_block2_2_bn").moving_variance,
                                  state["backbone.layer4.1.bn2.running_var"])
    assert model.preprocessing.mean == [0.5, 0.5, 0.5] and model.preprocessing.std == [0.229, 0.224, 0.225]
    backbone = from_torch(state, include_top=False, input_shape=(61, 67, 3))
    assert isinstance(backbone, ResNetBackbone) and backbone.output_stride == 8
    with pytest.raises(ConversionError, match="needs a segmenter"):
        from_torch(state, include_top=False, num_classes=3)


@pytest.mark.parametrize("head", ["deeplabv3", "fcn"])
def test_new_heads_keras_round_trip(head, tmp_path):
    model = quietly(
        ResNetSegmenter.from_preset, "resnet18", 3, head=head, input_shape=(35, 41, 3), output_stride=8,
        head_width=16, preprocessing=ImageNormalization.from_mode("torch"), **TINY_BACKBONE,
    )
    names = {layer.name for layer in model.layers}
    if head == "deeplabv3":
        assert {"aspp_rate36_conv", "aspp_dropout", "head_refine_conv"} <= names
        assert "decoder_refine1_conv" not in names
    else:
        assert {"fcn_conv", "fcn_dropout"} <= names and "aspp_1x1_conv" not in names
        assert model.get_layer("fcn_conv").kernel.shape == (3, 3, 16, 16)
    path = tmp_path / f"{head}.keras"
    model.save(path)
    loaded = quietly(keras.saving.load_model, path)
    head_config = ("head", "head_width", "aspp_rates", "num_classes", "activation")
    assert {key: loaded.get_config()[key] for key in head_config} == {key: model.get_config()[key] for key in head_config}
    assert loaded.head == head
    images = np.random.default_rng(0).uniform(0, 255, (2, 35, 41, 3)).astype("float32")
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)
    assert model.predict(images, verbose=0).shape == (2, 35, 41, 3)


def test_cli_convert_reports_a_segmenter(tmp_path, capsys):
    """`keras-resnet convert` of a .safetensors file (an FCN head on resnet18 keeps the test small)."""
    from safetensors.numpy import save_file

    source = tmp_path / "fcn.safetensors"
    save_file(fcn_resnet18_state(), str(source))
    output = tmp_path / "fcn.keras"
    assert main(["convert", str(source), "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert "source: fcn_resnet18 (torchvision layout: FCNHead, 5 classes" in out
    assert "model: ResNetSegmenter fcn_resnet18 (head 'fcn', output stride 8), 5 classes (logits), input 520x520" in out
    assert "parity" in out and f"wrote {output}" in out
    model = keras.saving.load_model(output)
    assert isinstance(model, ResNetSegmenter) and model.num_classes == 5
    assert main(["convert", str(source), "--output", str(tmp_path / "x.keras"), "--arch", "deeplabv3_resnet18"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "arch='deeplabv3_resnet18' does not match" in err[0]


def test_live_torchvision_parity():
    # torchvision runs in a child Python (it crashes a process that loaded TensorFlow): only its presence is checked.
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
        pytest.skip("torch and torchvision are not installed")
    data = fixture("deeplabv3_resnet50")
    weights = TorchSegmentationWeights(formula.state_dict_for(data), "deeplabv3_resnet50")
    model = quietly(segmenter_from_torch, weights, input_shape=(61, 67, 3))
    result, name = segmentation_source_parity(model, weights, batch_size=2)
    print(name, result)
    assert name == "torchvision deeplabv3_resnet50"
    assert result["max_rel_diff"] < TOLERANCE and result["mask_agreement"] == 1.0
