"""`fit_in_phases`: a head warm-up with the backbone frozen, then fine-tuning (`train.head_epochs`), each by `fit_run`.

`fit_run`: `model.fit` with the run folder's callbacks (best/last checkpoints, history.csv, TensorBoard,
training_curves.png) and resume through `keras.callbacks.BackupAndRestore` (`backup_epoch` reads where a run
resumes; `previous_best` the best value so far); it drops the history.csv rows of epochs trained again and
stops at the first NaN/inf loss.
"""

import inspect
import json
import os
import sys
import time

import keras
import tensorflow as tf

from keras_resnet.atomic_files import atomic_output
from keras_resnet.quantization.layers import sublayers
from keras_resnet.training import devices, optimizers
from keras_resnet.training.checkpoints import ModelCheckpoint
from keras_resnet.training.divergence import StopOnNonFinite
from keras_resnet.training.plots import (
    CLASSIFICATION_PANELS,
    plot_history,
    read_history_csv,
)
from keras_resnet.training.run_lock import continued_epochs, trim_history
from keras_resnet.training.time_budget import seconds_per_step
from keras_resnet_settings.errors import ModelError, WorkerLostError


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


class EpochEstimate(keras.callbacks.Callback):
    """One line, early in a run logged one line per epoch: seconds per step, and the minutes an epoch and the run take.

    Without progress bars (a log file, CI) a long epoch is otherwise silent
    until it ends (`keras-resnet qat` said `Epoch 1/2` and nothing for 25
    minutes). After `warmup` steps (tracing, pipeline start-up) it times the
    next `timed` ones.
    """

    def __init__(self, steps_per_epoch, epochs, warmup=3, timed=10):
        super().__init__()
        self.steps_per_epoch, self.epochs, self.warmup, self.timed = steps_per_epoch, epochs, warmup, timed
        self.stamps = []

    def on_train_batch_end(self, batch, logs=None):
        if len(self.stamps) > self.warmup + self.timed:
            return
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == self.warmup + self.timed + 1:
            step = seconds_per_step(self.stamps, self.warmup + 1)
            epoch_minutes = step * self.steps_per_epoch / 60
            print(f"~{step:.3g} s/step here: an epoch's {self.steps_per_epoch} steps take ~{epoch_minutes:.1f} min, "
                  f"the {self.epochs} epoch(s) of this phase ~{epoch_minutes * self.epochs:.0f} min "
                  "(validation not counted)", flush=True)


def previous_best(history_path, monitor):
    """The highest `monitor` value in a (resumed) run's history.csv; None without one."""
    if not os.path.exists(history_path):
        return None
    values = read_history_csv(history_path).get(monitor)
    return max(values) if values else None


def fit_run(model, cfg, train_ds, val_ds, paths, *, monitor, title, panels, best_key, backup_dir, epochs,
            initial_epoch=0, extra_callbacks=(), planned_epochs=None):
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
        planned_epochs: the epochs the run is expected to end at when a
            callback ends it before `epochs` (the time budget's); None: `epochs`.

    Every worker of a multi-worker run runs the same callbacks (saving a
    model under MultiWorkerMirroredStrategy is a collective operation: all
    workers save, the others into their temporary folder, which starts as a
    copy of the chief's, `devices.start_run`).
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
    if isinstance(model.distribute_strategy, devices.MultiWorkerStrategy):
        train_ds, val_ds = devices.shard_by_data(train_ds), devices.shard_by_data(val_ds)
    train_ds, steps_per_epoch = one_iterator_per_run(train_ds, cfg.train.steps_per_epoch)
    train_ds = spare_batch_for_the_build(train_ds)
    if fit_verbosity() == 2 and steps_per_epoch and steps_per_epoch > 20:  # no progress bar to show it
        remaining = (planned_epochs or epochs) - (resume_epoch or initial_epoch)
        callbacks.insert(0, EpochEstimate(steps_per_epoch, remaining))
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


def synchronize_batch_norm(model, synchronized):
    """Sets every BatchNormalization layer of `model` to compute its training statistics over all replicas
    (`synchronized=True`, Keras' synchronized BN: an all-reduce of the moments) or over each replica's batch.

    Only training steps under a tf.distribute strategy with several replicas
    differ; inference, exports and one-device training are unchanged.
    """
    layers = [layer for layer in sublayers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in layers:
        layer.synchronized = bool(synchronized)
    replicas = model.distribute_strategy.num_replicas_in_sync
    if synchronized and replicas > 1:
        print(f"train.sync_batch_norm: {len(layers)} BatchNorm layers compute their statistics over all "
              f"{replicas} replicas", flush=True)


def fit_in_phases(model, cfg, train_ds, val_ds, paths, *, compile_model, steps_per_epoch, extra_callbacks=(),
                  main_callbacks=(), up_to_epochs=None, **run_args):
    """Training in one phase, or two with `train.head_epochs`: the head alone (backbone frozen), then all of it.

    The first `train.head_epochs` epochs train with the whole backbone
    frozen (its BatchNorm in inference mode) at `train.learning_rate`, with
    the warm-up: a fresh head learns on top of pretrained features without
    disturbing them. Then the backbone is unfrozen (but `model.freeze_stages`)
    and the rest of the epochs run at `train.fine_tune_learning_rate`
    (default `learning_rate / 10`), each phase with its own cosine schedule.
    A run killed in phase 2 does not redo phase 1 (its weights are kept in
    the run's backup folder); each phase resumes from its own backup. A
    finished run whose `train.epochs` was raised continues from its last
    model, with a schedule over the epochs added (no warm-up).

    Args:
        model, cfg, train_ds, val_ds, paths: as `fit_run`'s.
        compile_model: `compile_model(model, optimizer)` compiles `model` as
            the task trains it (loss, metrics, jit_compile).
        steps_per_epoch: optimizer steps per epoch (for the schedules).
        extra_callbacks: `fit_run`'s, in both phases (e.g. an mAP evaluation the monitor needs).
        main_callbacks: callbacks of the last phase only (e.g. the time budget's).
        up_to_epochs: the last phase's `fit` runs for up to this many epochs
            (its schedule still spans `train.epochs`): for a callback of
            `main_callbacks` that lengthens the run as it goes and ends it
            (the time budget's `KeepToBudget`). None: `train.epochs`.
        **run_args: the rest of `fit_run`'s keyword arguments (monitor, title, panels, best_key).
    """
    train_cfg = cfg.train
    epochs, head_epochs = train_cfg.epochs, min(train_cfg.head_epochs, train_cfg.epochs)
    done = continued_epochs(paths)  # a finished run continued to a higher train.epochs
    if done:
        model.load_weights(paths.last)
        print(f"continuing from epoch {done + 1} of {epochs} with the weights of {paths.last}" if done < epochs else
              f"all {epochs} epochs are trained (its metrics.json was unreadable): evaluating it again", flush=True)

    synchronize_batch_norm(model, train_cfg.sync_batch_norm)
    scale = optimizers.learning_rate_scale(train_cfg, cfg.data.batch_size)
    if scale != 1.0:
        print(f"learning rates x {scale:g} (linear scaling rule: data.batch_size {cfg.data.batch_size} / "
              f"train.learning_rate_batch_size {train_cfg.learning_rate_batch_size}): train.learning_rate "
              f"{train_cfg.learning_rate:g} -> {train_cfg.learning_rate * scale:g}", flush=True)

    def phase(first, last, learning_rate, warmup, name, callbacks, up_to=None):
        compile_model(model, optimizers.make_optimizer(train_cfg, steps_per_epoch, last - first, learning_rate,
                                                       warmup, batch_size=cfg.data.batch_size))
        if isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer):
            print("float16 policy: gradients through Keras' LossScaleOptimizer (dynamic loss scaling)", flush=True)
        fit_run(model, cfg, train_ds, val_ds, paths, backup_dir=os.path.join(paths.backup_root, name),
                epochs=max(last, up_to or 0), planned_epochs=last, initial_epoch=first, extra_callbacks=callbacks,
                **run_args)

    if head_epochs and done:
        model.backbone.freeze_stages(cfg.model.freeze_stages)  # past the head phase: the fine-tuning set-up
    elif head_epochs:
        head_done = os.path.join(paths.backup_root, "head_phase.weights.h5")
        if os.path.exists(head_done):
            print(f"head phase already finished; restoring {head_done}")
            model.load_weights(head_done)
        else:
            print(f"phase 1: {head_epochs} epoch(s) training the head with the backbone frozen")
            model.backbone.trainable = False
            phase(0, head_epochs, None, True, "head",
                  [*extra_callbacks, *(main_callbacks if head_epochs == epochs else ())])
            with atomic_output(head_done) as temporary:
                model.save_weights(temporary)
        model.backbone.trainable = True
        model.backbone.freeze_stages(cfg.model.freeze_stages)
        if head_epochs < epochs:
            print(f"phase 2: fine-tuning epochs {head_epochs + 1}-{epochs}")
    first = max(head_epochs, done)
    if first < epochs:
        learning_rate = (train_cfg.fine_tune_learning_rate or train_cfg.learning_rate / 10) if head_epochs else None
        phase(first, epochs, learning_rate, not (head_epochs or done), "main", [*extra_callbacks, *main_callbacks],
              up_to=up_to_epochs)


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


def spare_batch_for_the_build(train_ds):
    """`train_ds` with one batch in front that Keras' `fit` takes under a tf.distribute strategy, else unchanged.

    Under a strategy scope Keras 3.15's TensorFlow `fit` builds the model on
    `next()` of the training iterator (`_maybe_symbolic_build`) and then
    trains on the same iterator: with the repeated dataset of
    `one_iterator_per_run` the first batch was never trained on and every
    later step saw the batch one step ahead of a one-device run. The spare
    batch (read from the same pipeline) goes to the build instead.
    """
    if not tf.distribute.has_strategy() or not isinstance(train_ds, tf.data.Dataset):
        return train_ds
    if int(train_ds.cardinality()) != tf.data.INFINITE_CARDINALITY:
        return train_ds  # a finite dataset gets a new iterator each epoch: the build's batch is not missed
    return train_ds.take(1).concatenate(train_ds)


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


class WorkerBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` whose workers agree on where a multi-worker run resumes.

    Under `MultiWorkerStrategy` the workers compare the epoch each restored
    (an all-reduce at the start of `fit`): a worker restarted while the chief
    was still writing its backup could have copied the one before. If they
    differ, `fit` stops with a `WorkerLostError` and the command line
    restarts the workers, which then read the same backup.
    """

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        strategy = self.model.distribute_strategy
        if not isinstance(strategy, devices.MultiWorkerStrategy):
            return
        epoch = float(backup_epoch(self.backup_dir))
        # All equal exactly when n * sum(e^2) == sum(e)^2 (ReduceOp has no MIN/MAX); every worker sees the same sums.
        count, total, squares = devices.sum_over_workers(strategy, [1.0, epoch, epoch ** 2])
        if count * squares != total ** 2:
            raise WorkerLostError(f"the workers restored different epochs from {self.backup_dir} (this one: epoch "
                                  f"{int(epoch) + 1}, mean {total / count + 1:g}); every worker reads it again "
                                  "when restarted")


def _backup_and_restore(backup_dir):
    """WorkerBackupAndRestore keeping the previous checkpoint too where Keras can.

    A corrupt `training_metadata.json` in `backup_dir` is reported here with
    the file and the fix (Keras would fail on it with a bare JSON error).
    """
    backup_epoch(backup_dir)
    kwargs = {"delete_checkpoint": True}
    if "double_checkpoint" in inspect.signature(keras.callbacks.BackupAndRestore).parameters:
        kwargs["double_checkpoint"] = True  # survives a kill during the write
    return WorkerBackupAndRestore(backup_dir, **kwargs)
