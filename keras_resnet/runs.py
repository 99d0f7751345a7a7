"""The run folder: what `keras-resnet train` writes and what export, evaluate and predict read.

A run folder (a recipe's `output_dir`) holds:

    best_model.keras, last_model.keras   the best (by the task's metric) and the latest model
    run.json                             task, preset, input shape, class names, preprocessing
    recipe.yaml                          the recipe as run, every default filled in
    metrics.json                         validation metrics of the best model
    history.csv, training_curves.png     per-epoch metrics and their plots
    logs/                                TensorBoard logs
    backup/                              BackupAndRestore state while a run is unfinished
    train.lock                           pid and host of the `train` running in the folder
    previous/                            earlier runs set aside by `train --restart`

This module owns those names and the helpers that read and write them.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from keras_resnet.atomic_files import read_json, set_aside
from keras_resnet_settings.errors import ConfigError, ModelError
from keras_resnet_settings.loading import RUN_RECIPE_FILE

BEST_MODEL_FILE = "best_model.keras"
LAST_MODEL_FILE = "last_model.keras"
RUN_MODEL_FILES = (BEST_MODEL_FILE, LAST_MODEL_FILE)
RUN_INFO_FILE = "run.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
LOCK_FILE = "train.lock"
PREVIOUS_RUNS_DIR = "previous"


@dataclass(frozen=True)
class RunPaths:
    """The files of one run folder (`RunPaths.of(output_dir)`)."""

    root: str
    best: str
    last: str
    history: str
    curves: str
    logs: str
    backup_root: str
    info: str
    recipe: str
    metrics: str
    lock: str
    previous: str

    @classmethod
    def of(cls, output_dir: str | os.PathLike) -> RunPaths:
        root = os.fspath(output_dir)
        return cls(
            root=root,
            best=os.path.join(root, BEST_MODEL_FILE),
            last=os.path.join(root, LAST_MODEL_FILE),
            history=os.path.join(root, HISTORY_FILE),
            curves=os.path.join(root, "training_curves.png"),
            logs=os.path.join(root, "logs"),
            backup_root=os.path.join(root, "backup"),
            info=os.path.join(root, RUN_INFO_FILE),
            recipe=os.path.join(root, RUN_RECIPE_FILE),
            metrics=os.path.join(root, METRICS_FILE),
            lock=os.path.join(root, LOCK_FILE),
            previous=os.path.join(root, PREVIOUS_RUNS_DIR),
        )

    def __getitem__(self, key: str) -> str:
        """`paths["best"]`, as the dict these paths used to be."""
        return getattr(self, key)


def prepare_output_dir(output_dir):
    """Creates `output_dir` and checks that it is writable."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write_test_", delete=True)
        probe.close()
    except OSError as error:
        raise ConfigError(
            f"output_dir {output_dir} is not writable ({error.strerror}); set output_dir to a writable folder."
        ) from None
    return output_dir


def keras_archive_problem(path) -> str | None:
    """Why `path` is not a readable `.keras` archive (a zip with config.json, every member intact), else None."""
    try:
        if not zipfile.is_zipfile(path):
            return "not a .keras archive: truncated or empty" if os.path.getsize(path) else "empty file"
        with zipfile.ZipFile(path) as archive:
            if "config.json" not in archive.namelist():
                return "not a .keras archive: no config.json"
            broken = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        return f"unreadable: {error}"
    return f"damaged member {broken}" if broken else None


def load_keras_model(path):
    """`keras.saving.load_model(path, compile=False)`; a one-line `ModelError` naming `path` when it fails.

    A truncated, empty or damaged archive is reported as such (Keras itself says "File not found").
    """
    import keras

    problem = keras_archive_problem(path)
    if problem:
        problem = problem.removeprefix("not a .keras archive: ")
        raise ModelError(f"{path} is not a valid .keras archive ({problem}); save or export the model again")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as error:  # JSON and deserialisation errors
        reason = (str(error).strip().splitlines() or [""])[0]
        raise ModelError(f"cannot load Keras model {path}: {type(error).__name__}: {reason}") from None


def set_aside_unreadable_models(run_dir) -> list[str]:
    """Sets aside a run folder's best/last model files that are not readable archives (left by a kill)."""
    moved = []
    for name in RUN_MODEL_FILES:
        path = os.path.join(os.fspath(run_dir), name)
        if os.path.isfile(path):
            problem = keras_archive_problem(path)
            if problem:
                moved.append(set_aside(path, problem))
    return moved


def read_run_info(run_dir) -> dict:
    """A run folder's `run.json`, or {} when it has none."""
    path = Path(run_dir) / RUN_INFO_FILE
    return read_json(path) if path.is_file() else {}


def run_model_file(run_dir) -> Path | None:
    """`best_model.keras` of a run folder, else `last_model.keras`, else None."""
    run_dir = Path(run_dir)
    return next((run_dir / name for name in RUN_MODEL_FILES if (run_dir / name).is_file()), None)


def trained_model_path(cfg) -> str:
    """The best model of a recipe's output_dir; a ConfigError when there is none."""
    model_path = os.path.join(cfg.output_dir, BEST_MODEL_FILE)
    if not os.path.exists(model_path):
        raise ConfigError(
            f"no trained model at {model_path}; run `keras-resnet train` with this recipe first "
            "(or --set output_dir=... to point at a run)."
        )
    return model_path


__all__ = [
    "BEST_MODEL_FILE",
    "HISTORY_FILE",
    "LAST_MODEL_FILE",
    "LOCK_FILE",
    "METRICS_FILE",
    "PREVIOUS_RUNS_DIR",
    "RUN_INFO_FILE",
    "RUN_MODEL_FILES",
    "RUN_RECIPE_FILE",
    "RunPaths",
    "keras_archive_problem",
    "prepare_output_dir",
    "read_run_info",
    "run_model_file",
    "set_aside_unreadable_models",
    "trained_model_path",
]
