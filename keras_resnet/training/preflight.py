"""What the task modules share before training: recipe checks, the run's announcement, epoch sizes.

The rest of a run is in `devices` (strategy, precision, `start_run`), `optimizers`, `fit` (`fit_run`) and
`run_files`; the run folder's file names are in `keras_resnet.runs`.
"""


import keras

from keras_resnet_settings.errors import ConfigError


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


def check_task_settings(cfg, neutral_values, message):
    """ConfigError for recipe settings that a task's training does not implement.

    Args:
        cfg: the recipe.
        neutral_values: `{(section, key): value}` of keys the task ignores; any
            other value is an error.
        message: the error after `section.key=value`, formatted with `key`
            (dotted), `neutral` ("null" for None).
    """
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
    replicas = strategy.num_replicas_in_sync  # data.batch_size is the global batch, split over the replicas
    per_replica = f" ({data_cfg.batch_size / replicas:g} per replica)" if replicas > 1 else ""
    print(
        f"{model_name} on {data_cfg.source}: {counts}"
        f"{details}, batch {data_cfg.batch_size} over {replicas} replica(s){per_replica}, "
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


