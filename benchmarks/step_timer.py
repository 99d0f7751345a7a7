"""Timing of training steps inside one `fit` call, shared by the throughput benchmarks.

`fit` has its own start-up cost (iterator, callbacks, about 0.8 s per call on a
2-core VM); a round of 5-10 steps timed around `fit` mostly measures that.
`timed_fit` times from the end of the first batch to the end of the last one.
"""

import time

import keras


class StepTimer(keras.callbacks.Callback):
    """Wall and process CPU time (all threads) from the end of the first batch to the end of the last."""

    def __init__(self):
        super().__init__()
        self.marks = []

    def on_train_batch_end(self, batch, logs=None):
        self.marks.append((time.perf_counter(), time.process_time()))

    def elapsed(self):
        (wall_first, cpu_first), (wall_last, cpu_last) = self.marks[0], self.marks[-1]
        return wall_last - wall_first, cpu_last - cpu_first


def timed_fit(model, dataset, steps, batch):
    """Runs `steps` training steps; returns (images/s, CPU ms per step) over the last `steps - 1`."""
    if steps < 2:
        raise ValueError("--steps must be at least 2: the first step of a round is not timed")
    timer = StepTimer()
    model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[timer])
    seconds, cpu_seconds = timer.elapsed()
    return (steps - 1) * batch / seconds, cpu_seconds / (steps - 1) * 1000
