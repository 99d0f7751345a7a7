"""The weights catalogue: complete, consistent, every entry's layout accepted, names resolved end to end.

What must hold (issue 30):
- every preset with published weights has a catalogue entry and an "imagenet" default;
- each entry is whole: its URL ends in its file name, the sha256 prefix in the name is its hash, the figures
  are in range, the evaluation is stated;
- every entry's architecture accepts the entry's layout (the real key/shape layouts of the committed
  torchvision/timm fixtures; keras.applications models built here);
- names resolve: `from_preset(..., weights="imagenet")` downloads (here: from a mirror folder in the Hub's
  layout, with no network), verifies, caches and loads; the second time with no mirror at all; task presets
  build their task model; unknown names and wrong kinds are one clear error; recipes check names before
  TensorFlow starts.
"""

import re

import numpy as np
import pytest

from keras_resnet_cli.presets_table import load_figures
from keras_resnet_settings.errors import ConfigError
from keras_resnet_settings.weights import (
    CATALOGUE,
    DEFAULT_IMAGENET,
    TASK_PRESETS,
    entries_for,
    find_entry,
    is_weights_name,
)
from tests.test_convert_torch import fixture, formula

# Presets nobody publishes weights for, and why (every other preset must have an entry).
NO_PUBLISHED_WEIGHTS = {
    "resnet200": "timm lists resnet200 untrained only; torchvision has none",
    **{name: "CIFAR ResNets: no published weights in these layouts"
       for name in ("resnet20_cifar", "resnet32_cifar", "resnet44_cifar", "resnet56_cifar", "resnet110_cifar",
                    "resnet1202_cifar")},
}


def layout(name):
    """A fixture's state dict as zero stand-ins of the right shapes and dtypes (no memory)."""
    return {key: np.broadcast_to(np.zeros((), dtype), shape)
            for key, shape, dtype in formula.fixture_layout(fixture(name))}


def layout_fixture_of(entry):
    """The committed layout fixture of an entry's architecture (timm's plain ResNets have torchvision's keys)."""
    from tests.test_convert_torch import FIXTURES

    for name in (f"{entry.source}_{entry.arch}", f"torchvision_{entry.arch}"):
        if (FIXTURES / f"{name}.npz").exists():
            return name
    return None


def test_every_preset_with_published_weights_has_an_entry_and_a_default():
    presets = list(load_figures())
    missing = [p for p in presets if p not in NO_PUBLISHED_WEIGHTS and not entries_for(p)]
    assert not missing, f"presets with published weights but no catalogue entry: {missing}"
    assert set(DEFAULT_IMAGENET) == {e.preset for e in CATALOGUE if e.task == "classification"}
    for preset in DEFAULT_IMAGENET:
        assert find_entry(preset, "imagenet").tag == DEFAULT_IMAGENET[preset]
    assert set(TASK_PRESETS) == {"retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "deeplabv3_resnet50",
                                 "deeplabv3_resnet101", "fcn_resnet50", "fcn_resnet101"}


@pytest.mark.parametrize("entry", CATALOGUE, ids=lambda e: f"{e.preset}-{e.tag}")
def test_each_entry_is_whole(entry):
    assert entry.urls or entry.hf_repo, "no source"
    for url in entry.urls:
        assert url.startswith("https://") and url.endswith("/" + entry.filename)
    if entry.hash_prefix is not None:  # torchvision/timm: the first hex digits of the sha256, in the file name
        assert re.fullmatch(r"[0-9a-f]{8}", entry.hash_prefix)
        assert entry.filename.rsplit("-", 1)[1].startswith(entry.hash_prefix)
    if entry.md5 is not None:
        assert re.fullmatch(r"[0-9a-f]{32}", entry.md5)
    assert entry.hash_prefix or entry.md5 or entry.hf_repo, "nothing verifies the file"
    if entry.task == "classification":
        assert entry.metrics["top1"] is None or 60 < entry.metrics["top1"] < entry.metrics["top5"] < 100
        assert entry.evaluation["crop"] in (224, 256)
    else:
        assert entry.metrics.get("box_map") or entry.metrics.get("miou")
    assert entry.license and entry.dataset
    assert len([e for e in entries_for(entry.preset) if e.tag == entry.tag]) == 1


@pytest.mark.parametrize("entry", [e for e in CATALOGUE if e.source in ("torchvision", "timm")
                                   and e.task == "classification"], ids=lambda e: f"{e.preset}-{e.tag}")
def test_torch_entries_accept_their_layout(entry):
    from keras_resnet.convert.torch_resnet import TorchWeights, preset_features

    name = layout_fixture_of(entry)
    if name is None:  # resnet34d, resnet101d: no committed layout; the -D layout of 18d/50d with their depth
        assert preset_features(entry.arch) == {**preset_features(entry.preset)}
        pytest.skip(f"no committed layout of {entry.source} {entry.arch}; its -D layout is checked on 18d/50d")
    weights = TorchWeights(None, arch=entry.arch, state_dict=(layout(name), name))
    assert weights.preset == entry.preset
    assert weights.num_classes == 1000


@pytest.mark.parametrize("entry", [e for e in CATALOGUE if e.task != "classification"],
                         ids=lambda e: e.preset)
def test_task_entries_accept_their_layout(entry):
    from keras_resnet.convert.torch_retinanet import TorchRetinaNetWeights
    from keras_resnet.convert.torch_segmentation import TorchSegmentationWeights
    from tests import test_convert_torch_detection as detection
    from tests import test_convert_torch_segmentation as segmentation

    if entry.task == "detection":
        state = detection.zeros_like_layout(detection.fixture(entry.preset))
        weights = TorchRetinaNetWeights(state, entry.filename, arch=entry.arch)
    else:
        weights = TorchSegmentationWeights(segmentation.layout_state(entry.preset), entry.filename, arch=entry.arch)
    assert weights.num_classes == (91 if entry.task == "detection" else 21)


@pytest.mark.parametrize("preset", ["resnet50_v1", "resnet50_v2"])
def test_keras_applications_entries_accept_their_layout(preset):
    import keras

    from keras_resnet import ResNetBackbone
    from keras_resnet.convert import KerasApplicationsWeights
    from keras_resnet.models.resnet.pretrained import load_pretrained

    entry = find_entry(preset, "imagenet")
    build = {"resnet50": keras.applications.ResNet50, "resnet50v2": keras.applications.ResNet50V2}[entry.arch]
    source = build(weights=None, input_shape=(64, 64, 3))
    weights = KerasApplicationsWeights.read(source, None, preset)
    assert weights.preset == preset and weights.num_classes == 1000
    load_pretrained(weights, ResNetBackbone.from_preset(preset, input_shape=(64, 64, 3)), preset=preset)


def test_names_and_paths_are_told_apart():
    for name in ("imagenet", "coco", "coco_voc", "keras_applications", "torchvision:IMAGENET1K_V2", "timm:a1_in1k"):
        assert is_weights_name(name)
    for path in ("resnet50.pth", "weights/imagenet", "./imagenet.h5", "C:\\w\\imagenet", None, 3):
        assert not is_weights_name(path)


def test_unknown_names_are_one_clear_error():
    with pytest.raises(ConfigError, match=r"preset 'resnet50' has no weights 'timm:a9_in1k'; it has: imagenet, "
                                          r"timm:a1_in1k, torchvision:IMAGENET1K_V1, torchvision:IMAGENET1K_V2"):
        find_entry("resnet50", "timm:a9_in1k")
    with pytest.raises(ConfigError, match="no published weights for preset 'resnet20_cifar'"):
        find_entry("resnet20_cifar", "imagenet")


@pytest.fixture
def weights_env(tmp_path, monkeypatch):
    """No network: an empty cache, the Hub offline, and a mirror folder with timm's resnet18d in the Hub layout."""
    from tests.weights_helpers import write_weights_mirror

    monkeypatch.setenv("KERAS_RESNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("KERAS_RESNET_WEIGHTS_MIRROR", str(write_weights_mirror(tmp_path / "mirror")))
    return tmp_path


def test_imagenet_by_name_downloads_verifies_caches_and_loads(weights_env, monkeypatch):
    from keras_resnet import ResNetClassifier
    from keras_resnet_settings.weights import cached_path
    from tests.weights_helpers import timm_resnet18d_state

    model = ResNetClassifier.from_preset("resnet18d", weights="imagenet", input_shape=(64, 64, 3))
    state = timm_resnet18d_state()
    np.testing.assert_array_equal(model.get_layer("predictions").get_weights()[0], state["fc.weight"].T)
    assert model.preprocessing.get_config()["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert cached_path(find_entry("resnet18d", "imagenet")) is not None
    # the second time from the cache alone: no mirror, no network
    monkeypatch.delenv("KERAS_RESNET_WEIGHTS_MIRROR")
    again = ResNetClassifier.from_preset("resnet18d", weights="timm:ra2_in1k", num_classes=3, input_shape=(64, 64, 3))
    kernel = again.backbone.weights[0].numpy()
    np.testing.assert_array_equal(kernel, state["conv1.0.weight"].transpose(2, 3, 1, 0))


def test_a_download_that_fails_says_where_to_put_the_file(weights_env, monkeypatch):
    import socket

    from keras_resnet import ResNetBackbone
    from keras_resnet.weights import WeightsDownloadError

    def offline(*args, **kwargs):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    (weights_env / "empty").mkdir()
    monkeypatch.setenv("KERAS_RESNET_WEIGHTS_MIRROR", str(weights_env / "empty"))
    monkeypatch.setattr(socket, "getaddrinfo", offline)
    entry = find_entry("resnet18", "imagenet")  # torchvision's file, at its real URL
    with pytest.raises(WeightsDownloadError) as caught:
        ResNetBackbone.from_preset("resnet18", weights="imagenet", input_shape=(64, 64, 3))
    message = str(caught.value)
    assert "\n" not in message
    assert entry.urls[0] in message and entry.filename in message and "KERAS_RESNET_WEIGHTS_MIRROR" in message


@pytest.mark.parametrize("mirror", [False, True], ids=["no-mirror", "empty-mirror"])
def test_a_hub_download_that_fails_names_every_source(weights_env, monkeypatch, caplog, capsys, mirror):
    # timm's weights: the Hub first, then the GitHub release. Without network the error named the fallback alone,
    # after about 23 s of huggingface_hub's retries and a dozen warning lines.
    import logging
    import socket
    import time

    import huggingface_hub.constants

    from keras_resnet import ResNetBackbone
    from keras_resnet.weights import WeightsDownloadError

    real_getaddrinfo = socket.getaddrinfo

    def offline(host, *args, **kwargs):
        if host in ("127.0.0.1", "localhost"):
            return real_getaddrinfo(host, *args, **kwargs)
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    with socket.socket() as probe:  # a Hub endpoint nothing listens on
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    empty = weights_env / "empty"
    empty.mkdir()
    if mirror:
        monkeypatch.setenv("KERAS_RESNET_WEIGHTS_MIRROR", str(empty))
    else:
        monkeypatch.delenv("KERAS_RESNET_WEIGHTS_MIRROR")
    entry = find_entry("resnet18d", "imagenet")
    cache = weights_env / "cache"
    capsys.readouterr()
    start = time.monotonic()
    with pytest.raises(WeightsDownloadError) as caught:
        ResNetBackbone.from_preset("resnet18d", weights="imagenet", input_shape=(64, 64, 3))
    assert time.monotonic() - start < 10
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"could not download {entry.name}: model.safetensors from ")
    for piece in (f"{endpoint}/{entry.hf_repo}/resolve/main/model.safetensors (", f"{entry.urls[0]} (",
                  str(cache / "timm__resnet18d.ra2_in1k" / "model.safetensors"), str(cache / entry.filename),
                  str(weights_env / "hf" / "models--timm--resnet18d.ra2_in1k")):
        assert piece in message
    if mirror:
        assert message.endswith(f"not found in the mirror KERAS_RESNET_WEIGHTS_MIRROR={empty}: "
                                f"{empty / 'timm__resnet18d.ra2_in1k' / 'model.safetensors'}, {empty / entry.filename}")
    else:
        assert message.endswith("set KERAS_RESNET_WEIGHTS_MIRROR to a folder or URL that has "
                                f"timm__resnet18d.ra2_in1k/model.safetensors or {entry.filename}")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    printed = capsys.readouterr()  # Keras's own line for the fallback's download is all
    assert [line for line in (printed.out + printed.err).splitlines()
            if line.strip() and not line.startswith("Downloading data from")] == []


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_task_presets_build_their_model_from_their_weights(task, tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    from keras_resnet import ResNetSegmenter, RetinaNetDetector
    from keras_resnet.weights import catalogue

    if task == "detection":
        from tests import test_convert_torch_detection as source

        preset, name, build = "retinanet_resnet50_fpn_v2", "coco", RetinaNetDetector.from_preset
        data = source.fixture(preset)
        state = source.formula.state_dict_for(preset, data)
    else:
        from tests import test_convert_torch_segmentation as source

        preset, name, build = "fcn_resnet50", "coco_voc", ResNetSegmenter.from_preset
        state = source.formula.state_dict_for(source.fixture(preset))
    served = tmp_path / find_entry(preset, name).filename.replace(".pth", ".safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(served))
    asked = []

    def weights_file(entry, progress=True):
        asked.append(entry.name)
        return served

    monkeypatch.setattr(catalogue, "weights_file", weights_file)
    model = build(preset, weights=name, input_shape=(64, 64, 3))
    assert asked == [find_entry(preset, name).name]
    assert model.num_classes == (91 if task == "detection" else 21)
    with pytest.raises(ConfigError, match="task preset"):
        build(preset, input_shape=(64, 64, 3))


def test_recipes_check_weight_names_before_tensorflow():
    from keras_resnet_settings import load_config

    recipe = "tasks/classification/fashion_mnist_resnet20.yaml"
    with pytest.raises(ConfigError, match="no published weights for preset 'resnet20_cifar'"):
        load_config(recipe, ["model.weights=imagenet"])
    with pytest.raises(ConfigError, match="are detection weights of a whole model"):
        load_config("tasks/detection/voc_retinanet_resnet50.yaml",
                    ["model.weights=torchvision:COCO_V1", "model.backbone=retinanet_resnet50_fpn_v2"])
    assert load_config(recipe, ["model.weights=imagenet", "model.backbone=resnet50"]).model.weights == "imagenet"
    with pytest.raises(ConfigError, match="'imagenett' is neither a weights name .* did you mean 'imagenet'"):
        load_config(recipe, ["model.weights=imagenett", "model.backbone=resnet50"])
    assert load_config(recipe, ["model.weights=my/model.keras"]).model.weights == "my/model.keras"  # checked later


def test_the_weights_command_lists_and_downloads(weights_env, capsys):
    from keras_resnet.cli import main

    assert main(["weights", "resnet18d"]) == 0
    listed = capsys.readouterr().out
    assert "timm:ra2_in1k" in listed and '"imagenet"' in listed and "73.794" in listed and "yes" not in listed
    assert main(["weights", "--download", "resnet18d"]) == 0
    assert "resnet18d timm:ra2_in1k:" in capsys.readouterr().out
    assert main(["weights", "resnet18d"]) == 0
    assert "yes" in capsys.readouterr().out  # cached now
    assert main(["weights", "--download", "resnet5"]) == 2
    assert "did you mean resnet50?" in capsys.readouterr().err
    assert main(["weights", "--weights", "imagenet"]) == 2
    assert "--weights goes with --download PRESET" in capsys.readouterr().err
