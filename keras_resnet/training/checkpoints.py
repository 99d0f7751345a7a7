"""Model files of a run written whole or not at all: `save_model` and the `ModelCheckpoint` callback.

Keras' own `ModelCheckpoint` writes `best_model.keras` in place, so a kill or
a full disk during the write leaves a truncated archive at the final path.
Here every save goes to a temporary name in the same folder and is renamed
into place once complete (`keras_resnet.atomic_files.atomic_output`).
"""

from __future__ import annotations

import math

import keras

from keras_resnet.atomic_files import atomic_output


def save_model(model, path) -> None:
    """`model.save(path)` through a temporary `.keras` file renamed into place when complete."""
    with atomic_output(path) as temporary:
        model.save(temporary)


class ModelCheckpoint(keras.callbacks.Callback):
    """Saves the model at each epoch end (`monitor=None`), or when `monitor` (maximised) improves.

    Like `keras.callbacks.ModelCheckpoint(path, monitor, mode="max",
    save_best_only=True)`, with atomic writes. `best` is the best value so far
    (set it to resume); a missing or non-finite `monitor` value never saves.
    """

    def __init__(self, path, monitor: str | None = None, best: float | None = None):
        super().__init__()
        self.path, self.monitor, self.best = path, monitor, best

    def on_epoch_end(self, epoch, logs=None):
        if self.monitor is not None:
            current = (logs or {}).get(self.monitor)
            if current is None or not math.isfinite(float(current)):
                return
            if self.best is not None and not float(current) > self.best:
                return
            self.best = float(current)
        save_model(self.model, self.path)


__all__ = ["ModelCheckpoint", "save_model"]
