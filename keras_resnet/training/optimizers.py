"""The optimizer of a run: SGD or AdamW over a `WarmupSchedule`, optionally with weight averaging (EMA).
"""


import keras

from keras_resnet.training.schedules import WarmupSchedule


# ----------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------
def learning_rate_scale(train_cfg, batch_size):
    """The linear scaling rule's factor: `batch_size / train.learning_rate_batch_size`, 1.0 when that is null.

    Goyal et al. 2017 ("Accurate, Large Minibatch SGD"): k times the global
    batch, k times the learning rate, with a warm-up. `batch_size` is the
    global batch (`data.batch_size`, split over all replicas of all workers).

    Example:
    >>> from keras_resnet_settings.recipe import TrainSettings
    >>> learning_rate_scale(TrainSettings(learning_rate_batch_size=128), 512)
    4.0
    """
    if not train_cfg.learning_rate_batch_size or batch_size is None:
        return 1.0
    return batch_size / train_cfg.learning_rate_batch_size


def make_schedule(train_cfg, steps_per_epoch, epochs, learning_rate=None, warmup=True, batch_size=None):
    """The `WarmupSchedule` of a run of `epochs` epochs (`make_optimizer`'s; arguments as there).

    The warm-up lasts `train.warmup_epochs` (none with `warmup=False`); the
    peak is `learning_rate` (else `train.learning_rate`) scaled by
    `learning_rate_scale(train_cfg, batch_size)`.
    """
    learning_rate = (learning_rate or train_cfg.learning_rate) * learning_rate_scale(train_cfg, batch_size)
    return WarmupSchedule(
        learning_rate,
        total_steps=steps_per_epoch * epochs,
        warmup_steps=int(train_cfg.warmup_epochs * steps_per_epoch) if warmup else 0,
        schedule=train_cfg.schedule,
    )


def make_optimizer(train_cfg, steps_per_epoch, epochs, learning_rate=None, warmup=True, batch_size=None):
    """SGD (momentum, Nesterov) or AdamW with a warm-up schedule.

    Weight decay skips BatchNorm parameters and biases. With
    `train.ema_momentum` set, the optimizer also keeps an exponential moving
    average of the weights (Keras' `use_ema`); `fit_run` then validates and
    checkpoints the averaged weights. The learning rate (`learning_rate`, else
    `train.learning_rate`) is scaled by `learning_rate_scale(train_cfg, batch_size)`.
    """
    schedule = make_schedule(train_cfg, steps_per_epoch, epochs, learning_rate, warmup, batch_size)
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
