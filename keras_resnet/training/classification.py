"""Training and evaluation of classification recipes (`task: classification`).

`train_classification` runs a recipe end to end (data
pipelines, the distribution strategy, mixed precision, the model, optionally
initialised from a keras.applications `.h5` or a `.keras` file, with frozen
stages and a two-phase head-then-fine-tune schedule, the optimizer and
schedule) and writes the run directory:

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

import os
import shutil
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from keras_resnet.atomic_files import atomic_output, write_json
from keras_resnet.data.classification import build_classification_datasets
from keras_resnet.models.resnet.classifier import ResNetClassifier
from keras_resnet.training import (
    devices,
    fit,
    optimizers,
    preflight,
    run_files,
    time_budget,
)
from keras_resnet.training.backbones import build_model_from_config, preprocessing_info
from keras_resnet.training.checkpoints import save_model
from keras_resnet.training.divergence import check_finite_loss
from keras_resnet.training.plots import (
    CLASSIFICATION_PANELS,
    plot_confusion_matrix,
    plot_history,
    read_history_csv,
)
from keras_resnet.training.run_lock import trim_history
from keras_resnet_settings.errors import ConfigError, DataError


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------
def build_classifier(cfg, info):
    """The recipe's `ResNetClassifier`, taking raw pixels 0..255.

    Normalisation by the training set's per-channel mean/std is a layer
    inside the model.
    """
    return build_model_from_config(cfg, info, ResNetClassifier, "classifier", dropout=cfg.model.dropout)


def classification_metrics():
    return [
        keras.metrics.CategoricalAccuracy(name="top1"),
        keras.metrics.TopKCategoricalAccuracy(k=5, name="top5"),
    ]


def _one_hot(dataset, num_classes):
    return dataset.map(lambda x, y: (x, tf.one_hot(y, num_classes)), num_parallel_calls=tf.data.AUTOTUNE)


def _datasets(cfg):
    return build_classification_datasets(cfg, seed=cfg.train.seed)


# ----------------------------------------------------------------------------
# Fit (single process: one device or MirroredStrategy): head phase, then fine-tuning
# ----------------------------------------------------------------------------
def _compile(model, train_cfg, optimizer):
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=train_cfg.label_smoothing),
        metrics=classification_metrics(),
        jit_compile=train_cfg.jit_compile,
    )


def _fit(model, cfg, train_ds, val_ds, steps_per_epoch, paths, extra_callbacks=()):
    """`fit.fit_in_phases` with the classifier's loss and metrics (`extra_callbacks`: the last phase's)."""
    fit.fit_in_phases(model, cfg, train_ds, val_ds, paths,
                      compile_model=lambda target, optimizer: _compile(target, cfg.train, optimizer),
                      steps_per_epoch=steps_per_epoch, main_callbacks=extra_callbacks, monitor="val_top1",
                      title=cfg.model.backbone, panels=CLASSIFICATION_PANELS, best_key="top1")


# ----------------------------------------------------------------------------
# Custom loop (MultiWorkerMirroredStrategy)
# ----------------------------------------------------------------------------
def _fit_custom_loop(model, cfg, strategy, train_ds, val_ds, steps_per_epoch, paths, is_chief):
    """A distributed custom training loop with checkpoint resume.

    Used for MultiWorkerMirroredStrategy. Every worker runs the same steps;
    only the chief writes models, history and plots (the others checkpoint
    into a temporary folder, as tf.distribute requires).
    """
    train_cfg = cfg.train
    if train_cfg.ema_momentum:
        raise ConfigError("train.ema_momentum is not supported with train.strategy=multi_worker; set it to null")
    num_classes = cfg.model.num_classes
    global_batch = cfg.data.batch_size
    epochs = train_cfg.epochs
    steps_per_epoch = train_cfg.steps_per_epoch or steps_per_epoch
    with strategy.scope():
        optimizer = optimizers.make_optimizer(train_cfg, steps_per_epoch, epochs)
        if keras.mixed_precision.dtype_policy().name == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        loss_fn = keras.losses.CategoricalCrossentropy(
            label_smoothing=train_cfg.label_smoothing, reduction=None
        )
        train_loss = keras.metrics.Mean(name="loss")
        train_top1 = keras.metrics.CategoricalAccuracy(name="top1")
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        optimizer.build(model.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_var)
    backup_dir = paths.backup_root if is_chief else tempfile.mkdtemp(prefix="keras_resnet_worker_")
    manager = tf.train.CheckpointManager(checkpoint, backup_dir, max_to_keep=1)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint)
        print(f"resuming from {manager.latest_checkpoint}: epoch {int(epoch_var.numpy()) + 1}")
    if is_chief:
        trim_history(paths.history, int(epoch_var.numpy()))  # epochs trained again leave history.csv

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
    writer = tf.summary.create_file_writer(os.path.join(paths.logs, "train")) if is_chief else None
    best = (fit.previous_best(paths.history, "val_top1") if os.path.exists(paths.best) else None) or -1.0
    chunk = max(1, min(steps_per_epoch, 50))
    for epoch in range(int(epoch_var.numpy()), epochs):
        start = time.time()
        train_loss.reset_state()
        train_top1.reset_state()
        progress = keras.utils.Progbar(steps_per_epoch, stateful_metrics=["loss", "top1"],
                                       verbose=fit.fit_verbosity() if is_chief else 0)
        done = 0
        while done < steps_per_epoch:
            steps = min(chunk, steps_per_epoch - done)
            train_steps(iterator, tf.constant(steps))
            done += steps
            loss = float(train_loss.result())
            check_finite_loss(loss, epoch + 1, done, train_cfg.learning_rate)  # before anything is saved
            progress.update(done, [("loss", loss), ("top1", float(train_top1.result()))])
        val_metrics = _evaluate_predictions(val_model_fn, val_ds, num_classes, label_smoothing=train_cfg.label_smoothing)
        val_loss = val_metrics.get("loss_label_smoothed", val_metrics["loss"])  # the training loss's definition
        check_finite_loss(val_loss, epoch + 1, None, train_cfg.learning_rate, what="validation loss")
        row = {
            "epoch": epoch,
            "loss": float(train_loss.result()),
            "top1": float(train_top1.result()),
            "learning_rate": float(keras.ops.convert_to_numpy(optimizer.learning_rate)),
            "val_loss": val_loss,
            "val_top1": val_metrics["top1"],
            "val_top5": val_metrics["top5"],
        }
        epoch_var.assign(epoch + 1)
        manager.save()
        if is_chief:
            print(f"epoch {epoch + 1}/{epochs} ({time.time() - start:.1f}s): "
                  + ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch"))
            _append_history_row(paths.history, row)
            with writer.as_default(step=epoch):
                for key, value in row.items():
                    if key != "epoch":
                        tf.summary.scalar(key, value)
            save_model(model, paths.last)
            if row["val_top1"] > best:
                best = row["val_top1"]
                save_model(model, paths.best)
            plot_history(read_history_csv(paths.history), paths.curves, cfg.model.backbone)
    if is_chief:
        shutil.rmtree(paths.backup_root, ignore_errors=True)
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
def _evaluate_predictions(predict_fn, dataset, num_classes, return_confusion=False, label_smoothing=0.0):
    """Top-1/top-5/loss (and the confusion matrix) of `predict_fn` on `dataset`.

    `dataset` yields `(images, integer labels)`. `loss` is the cross-entropy
    with the true labels; with `label_smoothing` > 0, `loss_label_smoothed`
    is the cross-entropy with smoothed targets (Keras'
    `CategoricalCrossentropy(label_smoothing=...)`: what training reports as
    `loss` and `val_loss`).
    """
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    correct1 = correct5 = total = 0
    loss_sum = smoothed_sum = 0.0
    for images, labels in dataset:
        probabilities = np.asarray(predict_fn(images), dtype=np.float64)
        labels = labels.numpy().astype(np.int64)
        top5 = np.argsort(-probabilities, axis=1)[:, :5]
        predicted = top5[:, 0]
        correct1 += int((predicted == labels).sum())
        correct5 += int((top5 == labels[:, None]).any(axis=1).sum())
        log_probabilities = np.log(np.clip(probabilities, 1e-7, 1.0))
        true_class = -log_probabilities[np.arange(len(labels)), labels]
        loss_sum += float(true_class.sum())
        smoothed_sum += float(((1.0 - label_smoothing) * true_class
                               - label_smoothing / num_classes * log_probabilities.sum(axis=1)).sum())
        total += len(labels)
        np.add.at(confusion, (labels, predicted), 1)
    if total == 0:
        raise DataError("the validation set is empty; check data.val / data.limit_val")
    metrics = {"top1": correct1 / total, "top5": correct5 / total, "loss": loss_sum / total, "num_examples": total}
    if label_smoothing:
        metrics["loss_label_smoothed"] = smoothed_sum / total
    return (metrics, confusion) if return_confusion else metrics


def evaluate_classifier(model, val_ds, class_names, output_dir, label_smoothing=0.0):
    """Evaluates `model` on `val_ds`; writes metrics.json and confusion_matrix.png.

    `label_smoothing` (the recipe's) adds `loss_label_smoothed`, comparable with training's `val_loss`.
    """
    predict = tf.function(lambda images: model(images, training=False))
    metrics, confusion = _evaluate_predictions(predict, val_ds, len(class_names), return_confusion=True,
                                               label_smoothing=label_smoothing)
    metrics["per_class_accuracy"] = {
        name: float(confusion[i, i] / max(confusion[i].sum(), 1)) for i, name in enumerate(class_names)
    }
    write_json(os.path.join(output_dir, "metrics.json"), metrics)
    with atomic_output(os.path.join(output_dir, "confusion_matrix.csv")) as temporary:
        np.savetxt(temporary, confusion, fmt="%d", delimiter=",")
    plot_confusion_matrix(confusion, class_names, os.path.join(output_dir, "confusion_matrix.png"))
    return metrics


# ----------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------
def train_classification(cfg):
    """Trains a `task: classification` recipe (a `load_config` dict) and evaluates its best model.

    Returns its validation metrics (also in metrics.json) with `run_summary`'s epochs and speed;
    None in a multi-worker process that is not the chief.
    """
    run_started = time.time()
    train_cfg, data_cfg, model_cfg = cfg.train, cfg.data, cfg.model
    time_budget.check_budget_settings(cfg)
    strategy, paths, is_chief = devices.start_run(cfg)
    output_dir = paths.root

    train_ds, val_ds, info = _datasets(cfg)
    preflight.check_num_classes(cfg, info)
    num_classes = model_cfg.num_classes
    steps_per_epoch = preflight.announce_run(cfg, info, strategy, paths, model_cfg.backbone)
    with strategy.scope():
        model = build_classifier(cfg, info)
    if is_chief:
        run_files.write_run_files(cfg, paths, {
            "task": "classification",
            "preset": model_cfg.backbone,
            "input_shape": list(model_cfg.input_shape),
            "num_classes": num_classes,
            "class_names": info["class_names"],
            "preprocessing": preprocessing_info(info),
            "num_train": info["num_train"],
            "num_val": info["num_val"],
        }, info)
    start = time.time()
    plan, fit_steps = None, steps_per_epoch
    if train_cfg.strategy == "multi_worker":
        _fit_custom_loop(model, cfg, strategy, _one_hot(train_ds, num_classes), val_ds, steps_per_epoch, paths, is_chief)
    else:
        with strategy.scope():
            train_onehot, val_onehot = _one_hot(train_ds, num_classes), _one_hot(val_ds, num_classes)
            fit_cfg, plan, budget_callbacks = time_budget.plan_epochs(
                cfg, model,
                lambda probe: _compile(probe, train_cfg,
                                       optimizers.make_optimizer(train_cfg, steps_per_epoch, train_cfg.epochs)),
                train_onehot, val_onehot, steps_per_epoch, paths.backup_root, run_started,
            )
            fit_steps = fit_cfg.train.steps_per_epoch or steps_per_epoch
            _fit(model, fit_cfg, train_onehot, val_onehot, fit_steps, paths, extra_callbacks=budget_callbacks)
    train_seconds = time.time() - start
    if not is_chief:
        shutil.rmtree(output_dir, ignore_errors=True)
        return None
    metrics = run_files.finish_run(
        paths, lambda best: evaluate_classifier(best, val_ds, info["class_names"], output_dir,
                                                train_cfg.label_smoothing),
        fit_steps, data_cfg.batch_size, train_seconds,
        extra={"time_budget": plan} if plan else None,
    )
    print(
        f"done: {model_cfg.backbone} top1={metrics['top1']:.4f} top5={metrics['top5']:.4f} "
        f"on {metrics['num_examples']} val images, {metrics['epochs']} epochs, {train_seconds / 60:.1f} min "
        f"-> {output_dir}"
    )
    return metrics


def evaluate_classification(cfg):
    """Evaluates the best model of a classification recipe's output_dir on its validation set.

    Rewrites metrics.json (keeping the training summary: epochs, speed, time budget),
    confusion_matrix.csv and confusion_matrix.png, and returns the metrics.
    """
    model_path, model, val_ds, info = run_files.load_trained_run(cfg, _datasets)
    metrics = run_files.keep_run_summary(cfg.output_dir, lambda: evaluate_classifier(
        model, val_ds, info["class_names"], cfg.output_dir, cfg.train.label_smoothing))
    smoothed = (f"; with the recipe's label_smoothing={cfg.train.label_smoothing:g}, as in training's "
                f"val_loss: {metrics['loss_label_smoothed']:.4f}" if "loss_label_smoothed" in metrics else "")
    print(
        f"evaluate: {model_path} top1={metrics['top1']:.4f} top5={metrics['top5']:.4f} "
        f"loss={metrics['loss']:.4f} (cross-entropy with the true labels{smoothed}) "
        f"on {metrics['num_examples']} val images"
    )
    return metrics
