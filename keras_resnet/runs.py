"""The run folder: what `keras-resnet train` writes and what export, evaluate and predict read.

A run folder (a recipe's `output_dir`) holds:

    best_model.keras, last_model.keras   the best (by the task's metric) and the latest model
    run.json                             task, preset, input shape, class names, preprocessing
    recipe.yaml                          the recipe as run, every default filled in
    metrics.json                         validation metrics of the best model
    history.csv, training_curves.png     per-epoch metrics and their plots
    logs/                                TensorBoard logs
    backup/                              BackupAndRestore state while a run is unfinished

This module owns those names and the helpers that read and write them.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from keras_resnet.errors import ConfigError, ModelError

BEST_MODEL_FILE = "best_model.keras"
LAST_MODEL_FILE = "last_model.keras"
RUN_MODEL_FILES = (BEST_MODEL_FILE, LAST_MODEL_FILE)
RUN_INFO_FILE = "run.json"
RUN_RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"


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


def write_json(path, payload) -> None:
    """Writes `payload` as indented JSON: to a temporary name beside `path`, then renamed into place."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(payload, stream, indent=2)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def read_json(path) -> dict:
    """The JSON object in `path`; a `ModelError` naming the file when it is unreadable."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ModelError(f"cannot read {path}: {error}") from None


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
    model_path = os.path.join(cfg["output_dir"], BEST_MODEL_FILE)
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
    "METRICS_FILE",
    "RUN_INFO_FILE",
    "RUN_MODEL_FILES",
    "RUN_RECIPE_FILE",
    "RunPaths",
    "prepare_output_dir",
    "read_json",
    "read_run_info",
    "run_model_file",
    "trained_model_path",
    "write_json",
]
