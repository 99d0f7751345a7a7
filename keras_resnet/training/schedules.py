"""Learning-rate schedules: linear warm-up + cosine decay, one-cycle, constant."""

import math

import keras
from keras import ops

from keras_resnet_settings.errors import ConfigError


@keras.saving.register_keras_serializable(package="keras_resnet")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up, then cosine decay, a one-cycle shape, or a constant.

    - "cosine": 0 -> `learning_rate` over `warmup_steps`, then a cosine to
      `learning_rate * final_fraction` at `total_steps`.
    - "onecycle": Smith's one-cycle with cosine annealing: from
      `learning_rate / 25` up to `learning_rate` over `warmup_steps` (30% of
      training when 0), then down to `learning_rate / 1e4`.
    - "constant": warm-up, then flat.

    Args:
        learning_rate: peak learning rate.
        total_steps: optimizer steps of the whole run.
        warmup_steps: steps of the warm-up phase.
        schedule: "cosine", "onecycle" or "constant".
        final_fraction: end value of the cosine as a fraction of the peak.
    """

    def __init__(self, learning_rate, total_steps, warmup_steps=0, schedule="cosine", final_fraction=0.0):
        if schedule not in ("cosine", "onecycle", "constant"):
            raise ConfigError(f"schedule={schedule!r}; allowed: 'cosine', 'onecycle', 'constant'.")
        self.learning_rate = float(learning_rate)
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = int(warmup_steps)
        if schedule == "onecycle" and self.warmup_steps == 0:
            self.warmup_steps = int(0.3 * self.total_steps)
        self.schedule = schedule
        self.final_fraction = float(final_fraction)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        peak = self.learning_rate
        warmup = float(max(self.warmup_steps, 1))
        decay_steps = float(max(self.total_steps - self.warmup_steps, 1))
        progress = ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = 0.5 * (1.0 + ops.cos(math.pi * progress))
        if self.schedule == "onecycle":
            start, end = peak / 25.0, peak / 1e4
            rising = start + (peak - start) * 0.5 * (1.0 - ops.cos(math.pi * ops.minimum(step / warmup, 1.0)))
            falling = end + (peak - end) * cosine
            return ops.where(step < self.warmup_steps, rising, falling)
        if self.schedule == "cosine":
            after = peak * (self.final_fraction + (1.0 - self.final_fraction) * cosine)
        else:
            after = ops.convert_to_tensor(peak, "float32")
        if self.warmup_steps == 0:
            return after
        return ops.where(step < self.warmup_steps, peak * (step + 1.0) / warmup, after)

    def get_config(self):
        return {
            "learning_rate": self.learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "schedule": self.schedule,
            "final_fraction": self.final_fraction,
        }
