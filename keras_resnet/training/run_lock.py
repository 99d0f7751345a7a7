"""The run folder's lock and resume rules while `train` writes into it.

- `guard_run`: the exclusive lock on the run folder (`RunLock`: a `train.lock`
  file with the pid and host, created with O_CREAT|O_EXCL; a stale lock of a
  dead process on this host is taken over with a warning) and the resume rule
  (`check_resume`): an unfinished run (a backup) continues only with the recipe
  it was started with, except for a higher `train.epochs`; `restart=True`
  moves the earlier run into `previous/<timestamp>/` first.
- `trim_history`: drops the history.csv rows of epochs a resumed run trains again,
  so each epoch is listed once.
"""

import contextlib
import csv
import json
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager

import yaml

from keras_resnet.atomic_files import atomic_output, read_json
from keras_resnet.config import load_config
from keras_resnet.runs import prepare_output_dir
from keras_resnet_settings.errors import ConfigError, ModelError, RunFolderError

# Recipe keys that may change between a run and its resume.
RESUMABLE_CHANGES = ("output_dir", "train.epochs")


# ----------------------------------------------------------------------------
# The run-folder lock
# ----------------------------------------------------------------------------
def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run folder: the file `paths.lock` holding the owner's pid and host."""

    def __init__(self, paths):
        self.paths = paths
        self.held = False

    def _owner(self):
        try:
            with open(self.paths.lock) as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None

    def acquire(self):
        owner_line = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        for _ in range(3):
            try:
                descriptor = os.open(self.paths.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(descriptor, "w") as handle:
                handle.write(owner_line)
                handle.flush()
                os.fsync(handle.fileno())
            self.held = True
            return self
        raise RunFolderError(f"cannot lock {self.paths.root}: {self.paths.lock} keeps reappearing; try again")

    def _take_over_if_stale(self):
        owner = self._owner()
        if owner is None:  # being written by its owner, or left empty by a kill during that write
            try:
                age = time.time() - os.path.getmtime(self.paths.lock)
            except FileNotFoundError:
                return
            if age < 10:
                time.sleep(0.5)
                owner = self._owner()
                if owner is None:
                    return
        if owner is not None:
            pid, host = owner.get("pid"), owner.get("host")
            if host != socket.gethostname() or not isinstance(pid, int) or _process_alive(pid):
                raise RunFolderError(
                    f"{self.paths.root} is in use by another `keras-resnet train` (pid {pid} on {host}); "
                    f"wait for it to finish or set another output_dir (the lock is {self.paths.lock})"
                )
            print(f"warning: taking over the stale lock of pid {pid} (no longer running) in {self.paths.root}",
                  file=sys.stderr)
        else:
            print(f"warning: taking over the unreadable lock {self.paths.lock}", file=sys.stderr)
        try:
            os.remove(self.paths.lock)
        except FileNotFoundError:
            pass

    def release(self):
        if self.held and (self._owner() or {}).get("pid") == os.getpid():
            os.remove(self.paths.lock)
        self.held = False


# ----------------------------------------------------------------------------
# Resume rules
# ----------------------------------------------------------------------------
def has_backup(paths):
    """True while the run folder holds the backup of an unfinished run."""
    return os.path.isdir(paths.backup_root) and any(os.scandir(paths.backup_root))


def _flatten(value, prefix=""):
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def recipe_changes(stored, cfg, resumable=RESUMABLE_CHANGES):
    """The dotted keys in which recipe `cfg` differs from the `stored` dict, beyond a resumable change.

    The stored recipe is loaded as any recipe (defaults of keys added since it was
    written filled in); one that no longer loads is compared as written.
    """
    try:
        stored = load_config(stored).to_dict()
    except ConfigError:
        pass
    old = _flatten(stored)
    new = _flatten(cfg.to_dict())
    changed = sorted(key for key in old.keys() | new.keys()
                     if key not in resumable and old.get(key, "<unset>") != new.get(key, "<unset>"))
    old_epochs, new_epochs = old.get("train.epochs"), new.get("train.epochs")
    if isinstance(old_epochs, int) and isinstance(new_epochs, int) and new_epochs < old_epochs:
        changed = [key for key in changed if key != "train.epochs"]
        changed.append(f"train.epochs (lowered from {old_epochs} to {new_epochs})")
    return changed


def _stored_recipe(paths):
    """The run folder's recipe.yaml as a dict, or None when it is missing or unreadable."""
    try:
        with open(paths.recipe, encoding="utf-8") as handle:
            stored = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError):
        return None
    return stored if isinstance(stored, dict) else None


def finished_run(cfg, paths):
    """The metrics of the finished run of recipe `cfg` in `paths`, or None when there is none.

    A run is finished when its folder holds best_model.keras, metrics.json and
    recipe.yaml and no resume backup. A finished run of another recipe is a
    `RunFolderError` naming the keys that differ: training it again would replace
    its model and metrics, so that takes `--restart` (which moves it to
    previous/) or another output_dir.
    """
    if has_backup(paths) or not all(os.path.isfile(path) for path in (paths.best, paths.metrics, paths.recipe)):
        return None
    stored = _stored_recipe(paths)
    if stored is None:
        return None
    changed = recipe_changes(stored, cfg, resumable=("output_dir",))
    if changed == ["train.epochs"]:  # raised (a lowered one reads "train.epochs (lowered ...)")
        _check_continuable(cfg, paths)
        print(f"{paths.root} holds a finished run of {stored.get('train', {}).get('epochs')} epochs: continuing it "
              f"to {cfg.train.epochs} from its last model ({paths.last}); the earlier epochs stay in history.csv",
              flush=True)
        return None
    if changed:
        raise RunFolderError(
            f"{paths.root} holds a finished run of another recipe (differs in {', '.join(changed)}); training would "
            f"replace its model and metrics. Start over with `keras-resnet train ... --restart` (moves the finished "
            "run to previous/), set another output_dir, or raise train.epochs alone to continue it"
        )
    try:
        return read_json(paths.metrics)
    except ModelError:  # an unreadable metrics.json (a kill while it was written): train again
        return None


def _check_continuable(cfg, paths):
    """A RunFolderError when a finished run cannot be continued to a higher `train.epochs`."""
    reason = None
    if cfg.train.time_budget_minutes is not None:
        reason = "its train.time_budget_minutes chooses the epochs itself"
    elif cfg.train.strategy == "multi_worker":
        reason = "train.strategy=multi_worker runs do not continue finished runs"
    elif not os.path.isfile(paths.last) or not os.path.isfile(paths.history):
        reason = f"{paths.last} or {paths.history} is missing"
    if reason:
        raise RunFolderError(f"{paths.root} holds a finished run; it cannot be continued to train.epochs="
                             f"{cfg.train.epochs} ({reason}). Start over with `keras-resnet train ... --restart` "
                             "(moves the finished run to previous/), or set another output_dir")


def continued_epochs(paths) -> int:
    """The epochs a finished run being continued has trained (history.csv rows), else 0.

    A run folder reaches training with its metrics.json and no backup only when
    `finished_run` let it continue (train.epochs raised): the count is where the
    continuation starts.
    """
    if has_backup(paths) or not all(os.path.isfile(p) for p in (paths.metrics, paths.last, paths.history)):
        return 0
    with open(paths.history, encoding="utf-8") as handle:
        return max(0, sum(1 for line in handle if line.strip()) - 1)


def check_resume(cfg, paths):
    """RunFolderError when `paths` holds an unfinished run of a recipe other than `cfg`.

    Raising `train.epochs` continues the run; anything else must match the
    recipe.yaml the run was started with.
    """
    stored = _stored_recipe(paths) if has_backup(paths) else None
    if stored is None:
        return
    changed = recipe_changes(stored, cfg)
    if changed:
        raise RunFolderError(
            f"{paths.root} holds an unfinished run of another recipe (differs in {', '.join(changed)}); "
            f"resume it with its own recipe ({paths.recipe}), start over with `keras-resnet train ... --restart` "
            "(moves the earlier run to previous/), or set another output_dir"
        )


def move_earlier_run(paths):
    """Moves an earlier run (backup, models, history, ...) into `previous/<timestamp>/`; its folder, or None."""
    keep = {os.path.basename(paths.lock), os.path.basename(paths.previous)}
    entries = [name for name in os.listdir(paths.root) if name not in keep and not name.startswith(".")]
    if not entries:
        return None
    target = os.path.join(paths.previous, time.strftime("%Y%m%d-%H%M%S"))
    suffix = 1
    while os.path.exists(target):
        target = os.path.join(paths.previous, f"{time.strftime('%Y%m%d-%H%M%S')}-{suffix}")
        suffix += 1
    os.makedirs(target)
    for name in entries:
        shutil.move(os.path.join(paths.root, name), os.path.join(target, name))
    print(f"--restart: moved the earlier run in {paths.root} to {target}")
    return target


@contextmanager
def guard_run(cfg, paths, *, is_chief=True, restart=False):
    """Holds the run folder's lock for a `train` and applies the resume and finished-run rules.

    Yields the metrics of a finished run of the same recipe (nothing to train),
    else None. Non-chief workers of a multi-worker run write elsewhere and take
    no lock; they read the chief's folder to agree on whether it is finished.
    """
    if not is_chief:  # reads the chief's folder: the same answer as the chief, or the same error
        if restart:
            yield None
            return
        finished = finished_run(cfg, paths)
        check_resume(cfg, paths)
        yield finished
        return
    created = not os.path.isdir(paths.root)
    prepare_output_dir(paths.root)
    lock = RunLock(paths).acquire()
    try:
        if restart:
            move_earlier_run(paths)
            finished = None
        else:
            finished = finished_run(cfg, paths)
            check_resume(cfg, paths)
        yield finished
    finally:
        lock.release()
        if created:  # a run that failed before writing anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                os.rmdir(paths.root)


# ----------------------------------------------------------------------------
# history.csv on resume
# ----------------------------------------------------------------------------
def trim_history(history_path, start_epoch):
    """Rewrites history.csv without the rows of epochs >= `start_epoch` (trained again on resume)."""
    if not os.path.exists(history_path):
        return
    with open(history_path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or "epoch" not in rows[0]:
        return
    column = rows[0].index("epoch")

    def keep(row):
        try:
            return int(float(row[column])) < start_epoch
        except (ValueError, IndexError):
            return False

    kept = [rows[0]] + [row for row in rows[1:] if keep(row)]
    if len(kept) == len(rows):
        return
    with atomic_output(history_path) as temporary:
        with open(temporary, "w", newline="") as stream:
            csv.writer(stream, lineterminator="\n").writerows(kept if len(kept) > 1 else [])


