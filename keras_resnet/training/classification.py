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
finished epoch. `train.strategy: multi_worker` trains with the same `fit`
on every worker (`keras_resnet.training.devices.MultiWorkerStrategy`); the
chief writes the run folder and evaluates.
"""

import os
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
from keras_resnet.training.plots import (
    CLASSIFICATION_PANELS,
    plot_confusion_matrix,
)
from keras_resnet_settings.errors import DataError


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
# Fit (one device, MirroredStrategy or every worker of MultiWorkerStrategy): head phase, then fine-tuning
# ----------------------------------------------------------------------------
def _compile(model, train_cfg, optimizer):
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=train_cfg.label_smoothing),
        metrics=classification_metrics(),
        jit_compile=train_cfg.jit_compile,
    )


def _fit(model, cfg, train_ds, val_ds, steps_per_epoch, paths, extra_callbacks=(), up_to_epochs=None):
    """`fit.fit_in_phases` with the classifier's loss and metrics (`extra_callbacks`: the last phase's)."""
    fit.fit_in_phases(model, cfg, train_ds, val_ds, paths,
                      compile_model=lambda target, optimizer: _compile(target, cfg.train, optimizer),
                      steps_per_epoch=steps_per_epoch, main_callbacks=extra_callbacks, up_to_epochs=up_to_epochs,
                      monitor="val_top1",
                      title=cfg.model.backbone, panels=CLASSIFICATION_PANELS, best_key="top1")


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
        fallback_model = time_budget.build_fallback_network(cfg, lambda cheaper: build_classifier(cheaper, info))
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
    with strategy.scope():
        train_onehot, val_onehot = _one_hot(train_ds, num_classes), _one_hot(val_ds, num_classes)
        fit_cfg, plan, budget_callbacks = time_budget.plan_epochs(
            cfg, model,
            lambda probe: _compile(probe, train_cfg,
                                   optimizers.make_optimizer(train_cfg, steps_per_epoch, train_cfg.epochs,
                                                             batch_size=cfg.data.batch_size)),
            train_onehot, val_onehot, steps_per_epoch, paths.backup_root, run_started,
            fallback_model=fallback_model,
        )
        if plan and plan.get("fallback"):  # the budget's cheaper network trains instead of the recipe's
            model = fallback_model
        fit_steps = fit_cfg.train.steps_per_epoch or steps_per_epoch
        # A budget's plan may lengthen the run up to the recipe's epochs as it goes (KeepToBudget).
        _fit(model, fit_cfg, train_onehot, val_onehot, fit_steps, paths, extra_callbacks=budget_callbacks,
             up_to_epochs=train_cfg.epochs if budget_callbacks else None)
    train_seconds = time.time() - start
    if devices.leave_run(paths, is_chief):
        return None
    metrics = run_files.finish_run(
        paths, lambda best: evaluate_classifier(best, val_ds, info["class_names"], output_dir,
                                                train_cfg.label_smoothing),
        fit_steps, data_cfg.batch_size, train_seconds,
        extra={"time_budget": plan} if plan else None,
    )
    print(
        f"done: {model_cfg.backbone} top1={metrics['top1']:.4f} top5={metrics['top5']:.4f} "
        + run_files.finished_text(metrics, train_seconds, output_dir)
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
