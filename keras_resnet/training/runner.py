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
from keras_resnet.training.devices import is_chief_process
from keras_resnet.training.run_lock import guard_run
from keras_resnet.training.segmentation import evaluate_segmentation, train_segmentation
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
    recipe (a higher `train.epochs` allowed); `restart=True` moves it to
    `output_dir/previous/` and starts over.

    Args:
        config: path of a recipe YAML, or a dict.
        overrides: `"dotted.key=value"` strings (values parsed as YAML).
        restart: start over instead of resuming an unfinished run.

    Returns:
        The validation metrics of the best model (also in metrics.json).
    """
    cfg = load_config(config, overrides)
    with guard_run(cfg, RunPaths.of(cfg.output_dir), is_chief=is_chief_process(cfg), restart=restart):
        return TRAIN_BY_TASK[cfg.task](cfg)


def evaluate_from_config(config, overrides=()):
    """Evaluates the best model of a recipe's output_dir on its validation set."""
    cfg = load_config(config, overrides)
    return EVALUATE_BY_TASK[cfg.task](cfg)
