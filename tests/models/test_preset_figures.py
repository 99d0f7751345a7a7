"""`keras-resnet models` prints figures computed once (preset_figures.json): they match PRESETS and built models."""

import pytest

from keras_resnet.models.resnet.analysis import FIGURES_PATH, preset_figures
from keras_resnet.models.resnet.presets import PRESETS
from keras_resnet_cli.presets_table import figures_path, load_figures

# One of each kind: basic and bottleneck blocks, v2, grouped convolutions, SE, CIFAR.
BUILT = ["resnet18", "resnet50", "resnet50_v2", "resnext50_32x4d", "seresnet50", "resnet20_cifar"]
REBUILD = "rebuild it: python -m keras_resnet.models.resnet.analysis --write-figures"


def test_the_cli_reads_the_file_the_generator_writes():
    assert figures_path().resolve() == FIGURES_PATH.resolve()


def test_the_table_has_every_preset_and_its_descriptions():
    table = load_figures()
    assert list(table) == list(PRESETS), REBUILD
    for name, figures in table.items():
        assert figures["description"] == PRESETS[name]["description"], (name, REBUILD)
        assert figures["short"] == PRESETS[name]["short"], (name, REBUILD)


@pytest.mark.parametrize("name", BUILT)
def test_the_figures_are_those_of_the_built_model(name):
    assert preset_figures([name])[name] == load_figures()[name], REBUILD
