"""Tests for keras_resnet.runs' atomic writes and set-aside, and for the run files training writes through them.

What is asserted:
* `atomic_output`: a writer that fails half-way (half the bytes written,
  then `OSError(ENOSPC)`) leaves the previous complete file at the final path
  and no temporary file, and surfaces as a one-line `DiskFullError` naming
  the path; a folder is replaced whole (nothing of the old one is left);
* `write_json` writes NaN/inf as null (strict JSON) with one warning line;
* `set_aside` numbers `.corrupt` names that are taken;
* training (`fit.fit_run`): a full disk while saving best_model.keras /
  last_model.keras keeps the previous complete models and leaves no temporary;
* a re-run over a truncated best_model.keras (a kill during its write) sets
  it aside with one line and writes a loadable best_model.keras again.
"""

import errno
import json
import os
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_resnet.atomic_files import atomic_output, set_aside, write_json
from keras_resnet.config import load_config
from keras_resnet.runs import RunPaths
from keras_resnet.training import devices, fit
from keras_resnet.training.plots import CLASSIFICATION_PANELS
from keras_resnet_settings.errors import DiskFullError, KerasResNetError


def leftovers(folder):
    """Temporary or renamed-aside entries in a folder."""
    return sorted(name for name in os.listdir(folder) if name.startswith((".tmp-", ".old-")))


def write_half_then_fail(path, data: bytes):
    with open(path, "wb") as stream:
        stream.write(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, "No space left on device")


# --------------------------------------------------------------------------- atomic_output, write_json, set_aside


def test_atomic_output_keeps_the_old_file_when_the_write_fails(tmp_path):
    final = tmp_path / "model.bin"
    final.write_bytes(b"old complete content")
    with pytest.raises(DiskFullError, match=f"no space left on device while writing {final}"):
        with atomic_output(final) as temporary:
            assert temporary.parent == tmp_path and temporary.name.endswith("model.bin")
            write_half_then_fail(temporary, b"new content that does not fit")
    assert final.read_bytes() == b"old complete content"
    assert leftovers(tmp_path) == []
    assert isinstance(DiskFullError("x"), KerasResNetError)


def test_atomic_output_writes_a_new_file_and_replaces_a_folder_whole(tmp_path):
    with atomic_output(tmp_path / "a.txt") as temporary:
        temporary.write_text("new")
    assert (tmp_path / "a.txt").read_text() == "new"
    folder = tmp_path / "saved_model"
    (folder / "variables").mkdir(parents=True)
    (folder / "stale.txt").write_text("old")
    with atomic_output(folder) as temporary:
        (temporary / "variables").mkdir(parents=True)
        (temporary / "saved_model.pb").write_text("new")
    assert sorted(p.name for p in folder.iterdir()) == ["saved_model.pb", "variables"]
    assert leftovers(tmp_path) == []


def test_write_json_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_json(path, {"top1": 0.5})
    before = path.read_text()

    def half_dump(payload, stream, **kwargs):
        stream.write(json.dumps(payload)[:5])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", half_dump)
    with pytest.raises(DiskFullError, match="metrics.json"):
        write_json(path, {"top1": 0.9})
    assert path.read_text() == before
    assert leftovers(tmp_path) == []


def test_write_json_writes_non_finite_numbers_as_null(tmp_path, capsys):
    path = tmp_path / "metrics.json"
    write_json(path, {"loss": float("nan"), "per_class": {"cat": float("inf")}, "top1": 0.5, "list": [1.0, -np.inf]})
    assert json.loads(path.read_text(), parse_constant=pytest.fail) == {
        "loss": None, "per_class": {"cat": None}, "top1": 0.5, "list": [1.0, None],
    }
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "loss, per_class.cat, list[1]" in warning[0]


def test_set_aside_numbers_taken_names(tmp_path, capsys):
    for _ in range(3):
        (tmp_path / "best_model.keras").write_bytes(b"truncated")
        set_aside(tmp_path / "best_model.keras", "not a .keras archive")
    assert sorted(os.listdir(tmp_path)) == [
        "best_model.keras.corrupt", "best_model.keras.corrupt.1", "best_model.keras.corrupt.2",
    ]
    assert len(capsys.readouterr().err.strip().splitlines()) == 3


# --------------------------------------------------------------------------- training's model files


def tiny_run(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    rng = np.random.default_rng(0)
    features = rng.normal(size=(32, 4)).astype("float32")
    labels = (features[:, 0] > 0).astype("int32")
    dataset = tf.data.Dataset.from_tensor_slices((features, labels)).batch(8)
    cfg = load_config({
        "output_dir": str(tmp_path / "run"),
        "train": {"strategy": "auto", "seed": 0, "mixed_precision": False, "steps_per_epoch": None,
                  "ema_momentum": None, "learning_rate": 0.01},
    })
    return model, dataset, cfg


def fit_once(model, dataset, cfg, paths, epochs=1):
    fit.fit_run(model, cfg, dataset, dataset, paths, monitor="val_accuracy", title="t",
                panels=CLASSIFICATION_PANELS, best_key="accuracy", backup_dir=paths.backup_root, epochs=epochs)


def test_disk_full_while_saving_models_keeps_the_previous_ones(tmp_path, monkeypatch):
    model, dataset, cfg = tiny_run(tmp_path)
    _, paths, _ = devices.start_run(cfg)
    fit_once(model, dataset, cfg, paths)
    saved = {name: Path(getattr(paths, name)).read_bytes() for name in ("best", "last")}
    original_save = keras.Model.save

    def save_half(self, filepath, *args, **kwargs):
        scratch = tmp_path / "scratch.keras"
        original_save(self, scratch)
        write_half_then_fail(filepath, scratch.read_bytes())

    monkeypatch.setattr(keras.Model, "save", save_half)
    os.remove(paths.history)  # no best value so far: best_model.keras is saved again
    with pytest.raises(DiskFullError, match="no space left on device while writing .*best_model.keras"):
        fit_once(model, dataset, cfg, paths)
    for name, content in saved.items():
        assert Path(getattr(paths, name)).read_bytes() == content, name
    assert leftovers(paths.root) == []
    monkeypatch.undo()
    keras.saving.load_model(paths.best)


def test_rerun_sets_aside_a_truncated_best_model(tmp_path, capsys):
    model, dataset, cfg = tiny_run(tmp_path)
    paths = RunPaths.of(cfg.output_dir)
    os.makedirs(paths.root)
    model.save(tmp_path / "whole.keras")
    whole = (tmp_path / "whole.keras").read_bytes()
    Path(paths.best).write_bytes(whole[: len(whole) // 2])  # a kill during the write
    Path(paths.history).write_text("epoch,accuracy,loss,val_accuracy,val_loss\n0,1.0,0.1,1.0,0.1\n")
    devices.start_run(cfg)
    err = capsys.readouterr().err
    assert f"set aside {paths.best}" in err and len([line for line in err.splitlines() if "set aside" in line]) == 1
    assert Path(paths.best + ".corrupt").read_bytes() == whole[: len(whole) // 2]
    fit_once(model, dataset, cfg, paths, epochs=2)
    keras.saving.load_model(paths.best)  # written again although history.csv had a better value
