"""Quantization-aware fine-tuning of a finished run: `keras-resnet qat RUN_DIR`.

`qat_config(run_dir, ...)` turns the run's own recipe (`recipe.yaml`) into the
recipe of a QAT run in `RUN_DIR/qat/`: same data, task, loss and
augmentation; `qat.source_run` set, fewer epochs at a lower learning rate,
float32, no warm-up, no pretrained-weight or freezing steps. Training that
recipe is an ordinary run (best/last model, history, plots, metrics.json,
TensorBoard, resume after a kill): the only difference is the model, which
`quantize_aware_from_run` makes from the source run's best model with
`keras_resnet.quantization.quantize_aware` instead of building a fresh one.
"""

import math
from pathlib import Path

from keras_resnet.config import load_config
from keras_resnet.quantization import quantize_aware
from keras_resnet.runs import (
    BEST_MODEL_FILE,
    METRICS_FILE,
    RUN_RECIPE_FILE,
    load_keras_model,
    read_run_info,
)
from keras_resnet_settings.errors import ConfigError
from keras_resnet_settings.loading import QAT_DIR

LEARNING_RATE_FACTOR = 0.1  # default QAT learning rate: the recipe's times this
EPOCHS_FRACTION = 0.1  # default QAT epochs: the recipe's times this, at least 1


def check_finished_run(run_dir) -> Path:
    """`run_dir` as a Path; a ConfigError naming what is missing when it is not a finished float run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a folder; pass the output_dir of a finished `keras-resnet train` run.")
    missing = [name for name in (RUN_RECIPE_FILE, BEST_MODEL_FILE, METRICS_FILE) if not (run_dir / name).is_file()]
    if missing:
        raise ConfigError(
            f"{run_dir} is not a finished run: {', '.join(missing)} missing; finish it with `keras-resnet train "
            f"{run_dir / RUN_RECIPE_FILE}` (or pass the run's output_dir)."
        )
    return run_dir


def qat_config(run_dir, epochs=None, learning_rate=None, overrides=()):
    """The recipe of the QAT run of finished run `run_dir` (a `load_config` dict).

    Args:
        run_dir: a finished float run (best_model.keras, metrics.json, recipe.yaml).
        epochs: QAT epochs; default 10 % of the recipe's, at least 1.
        learning_rate: default the recipe's times 0.1.
        overrides: further `"dotted.key=value"` strings, applied last.
    """
    run_dir = check_finished_run(run_dir)
    recipe = load_config(run_dir / RUN_RECIPE_FILE)
    if recipe.qat.source_run:
        raise ConfigError(
            f"{run_dir} is already a QAT run (of {recipe.qat.source_run}); export it, or pass the float run."
        )
    epochs = epochs or max(1, math.ceil(recipe.train.epochs * EPOCHS_FRACTION))
    learning_rate = learning_rate or recipe.train.learning_rate * LEARNING_RATE_FACTOR
    return load_config(run_dir / RUN_RECIPE_FILE, [
        f"output_dir={run_dir / QAT_DIR}",
        f"qat.source_run={run_dir}",
        f"train.epochs={int(epochs)}",
        f"train.learning_rate={float(learning_rate)}",
        "train.warmup_epochs=0",
        "train.mixed_precision=false",
        "train.head_epochs=0",
        "train.fine_tune_learning_rate=null",
        "train.time_budget_minutes=null",
        "train.steps_per_epoch=null",
        "model.weights=null",
        "model.freeze_stages=-1",
        *overrides,
    ])


def quantize_aware_from_run(cfg, info, model_class):
    """The quantize-aware copy of `qat.source_run`'s best model (the model of a QAT run).

    Sets `info["preprocessing"]` to the source run's (run.json), which the
    model keeps inside.
    """
    run_dir = check_finished_run(cfg.qat.source_run)
    model = load_keras_model(run_dir / BEST_MODEL_FILE)
    if not isinstance(model, model_class):
        raise ConfigError(
            f"{run_dir / BEST_MODEL_FILE} is a {type(model).__name__}, not the recipe's {model_class.__name__}; "
            f"qat.source_run must be a run of the same task."
        )
    info["preprocessing"] = read_run_info(run_dir).get("preprocessing", info.get("preprocessing"))
    qat = quantize_aware(model, momentum=cfg.qat.momentum)
    print(f"quantization-aware: {run_dir / BEST_MODEL_FILE} with BatchNorm folded and int8 fake quantization "
          f"(weights per channel, activations per tensor, range momentum {cfg.qat.momentum})", flush=True)
    return qat
