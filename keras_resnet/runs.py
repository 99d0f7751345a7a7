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

import errno
import json
import math
import os
import shutil
import sys
import tempfile
import uuid
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from keras_resnet_settings.errors import ConfigError, DiskFullError, ModelError

BEST_MODEL_FILE = "best_model.keras"
LAST_MODEL_FILE = "last_model.keras"
RUN_MODEL_FILES = (BEST_MODEL_FILE, LAST_MODEL_FILE)
RUN_INFO_FILE = "run.json"
RUN_RECIPE_FILE = "recipe.yaml"
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


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
TEMPORARY_MARK = ".tmp-"
CORRUPT_SUFFIX = ".corrupt"


def temporary_sibling(path, mark=TEMPORARY_MARK) -> str:
    """A fresh hidden name beside `path` ending in its whole name (`.tmp-1a2b3c4d-best_model.keras`)."""
    directory, name = os.path.split(os.fspath(path))
    return os.path.join(directory, f"{mark}{uuid.uuid4().hex[:8]}-{name}")


def is_disk_full(error: BaseException) -> bool:
    """True for "no space left on device" (or quota), as an OSError or in another library's error text."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    return "No space left on device" in str(error) or "Disk quota exceeded" in str(error)


def _remove(path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _fsync(path, directory=False) -> None:
    try:
        handle = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        if not directory:  # some file systems cannot sync folders; a file that cannot be synced is an error
            raise
    finally:
        os.close(handle)


def _sync_tree(path) -> None:
    if not os.path.isdir(path):
        _fsync(path)
        return
    for root, _, files in os.walk(path):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root, directory=True)


def _move_into_place(temporary, final) -> None:
    """`os.replace` for a file; a folder: the old one renamed aside, the new one renamed in, the old deleted."""
    if not (os.path.isdir(temporary) and not os.path.islink(temporary)):
        os.replace(temporary, final)
        return
    old = None
    if os.path.lexists(final):
        old = temporary_sibling(final, ".old-")
        os.rename(final, old)
    try:
        os.rename(temporary, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)
        raise
    if old is not None:
        _remove(old)


@contextmanager
def atomic_output(path):
    """Writes an artefact whole or not at all.

    Yields a temporary path beside `path` (same folder, same extension; a
    `Path` for a `Path`) for the caller to write a file or a folder (e.g. a
    SavedModel) to. When the block ends normally, what was written is flushed
    to disk and renamed over `path`: `path` holds either its previous complete
    content or the new complete one, never part of it. When the block raises,
    the temporary is deleted and `path` is untouched; a full disk becomes a
    `DiskFullError` ("no space left on device while writing <path>"). Nothing
    written (the block wrote nothing at the temporary path): `path` is left as is.
    """
    final = os.fspath(path)
    temporary = temporary_sibling(final)
    try:
        yield Path(temporary) if isinstance(path, Path) else temporary
        if os.path.lexists(temporary):
            _sync_tree(temporary)
            _move_into_place(temporary, final)
            _fsync(os.path.dirname(final) or ".", directory=True)
    except BaseException as error:
        _remove(temporary)
        if isinstance(error, Exception) and not isinstance(error, DiskFullError) and is_disk_full(error):
            raise DiskFullError(f"no space left on device while writing {final}; free space and run again") from error
        raise


def set_aside(path, reason: str) -> str:
    """Renames an unreadable artefact to `<name>.corrupt` (`.corrupt.1`, ... when taken) and says so in one line.

    Returns the new name.
    """
    path = os.fspath(path)
    target, number = path + CORRUPT_SUFFIX, 0
    while os.path.lexists(target):
        number += 1
        target = f"{path}{CORRUPT_SUFFIX}.{number}"
    os.replace(path, target)
    print(f"set aside {path} ({reason}) as {target}; it will be written again", file=sys.stderr, flush=True)
    return target


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


def finite_json(payload, where="", replaced=None):
    """`payload` with every NaN/inf float replaced by None; `replaced` collects where (dotted keys)."""
    if isinstance(payload, float) and not math.isfinite(payload):
        if replaced is not None:
            replaced.append(where or "value")
        return None
    if isinstance(payload, dict):
        return {key: finite_json(value, f"{where}.{key}" if where else str(key), replaced)
                for key, value in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [finite_json(value, f"{where}[{index}]", replaced) for index, value in enumerate(payload)]
    return payload


def write_json(path, payload) -> None:
    """Writes `payload` as indented, strict JSON, atomically (see `atomic_output`).

    Non-finite numbers (NaN, inf) are not JSON: they are written as null,
    with one warning line naming them.
    """
    replaced = []
    payload = finite_json(payload, replaced=replaced)
    if replaced:
        print(f"warning: {path}: non-finite values written as null: {', '.join(replaced)}", file=sys.stderr,
              flush=True)
    with atomic_output(os.fspath(path)) as temporary:
        with open(temporary, "w", encoding="utf-8") as stream:
            json.dump(payload, stream, indent=2, allow_nan=False)
            stream.write("\n")


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
    model_path = os.path.join(cfg.output_dir, BEST_MODEL_FILE)
    if not os.path.exists(model_path):
        raise ConfigError(
            f"no trained model at {model_path}; run `keras-resnet train` with this recipe first "
            "(or --set output_dir=... to point at a run)."
        )
    return model_path


__all__ = [
    "BEST_MODEL_FILE",
    "CORRUPT_SUFFIX",
    "HISTORY_FILE",
    "LAST_MODEL_FILE",
    "LOCK_FILE",
    "METRICS_FILE",
    "PREVIOUS_RUNS_DIR",
    "RUN_INFO_FILE",
    "RUN_MODEL_FILES",
    "RUN_RECIPE_FILE",
    "RunPaths",
    "atomic_output",
    "finite_json",
    "is_disk_full",
    "keras_archive_problem",
    "prepare_output_dir",
    "read_json",
    "read_run_info",
    "run_model_file",
    "set_aside",
    "set_aside_unreadable_models",
    "temporary_sibling",
    "trained_model_path",
    "write_json",
]
