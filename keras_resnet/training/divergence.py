"""Stop a run at the first NaN or infinite training loss, before anything is saved.

`StopOnNonFinite` (a Keras callback) and `check_finite_loss` (the custom
loop's check) raise a `TrainingDivergedError` naming the epoch, the step and
the learning rate to lower.
"""

import math

import keras

from keras_resnet_settings.errors import TrainingDivergedError


# ----------------------------------------------------------------------------
# NaN / inf stop
# ----------------------------------------------------------------------------
def check_finite_loss(loss, epoch, step, learning_rate, what="loss"):
    """TrainingDivergedError when `loss` is NaN or infinite (`epoch`, `step` counted from 1)."""
    loss = float(loss)
    if math.isfinite(loss):
        return
    where = f"epoch {epoch} step {step}" if step is not None else f"epoch {epoch}"
    raise TrainingDivergedError(
        f"{what} became {'NaN' if math.isnan(loss) else 'inf'} at {where}; lower train.learning_rate "
        f"(now {learning_rate:g}) or raise train.warmup_epochs, then train again with --restart "
        "(best_model.keras and last_model.keras keep the last finite epoch)"
    )


class StopOnNonFinite(keras.callbacks.Callback):
    """Raises `TrainingDivergedError` at the first non-finite training loss or validation loss.

    Put it before the checkpoint and log callbacks: an epoch that diverged
    reaches none of them, so best/last models and history keep the last finite epoch.
    """

    def __init__(self, learning_rate):
        super().__init__()
        self.learning_rate = learning_rate
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if logs and "loss" in logs:
            check_finite_loss(logs["loss"], self.epoch + 1, batch + 1, self.learning_rate)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        for key in ("loss", "val_loss"):
            if key in logs:
                check_finite_loss(logs[key], epoch + 1, None, self.learning_rate,
                                  what="validation loss" if key == "val_loss" else "loss")
