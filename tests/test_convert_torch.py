"""Import of torchvision/timm ResNets, checked against real torch outputs without torch installed.

tests/fixtures/torch/*.npz hold what real torchvision/timm models computed
(scripts/make_torch_fixtures.py, run in a torch environment) on weights that
the script's integer formula (`tensor_for`) defines: the tests rebuild the same
state dicts in NumPy, convert them and compare logits and C2-C5 features.
The LIVE tests compare against torch modules directly and run only where
torch and torchvision import.
"""

import importlib.util
import os
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_resnet import ResNetBackbone, ResNetClassifier
from keras_resnet.cli import main
from keras_resnet.convert import TORCH_ARCHS, ConversionError, from_torch, torch_parity
from keras_resnet.convert.torch_resnet import TorchWeights
from keras_resnet.training.backbones import load_pretrained_weights

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "torch"
SCRIPT = ROOT / "scripts" / "make_torch_fixtures.py"
TOLERANCE = 1e-4  # max abs diff over max abs of the reference


def _load_script():
    spec = importlib.util.spec_from_file_location("make_torch_fixtures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


formula = _load_script()
NAMES = [f"{library}_{name}" for library, name in formula.MODELS]


def fixture(name):
    with np.load(FIXTURES / f"{name}.npz") as data:
        return {key: data[key] for key in data.files}


def arch_of(name):
    return name.split("_", 1)[1]


def relative_diff(reference, ours):
    reference, ours = np.asarray(reference), np.asarray(ours)
    assert reference.shape == ours.shape
    return float(np.abs(reference - ours).max() / np.abs(reference).max())


@pytest.fixture(scope="module")
def resnet18():
    data = fixture("torchvision_resnet18")
    return data, formula.state_dict_for(data)


def test_every_fixture_is_there_and_every_torch_arch_is_covered():
    assert sorted(p.stem for p in FIXTURES.glob("*.npz")) == sorted(NAMES)
    assert {arch_of(n) for n in NAMES} <= set(TORCH_ARCHS)
    assert sum(p.stat().st_size for p in FIXTURES.glob("*.npz")) < 3_000_000


# timm's resnext50_32x4d is torchvision's (same keys, same outputs: checked below), so it is converted once.
CONVERTED = [name for name in NAMES if name != "timm_resnext50_32x4d"]


# In CI one deep network (torchvision's resnet101) stands for the 101/152-layer ones: they convert with the
# code of their 50-layer counterparts and take ~10 s each here. KERAS_RESNET_ALL_PRESETS=1 runs them all.
CI_DEEP = ("torchvision_resnet101",)


@pytest.mark.parametrize("name", CONVERTED)
def test_logits_and_features_equal_torch(name):
    if (any(depth in name for depth in ("101", "152")) and name not in CI_DEEP
            and not os.environ.get("KERAS_RESNET_ALL_PRESETS")):
        pytest.skip("deep network parity: set KERAS_RESNET_ALL_PRESETS=1 to run it")
    data = fixture(name)
    np.testing.assert_array_equal(formula.input_pixels(), data["pixels"])  # the formula reproduces the input
    pixels = data["pixels"]
    model = from_torch(formula.state_dict_for(data), arch=arch_of(name), input_shape=pixels.shape[1:])
    assert isinstance(model, ResNetClassifier) and model.activation is None
    # One forward pass (deep nets run eagerly layer by layer): the classifier's own preprocessing, backbone,
    # pooling and head layers; its graph as a whole runs in the tests below.
    normalised = model.preprocessing(pixels)
    np.testing.assert_allclose(normalised, formula.normalise(pixels), atol=1e-5)
    features = model.backbone.feature_extractor()(normalised)
    logits = model.get_layer("predictions")(model.get_layer("avg_pool")(features["C5"]))
    diffs = {"logits": relative_diff(data["logits"], logits)}
    diffs.update({level: relative_diff(data[level], features[level][:1]) for level in ("C2", "C3", "C4", "C5")})
    print(f"{name}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) < TOLERANCE, diffs


def test_timm_resnext_is_torchvision_s():
    timm, torchvision = fixture("timm_resnext50_32x4d"), fixture("torchvision_resnext50_32x4d")
    assert formula.fixture_layout(timm) == formula.fixture_layout(torchvision)
    for key in ("logits", "C2", "C3", "C4", "C5"):
        np.testing.assert_allclose(timm[key], torchvision[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_the_architecture_is_inferred_from_keys_and_shapes(name):
    # Inference reads keys and shapes only: all-zero stand-ins of the right shapes (no memory) suffice.
    layout = formula.fixture_layout(fixture(name))
    weights = TorchWeights({key: np.broadcast_to(np.zeros((), dtype), shape) for key, shape, dtype in layout})
    assert weights.preset == arch_of(name) and weights.num_classes == 1000


def test_safetensors_file_and_wrapped_checkpoints(resnet18, tmp_path):
    from safetensors.numpy import save_file

    data, state = resnet18
    path = tmp_path / "resnet18.safetensors"
    save_file(state, str(path))
    model = from_torch(path, input_shape=(29, 33, 3))
    assert relative_diff(data["logits"], model(data["pixels"])) < TOLERANCE
    assert model.get_config()["preprocessing"]["config"]["mean"] == [0.485, 0.456, 0.406]
    wrapped = {"state_dict": {f"module.{key}": value for key, value in state.items()}, "epoch": 3}
    backbone = from_torch(wrapped, include_top=False, input_shape=(29, 33, 3))
    assert isinstance(backbone, ResNetBackbone)
    features = backbone.feature_extractor()(formula.normalise(data["pixels"][:1]))
    assert relative_diff(data["C5"], features["C5"]) < TOLERANCE


def test_from_preset_loads_the_backbone_and_a_fresh_head(resnet18, tmp_path):
    data, state = resnet18
    model = ResNetClassifier.from_preset("resnet18", weights=state, num_classes=10, input_shape=(29, 33, 3))
    assert model.num_classes == 10 and model.preprocessing is not None
    features = model.backbone.feature_extractor()(formula.normalise(data["pixels"][:1]))
    assert relative_diff(data["C5"], features["C5"]) < TOLERANCE
    same = ResNetClassifier.from_preset("resnet18", weights=state, input_shape=(29, 33, 3), activation=None)
    assert relative_diff(data["logits"], same(data["pixels"])) < TOLERANCE
    with pytest.raises(ConversionError, match=r"preset 'resnet34' does not match.*stackwise_num_blocks"):
        ResNetBackbone.from_preset("resnet34", weights=state)
    with pytest.raises(ConversionError, match=r"bn_epsilon=0.001 \(the weights need 1e-05\)"):
        ResNetBackbone.from_preset("resnet18", weights=state, bn_epsilon=1e-3)
    # Recipes: model.weights takes the same files.
    from safetensors.numpy import save_file

    path = tmp_path / "resnet18.safetensors"
    save_file(state, str(path))
    recipe_model = ResNetClassifier.from_preset("resnet18", num_classes=1000, input_shape=(29, 33, 3), activation=None,
                                                preprocessing=model.preprocessing)
    load_pretrained_weights(recipe_model, str(path))
    assert relative_diff(data["logits"], recipe_model(data["pixels"])) < TOLERANCE


def test_mismatches_name_the_keys_and_shapes(resnet18):
    _, state = resnet18
    backbone = ResNetBackbone.from_preset("resnet18", input_shape=(29, 33, 3))
    with pytest.raises(ConversionError, match=r"arch='resnet34' does not match.*\[2, 2, 2, 2\] \(not \[3, 4, 6, 3\]\)"):
        from_torch(state, arch="resnet34")
    with pytest.raises(ConversionError, match="not a torchvision/timm ResNet we import"):
        from_torch(state, arch="vit_base_patch16_224")
    from_torch(state, arch="timm/resnet18.a1_in1k", include_top=False)  # timm names with a tag
    bad = dict(state, **{"layer1.0.conv2.weight": state["layer1.0.conv2.weight"][:, :32]})
    with pytest.raises(ConversionError, match=r"conv2.weight \(64, 32, 3, 3\) \(ours needs \(64, 64, 3, 3\)\)"):
        TorchWeights(bad).load_backbone(backbone)
    with pytest.raises(ConversionError, match=r"1 keys our model does not use \(extra.weight\)"):
        TorchWeights(dict(state, **{"extra.weight": np.zeros(3, "float32")})).load_backbone(backbone)
    missing = {k: v for k, v in state.items() if k != "layer4.1.bn2.running_var"}
    with pytest.raises(ConversionError, match=r"missing 1 keys \(layer4.1.bn2.running_var\)"):
        TorchWeights(missing).load_backbone(backbone)
    headless = {k: v for k, v in state.items() if not k.startswith("fc.")}
    assert TorchWeights(headless).num_classes is None
    with pytest.raises(ConversionError, match="has no fc"):
        from_torch(headless, include_top=True)


def test_what_is_not_a_state_dict(tmp_path, monkeypatch):
    with pytest.raises(ConversionError, match="key 'a' holds a str, not a tensor"):
        from_torch({"a": "b"})
    with pytest.raises(ConversionError, match="Expected a state dict file"):
        from_torch([1, 2])
    with pytest.raises(ConversionError, match="no layer1"):
        from_torch({"conv1.weight": np.zeros((64, 3, 7, 7), "float32")})
    with pytest.raises(ConversionError, match="does not exist"):
        from_torch(tmp_path / "missing.pth")
    text = tmp_path / "notes.safetensors"
    text.write_text("not tensors")
    with pytest.raises(ConversionError, match="not a readable .safetensors file"):
        from_torch(text)
    other = tmp_path / "weights.npz"
    other.write_text("x")
    with pytest.raises(ConversionError, match="unknown weight file type"):
        from_torch(other)
    monkeypatch.setitem(sys.modules, "torch", None)  # as where torch is not installed: .pth files need none
    pth = tmp_path / "model.pth"
    pth.write_bytes(b"\x80")
    with pytest.raises(ConversionError, match=r"model.pth is not a PyTorch state dict file: it cannot be read"):
        from_torch(pth)


def test_cli_convert_writes_the_model_and_reports(resnet18, tmp_path, capsys):
    from safetensors.numpy import save_file

    _, state = resnet18
    source = tmp_path / "resnet18.safetensors"
    save_file(state, str(source))
    output = tmp_path / "resnet18.keras"
    argv = ["convert", str(source), "--output", str(output), "--num-classes", "7", "--mean", "0.5", "0.5", "0.5",
            "--std", "0.5", "0.5", "0.5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "-> preset resnet18" in out and "a fresh 7-class head" in out and f"wrote {output}" in out
    assert "parameters: 11," in out and "parity" in out
    model = keras.saving.load_model(output)
    assert model.num_classes == 7 and model.preprocessing.std == [0.5, 0.5, 0.5]
    assert main(["convert", str(source), "--output", str(tmp_path / "x.keras"), "--arch", "resnet50"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "arch='resnet50' does not match" in err[0]
    assert not (tmp_path / "x.keras").exists()


def test_cli_converts_keras_applications_files_too(tmp_path, capsys):
    from tests.test_convert import write_keras_applications_h5

    path = tmp_path / "resnet50_weights_notop.h5"
    write_keras_applications_h5(keras.applications.ResNet50(weights=None, include_top=False), path)
    output = tmp_path / "resnet50_v1.keras"
    assert main(["convert", str(path), "--output", str(output)]) == 0
    assert "keras.applications resnet50 (preset resnet50_v1)" in capsys.readouterr().out
    assert isinstance(keras.saving.load_model(output), ResNetBackbone)
    assert main(["convert", str(path), "--output", str(output), "--num-classes", "3"]) == 2
    assert "apply to torchvision/timm files only" in capsys.readouterr().err


def test_live_torchvision_module():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    module = torchvision.models.resnet50(weights=None).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for submodule in module.modules():
            if isinstance(submodule, torch.nn.BatchNorm2d):
                for tensor in (submodule.weight, submodule.bias, submodule.running_mean):
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.4 + 0.2)
                submodule.running_var.copy_(torch.rand(submodule.running_var.shape, generator=generator) * 0.9 + 0.1)
    model = from_torch(module, input_shape=(61, 47, 3))
    result = torch_parity(model, module)
    print("live torchvision resnet50", result)
    assert result["max_rel_diff"] < TOLERANCE
    backbone = from_torch(module, include_top=False, input_shape=(61, 47, 3))
    assert torch_parity(backbone, module)["max_rel_diff"] < TOLERANCE


def test_live_timm_module_brings_its_preprocessing():
    timm = pytest.importorskip("timm")
    module = timm.create_model("resnet18d", pretrained=False).eval()
    module.pretrained_cfg = {**module.pretrained_cfg, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                             "input_size": (3, 160, 176)}
    model = from_torch(module)
    assert model.input_shape == (None, 160, 176, 3)
    assert model.get_config()["preprocessing"]["config"]["std"] == [0.25, 0.25, 0.25]
    assert torch_parity(model, module)["max_rel_diff"] < TOLERANCE


def test_torch_files_and_the_pickles_weights_only_refuses(resnet18, tmp_path):
    torch = pytest.importorskip("torch")
    data, state = resnet18
    path = tmp_path / "resnet18.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}}, path)
    model = from_torch(path, input_shape=(29, 33, 3))
    assert relative_diff(data["logits"], model(data["pixels"])) < TOLERANCE
    unsafe = tmp_path / "module.pth"
    torch.save({"model": torch.nn.Linear(2, 2), "note": Path("x")}, unsafe)
    with pytest.raises(ConversionError, match="torch.nn.modules.linear.Linear.*can execute code"):
        from_torch(unsafe)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("hello")
    with pytest.raises(ConversionError, match="is not a PyTorch state dict file"):
        from_torch(garbage)
