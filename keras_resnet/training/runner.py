"""Training and evaluation of any task recipe: `train_from_config` / `evaluate_from_config`.

Each loads the recipe and hands it to its task's module (`classification`,
`segmentation`, `detection`), picked by the recipe's `task`
(`keras_resnet_settings.registry`). This is the only module that imports the task modules.
"""

from keras_resnet.config import load_config
from keras_resnet.runs import RunPaths
from keras_resnet.training.classification import (
    evaluate_classification,
    train_classification,
)
from keras_resnet.training.detection import evaluate_detection, train_detection
from keras_resnet.training.devices import is_chief_process, lost_worker
from keras_resnet.training.run_lock import guard_run
from keras_resnet.training.segmentation import evaluate_segmentation, train_segmentation
from keras_resnet_settings.errors import WorkerLostError
from keras_resnet_settings.registry import CLASSIFICATION, DETECTION, SEGMENTATION

TRAIN_BY_TASK = {
    CLASSIFICATION: train_classification,
    SEGMENTATION: train_segmentation,
    DETECTION: train_detection,
}
EVALUATE_BY_TASK = {
    CLASSIFICATION: evaluate_classification,
    SEGMENTATION: evaluate_segmentation,
    DETECTION: evaluate_detection,
}


def train_from_config(config, overrides=(), restart=False):
    """Trains a recipe and evaluates its best model.

    The run folder is locked while it trains (a second `train` into it is a
    `RunFolderError`). An unfinished run there continues only with its own
    recipe (a higher `train.epochs` allowed). A finished run of the same
    recipe is not trained again (its metrics are returned); a finished run
    of another recipe is a `RunFolderError` naming the keys that differ.
    `restart=True` moves an earlier run to `output_dir/previous/` and starts over.

    Args:
        config: path of a recipe YAML, or a dict.
        overrides: `"dotted.key=value"` strings (values parsed as YAML).
        restart: start over instead of resuming an unfinished run.

    Returns:
        The validation metrics of the best model (also in metrics.json); None
        in a multi-worker run's non-chief worker.

    Raises:
        WorkerLostError: a multi-worker run lost a peer; its `restarts` is the
            recipe's `train.worker_restarts` (the command line restarts the
            worker that many times, `keras_resnet.training.devices.rejoin_cluster`).
    """
    cfg = load_config(config, overrides)
    paths = RunPaths.of(cfg.output_dir)
    with guard_run(cfg, paths, is_chief=is_chief_process(cfg), restart=restart) as finished:
        if finished is not None:
            print(f"{paths.root} holds a finished run of this recipe: nothing to train. Best model "
                  f"{paths.best}, metrics {paths.metrics} ({describe_metrics(finished)}). `--restart` trains it "
                  "again (the finished run moves to previous/).")
            return finished
        try:
            return TRAIN_BY_TASK[cfg.task](cfg)
        except Exception as error:  # a collective that lost its peer fails with one of several TensorFlow errors
            lost = error if isinstance(error, WorkerLostError) else (
                lost_worker(error) if cfg.train.strategy == "multi_worker" else None)
            if lost is None:
                raise
            lost.restarts = cfg.train.worker_restarts
            raise lost from None


def describe_metrics(metrics):
    """The headline numbers of a metrics.json, e.g. "top1 0.9312, loss 0.2210"."""
    shown = [f"{key} {value:.4g}" for key, value in metrics.items()
             if isinstance(value, float) and not key.endswith(("seconds", "per_second", "_session"))]
    return ", ".join(shown[:4]) or "no figures"


def evaluate_from_config(config, overrides=()):
    """Evaluates the best model of a recipe's output_dir on its validation set."""
    cfg = load_config(config, overrides)
    return EVALUATE_BY_TASK[cfg.task](cfg)
