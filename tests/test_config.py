"""Tests for the recipe settings: defaults, YAML + overrides, validation errors (keras_resnet_settings)."""

import dataclasses

import pytest

from keras_resnet.config import (
    TASKS,
    ConfigError,
    Recipe,
    TrainSettings,
    dump_config,
    load_config,
)


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_load_as_a_fresh_frozen_copy():
    config = load_config(None)
    assert config == Recipe() and config.task in TASKS
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.epochs = 1
    config.model.input_shape.append(5)  # a list of its own: the declared default is untouched
    assert load_config(None).model.input_shape == Recipe().model.input_shape == [28, 28, 1]


def test_yaml_file_merged_over_defaults_then_overrides(tmp_path):
    path = write(tmp_path, "model:\n  num_classes: 3\ntrain:\n  epochs: 10\n  learning_rate: 1\n")
    config = load_config(path, ["model.input_shape=[20,20,1]", "train.epochs=3", "model.weights=null"])
    assert config.model.num_classes == 3
    assert config.model.input_shape == [20, 20, 1]
    assert config.train.epochs == 3
    assert config.train.learning_rate == 1.0 and isinstance(config.train.learning_rate, float)
    assert config.train.optimizer == TrainSettings().optimizer
    assert config.model.weights is None


def test_free_form_backbone_args_and_mixed_type_options():
    config = load_config(
        {"model": {"backbone_args": {"width": 16}}},
        ["model.backbone_args.depth=3", "train.mixed_precision=mixed_bfloat16", "train.jit_compile=true"],
    )
    assert config.model.backbone_args == {"width": 16, "depth": 3}
    assert config.train.mixed_precision == "mixed_bfloat16"
    assert config.train.jit_compile is True


def test_dump_and_reload_round_trip(tmp_path):
    config = load_config(None, ["train.epochs=2"])
    dump_config(config, tmp_path / "out" / "recipe.yaml")
    assert load_config(tmp_path / "out" / "recipe.yaml") == config


def test_unknown_key_names_allowed_keys_and_suggests(tmp_path):
    path = write(tmp_path, "train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "unknown key 'train.epoch'" in message and "recipe.yaml" in message
    assert "allowed keys under 'train'" in message and "did you mean 'train.epochs'" in message


def test_one_class_is_for_detection_only():
    one_class = ["task=detection", "data.source=voc", "data.train=voc", "data.val=voc", "model.num_classes=1"]
    assert load_config(None, one_class).model.num_classes == 1
    with pytest.raises(ConfigError, match="task 'segmentation' needs background \\+ at least one class"):
        load_config(None, ["task=segmentation", "data.source=mosaic", "model.num_classes=1"])


def test_unknown_override_key_is_rejected():
    with pytest.raises(ConfigError, match="unknown key 'modle'"):
        load_config(None, ["modle.num_classes=3"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.epochs=ten", "'train.epochs' must be an int, got 'ten' (str)"),
        ("train.epochs=true", "'train.epochs' must be an int, got True (bool)"),
        ("train.learning_rate=fast", "'train.learning_rate' must be a float"),
        ("train.learning_rate=3e-3", "YAML reads 3e-3 as text: write 0.003"),
        ("train.epochs=null", "'train.epochs' must not be null"),
        ("model.num_classes=0", "'model.num_classes' must be >= 1"),
        ("model.num_classes=1", "task 'classification' needs at least two classes, so >= 2"),
        ("model.input_shape=[20,20,2]", "'model.input_shape' must have 1 or 3 channels"),
        ("model.dropout=1.0", "'model.dropout' must be in [0, 1)"),
    ],
)
def test_wrong_types_and_ranges(override, expected):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert expected in str(error.value)


@pytest.mark.parametrize(
    "override, allowed",
    [
        ("train.optimizer=adam", "'sgd', 'adamw'"),
        ("data.source=cifar10", "'fashion_mnist', 'image_folder'"),
        ("train.mixed_precision=fp16", "'mixed_float16'"),
        ("task=tracking", "'detection'"),
    ],
)
def test_values_outside_allowed_set(override, allowed):
    with pytest.raises(ConfigError, match="must be one of") as error:
        load_config(None, [override])
    assert allowed in str(error.value)


def test_malformed_yaml_names_path_and_line(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\n  optimizer: [sgd\n", name="bad.yaml")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "bad.yaml" in str(error.value) and "line" in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found.*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_override_without_equals():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["train.epochs"])


def test_a_folder_for_a_recipe_names_the_run_s_recipe(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a recipe file"):
        load_config(tmp_path)
    dump_config(Recipe(), tmp_path / "recipe.yaml")
    with pytest.raises(ConfigError, match=f"is a run folder, not a recipe file; pass its recipe, "
                                          f"{tmp_path / 'recipe.yaml'}"):
        load_config(tmp_path)
