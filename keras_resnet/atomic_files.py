"""Files written whole or not at all, and JSON in and out.

`atomic_output(path)` yields a temporary sibling to write, then fsyncs it and
renames it into place: a kill or a full disk (`DiskFullError`) never leaves
half a model, export or JSON at the final path. `set_aside` moves a damaged
file out of the way under a name that says so. `write_json` / `read_json`
write atomically and read with one clear error; `finite_json` replaces NaN
and infinities (invalid JSON) with null, naming where.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

from keras_resnet_settings.errors import DiskFullError, ModelError

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
