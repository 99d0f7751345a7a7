"""A time budget for a training run: the epochs that fit, measured on this machine first.

With `train.time_budget_minutes` set, `plan_epochs` times a few training and
validation steps of a throwaway copy of the model (same architecture, dtype
policy, loss and input pipeline) before training starts, estimates one
epoch, and chooses the epochs (at most `train.epochs`) and steps per epoch
that fill what is left of the budget (`choose_run_length`). The learning-rate schedule is then laid out
over the chosen epochs (the warm-up shrinks in proportion), so a short run
is a complete run, not the first part of a long one. The plan is printed up
front and kept in the run's backup folder: a resumed run follows it instead
of measuring again.

The budget covers the `train` command: data loading, the measurement, the
epochs and the final evaluation of the best model; not installation or exports.
"""

import json
import math
import os
import time

import keras

from keras_resnet.atomic_files import read_json, write_json
from keras_resnet.training import optimizers
from keras_resnet_settings.errors import ConfigError

PLAN_FILE = "time_budget.json"
# Per epoch beyond the steps: best/last .keras saves, the backup, history.csv and the plot.
EPOCH_OVERHEAD_SECONDS = 4.0
# Epoch estimates are multiplied by this before fitting them into the budget (noisy machines).
SAFETY_FACTOR = 1.1
# The final evaluation beyond its validation pass: loading best_model.keras, tracing its predict function, the
# confusion matrix and its plot (9-19 s measured after the main job's training, BENCHMARKS.md, issue 31).
FINAL_EVALUATION_OVERHEAD_SECONDS = 15.0
WARMUP_STEPS = 3
TIMED_STEPS = 10


class _BatchClock(keras.callbacks.Callback):
    """Timestamps of the end of every training and validation batch."""

    def __init__(self):
        super().__init__()
        self.train, self.test = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.train.append(time.perf_counter())

    def on_test_batch_end(self, batch, logs=None):
        self.test.append(time.perf_counter())


def seconds_per_step(stamps, warmup):
    """Mean seconds per step after the first `warmup` steps (tracing, pipeline start-up)."""
    timed = stamps[warmup - 1:]
    return (timed[-1] - timed[0]) / (len(timed) - 1)


def _batches(dataset):
    count = int(dataset.cardinality())
    if count < 0:  # unknown (a filter) or infinite: count once
        count = sum(1 for _ in dataset)
    return count


def measure_epoch(model, compile_model, train_ds, val_ds, steps_per_epoch):
    """Seconds of one epoch of `model` on this machine, from a few timed steps of a copy.

    Args:
        model: the model to train (not modified: a `clone_model` copy is timed).
        compile_model: `compile_model(model)` compiles a model as training will
            (loss, metrics, jit_compile); its optimizer's state is thrown away.
        train_ds, val_ds: the datasets `fit` will get.
        steps_per_epoch: optimizer steps per epoch.

    Returns:
        A dict: `train_step_seconds`, `val_step_seconds`, `val_batches`,
        `epoch_seconds` (steps + validation + `EPOCH_OVERHEAD_SECONDS`) and
        `measure_seconds` (what the measurement itself took).
    """
    start = time.perf_counter()
    probe = keras.models.clone_model(model)
    compile_model(probe)
    clock = _BatchClock()
    train_steps = WARMUP_STEPS + TIMED_STEPS
    probe.fit(train_ds.repeat(), steps_per_epoch=train_steps, epochs=1, verbose=0, callbacks=[clock], shuffle=False)
    val_batches = _batches(val_ds)
    val_steps = min(val_batches, WARMUP_STEPS + TIMED_STEPS)
    probe.evaluate(val_ds.take(val_steps), verbose=0, callbacks=[clock])
    train_step = seconds_per_step(clock.train, WARMUP_STEPS)
    val_step = seconds_per_step(clock.test, min(WARMUP_STEPS, val_steps - 1)) if val_steps > 1 else 0.0
    del probe
    return {
        "train_step_seconds": round(train_step, 4),
        "val_step_seconds": round(val_step, 4),
        "val_batches": val_batches,
        "epoch_seconds": round(steps_per_epoch * train_step + val_batches * val_step + EPOCH_OVERHEAD_SECONDS, 1),
        "measure_seconds": round(time.perf_counter() - start, 1),
    }


def validation_seconds(measured):
    """One pass over the validation set, from `measure_epoch`'s figures."""
    return measured["val_batches"] * measured["val_step_seconds"]


def final_evaluation_seconds(measured):
    """What `train` needs after training: a validation pass plus `FINAL_EVALUATION_OVERHEAD_SECONDS`."""
    return validation_seconds(measured) + FINAL_EVALUATION_OVERHEAD_SECONDS


def scaled_warmup(recipe_warmup_epochs, epochs, recipe_epochs):
    """The warm-up of a run of `epochs` epochs: the same fraction of the run as the recipe's warm-up of its own."""
    return round(recipe_warmup_epochs * epochs / recipe_epochs, 4)


def choose_run_length(budget_minutes, elapsed_seconds, measured, max_epochs, steps_per_epoch):
    """`(epochs, steps per epoch)` whose estimated time fills the rest of the budget.

    The rest is the budget minus `elapsed_seconds` (data loading and the
    measurement) minus the final evaluation of the best model
    (`final_evaluation_seconds`); everything counts `SAFETY_FACTOR` times its estimate. All
    `max_epochs` where they fit. Otherwise the budget is filled to the step,
    not to the last whole epoch: the run has one epoch more than whole epochs
    fit, each shortened evenly to the steps that fit (every epoch is still
    validated on the whole validation set). With 2.9 epochs' time that is 3
    epochs of 97 % of the steps, not 2 whole epochs; with less than one
    epoch's time, one shortened epoch (at least 1 step).
    """
    validation = validation_seconds(measured)
    available = (budget_minutes * 60.0 - elapsed_seconds - final_evaluation_seconds(measured)) / SAFETY_FACTOR
    if available >= max_epochs * measured["epoch_seconds"]:
        return max_epochs, steps_per_epoch
    epochs = min(max_epochs, max(1, math.ceil(available / measured["epoch_seconds"])))
    per_epoch = available / epochs - validation - EPOCH_OVERHEAD_SECONDS
    steps = math.floor(per_epoch / measured["train_step_seconds"] + 1e-6)  # not 107.99999 for 108
    return epochs, max(1, min(steps_per_epoch, steps))


class KeepToBudget(keras.callbacks.Callback):
    """Keeps a budgeted run to its deadline, re-planning it from the epochs' real time.

    The plan (`plan_epochs`) rests on a few steps timed before training; the
    machine can turn out faster (the measurement ran beside other work, the
    plan keeps a `SAFETY_FACTOR` margin) or slower (other work starts). After
    each epoch this callback estimates the next epochs from the ones trained
    (the slower of the last epoch and the mean after the first, which also
    traced the model; with the saves after it) and:

    - **lengthens** the run where more epochs fit the rest of the budget with
      the safety margin (up to `fit`'s `epochs`: the recipe's `train.epochs`);
    - **shortens** it where the planned epochs no longer fit (from the
      second epoch on: the first one's time includes tracing);
    - ends it at the planned epoch.

    A longer or shorter run gets its learning-rate schedule laid out again
    over the new length (`schedule_for`; the optimizer's step count and
    momentum carry on), so it still ends annealed instead of being cut off at
    a high learning rate; the updated plan is written to `plan_path` (a
    resumed run follows it) and lands in metrics.json with a `replanned`
    entry per change. `fit` must be called with `epochs=` the most the run
    may grow to; this callback ends it at the planned epoch.

    Within an epoch it stops at the step that leaves just `reserve_seconds`
    (validation, checkpoints) before `deadline`: the epoch is still validated
    and saved.

    Args:
        deadline: `time.time()` by which training must end.
        reserve_seconds: what an epoch needs after its last step.
        plan: the plan dict (`epochs`, `recipe_epochs`, `warmup_epochs`); updated in place.
        plan_path: where the plan is stored (None: not stored).
        schedule_for: `schedule_for(epochs, warmup_epochs)` -> the learning-rate
            schedule of a run of that length; None: the plan's length stays
            (the run only stops early where it must).
        recipe_warmup_epochs: the recipe's warm-up; a re-planned run's warm-up
            is the same fraction of it.
    """

    def __init__(self, deadline, reserve_seconds=0.0, plan=None, plan_path=None, schedule_for=None,
                 recipe_warmup_epochs=0.0):
        super().__init__()
        self.deadline, self.reserve_seconds = deadline, reserve_seconds
        self.plan, self.plan_path, self.schedule_for = plan, plan_path, schedule_for
        self.recipe_warmup_epochs = recipe_warmup_epochs
        self.epoch_started = self.epoch_ended = None
        self.durations, self.after_epoch = [], []

    @property
    def planned_epochs(self):
        return self.plan["epochs"] if self.plan else self.params["epochs"]

    def on_epoch_begin(self, epoch, logs=None):
        now = time.time()
        if self.epoch_ended is not None:  # the saves and logs of the previous epoch, after this callback
            self.after_epoch.append(now - self.epoch_ended)
        self.epoch_started = now

    def on_train_batch_end(self, batch, logs=None):
        if not self.model.stop_training and time.time() + self.reserve_seconds > self.deadline:
            self.model.stop_training = True
            print(f"\ntime budget: the machine is slower than measured before training (busier now?); stopping "
                  f"at step {batch + 1} of this epoch to validate and save within the budget")

    def epoch_estimate(self):
        """Seconds of the next epoch with its saves: the slower of the last epoch and the mean after the first."""
        later = self.durations[1:]
        steps = max(self.durations[-1], sum(later) / len(later)) if later else self.durations[-1]
        saves = sum(self.after_epoch) / len(self.after_epoch) if self.after_epoch else EPOCH_OVERHEAD_SECONDS
        return steps + saves

    def seconds_left(self):
        """Seconds from the end of the epoch that just ended (its saves still to come) to the deadline."""
        saves = self.after_epoch[-1] if self.after_epoch else EPOCH_OVERHEAD_SECONDS
        return self.deadline - self.epoch_ended - saves

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_ended = time.time()
        self.durations.append(self.epoch_ended - self.epoch_started)
        if self.model.stop_training:  # stopped inside the epoch (the deadline, a NaN): nothing to plan
            return
        done, planned = epoch + 1, self.planned_epochs
        estimate, left = self.epoch_estimate(), self.seconds_left()
        fits, target = max(0, math.floor(left / estimate)), planned
        if done + fits < planned and (fits == 0 or len(self.durations) > 1):
            target = done + fits
        elif self.schedule_for is not None and done < self.params["epochs"]:
            safely = done + math.floor(left / (estimate * SAFETY_FACTOR))
            target = max(planned, min(self.params["epochs"], safely))
        if target != planned and target > done and self.schedule_for is not None:
            self.replan(done, target, estimate)
        if done >= target:
            self.model.stop_training = True
            if done < planned:
                print(f"time budget: epoch {done} took {self.durations[-1] / 60:.1f} min, more than measured before "
                      f"training (the machine is busier now); another would end past the budget, so training stops "
                      f"after epoch {done} of {planned}")

    def replan(self, done, epochs, estimate):
        """Lays the run out again over `epochs` epochs: plan file, learning-rate schedule, train function."""
        before = self.plan["epochs"]
        warmup = scaled_warmup(self.recipe_warmup_epochs, epochs, self.plan["recipe_epochs"])
        self.plan.update(epochs=epochs, warmup_epochs=warmup)
        self.plan.setdefault("replanned", []).append(
            {"after_epoch": done, "epoch_seconds": round(estimate, 1), "epochs": epochs,
             "minutes_left": round((self.deadline - time.time()) / 60.0, 2)})
        if self.plan_path:
            write_json(self.plan_path, self.plan)
        self.model.optimizer.learning_rate = self.schedule_for(epochs, warmup)
        self.model.make_train_function(force=True)  # the schedule is read when the train step is traced
        print(f"time budget: epochs take ~{estimate / 60:.1f} min here with {(self.deadline - time.time()) / 60:.1f} "
              f"min left after epoch {done}: {'lengthening' if epochs > before else 'shortening'} the run from "
              f"{before} to {epochs} epochs (the learning-rate schedule laid out again over {epochs})", flush=True)


def check_budget_settings(cfg):
    """ConfigError where `train.time_budget_minutes` cannot be honoured."""
    train_cfg = cfg.train
    if train_cfg.time_budget_minutes is None:
        return
    if train_cfg.head_epochs:
        raise ConfigError(
            f"train.time_budget_minutes={train_cfg.time_budget_minutes} does not combine with "
            f"train.head_epochs={train_cfg.head_epochs} (a two-phase run); set one of them to null/0"
        )
    if train_cfg.strategy == "multi_worker":
        raise ConfigError(
            "train.time_budget_minutes is not supported with train.strategy=multi_worker: the budget times an "
            "epoch on the machine before training, and workers measuring their own speed could choose different "
            "epoch counts, which would stall the cluster; set it to null and choose train.epochs"
        )
    if train_cfg.time_budget_fallback:
        if cfg.model.weights is not None:
            raise ConfigError(
                f"train.time_budget_fallback (another network) does not combine with model.weights="
                f"{cfg.model.weights!r} (weights of the recipe's network); set train.time_budget_fallback={{}}"
            )
        fallback_recipe(cfg)  # a bad key or value is a ConfigError now, not after the measurement


FALLBACK_REFUSED = ("model.input_shape", "model.num_classes", "model.weights")


def fallback_overrides(train_cfg):
    """`train.time_budget_fallback` as `--set` strings ("model.backbone_args.stem_width=16", ...)."""
    return [f"{key}={json.dumps(value)}" for key, value in train_cfg.time_budget_fallback.items()]


def fallback_recipe(cfg):
    """`cfg` with `train.time_budget_fallback` applied: the recipe of the cheaper network.

    Only `model.*` keys (the network; not its input shape, classes or
    weights): the data, batches and schedule stay the recipe's, so the two
    networks' epochs are the same steps and compare by their measured time.
    """
    from keras_resnet_settings.loading import load_config

    keys = list(cfg.train.time_budget_fallback)
    refused = [key for key in keys if not key.startswith("model.") or key.startswith(FALLBACK_REFUSED)]
    if refused:
        raise ConfigError(
            f"train.time_budget_fallback: {', '.join(refused)} cannot change; it takes keys of the network "
            f"(model.*, e.g. model.backbone_args.stackwise_num_filters), not {', '.join(FALLBACK_REFUSED)} "
            "or keys outside model"
        )
    try:
        return load_config(cfg, fallback_overrides(cfg.train))
    except ConfigError as error:
        raise ConfigError(f"train.time_budget_fallback: {error}") from None


def build_fallback_network(cfg, build):
    """The untrained network of `train.time_budget_fallback` (`build(fallback recipe)`), or None without one.

    Built when the run starts, whether or not the budget ends up choosing
    it, so a fallback that cannot be built (e.g. widths for another number of
    stages) is a ConfigError naming the setting at once, on every machine,
    not only on a slow one after the measurement. `plan_epochs` times a copy
    of it; where it is chosen, this model is the one that trains.
    """
    if cfg.train.time_budget_minutes is None or not cfg.train.time_budget_fallback:
        return None
    try:
        return build(fallback_recipe(cfg))
    except ConfigError as error:
        message = str(error)
        if message.startswith("train.time_budget_fallback"):
            raise
        raise ConfigError(f"train.time_budget_fallback: the network it makes cannot be built: {message}") from None


def plan_epochs(cfg, model, compile_model, train_ds, val_ds, steps_per_epoch, backup_root, run_started,
                fallback_model=None):
    """The recipe to train under `train.time_budget_minutes`: `cfg` with the epochs that fit.

    Without a budget, returns `(cfg, None, [])`. Otherwise measures an epoch
    (`measure_epoch`), chooses the run (`choose_run_length`), prints the plan,
    stores it in `backup_root` (a resumed run reuses it) and returns
    `(planned cfg, plan, callbacks)`: `train.epochs` is the chosen count and
    `train.warmup_epochs` shrinks in the same proportion, so the schedule
    spans the run that will happen; `callbacks` holds the `KeepToBudget` of
    a new plan, which lengthens or shortens the run as its epochs show the
    machine's real speed, up to the recipe's `train.epochs` (so `fit` runs
    with `epochs=cfg.train.epochs`); a resumed run has no clock to keep: none.

    With `fallback_model` given (`build_fallback_network`) and less than
    `train.time_budget_fallback_below` of the recipe's epochs fitting, the
    cheaper network is measured too and, where more of its epochs fit, is
    what trains: the planned cfg then has the fallback applied
    (`fallback_recipe`) and `plan["fallback"]` lists its overrides, so the
    caller trains `fallback_model` (a resumed run does the same from the stored plan).

    Args:
        cfg: the recipe.
        model, compile_model, train_ds, val_ds, steps_per_epoch: see `measure_epoch`.
        backup_root: the run's backup folder (deleted when the run finishes).
        run_started: `time.time()` when the `train` command started.
        fallback_model: the untrained cheaper network (None: no fallback); only a copy of it is timed.
    """
    budget = cfg.train.time_budget_minutes
    if budget is None:
        return cfg, None, []
    path = os.path.join(backup_root, PLAN_FILE)
    recipe_epochs = cfg.train.epochs
    if os.path.exists(path):
        plan = read_json(path)
        resumed = True  # it follows its stored plan: no clock to keep
        network = f", the fallback network ({', '.join(plan['fallback'])})" if plan.get("fallback") else ""
        print(f"time budget: resuming the plan made when this run started ({path}): "
              f"{plan['epochs']} of {recipe_epochs} epochs{network}")
    else:
        measured = measure_epoch(model, compile_model, train_ds, val_ds, steps_per_epoch)
        elapsed = time.time() - run_started
        epochs, steps = choose_run_length(budget, elapsed, measured, recipe_epochs, steps_per_epoch)
        recipe_passes, fallback = epochs * steps / steps_per_epoch, None
        if fallback_model is not None and recipe_passes < cfg.train.time_budget_fallback_below * recipe_epochs:
            cheaper = measure_epoch(fallback_model, compile_model, train_ds, val_ds, steps_per_epoch)
            elapsed = time.time() - run_started
            fallback_epochs, fallback_steps = choose_run_length(budget, elapsed, cheaper, recipe_epochs,
                                                                steps_per_epoch)
            if fallback_epochs * fallback_steps > epochs * steps:
                fallback = {"fallback": fallback_overrides(cfg.train),
                            "recipe_network": {"passes": round(recipe_passes, 2), **measured}}
                measured, epochs, steps = cheaper, fallback_epochs, fallback_steps
        validation = validation_seconds(measured)
        run_seconds = epochs * (steps * measured["train_step_seconds"] + validation + EPOCH_OVERHEAD_SECONDS)
        plan = {
            "budget_minutes": budget,
            "recipe_epochs": recipe_epochs,
            "epochs": epochs,
            "steps_per_epoch": steps,
            "full_steps_per_epoch": steps_per_epoch,
            "warmup_epochs": scaled_warmup(cfg.train.warmup_epochs, epochs, recipe_epochs),  # in epochs of `steps`
            "policy": keras.mixed_precision.dtype_policy().name,
            "elapsed_seconds_before_training": round(elapsed, 1),
            "estimated_minutes": round((elapsed + run_seconds + final_evaluation_seconds(measured)) / 60.0, 1),
            **measured,
            **(fallback or {}),
        }
        print(describe_plan(plan))
        os.makedirs(backup_root, exist_ok=True)
        write_json(path, plan)
        resumed = False
    changes = {"epochs": plan["epochs"], "warmup_epochs": float(plan["warmup_epochs"])}
    if plan.get("steps_per_epoch", steps_per_epoch) < steps_per_epoch:
        changes["steps_per_epoch"] = plan["steps_per_epoch"]
    planned = fallback_recipe(cfg) if plan.get("fallback") else cfg
    planned = planned.replace(train=planned.train.replace(**changes))
    if resumed:
        return planned, plan, []

    def schedule_for(epochs, warmup_epochs):  # a new plan is kept to its deadline, re-planned as epochs end
        return optimizers.make_schedule(planned.train.replace(warmup_epochs=warmup_epochs),
                                        plan["steps_per_epoch"], epochs, batch_size=cfg.data.batch_size)

    keeper = KeepToBudget(run_started + budget * 60.0 - final_evaluation_seconds(measured),
                          reserve_seconds=validation + EPOCH_OVERHEAD_SECONDS,
                          plan=plan, plan_path=path, schedule_for=schedule_for,
                          recipe_warmup_epochs=cfg.train.warmup_epochs)
    return planned, plan, [keeper]


def describe_plan(plan):
    """The plan in words: the measurement, the epochs chosen and why, the expected time."""
    epochs, recipe_epochs = plan["epochs"], plan["recipe_epochs"]
    steps, full_steps = plan["steps_per_epoch"], plan["full_steps_per_epoch"]
    epoch_minutes = plan["epoch_seconds"] / 60.0
    head = (
        f"time budget {plan['budget_minutes']:g} min: one epoch takes ~{epoch_minutes:.1f} min here "
        f"({full_steps} steps x {plan['train_step_seconds']:.3f} s + {plan['val_batches']} validation "
        f"batches x {plan['val_step_seconds']:.3f} s, policy {plan['policy']}); "
        f"{plan['elapsed_seconds_before_training'] / 60.0:.1f} min used before training. "
    )
    if plan.get("fallback"):
        slower = plan["recipe_network"]
        head += (
            f"The recipe's network would take ~{slower['epoch_seconds'] / 60.0:.1f} min per epoch "
            f"({slower['train_step_seconds']:.3f} s/step): {slower['passes']:g} of its {recipe_epochs} epochs, "
            f"under train.time_budget_fallback_below; so the cheaper network of train.time_budget_fallback "
            f"({', '.join(plan['fallback'])}) trains instead (times above). "
        )
    expect = f"expect ~{plan['estimated_minutes']:.0f} min"
    if epochs == recipe_epochs and steps == full_steps:
        return head + f"All {recipe_epochs} epochs fit: {expect}."
    if steps < full_steps and epochs == 1:
        what = (f"not even one epoch fits, so training 1 shortened epoch of {steps} of its {full_steps} steps "
                f"({steps / full_steps:.0%} of the training images)")
    elif steps < full_steps:
        what = (f"training {epochs} of the recipe's {recipe_epochs} epochs, each shortened to {steps} of its "
                f"{full_steps} steps to fill the budget ({epochs * steps / full_steps:.2f} passes over the "
                "training images)")
    else:
        what = f"training {epochs} of the recipe's {recipe_epochs} epochs"
    return head + (
        f"{what}, with the learning-rate schedule laid out over that (warm-up {plan['warmup_epochs']:g} epochs): "
        f"{expect}. After each epoch the plan is checked against the epochs' real time: more epochs (up to "
        f"{recipe_epochs}; Keras counts out of {recipe_epochs}) where the machine proves faster, fewer where "
        f"slower. Accuracy will be lower than a full run; set train.time_budget_minutes=null (or raise it) "
        f"for all {recipe_epochs} epochs."
    )

