"""Training and evaluation of classification recipes.

`train_from_config` runs a YAML recipe end to end: data pipelines, the
distribution strategy, mixed precision, the model (optionally initialised
from a keras.applications `.h5` or a `.keras` file, with frozen stages and a
two-phase head-then-fine-tune schedule), the optimizer and schedule, and the
run directory:

    output_dir/
      recipe.yaml            the resolved recipe
      run.json               preset, input shape, classes, preprocessing
      best_model.keras       best validation top-1
      last_model.keras       end of the last finished epoch
      history.csv            one row per epoch (deduplicated on resume)
      training_curves.png    loss / top-1 / learning-rate curves
      confusion_matrix.png   of the best model on the validation set
      metrics.json           {"top1", "top5", "loss", ...} of the best model
      logs/                  TensorBoard
      backup/                BackupAndRestore state while a run is unfinished

A killed run started again with the same recipe continues from its last
finished epoch. `train.strategy: multi_worker` uses a custom training loop
(Keras `fit` fails under MultiWorkerMirroredStrategy with TF 2.21 / Keras
3.15, keras-team/keras#20585) with `tf.train.CheckpointManager` resume.
"""

import inspect
import json
import os
import shutil
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from keras_resnet.config import ConfigError, dump_config, load_config
from keras_resnet.convert import from_keras_applications
from keras_resnet.data import DataError, build_classification_datasets
from keras_resnet.layers.core import ImageNormalization
from keras_resnet.models.resnet.backbone import ResNetBackbone
from keras_resnet.models.resnet.classifier import ResNetClassifier
from keras_resnet.models.resnet.presets import get_preset_config
from keras_resnet.training.plots import (
    CLASSIFICATION_PANELS,
    plot_confusion_matrix,
    plot_history,
    read_history_csv,
)
from keras_resnet.training.schedules import WarmupSchedule


# ----------------------------------------------------------------------------
# Environment: strategy and precision
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


def _task_info():
    """(task type, index, is_chief) from TF_CONFIG; single-process runs are chief."""
    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = tf_config.get("task", {})
    task_type, index = task.get("type"), int(task.get("index", 0))
    cluster = tf_config.get("cluster", {})
    is_chief = task_type is None or task_type == "chief" or (task_type == "worker" and index == 0 and "chief" not in cluster)
    return task_type, index, is_chief


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------
def build_backbone_from_config(cfg, info):
    """The recipe's backbone and the layer normalising raw pixels 0..255.

    Returns:
        `(backbone, preprocessing)`; normalisation uses the training set's
        per-channel mean/std from `info`.
    """
    model_cfg = cfg["model"]
    get_preset_config(model_cfg["backbone"])  # unknown preset -> ValueError listing the valid ones
    try:
        backbone = ResNetBackbone.from_preset(
            model_cfg["backbone"], input_shape=tuple(model_cfg["input_shape"]), **model_cfg["backbone_args"]
        )
    except TypeError as error:
        raise ConfigError(f"model.backbone_args: {error}") from None
    preprocessing = ImageNormalization(mean=info["mean"], std=info["std"], name="normalization")
    return backbone, preprocessing


def build_classifier(cfg, info):
    """The recipe's `ResNetClassifier`, taking raw pixels 0..255.

    Normalisation by the training set's per-channel mean/std is a layer
    inside the model.
    """
    model_cfg = cfg["model"]
    preset = model_cfg["backbone"]
    backbone, preprocessing = build_backbone_from_config(cfg, info)
    model = ResNetClassifier(
        backbone,
        model_cfg["num_classes"],
        dropout=model_cfg["dropout"],
        preprocessing=preprocessing,
        name=f"{preset}_classifier",
    )
    if model_cfg["weights"]:
        load_pretrained_weights(model, model_cfg["weights"])
    if model_cfg["freeze_stages"] >= 0:
        backbone.freeze_stages(model_cfg["freeze_stages"])
    return model


def _copy_layer_weights(source_layers, target_layers, source_name, target_name):
    by_name = {layer.name: layer for layer in source_layers if layer.weights}
    copied = 0
    for layer in target_layers:
        if not layer.weights:
            continue
        source = by_name.get(layer.name)
        if source is None:
            raise ConfigError(
                f"model.weights {source_name} is of another architecture: it has no layer {layer.name!r} "
                f"needed by {target_name}; pick the matching model.backbone."
            )
        values = source.get_weights()
        shapes = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != shapes:
            raise ConfigError(
                f"model.weights {source_name} does not fit {target_name}: layer {layer.name!r} has shapes "
                f"{[v.shape for v in values]}, the model needs {shapes} (another architecture or input channels)."
            )
        layer.set_weights(values)
        copied += 1
    return copied


def load_pretrained_weights(model, path):
    """Initialises `model` from a `.keras` model or a keras.applications `.h5`.

    The backbone is copied by layer name (shapes checked); the head too when
    the source is a classifier with the same number of classes.
    """
    if not os.path.exists(path):
        raise ConfigError(f"model.weights file {path} does not exist.")
    target_name = f"model.backbone={model.backbone.name!r}"
    if path.endswith(".keras"):
        source = keras.saving.load_model(path, compile=False)
        source_backbone = getattr(source, "backbone", source)
        _copy_layer_weights(source_backbone.layers, model.backbone.layers, path, target_name)
        if isinstance(source, ResNetClassifier) and source.num_classes == model.num_classes:
            model.get_layer("predictions").set_weights(source.get_layer("predictions").get_weights())
        return model
    if path.endswith(".h5"):
        try:
            source = from_keras_applications(path, input_shape=model.backbone.image_shape)
        except ValueError as error:
            raise ConfigError(f"model.weights: {error}") from None
        source_backbone = getattr(source, "backbone", source)
        _copy_layer_weights(source_backbone.layers, model.backbone.layers, path, target_name)
        return model
    raise ConfigError(f"model.weights {path} must be a .keras model or a keras.applications .h5 weight file.")


def make_optimizer(train_cfg, steps_per_epoch, epochs, learning_rate=None, warmup=True):
    """SGD (momentum, Nesterov) or AdamW with a warm-up schedule.

    Weight decay skips BatchNorm parameters and biases. With
    `train.ema_momentum` set, the optimizer also keeps an exponential moving
    average of the weights (Keras' `use_ema`); `fit_run` then validates and
    checkpoints the averaged weights.
    """
    learning_rate = learning_rate or train_cfg["learning_rate"]
    schedule = WarmupSchedule(
        learning_rate,
        total_steps=steps_per_epoch * epochs,
        warmup_steps=int(train_cfg["warmup_epochs"] * steps_per_epoch) if warmup else 0,
        schedule=train_cfg["schedule"],
    )
    weight_decay = train_cfg["weight_decay"] or None
    ema = {"use_ema": True, "ema_momentum": train_cfg["ema_momentum"]} if train_cfg.get("ema_momentum") else {}
    if train_cfg["optimizer"] == "sgd":
        optimizer = keras.optimizers.SGD(
            schedule, momentum=train_cfg["momentum"], nesterov=train_cfg["nesterov"], weight_decay=weight_decay,
            **ema,
        )
    else:
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=weight_decay or 0.0, **ema)
    if weight_decay:
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


def classification_metrics():
    return [
        keras.metrics.CategoricalAccuracy(name="top1"),
        keras.metrics.TopKCategoricalAccuracy(k=5, name="top5"),
    ]


def _one_hot(dataset, num_classes):
    return dataset.map(lambda x, y: (x, tf.one_hot(y, num_classes)), num_parallel_calls=tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------
# Run directory
# ----------------------------------------------------------------------------
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


def _write_json(path, payload):
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


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


def _previous_best(history_path):
    if not os.path.exists(history_path):
        return None
    values = read_history_csv(history_path).get("val_top1")
    return max(values) if values else None


# ----------------------------------------------------------------------------
# Fit (single process: one device or MirroredStrategy)
# ----------------------------------------------------------------------------
def _fit_phase(model, cfg, train_ds, val_ds, *, epochs, initial_epoch, steps_per_epoch, learning_rate,
               warmup, backup_dir, paths):
    train_cfg = cfg["train"]
    optimizer = make_optimizer(train_cfg, steps_per_epoch, epochs - initial_epoch, learning_rate, warmup)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=train_cfg["label_smoothing"]),
        metrics=classification_metrics(),
        jit_compile=train_cfg["jit_compile"],
    )
    fit_run(model, cfg, train_ds, val_ds, paths, monitor="val_top1", title=cfg["model"]["backbone"],
            panels=CLASSIFICATION_PANELS, best_key="top1", backup_dir=backup_dir, epochs=epochs,
            initial_epoch=initial_epoch)


def fit_run(model, cfg, train_ds, val_ds, paths, *, monitor, title, panels, best_key, backup_dir, epochs,
            initial_epoch=0, extra_callbacks=()):
    """`model.fit` with the run directory's callbacks: resumable, best/last checkpoints, logs, curves.

    Args:
        model: a compiled model.
        cfg: the recipe (train.steps_per_epoch is read).
        train_ds, val_ds: datasets for `fit`.
        paths: `_run_paths(output_dir)`.
        monitor: the `val_*` log key (maximised) that picks best_model.keras; a
            resumed run starts from the best value in history.csv.
        title, panels, best_key: of training_curves.png (see `plot_history`).
        backup_dir: BackupAndRestore folder.
        epochs, initial_epoch: as in `fit`.
        extra_callbacks: run first, so the logs they add (e.g. val_mAP) reach
            the CSV, the checkpoints and the plots.
    """
    best = keras.callbacks.ModelCheckpoint(paths["best"], monitor=monitor, mode="max", save_best_only=True)
    if os.path.exists(paths["history"]):
        previous = read_history_csv(paths["history"]).get(monitor)
        if previous:
            best.best = max(previous)
    # Weight averaging: validation, checkpoints and backups at each epoch end see the EMA weights.
    ema = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if cfg["train"].get("ema_momentum") else []
    callbacks = [
        *ema,
        _LogLearningRate(),
        *extra_callbacks,
        keras.callbacks.CSVLogger(paths["history"], append=True),
        keras.callbacks.TensorBoard(paths["logs"]),
        best,
        keras.callbacks.ModelCheckpoint(paths["last"]),
        _PlotCurves(paths["history"], paths["curves"], title, panels=panels, best_key=best_key),
        _backup_and_restore(backup_dir),
    ]
    train_ds, steps_per_epoch = _one_iterator_per_run(train_ds, cfg["train"]["steps_per_epoch"])
    model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps_per_epoch,
        callbacks=callbacks,
        verbose=1 if os.environ.get("CI") is None else 2,
    )


def _one_iterator_per_run(train_ds, steps_per_epoch):
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


def run_summary(paths, steps_per_epoch, batch_size, train_seconds):
    """`epochs` (in history.csv), `train_seconds_this_session` and `train_images_per_second` of a run."""
    epochs = len(read_history_csv(paths["history"]).get("epoch", []))
    return {
        "epochs": epochs,
        "train_seconds_this_session": round(train_seconds, 1),
        "train_images_per_second": round(steps_per_epoch * batch_size * max(epochs, 1) / train_seconds, 1)
        if train_seconds > 0 else None,
    }


def backup_epoch(backup_dir):
    """The epoch a run resumed from `backup_dir` starts at: 0 without a backup.

    Reads the `training_metadata.json` that `keras.callbacks.BackupAndRestore`
    writes at each epoch end, so data pipelines can be built for the epoch
    `fit` will resume at (before `fit` restores it).

    Raises:
        ValueError: the file exists but is not BackupAndRestore's JSON (a run
            killed while writing it), naming the file and how to restart.
    """
    path = os.path.join(backup_dir, "training_metadata.json")
    try:
        with open(path) as handle:
            return max(int(json.load(handle)["epoch"]), 0)
    except FileNotFoundError:
        return 0
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
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


def _fit(model, cfg, train_ds, val_ds, steps_per_epoch, paths):
    train_cfg = cfg["train"]
    epochs, head_epochs = train_cfg["epochs"], min(train_cfg["head_epochs"], train_cfg["epochs"])
    head_done = os.path.join(paths["backup_root"], "head_phase.weights.h5")
    if head_epochs:
        if os.path.exists(head_done):
            print(f"head phase already finished; restoring {head_done}")
            model.load_weights(head_done)
        else:
            print(f"phase 1: {head_epochs} epoch(s) training the head with the backbone frozen")
            model.backbone.trainable = False
            _fit_phase(model, cfg, train_ds, val_ds, epochs=head_epochs, initial_epoch=0,
                       steps_per_epoch=steps_per_epoch, learning_rate=None, warmup=True,
                       backup_dir=os.path.join(paths["backup_root"], "head"), paths=paths)
            model.save_weights(head_done)
        model.backbone.trainable = True
        model.backbone.freeze_stages(cfg["model"]["freeze_stages"])
        if head_epochs < epochs:
            print(f"phase 2: fine-tuning epochs {head_epochs + 1}-{epochs}")
    if head_epochs < epochs:
        learning_rate = train_cfg["fine_tune_learning_rate"] if head_epochs else None
        if head_epochs and learning_rate is None:
            learning_rate = train_cfg["learning_rate"] / 10
        _fit_phase(model, cfg, train_ds, val_ds, epochs=epochs, initial_epoch=head_epochs,
                   steps_per_epoch=steps_per_epoch, learning_rate=learning_rate, warmup=not head_epochs,
                   backup_dir=os.path.join(paths["backup_root"], "main"), paths=paths)
    shutil.rmtree(paths["backup_root"], ignore_errors=True)


# ----------------------------------------------------------------------------
# Custom loop (MultiWorkerMirroredStrategy)
# ----------------------------------------------------------------------------
def _fit_custom_loop(model, cfg, strategy, train_ds, val_ds, steps_per_epoch, paths, is_chief):
    """A distributed custom training loop with checkpoint resume.

    Used for MultiWorkerMirroredStrategy. Every worker runs the same steps;
    only the chief writes models, history and plots (the others checkpoint
    into a temporary folder, as tf.distribute requires).
    """
    train_cfg = cfg["train"]
    if train_cfg["ema_momentum"]:
        raise ConfigError("train.ema_momentum is not supported with train.strategy=multi_worker; set it to null")
    num_classes = cfg["model"]["num_classes"]
    global_batch = cfg["data"]["batch_size"]
    epochs = train_cfg["epochs"]
    steps_per_epoch = train_cfg["steps_per_epoch"] or steps_per_epoch
    with strategy.scope():
        optimizer = make_optimizer(train_cfg, steps_per_epoch, epochs)
        if keras.mixed_precision.dtype_policy().name == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        loss_fn = keras.losses.CategoricalCrossentropy(
            label_smoothing=train_cfg["label_smoothing"], reduction=None
        )
        train_loss = keras.metrics.Mean(name="loss")
        train_top1 = keras.metrics.CategoricalAccuracy(name="top1")
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        optimizer.build(model.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_var)
    backup_dir = paths["backup_root"] if is_chief else tempfile.mkdtemp(prefix="keras_resnet_worker_")
    manager = tf.train.CheckpointManager(checkpoint, backup_dir, max_to_keep=1)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint)
        print(f"resuming from {manager.latest_checkpoint}: epoch {int(epoch_var.numpy()) + 1}")

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    distributed = strategy.experimental_distribute_dataset(train_ds.repeat().with_options(options))
    iterator = iter(distributed)

    def step_fn(images, labels):
        with tf.GradientTape() as tape:
            predictions = model(images, training=True)
            per_example = loss_fn(labels, predictions)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            scaled = optimizer.scale_loss(loss) if hasattr(optimizer, "scale_loss") else loss
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        train_loss.update_state(per_example)
        train_top1.update_state(labels, predictions)

    @tf.function
    def train_steps(iterator, steps):
        for _ in tf.range(steps):
            images, labels = next(iterator)
            strategy.run(step_fn, args=(images, labels))

    val_model_fn = tf.function(lambda images: model(images, training=False))
    writer = tf.summary.create_file_writer(os.path.join(paths["logs"], "train")) if is_chief else None
    best = _previous_best(paths["history"]) or -1.0
    chunk = max(1, min(steps_per_epoch, 50))
    for epoch in range(int(epoch_var.numpy()), epochs):
        start = time.time()
        train_loss.reset_state()
        train_top1.reset_state()
        progress = keras.utils.Progbar(steps_per_epoch, stateful_metrics=["loss", "top1"], verbose=1 if is_chief else 0)
        done = 0
        while done < steps_per_epoch:
            steps = min(chunk, steps_per_epoch - done)
            train_steps(iterator, tf.constant(steps))
            done += steps
            progress.update(done, [("loss", float(train_loss.result())), ("top1", float(train_top1.result()))])
        val_metrics = _evaluate_predictions(val_model_fn, val_ds, num_classes)
        row = {
            "epoch": epoch,
            "loss": float(train_loss.result()),
            "top1": float(train_top1.result()),
            "learning_rate": float(keras.ops.convert_to_numpy(optimizer.learning_rate)),
            "val_loss": val_metrics["loss"],
            "val_top1": val_metrics["top1"],
            "val_top5": val_metrics["top5"],
        }
        epoch_var.assign(epoch + 1)
        manager.save()
        if is_chief:
            print(f"epoch {epoch + 1}/{epochs} ({time.time() - start:.1f}s): "
                  + ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch"))
            _append_history_row(paths["history"], row)
            with writer.as_default(step=epoch):
                for key, value in row.items():
                    if key != "epoch":
                        tf.summary.scalar(key, value)
            model.save(paths["last"])
            if row["val_top1"] > best:
                best = row["val_top1"]
                model.save(paths["best"])
            plot_history(read_history_csv(paths["history"]), paths["curves"], cfg["model"]["backbone"])
    if is_chief:
        shutil.rmtree(paths["backup_root"], ignore_errors=True)
    else:
        shutil.rmtree(backup_dir, ignore_errors=True)


def _append_history_row(path, row):
    new_file = not os.path.exists(path)
    with open(path, "a") as f:
        if new_file:
            f.write(",".join(row) + "\n")
        f.write(",".join(str(v) for v in row.values()) + "\n")


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------
def _evaluate_predictions(predict_fn, dataset, num_classes, return_confusion=False):
    """Top-1/top-5/loss (and the confusion matrix) of `predict_fn` on `dataset`.

    `dataset` yields `(images, integer labels)`.
    """
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    for images, labels in dataset:
        probabilities = np.asarray(predict_fn(images), dtype=np.float64)
        labels = labels.numpy().astype(np.int64)
        top5 = np.argsort(-probabilities, axis=1)[:, :5]
        predicted = top5[:, 0]
        correct1 += int((predicted == labels).sum())
        correct5 += int((top5 == labels[:, None]).any(axis=1).sum())
        loss_sum += float(-np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, 1.0)).sum())
        total += len(labels)
        np.add.at(confusion, (labels, predicted), 1)
    if total == 0:
        raise DataError("the validation set is empty; check data.val / data.limit_val")
    metrics = {"top1": correct1 / total, "top5": correct5 / total, "loss": loss_sum / total, "num_examples": total}
    return (metrics, confusion) if return_confusion else metrics


def evaluate_model(model, val_ds, class_names, output_dir):
    """Evaluates `model` on `val_ds`; writes metrics.json and confusion_matrix.png."""
    predict = tf.function(lambda images: model(images, training=False))
    metrics, confusion = _evaluate_predictions(predict, val_ds, len(class_names), return_confusion=True)
    metrics["per_class_accuracy"] = {
        name: float(confusion[i, i] / max(confusion[i].sum(), 1)) for i, name in enumerate(class_names)
    }
    _write_json(os.path.join(output_dir, "metrics.json"), metrics)
    np.savetxt(os.path.join(output_dir, "confusion_matrix.csv"), confusion, fmt="%d", delimiter=",")
    plot_confusion_matrix(confusion, class_names, os.path.join(output_dir, "confusion_matrix.png"))
    return metrics


def _run_paths(output_dir):
    return {
        "best": os.path.join(output_dir, "best_model.keras"),
        "last": os.path.join(output_dir, "last_model.keras"),
        "history": os.path.join(output_dir, "history.csv"),
        "curves": os.path.join(output_dir, "training_curves.png"),
        "logs": os.path.join(output_dir, "logs"),
        "backup_root": os.path.join(output_dir, "backup"),
    }


def _check_classes(cfg, info):
    expected = cfg["model"]["num_classes"]
    found = len(info["class_names"])
    if found != expected:
        raise ConfigError(
            f"model.num_classes={expected} but data.source={cfg['data']['source']!r} has {found} classes; "
            f"set model.num_classes={found}."
        )


def train_from_config(config, overrides=()):
    """Trains a classification recipe and evaluates its best model.

    Args:
        config: path of a recipe YAML, or a dict.
        overrides: `"dotted.key=value"` strings (values parsed as YAML).

    Returns:
        The validation metrics of the best model (also in metrics.json).
    """
    cfg = load_config(config, overrides)
    if cfg["task"] == "segmentation":
        from keras_resnet.training.segmentation import train_segmentation

        return train_segmentation(cfg)
    if cfg["task"] == "detection":
        from keras_resnet.training.detection import train_detection

        return train_detection(cfg)
    train_cfg = cfg["train"]
    strategy = make_strategy(train_cfg["strategy"])
    keras.utils.set_random_seed(train_cfg["seed"])
    keras.mixed_precision.set_global_policy(resolve_precision(train_cfg["mixed_precision"]))
    multi_worker = train_cfg["strategy"] == "multi_worker"
    _, _, is_chief = _task_info() if multi_worker else (None, 0, True)
    output_dir = cfg["output_dir"] if is_chief else tempfile.mkdtemp(prefix="keras_resnet_worker_out_")
    prepare_output_dir(output_dir)
    paths = _run_paths(output_dir)

    train_ds, val_ds, info = build_classification_datasets(cfg, seed=train_cfg["seed"])
    _check_classes(cfg, info)
    num_classes = cfg["model"]["num_classes"]
    steps_per_epoch = train_cfg["steps_per_epoch"] or info["num_train"] // cfg["data"]["batch_size"]
    print(
        f"{cfg['model']['backbone']} on {cfg['data']['source']}: {info['num_train']} train / {info['num_val']} val "
        f"images, batch {cfg['data']['batch_size']} over {strategy.num_replicas_in_sync} replica(s), "
        f"policy {keras.mixed_precision.dtype_policy().name}, output {output_dir}"
    )
    with strategy.scope():
        model = build_classifier(cfg, info)
    if is_chief:
        dump_config(cfg, os.path.join(output_dir, "recipe.yaml"))
        _write_json(os.path.join(output_dir, "run.json"), {
            "task": "classification",
            "preset": cfg["model"]["backbone"],
            "input_shape": list(cfg["model"]["input_shape"]),
            "num_classes": num_classes,
            "class_names": info["class_names"],
            "preprocessing": {"mean": info["mean"], "std": info["std"], "input_range": [0, 255]},
            "num_train": info["num_train"],
            "num_val": info["num_val"],
        })
    start = time.time()
    if multi_worker:
        _fit_custom_loop(model, cfg, strategy, _one_hot(train_ds, num_classes), val_ds, steps_per_epoch, paths, is_chief)
    else:
        with strategy.scope():
            _fit(model, cfg, _one_hot(train_ds, num_classes), _one_hot(val_ds, num_classes), steps_per_epoch, paths)
    train_seconds = time.time() - start
    if not is_chief:
        shutil.rmtree(output_dir, ignore_errors=True)
        return None
    best_model = keras.saving.load_model(paths["best"], compile=False)
    metrics = evaluate_model(best_model, val_ds, info["class_names"], output_dir)
    metrics.update(run_summary(paths, steps_per_epoch, cfg["data"]["batch_size"], train_seconds))
    _write_json(os.path.join(output_dir, "metrics.json"), metrics)
    print(
        f"done: {cfg['model']['backbone']} top1={metrics['top1']:.4f} top5={metrics['top5']:.4f} "
        f"on {metrics['num_examples']} val images, {metrics['epochs']} epochs, {train_seconds / 60:.1f} min "
        f"-> {output_dir}"
    )
    return metrics


def trained_model_path(cfg):
    """The best model of a recipe's output_dir; a ConfigError when there is none."""
    model_path = os.path.join(cfg["output_dir"], "best_model.keras")
    if not os.path.exists(model_path):
        raise ConfigError(
            f"no trained model at {model_path}; run `keras-resnet train` with this recipe first "
            "(or --set output_dir=... to point at a run)."
        )
    return model_path


def evaluate_from_config(config, overrides=()):
    """Evaluates the best model of a recipe's output_dir on its validation set."""
    cfg = load_config(config, overrides)
    if cfg["task"] == "segmentation":
        from keras_resnet.training.segmentation import evaluate_segmentation

        return evaluate_segmentation(cfg)
    if cfg["task"] == "detection":
        from keras_resnet.training.detection import evaluate_detection

        return evaluate_detection(cfg)
    model_path = trained_model_path(cfg)
    _, val_ds, info = build_classification_datasets(cfg, seed=cfg["train"]["seed"])
    _check_classes(cfg, info)
    model = keras.saving.load_model(model_path, compile=False)
    metrics = evaluate_model(model, val_ds, info["class_names"], cfg["output_dir"])
    print(
        f"evaluate: {model_path} top1={metrics['top1']:.4f} top5={metrics['top5']:.4f} "
        f"loss={metrics['loss']:.4f} on {metrics['num_examples']} val images"
    )
    return metrics
