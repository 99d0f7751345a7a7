"""The run folder's guards: the train lock, the resume rules (--restart), history.csv on resume, the NaN stop."""

import csv
import json
import os
import re
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import yaml
import tensorflow as tf
from PIL import Image

from keras_resnet.cli import main
from keras_resnet.config import load_config
from keras_resnet.runs import RunPaths
from keras_resnet.training import fit
from keras_resnet.training.plots import CLASSIFICATION_PANELS
from keras_resnet.training.runner import train_from_config
from keras_resnet_settings.errors import ConfigError, TrainingDivergedError
from tests.helpers import tiny_classifier
from tests.training.test_classification import make_toy_folders, write_recipe


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return make_toy_folders(tmp_path_factory.mktemp("toy"), per_class=8)


def raw_history_epochs(run):
    """The epoch column of history.csv as written (plots deduplicate when they read it; this does not)."""
    with open(run / "history.csv", newline="") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def write_lock(run, pid):
    run.mkdir(parents=True, exist_ok=True)
    (run / "train.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))


def interrupted_run(recipe, monkeypatch, at_epoch=1):
    """Trains `recipe` and interrupts it (KeyboardInterrupt) at the end of epoch `at_epoch` (from 0).

    The interrupt comes after history.csv got that epoch's row and before the
    backup saved it: the run resumes at `at_epoch`, as after a kill there.
    """
    original = keras.callbacks.BackupAndRestore.on_epoch_end

    def on_epoch_end(self, epoch, logs=None):
        if epoch == at_epoch:
            raise KeyboardInterrupt
        return original(self, epoch, logs)

    with monkeypatch.context() as patch:
        patch.setattr(keras.callbacks.BackupAndRestore, "on_epoch_end", on_epoch_end)
        with pytest.raises(KeyboardInterrupt):
            train_from_config(str(recipe))


# ----------------------------------------------------------------------------
# The lock
# ----------------------------------------------------------------------------
def test_second_train_on_a_locked_folder_exits_2_naming_the_pid(toy_data, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", *toy_data, run, epochs=1)
    write_lock(run, os.getpid())  # a live process holds it
    assert main(["train", str(recipe)]) == 2
    err = one_line_error(capsys)
    assert str(run) in err and f"pid {os.getpid()}" in err
    assert not (run / "history.csv").exists() and (run / "train.lock").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(toy_data, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", *toy_data, run, epochs=1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(run, dead.pid)
    assert main(["train", str(recipe)]) == 0
    assert f"stale lock of pid {dead.pid}" in capsys.readouterr().err
    assert not (run / "train.lock").exists()  # released at the end


# ----------------------------------------------------------------------------
# Resume rules and history.csv
# ----------------------------------------------------------------------------
def test_interrupted_run_resumes_with_each_epoch_once_in_history(toy_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", *toy_data, run, epochs=3)
    interrupted_run(recipe, monkeypatch)
    assert not (run / "train.lock").exists()  # released on KeyboardInterrupt too
    assert raw_history_epochs(run) == [0, 1]  # epoch 1 logged, not backed up
    train_from_config(str(recipe))
    assert raw_history_epochs(run) == [0, 1, 2]


def test_changed_recipe_over_a_backup_exits_2_and_restart_starts_over(toy_data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", *toy_data, run, epochs=3)
    interrupted_run(recipe, monkeypatch)
    capsys.readouterr()
    assert main(["train", str(recipe), "--set", "train.epochs=2", "train.learning_rate=0.005"]) == 2
    err = one_line_error(capsys)
    assert "train.learning_rate" in err and "train.epochs" in err and "--restart" in err and str(run) in err
    assert not (run / "train.lock").exists()

    assert main(["train", str(recipe), "--restart", "--set", "train.learning_rate=0.005"]) == 0
    assert "Epoch 1/3" in capsys.readouterr().out  # from the start
    assert raw_history_epochs(run) == [0, 1, 2]
    (previous,) = (run / "previous").iterdir()
    assert raw_history_epochs(previous) == [0, 1] and (previous / "backup").is_dir()


def test_raising_epochs_continues_the_run(toy_data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", *toy_data, run, epochs=3)
    interrupted_run(recipe, monkeypatch)
    capsys.readouterr()
    assert main(["train", str(recipe), "--set", "train.epochs=4"]) == 0
    out = capsys.readouterr().out
    assert "Epoch 2/4" in out and "Epoch 1/4" not in out
    assert raw_history_epochs(run) == [0, 1, 2, 3]


def test_a_finished_run_is_never_trained_over(toy_data, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", *toy_data, run, epochs=1)
    assert main(["train", str(recipe)]) == 0
    kept = {name: (run / name).read_bytes() for name in ("best_model.keras", "history.csv", "metrics.json")}
    capsys.readouterr()
    # The same recipe: it says where the model and metrics are, trains nothing, exit 0.
    assert main(["train", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "holds a finished run of this recipe: nothing to train" in out and str(run / "best_model.keras") in out
    assert "Epoch" not in out
    # Another recipe: exit 2 naming the keys, nothing replaced.
    assert main(["train", str(recipe), "--set", "model.backbone=resnet18", "train.epochs=2"]) == 2
    err = one_line_error(capsys)
    assert "finished run of another recipe" in err and "model.backbone" in err and "train.epochs" in err
    assert "--restart" in err
    assert {name: (run / name).read_bytes() for name in kept} == kept
    # --restart trains anew and keeps the finished run in previous/.
    assert main(["train", str(recipe), "--restart", "--set", "train.seed=3"]) == 0
    (previous,) = (run / "previous").iterdir()
    assert (previous / "best_model.keras").read_bytes() == kept["best_model.keras"]


def test_raising_epochs_continues_a_finished_run_from_its_last_model(toy_data, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", *toy_data, run, epochs=2)
    assert main(["train", str(recipe)]) == 0
    last = [w.copy() for w in keras.models.load_model(run / "last_model.keras").get_weights()]
    capsys.readouterr()
    assert main(["train", str(recipe), "--set", "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "holds a finished run of 2 epochs: continuing it to 3" in out
    assert "continuing from epoch 3 of 3" in out and "Epoch 3/3" in out and "Epoch 1/3" not in out
    assert raw_history_epochs(run) == [0, 1, 2]
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 3
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["epochs"] == 3
    # it started from the last model: one more epoch moved it, and not back to a fresh start
    continued = keras.models.load_model(run / "last_model.keras").get_weights()
    assert not all(np.array_equal(a, b) for a, b in zip(last, continued))
    # the same command again: finished, nothing to train; lowering train.epochs is a changed recipe
    assert main(["train", str(recipe), "--set", "train.epochs=3"]) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert main(["train", str(recipe), "--set", "train.epochs=2"]) == 2
    assert "train.epochs (lowered from 3 to 2)" in one_line_error(capsys)


def test_a_run_that_fails_before_writing_anything_leaves_no_folder(toy_data, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", *toy_data, run, epochs=1)
    assert main(["train", str(recipe), "--set", f"model.weights={tmp_path / 'missing.keras'}"]) == 2
    assert "missing.keras does not exist" in one_line_error(capsys)
    assert not run.exists()
    kept = tmp_path / "mine"
    kept.mkdir()  # a folder the user made stays, empty or not
    assert main(["train", str(recipe), "--set", f"model.weights={tmp_path / 'missing.keras'}",
                 f"output_dir={kept}"]) == 2
    assert kept.is_dir()


def test_a_budgeted_finished_run_is_not_continued_by_raising_epochs(toy_data, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", *toy_data, run, epochs=1)
    assert main(["train", str(recipe), "--set", "train.time_budget_minutes=30"]) == 0
    capsys.readouterr()
    assert main(["train", str(recipe), "--set", "train.time_budget_minutes=30", "train.epochs=2"]) == 2
    err = one_line_error(capsys)
    assert "cannot be continued to train.epochs=2" in err and "time_budget_minutes" in err and "--restart" in err


# ----------------------------------------------------------------------------
# NaN / inf
# ----------------------------------------------------------------------------
def _strict_json(text):
    def refuse(constant):
        raise AssertionError(f"non-finite number {constant} in JSON")

    return json.loads(text, parse_constant=refuse)


def test_diverging_run_stops_at_the_first_nan_loss(toy_data, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", *toy_data, run, epochs=2, optimizer="sgd")
    assert main(["train", str(recipe), "--set", "train.learning_rate=1000000.0"]) == 2
    err = one_line_error(capsys)
    # The training loss, or (when the epoch's last update blew the weights up) the validation loss.
    assert re.search(r"loss became (NaN|inf) at epoch 1", err) and "lower train.learning_rate" in err
    assert not (run / "best_model.keras").exists() and not (run / "last_model.keras").exists()
    if (run / "metrics.json").exists():
        _strict_json((run / "metrics.json").read_text())


def test_nan_in_a_later_epoch_keeps_the_last_finite_models(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 4)).astype("float32")
    x[16:] = np.nan  # the third batch: the first of epoch 2
    y = np.eye(2, dtype="float32")[np.arange(24) % 2]
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    val = tf.data.Dataset.from_tensor_slices((x[:8], y[:8])).batch(8)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("sgd", "categorical_crossentropy", metrics=[keras.metrics.CategoricalAccuracy(name="top1")])
    paths = RunPaths.of(tmp_path)
    cfg = load_config({"train": {"steps_per_epoch": 2, "ema_momentum": None, "learning_rate": 0.1}})
    with pytest.raises(TrainingDivergedError, match="loss became NaN at epoch 2 step 1; lower train.learning_rate"):
        fit.fit_run(model, cfg, train, val, paths, monitor="val_top1", title="t", panels=CLASSIFICATION_PANELS,
                       best_key="top1", backup_dir=str(tmp_path / "backup"), epochs=3)
    for path in (paths.best, paths.last):
        weights = keras.saving.load_model(path).get_weights()
        assert all(np.isfinite(w).all() for w in weights), path
    assert raw_history_epochs(tmp_path) == [0]


def test_predict_json_has_no_non_finite_numbers(tmp_path, capsys):
    model = tiny_classifier(channels=3, num_classes=3, size=32)
    model.set_weights([np.full_like(w, np.nan) for w in model.get_weights()])
    model.save(tmp_path / "nan.keras")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    assert main(["predict", str(tmp_path / "nan.keras"), str(tmp_path / "a.png"), "--json"]) == 0
    results = _strict_json(capsys.readouterr().out)
    assert results[0]["top"][0]["score"] is None


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_learning_rate_is_a_config_error(toy_data, tmp_path, value, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", *toy_data, tmp_path / "run", epochs=1)
    assert main(["train", str(recipe), "--set", f"train.learning_rate={value}"]) == 2
    err = one_line_error(capsys)
    assert "'train.learning_rate' must be a finite number" in err
    with pytest.raises(ConfigError, match="finite"):
        train_from_config(str(recipe), [f"train.learning_rate={value}"])
