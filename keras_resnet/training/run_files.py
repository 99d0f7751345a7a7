"""What a run leaves beside its models: recipe.yaml and run.json (`write_run_files`), the training summary
in metrics.json (`run_summary`, `finish_run`, `keep_run_summary`), and `load_trained_run` for evaluate.
"""

import os
import shutil

from keras_resnet.atomic_files import atomic_output, read_json, write_json
from keras_resnet.config import dump_config
from keras_resnet.data.images import BIT_DEPTH_KEY
from keras_resnet.runs import (
    RunPaths,
    load_keras_model,
    trained_model_path,
)
from keras_resnet.training.plots import (
    read_history_csv,
)
from keras_resnet.training.preflight import check_num_classes


# ----------------------------------------------------------------------------
# Run files, summary, evaluation of the trained model
# ----------------------------------------------------------------------------
def write_run_files(cfg, paths, run_info, data_info=None):
    """Writes the resolved recipe (recipe.yaml) and `run_info` (run.json) into the run folder.

    A validation split held out of data.train (`data.val_split`) is recorded
    in run.json from the data's `info`: fraction, seed and the validation files.
    """
    if data_info is not None and data_info.get("val_split") is not None:
        run_info = {**run_info, "val_split": data_info["val_split"]}
    if data_info is not None and data_info.get(BIT_DEPTH_KEY) is not None:  # 16-bit images: the one scale
        run_info = {**run_info, BIT_DEPTH_KEY: data_info[BIT_DEPTH_KEY]}
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
    best_model = load_keras_model(paths.best)
    metrics = evaluate(best_model)
    metrics.update(run_summary(paths, steps_per_epoch, batch_size, train_seconds))
    metrics.update(extra or {})
    write_json(paths.metrics, metrics)
    return metrics


def finished_text(metrics, train_seconds, output_dir) -> str:
    """The end of `train`'s closing "done: ..." line, after the task's metrics: what was validated, how long, where."""
    epochs = metrics["epochs"]
    return (f"on {metrics['num_examples']} val images, {epochs} epoch{'s' if epochs != 1 else ''}, "
            f"{train_seconds / 60:.1f} min -> {output_dir}")


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
    return model_path, load_keras_model(model_path), val_ds, info
