"""The task-agnostic training engine every task module runs on.

- Environment: `make_strategy`, `resolve_precision`, `task_info` (TF_CONFIG), and
  `start_run`, which sets them up with the seed and the run folder.
- Recipe checks shared by the tasks: `check_num_classes`, `check_task_settings`, `epoch_steps`, `announce_run`.
- `make_optimizer`: SGD or AdamW with a `WarmupSchedule`, optionally with weight averaging.
- `fit_run`: `model.fit` with the run folder's callbacks (best/last checkpoints, history.csv,
  TensorBoard, training_curves.png) and resume through `keras.callbacks.BackupAndRestore`
  (`backup_epoch` reads where a run resumes; `previous_best` the best value so far); it drops
  the history.csv rows of epochs trained again and stops at the first NaN/inf loss (`guard`).
- After training: `run_summary`, `write_run_files`, `finish_run`; `load_trained_run` for evaluate.

The run folder's file names are in `keras_resnet.runs`.
"""

import inspect
import json
import os
import shutil
import sys
import tempfile

import keras
import tensorflow as tf

from keras_resnet.atomic_files import atomic_output, read_json, write_json
from keras_resnet.config import dump_config
from keras_resnet.runs import (
    RunPaths,
    prepare_output_dir,
    set_aside_unreadable_models,
    trained_model_path,
)
from keras_resnet.training.checkpoints import ModelCheckpoint
from keras_resnet.training.divergence import StopOnNonFinite
from keras_resnet.training.plots import (
    CLASSIFICATION_PANELS,
    plot_history,
    read_history_csv,
)
from keras_resnet.training.run_lock import trim_history
from keras_resnet.training.schedules import WarmupSchedule
from keras_resnet_settings.errors import ConfigError, ModelError


# ----------------------------------------------------------------------------
# Environment: strategy, precision, run folder
# ----------------------------------------------------------------------------
def make_strategy(name):
    """A tf.distribute strategy for `train.strategy`.

    - "auto": MirroredStrategy over all GPUs when there are several, else
      the default strategy.
    - "one_device": the first GPU, else the CPU.
    - "mirrored": MirroredStrategy over all GPUs, or over all logical CPUs
      when there is no GPU.
    - "multi_worker": MultiWorkerMirroredStrategy configured by TF_CONFIG.
    """
    # Collective ops must be configured before anything initialises TF.
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise ConfigError(
                "train.strategy=multi_worker needs the TF_CONFIG environment variable (cluster and task); "
                "see README 'Several machines'."
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    raise ConfigError(f"train.strategy={name!r}; allowed: auto, one_device, mirrored, multi_worker")


def cpu_has_native_bfloat16():
    """True on x86 CPUs with AVX512-BF16 or AMX-BF16 (bfloat16 runs fast there)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(value):
    """The Keras dtype policy for `train.mixed_precision`.

    false/"float32": float32. "auto": mixed_float16 on GPU; on CPU
    mixed_bfloat16 where the CPU has native bfloat16 (AVX512-BF16/AMX; about
    2x faster than float32 for ResNet-20 here), else float32. true:
    mixed_float16 on GPU, mixed_bfloat16 on CPU. A policy name is used as
    given.
    """
    on_gpu = bool(tf.config.list_logical_devices("GPU"))
    if value in (False, "float32"):
        return "float32"
    if value == "auto":
        if on_gpu:
            return "mixed_float16"
        return "mixed_bfloat16" if cpu_has_native_bfloat16() else "float32"
    if value is True:
        return "mixed_float16" if on_gpu else "mixed_bfloat16"
    return value


def task_info():
    """(task type, index, is_chief) from TF_CONFIG; single-process runs are chief."""
    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = tf_config.get("task", {})
    task_type, index = task.get("type"), int(task.get("index", 0))
    cluster = tf_config.get("cluster", {})
    is_chief = task_type is None or task_type == "chief" or (task_type == "worker" and index == 0 and "chief" not in cluster)
    return task_type, index, is_chief


def is_chief_process(cfg):
    """False only in a multi-worker run's non-chief workers (which write nothing into output_dir)."""
    return task_info()[2] if cfg.train.strategy == "multi_worker" else True


def start_run(cfg):
    """Sets up a recipe's training process: strategy, seed, dtype policy and run folder.

    Under `train.strategy=multi_worker` only the chief writes into `output_dir`;
    the other workers get a temporary folder (theirs to delete).

    Returns:
        `(strategy, paths, is_chief)`, `paths` the `RunPaths` of the (checked
        writable) output folder.
    """
    train_cfg = cfg.train
    strategy = make_strategy(train_cfg.strategy)
    keras.utils.set_random_seed(train_cfg.seed)
    keras.mixed_precision.set_global_policy(resolve_precision(train_cfg.mixed_precision))
    is_chief = is_chief_process(cfg)
    output_dir = cfg.output_dir if is_chief else tempfile.mkdtemp(prefix="keras_resnet_worker_out_")
    prepare_output_dir(output_dir)
    set_aside_unreadable_models(output_dir)  # a model file a kill left truncated never blocks a re-run
    return strategy, RunPaths.of(output_dir), is_chief


# ----------------------------------------------------------------------------
# Recipe checks shared by the tasks
# ----------------------------------------------------------------------------
def check_num_classes(cfg, info):
    """ConfigError when `model.num_classes` differs from the classes the data source has."""
    expected = cfg.model.num_classes
    found = len(info["class_names"])
    if found != expected:
        raise ConfigError(
            f"model.num_classes={expected} but data.source={cfg.data.source!r} has {found} classes; "
            f"set model.num_classes={found}."
        )


def check_task_settings(cfg, task, neutral_values, message):
    """ConfigError for recipe settings that a task's training does not implement.

    Args:
        cfg: the recipe.
        task: the task name, for `train.strategy=multi_worker` (rejected: it is
            implemented for classification only).
        neutral_values: `{(section, key): value}` of keys the task ignores; any
            other value is an error.
        message: the error after `section.key=value`, formatted with `key`
            (dotted), `neutral` ("null" for None).
    """
    if cfg.train.strategy == "multi_worker":
        raise ConfigError(
            f"train.strategy=multi_worker is not supported for task={task}; use auto, one_device or mirrored"
        )
    for (section, key), neutral in neutral_values.items():
        value = getattr(getattr(cfg, section), key)
        if value != neutral:
            shown = "null" if neutral is None else neutral
            raise ConfigError(
                f"{section}.{key}={value!r} " + message.format(key=f"{section}.{key}", neutral=shown)
            )


def announce_run(cfg, info, strategy, paths, model_name, details=""):
    """Prints a run's first line and returns its optimizer steps per epoch.

    The line names the model, the data source, the image counts (then
    `details`), the batch size, the replicas, the dtype policy and the output folder.
    With `data.sampling: crop` the training count reads e.g. "12 train images x 8 crops
    = 96 windows" (x `data.repeat` when above 1) and the validation tiles follow the images.
    """
    data_cfg = cfg.data
    if info.get("sampling") == "crop":
        repeat = f" x {data_cfg.repeat} repeats" if data_cfg.repeat > 1 else ""
        tiles = f" ({info['num_val_windows']} tiles)" if "num_val_windows" in info else ""
        counts = (f"{info['num_train']} train images x {info['crops_per_image']} crops{repeat} = "
                  f"{epoch_examples(cfg, info)} windows / {info['num_val']} val images{tiles}")
    else:
        counts = f"{info['num_train']} train / {info['num_val']} val images"
    print(
        f"{model_name} on {data_cfg.source}: {counts}"
        f"{details}, batch {data_cfg.batch_size} over {strategy.num_replicas_in_sync} replica(s), "
        f"policy {keras.mixed_precision.dtype_policy().name}, output {paths.root}"
    )
    return epoch_steps(cfg, info)


def epoch_examples(cfg, info):
    """Training examples per epoch: `info["num_train_windows"]` where the data gives it (images x
    `data.crops_per_image` x `data.repeat`), else the training set x `data.repeat`."""
    if "num_train_windows" in info:
        return info["num_train_windows"]
    return info["num_train"] * cfg.data.repeat


def epoch_steps(cfg, info):
    """Optimizer steps per epoch: `train.steps_per_epoch`, else whole batches of :func:`epoch_examples`."""
    return cfg.train.steps_per_epoch or epoch_examples(cfg, info) // cfg.data.batch_size


# ----------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------
def make_optimizer(train_cfg, steps_per_epoch, epochs, learning_rate=None, warmup=True):
    """SGD (momentum, Nesterov) or AdamW with a warm-up schedule.

    Weight decay skips BatchNorm parameters and biases. With
    `train.ema_momentum` set, the optimizer also keeps an exponential moving
    average of the weights (Keras' `use_ema`); `fit_run` then validates and
    checkpoints the averaged weights.
    """
    learning_rate = learning_rate or train_cfg.learning_rate
    schedule = WarmupSchedule(
        learning_rate,
        total_steps=steps_per_epoch * epochs,
        warmup_steps=int(train_cfg.warmup_epochs * steps_per_epoch) if warmup else 0,
        schedule=train_cfg.schedule,
    )
    weight_decay = train_cfg.weight_decay or None
    ema = {"use_ema": True, "ema_momentum": train_cfg.ema_momentum} if train_cfg.ema_momentum else {}
    if train_cfg.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(
            schedule, momentum=train_cfg.momentum, nesterov=train_cfg.nesterov, weight_decay=weight_decay,
            **ema,
        )
    else:
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=weight_decay or 0.0, **ema)
    if weight_decay:
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


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
    """
    if steps_per_epoch is not None or not isinstance(train_ds, tf.data.Dataset):
        return train_ds, steps_per_epoch
    batches = int(train_ds.cardinality())
    if batches <= 0:  # unknown or infinite length: leave as given
        return train_ds, steps_per_epoch
    return train_ds.repeat(), batches


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


# ----------------------------------------------------------------------------
# Run files, summary, evaluation of the trained model
# ----------------------------------------------------------------------------
def write_run_files(cfg, paths, run_info):
    """Writes the resolved recipe (recipe.yaml) and `run_info` (run.json) into the run folder."""
    with atomic_output(paths.recipe) as temporary:
        dump_config(cfg, temporary)
    write_json(paths.info, run_info)


def run_summary(paths, steps_per_epoch, batch_size, train_seconds):
    """`epochs` (in history.csv), `train_seconds_this_session` and `train_images_per_second` of a run."""
    epochs = len(read_history_csv(paths.history).get("epoch", []))
    return {
        "epochs": epochs,
        "train_seconds_this_session": round(train_seconds, 1),
        "train_images_per_second": round(steps_per_epoch * batch_size * max(epochs, 1) / train_seconds, 1)
        if train_seconds > 0 else None,
    }


def finish_run(paths, evaluate, steps_per_epoch, batch_size, train_seconds, extra=None):
    """Ends a finished run: deletes its backup and evaluates its best model.

    Args:
        paths: the run folder's `RunPaths`.
        evaluate: `evaluate(model) -> metrics dict` of the task.
        steps_per_epoch, batch_size, train_seconds: for `run_summary`.
        extra: more entries for metrics.json (e.g. the time-budget plan).

    Returns:
        The metrics of best_model.keras with the `run_summary`, as written to metrics.json.
    """
    shutil.rmtree(paths.backup_root, ignore_errors=True)
    best_model = keras.saving.load_model(paths.best, compile=False)
    metrics = evaluate(best_model)
    metrics.update(run_summary(paths, steps_per_epoch, batch_size, train_seconds))
    metrics.update(extra or {})
    write_json(paths.metrics, metrics)
    return metrics


# metrics.json entries about the training run, not the evaluation: `evaluate` keeps them.
RUN_SUMMARY_KEYS = ("epochs", "train_seconds_this_session", "train_images_per_second", "time_budget")


def keep_run_summary(output_dir, evaluate):
    """Runs `evaluate() -> metrics` (which rewrites metrics.json) and puts the training summary back.

    `keras-resnet evaluate` re-computes a finished run's metrics; the
    entries `finish_run` added (`RUN_SUMMARY_KEYS`: epochs, speed, the
    time-budget plan) describe the training and are kept, so scripts that
    read them after an evaluate still find them.
    """
    path = RunPaths.of(output_dir).metrics
    try:
        previous = read_json(path) if os.path.isfile(path) else {}
    except Exception:  # an unreadable old file: nothing to keep
        previous = {}
    metrics = evaluate()
    kept = {key: previous[key] for key in RUN_SUMMARY_KEYS if key in previous and key not in metrics}
    if kept:
        metrics.update(kept)
        write_json(path, metrics)
    return metrics


def load_trained_run(cfg, build_datasets):
    """The best model of a recipe's output_dir with the validation set to evaluate it on.

    Args:
        cfg: the recipe.
        build_datasets: `build_datasets(cfg) -> (train_ds, val_ds, info)` of the task.

    Returns:
        `(model_path, model, val_ds, info)`; a ConfigError when the run has no
        best_model.keras or the data's classes do not fit the recipe.
    """
    model_path = trained_model_path(cfg)
    _, val_ds, info = build_datasets(cfg)
    check_num_classes(cfg, info)
    return model_path, keras.saving.load_model(model_path, compile=False), val_ds, info
