"""The typed recipe settings (keras_resnet_settings): declarations, all-at-once errors, saved recipes, reference."""

import dataclasses
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from keras_resnet_settings import (
    DataSettings,
    ExportSettings,
    Recipe,
    check_setting,
    default,
    load_config,
)
from keras_resnet_settings.errors import ConfigError
from keras_resnet_settings.explain import REFERENCE_FILE, reference_markdown, rows
from keras_resnet_settings.fields import (
    check_value,
    default_of,
    hints,
    is_section,
    rule_of,
)

ROOT = Path(__file__).resolve().parents[1]
SAVED = Path(__file__).resolve().parent / "fixtures" / "saved_recipes"
TASK_RECIPES = sorted((ROOT / "tasks").rglob("*.yaml"))


# Recipe keys declared after tests/fixtures/saved_recipes/ was written (by the dict loader of af57587).
ADDED_SINCE_FIXTURES = {"data.val_split", "data.augment.color_jitter", "train.worker_wait_minutes",
                        "train.worker_restarts", "train.sync_batch_norm", "train.learning_rate_batch_size",
                        "train.time_budget_fallback", "train.time_budget_fallback_below"}


FREE_FORM = ("backbone_args", "head_args", "decoder_args", "time_budget_fallback")  # mappings, not sections


def flatten(tree, prefix=""):
    """{"data.augment.scale_range": [...], ...} of a nested recipe dict."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in FREE_FORM:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def declared(cls=Recipe, prefix=""):
    kinds = hints(cls)
    for f in dataclasses.fields(cls):
        if is_section(kinds[f.name]):
            yield from declared(kinds[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, kinds[f.name]


@pytest.mark.parametrize("cls", [Recipe, ExportSettings])
def test_every_setting_has_help_and_a_default_that_passes_its_own_checks(cls):
    for name, f, kind in declared(cls):
        rule = rule_of(f)
        assert rule.help and len(rule.help) > 8, name
        _, problem = check_value(name, default_of(f), kind, rule, default_of(f))
        assert problem is None, problem


def test_a_recipe_with_three_mistakes_lists_all_three_with_a_suggestion(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("train:\n  epoch: 3\n  learning_rate: fast\ndata:\n  tile_overlap: 0.95\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"3 problems in {path}:")
    assert "unknown key 'train.epoch'" in message and "did you mean 'train.epochs'?" in message
    assert "'train.learning_rate' must be a float, got 'fast' (str)" in message
    assert "'data.tile_overlap' must be in [0, 0.9], got 0.95 (float)" in message


def test_rules_between_settings_are_reported_with_the_others():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["model.num_classes=1", "data.sampling=crop", "train.epochs=0"])
    message = str(error.value)
    assert message.startswith("3 problems in defaults:")
    assert "needs at least two classes" in message and "'data.sampling'='crop' applies to" in message
    assert "'train.epochs' must be >= 1" in message


def test_cli_reports_every_mistake_before_tensorflow_and_makes_no_run_folder(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\ntrain:\n  epoch: 3\n  learning_rate: fast\n"
                      "data:\n  tile_overlap: 0.95\nmodel:\n  backbone: resnet19\n")
    code = textwrap.dedent(f"""
        import sys, time
        started = time.perf_counter()
        from keras_resnet_cli import main
        status = main(["train", {str(recipe)!r}])
        print("STATUS", status, "SECONDS", time.perf_counter() - started,
              "TF", "tensorflow" in sys.modules, "KERAS", "keras" in sys.modules)
    """)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - started
    assert "STATUS 2" in result.stdout and "TF False KERAS False" in result.stdout, result.stdout + result.stderr
    assert "4 problems in" in result.stderr and "did you mean 'train.epochs'?" in result.stderr
    assert "'model.backbone': Unknown preset 'resnet19'" in result.stderr and "did you mean 'resnet18'" in result.stderr
    assert "Traceback" not in result.stderr
    assert wall < 10  # the in-process figure below is the one that counts; this bounds interpreter start-up
    seconds = float(result.stdout.split("SECONDS ")[1].split()[0])
    assert seconds < 1.5, seconds
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("saved", sorted(SAVED.glob("*.yaml")), ids=lambda p: p.stem)
def test_recipes_saved_by_the_dict_loader_load_the_same(saved):
    # Written by the last main with the dict loader (load_config + dump_config, as a run folder's recipe.yaml).
    stored = flatten(yaml.safe_load(saved.read_text()))
    loaded = flatten(load_config(saved).to_dict())
    added = set(loaded) - set(stored)  # keys declared since the fixture was written: at their defaults
    assert set(stored) <= set(loaded) and added <= ADDED_SINCE_FIXTURES, added - ADDED_SINCE_FIXTURES
    assert {key: loaded[key] for key in stored} == stored
    assert all(loaded[key] == default(key) for key in added)
    source = {path.stem: path for path in TASK_RECIPES}.get(saved.stem)
    if source is not None:  # the task recipe itself still resolves to what was saved
        assert {key: value for key, value in flatten(load_config(source).to_dict()).items() if key in stored} == stored


def test_saved_recipes_resume_without_a_recipe_change():
    from keras_resnet.training.run_lock import recipe_changes

    for saved in sorted(SAVED.glob("*.yaml")):
        stored = yaml.safe_load(saved.read_text())
        assert recipe_changes(stored, load_config(saved)) == [], saved
        changed = load_config(saved, ["train.seed=7"])
        assert recipe_changes(stored, changed) == ["train.seed"], saved


def test_recipes_are_frozen_and_replace_gives_a_new_one():
    recipe = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.data.batch_size = 3
    smaller = recipe.replace(data=recipe.data.replace(batch_size=3))
    assert (smaller.data.batch_size, recipe.data.batch_size) == (3, 128)


def test_one_setting_checked_by_its_declaration():
    assert default("data.tile_overlap") == DataSettings().tile_overlap == 0.25
    assert check_setting("data.tile_overlap", 0) == 0.0
    with pytest.raises(ConfigError, match="'--tile-overlap' must be in \\[0, 0.9\\], got 0.95"):
        check_setting("data.tile_overlap", 0.95, shown_as="--tile-overlap")
    with pytest.raises(ConfigError, match="'export.quantize' must be one of 'none', 'float16', 'dynamic', 'int8'"):
        check_setting("export.quantize", "int4")


def test_yaml_float_hint_names_a_form_that_parses():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["train.learning_rate=1.0e9"])
    hint = str(error.value)
    assert "write 1000000000.0" in hint and "1.0e+9" in hint
    assert load_config(None, ["train.learning_rate=1.0e+9"]).train.learning_rate == 1.0e9  # the hint's form works


def test_reference_file_is_current_and_lists_every_key():
    text = (ROOT / REFERENCE_FILE).read_text()
    assert text == reference_markdown(), "stale: run python -m keras_resnet_settings.explain --write"
    for key, *_ in rows():
        assert f"| `{key}` |" in text, key
    assert "| `export.quantize` |" in text


def test_settings_package_starts_without_keras_or_tensorflow():
    code = ("import sys, keras_resnet_settings, keras_resnet_settings.explain\n"
            "print(sorted(m for m in ('keras', 'tensorflow', 'keras_resnet') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_recipe_command_checks_and_explains(capsys):
    from keras_resnet_cli import main

    assert main(["recipe", str(TASK_RECIPES[0])]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_config(TASK_RECIPES[0]).to_dict()
    assert main(["recipe", "--explain", "data.augment"]) == 0
    out = capsys.readouterr().out
    assert "`data.augment.scale_range`" in out and "`train.epochs`" not in out
    assert main(["recipe", "--explain", "trian"]) == 2
    assert "no recipe section 'trian'" in capsys.readouterr().err


def test_preset_names_read_without_tensorflow_are_the_preset_table():
    from keras_resnet.models.resnet.presets import PRESETS
    from keras_resnet_settings.presets import preset_names

    assert preset_names() == tuple(PRESETS)


def test_backbone_presets_are_checked_with_every_other_mistake(monkeypatch):
    import keras_resnet_settings.presets as presets

    # As the CLI checks a recipe, before keras_resnet is imported: the names come from preset_figures.json.
    monkeypatch.delitem(sys.modules, presets.TABLE_MODULE, raising=False)
    recipe = str(TASK_RECIPES[0])
    with pytest.raises(ConfigError) as error:
        load_config(recipe, ["model.backbone=resnet19", "train.epochs=0", "data.batch_size=abc"])
    message = str(error.value)
    assert message.startswith("3 problems in") and "'model.backbone': Unknown preset 'resnet19'" in message
    assert "did you mean 'resnet18'" in message
    fallback = ['train.time_budget_fallback={"model.backbone": "resnet20_cifr"}', "train.time_budget_minutes=5"]
    with pytest.raises(ConfigError, match="time_budget_fallback: model.backbone': Unknown .* did you mean "
                                          "'resnet20_cifar'"):
        load_config(recipe, fallback)
    with pytest.raises(ConfigError, match="'retinanet_resnet50_fpn_v2' is a task preset"):
        load_config(recipe, ["model.backbone=retinanet_resnet50_fpn_v2"])
    assert load_config(recipe, ["model.backbone=resnet50"]).model.backbone == "resnet50"
