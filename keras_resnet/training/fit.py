"""`fit_run`: `model.fit` with the run folder's callbacks (best/last checkpoints, history.csv, TensorBoard,
training_curves.png) and resume through `keras.callbacks.BackupAndRestore` (`backup_epoch` reads where a run
resumes; `previous_best` the best value so far); it drops the history.csv rows of epochs trained again and
stops at the first NaN/inf loss.
"""

import inspect
import json
import os
import sys

import keras
import tensorflow as tf

from keras_resnet.training.checkpoints import ModelCheckpoint
from keras_resnet.training.divergence import StopOnNonFinite
from keras_resnet.training.plots import (
    CLASSIFICATION_PANELS,
    plot_history,
    read_history_csv,
)
from keras_resnet.training.run_lock import trim_history
from keras_resnet_settings.errors import ModelError


# ----------------------------------------------------------------------------
# Fit with the run folder's callbacks and resume
# ----------------------------------------------------------------------------
class _LogLearningRate(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            optimizer = self.model.optimizer
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class _PlotCurves(keras.callbacks.Callback):
    """Redraws training_curves.png from history.csv after each epoch."""

    def __init__(self, history_path, plot_path, title, panels=CLASSIFICATION_PANELS, best_key="top1"):
        super().__init__()
        self.history_path, self.plot_path, self.title = history_path, plot_path, title
        self.panels, self.best_key = panels, best_key

    def on_epoch_end(self, epoch, logs=None):
        if os.path.exists(self.history_path):
            plot_history(read_history_csv(self.history_path), self.plot_path, self.title, self.panels, self.best_key)


def previous_best(history_path, monitor):
    """The highest `monitor` value in a (resumed) run's history.csv; None without one."""
    if not os.path.exists(history_path):
        return None
    values = read_history_csv(history_path).get(monitor)
    return max(values) if values else None


def fit_run(model, cfg, train_ds, val_ds, paths, *, monitor, title, panels, best_key, backup_dir, epochs,
            initial_epoch=0, extra_callbacks=()):
    """`model.fit` with the run directory's callbacks: resumable, best/last checkpoints, logs, curves.

    Args:
        model: a compiled model.
        cfg: the recipe (train.steps_per_epoch is read).
        train_ds, val_ds: datasets for `fit`.
        paths: the run folder's `keras_resnet.runs.RunPaths`.
        monitor: the `val_*` log key (maximised) that picks best_model.keras; a
            resumed run starts from the best value in history.csv.
        title, panels, best_key: of training_curves.png (see `plot_history`).
        backup_dir: BackupAndRestore folder.
        epochs, initial_epoch: as in `fit`.
        extra_callbacks: run first, so the logs they add (e.g. val_mAP) reach
            the CSV, the checkpoints and the plots.
    """
    # Epochs at and after the one fit resumes at are trained again: their rows leave history.csv.
    resume_epoch = backup_epoch(backup_dir)
    trim_history(paths.history, resume_epoch or initial_epoch)
    if resume_epoch:
        print(f"resuming from epoch {resume_epoch + 1} of {epochs} (backup in {backup_dir})")
    # A best_model.keras set aside as unreadable (start_run) is written again at the next epoch end.
    best = ModelCheckpoint(paths.best, monitor, previous_best(paths.history, monitor) if os.path.exists(paths.best)
                           else None)
    # Weight averaging: validation, checkpoints and backups at each epoch end see the EMA weights.
    ema = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if cfg.train.ema_momentum else []
    callbacks = [
        StopOnNonFinite(cfg.train.learning_rate),  # before any save: a diverged epoch is never saved
        *ema,
        _LogLearningRate(),
        *extra_callbacks,
        keras.callbacks.CSVLogger(paths.history, append=True),
        keras.callbacks.TensorBoard(paths.logs),
        best,
        ModelCheckpoint(paths.last),
        _PlotCurves(paths.history, paths.curves, title, panels=panels, best_key=best_key),
        _backup_and_restore(backup_dir),
    ]
    train_ds, steps_per_epoch = one_iterator_per_run(train_ds, cfg.train.steps_per_epoch)
    model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps_per_epoch,
        callbacks=callbacks,
        shuffle=False,  # the tf.data pipelines shuffle; Keras would warn that shuffle=True is ignored
        verbose=fit_verbosity(),
    )


def fit_verbosity():
    """Keras `verbose`: progress bars (1) on a terminal, one line per epoch (2) in a log file or CI."""
    return 1 if sys.stdout.isatty() and os.environ.get("CI") is None else 2


def one_iterator_per_run(train_ds, steps_per_epoch):
    """`(train_ds.repeat(), its batches per pass)` where the pass length is known, else unchanged.

    With a finite dataset Keras makes a new iterator every epoch, and deleting the
    old one waited for a sleeping tf.data background thread (the autotuner, as far
    as a py-spy dump shows): up to a minute at some epoch ends with the CPU idle
    once epochs last minutes (measured on TF 2.21: 5.4 of 45.6 minutes of the
    segmentation recipe). A repeated dataset with
    `steps_per_epoch` keeps one iterator for the whole `fit`; each pass is still
    reshuffled and re-augmented (and fresh mosaics are still new).

    With `train.steps_per_epoch` set, the dataset is repeated too, so epochs
    that end inside a pass continue where the last one stopped (a finite
    dataset would run out part-way through an epoch: Keras warns and trains
    the rest of it on nothing).
    """
    if not isinstance(train_ds, tf.data.Dataset):
        return train_ds, steps_per_epoch
    batches = int(train_ds.cardinality())
    if batches == tf.data.INFINITE_CARDINALITY or (batches < 0 and steps_per_epoch is None):
        return train_ds, steps_per_epoch  # already endless, or of unknown length with nothing to count by
    return train_ds.repeat(), steps_per_epoch or batches


def backup_epoch(backup_dir):
    """The epoch a run resumed from `backup_dir` starts at: 0 without a backup.

    Reads the `training_metadata.json` that `keras.callbacks.BackupAndRestore`
    writes at each epoch end, so data pipelines can be built for the epoch
    `fit` will resume at (before `fit` restores it).

    Raises:
        ModelError: the file exists but is not BackupAndRestore's JSON (a run
            killed while writing it), naming the file and how to restart.
    """
    path = os.path.join(backup_dir, "training_metadata.json")
    try:
        with open(path) as handle:
            return max(int(json.load(handle)["epoch"]), 0)
    except FileNotFoundError:
        return 0
    except (ValueError, KeyError, TypeError) as error:
        raise ModelError(
            f"the resume backup {path} is unreadable ({type(error).__name__}: {error}); delete {backup_dir} to "
            "train from epoch 1 again (best_model.keras and last_model.keras in the run directory are kept)"
        ) from None


def _backup_and_restore(backup_dir):
    """BackupAndRestore keeping the previous checkpoint too where Keras can.

    A corrupt `training_metadata.json` in `backup_dir` is reported here with
    the file and the fix (Keras would fail on it with a bare JSON error).
    """
    backup_epoch(backup_dir)
    kwargs = {"delete_checkpoint": True}
    if "double_checkpoint" in inspect.signature(keras.callbacks.BackupAndRestore).parameters:
        kwargs["double_checkpoint"] = True  # survives a kill during the write
    return keras.callbacks.BackupAndRestore(backup_dir, **kwargs)
