"""train.time_budget_minutes: measure an epoch, choose the epochs that fit, lay the schedule over them."""

import json
import time
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_resnet.cli import main
from keras_resnet.config import load_config
from keras_resnet.training import time_budget
from keras_resnet.training.classification import evaluate_classifier
from keras_resnet.training.plots import read_history_csv
from keras_resnet_settings.errors import ConfigError
from tests.helpers import tiny_classifier
from tests.training.test_classification import make_toy_folders, write_recipe

MEASURED = {"train_step_seconds": 0.5, "val_step_seconds": 0.25, "val_batches": 8, "epoch_seconds": 60.0,
            "measure_seconds": 1.0}


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return make_toy_folders(tmp_path_factory.mktemp("toy"))


def machine_as_measured(monkeypatch):
    """The run's `KeepToBudget` finds the planned epochs exactly filling the budget (as the faked measurement
    said, whatever this machine's real speed), so the plan stands: for tests of the plan itself."""
    monkeypatch.setattr(time_budget.KeepToBudget, "epoch_estimate", lambda self: 60.0)
    monkeypatch.setattr(time_budget.KeepToBudget, "seconds_left",
                        lambda self: 60.0 * (self.planned_epochs - len(self.durations)))


def test_run_length_fills_the_rest_of_the_budget():
    # (10 min - 60 s used - 2 s validation - 15 s for the final evaluation) / 1.1 = 475 s = 7.9 epochs of 60 s:
    # not 7 whole epochs (756 steps) but 8 shortened ones, (475 / 8 - 2 s validation - 4 s overhead) / 0.5 s = 106
    # steps each: 848 steps.
    assert time_budget.choose_run_length(10, 60.0, MEASURED, max_epochs=16, steps_per_epoch=108) == (8, 106)
    assert time_budget.choose_run_length(10, 60.0, MEASURED, max_epochs=5, steps_per_epoch=108) == (5, 108)
    # Exactly whole epochs' time: whole epochs. 4 epochs x 60 s x 1.1 + 17 s final evaluation = 281 s.
    assert time_budget.choose_run_length(281 / 60, 0.0, MEASURED, max_epochs=16, steps_per_epoch=108) == (4, 108)
    # Not even one 600-s epoch fits in 5 min: one shortened epoch, (257.3 - 2 - 4) / 5 s a step = 50 steps.
    slow = {**MEASURED, "epoch_seconds": 600.0, "train_step_seconds": 5.0}
    assert time_budget.choose_run_length(5, 0.0, slow, max_epochs=16, steps_per_epoch=100) == (1, 50)
    assert time_budget.choose_run_length(0.1, 0.0, slow, max_epochs=16, steps_per_epoch=100) == (1, 1)  # at least a step


def test_measure_epoch_times_a_copy_and_leaves_the_model_alone():
    model = tiny_classifier(channels=1, num_classes=3, size=16)
    before = [w.numpy().copy() for w in model.weights]
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (64, 16, 16, 1)).astype("float32")
    labels = tf.one_hot(rng.integers(0, 3, 64), 3)
    train_ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    val_ds = tf.data.Dataset.from_tensor_slices((images[:40], labels[:40])).batch(8)

    def compile_model(probe):
        probe.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")

    measured = time_budget.measure_epoch(model, compile_model, train_ds, val_ds, steps_per_epoch=100)
    assert measured["train_step_seconds"] > 0 and measured["val_step_seconds"] > 0
    assert measured["val_batches"] == 5
    expected = 100 * measured["train_step_seconds"] + 5 * measured["val_step_seconds"] + time_budget.EPOCH_OVERHEAD_SECONDS
    assert measured["epoch_seconds"] == pytest.approx(expected, abs=0.2)
    for old, new in zip(before, model.weights):
        np.testing.assert_array_equal(old, new.numpy())
    assert getattr(model, "optimizer", None) is None  # the copy was compiled, not the model


def test_budget_run_trains_the_epochs_that_fit_with_the_schedule_over_them(toy_data, tmp_path, monkeypatch, capsys):
    # An epoch "takes" 60 s (66 s with the safety factor), whatever this machine's speed: a 3-minute budget
    # fits 2.3-2.5 of the recipe's 30 epochs (less what loading the data took): 3 epochs of fewer steps.
    def measured(model, compile_model, train_ds, val_ds, steps_per_epoch):
        return {**MEASURED, "train_step_seconds": 54.0 / steps_per_epoch}

    monkeypatch.setattr(time_budget, "measure_epoch", measured)
    machine_as_measured(monkeypatch)
    recipe = write_recipe(tmp_path / "r.yaml", *toy_data, tmp_path / "run", epochs=30, optimizer="sgd",
                          learning_rate=0.05, warmup_epochs=3, schedule="cosine", time_budget_minutes=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "time budget 3 min: one epoch takes ~1.0 min here" in out
    assert "training 3 of the recipe's 30 epochs, each shortened to" in out and "warm-up 0.3 epochs" in out
    history = read_history_csv(tmp_path / "run" / "history.csv")
    assert history["epoch"] == [0, 1, 2]
    # The cosine ends at 0 after the 3 chosen epochs (over 30 it would still be near its 0.05 peak).
    assert history["learning_rate"][-1] < 1e-6 < history["learning_rate"][0]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    plan = metrics["time_budget"]
    assert plan["epochs"] == 3 and metrics["epochs"] == 3
    assert 0 < plan["steps_per_epoch"] < plan["full_steps_per_epoch"]
    assert not (tmp_path / "run" / "backup").exists()
    # Not a terminal: one line per epoch (verbose=2), no progress-bar redraws, no shuffle warning.
    assert "\x08" not in out and "\r" not in out
    assert not [w for w in caught if "shuffle" in str(w.message)]


FALLBACK = {"model.backbone_args.stackwise_num_filters": [4, 4, 8], "model.backbone_args.stem_width": 4}


def _measured_by_width(slow_seconds, fast_seconds):
    """A fake `measure_epoch`: epochs of the recipe's network (stem width 8) take `slow_seconds`, the fallback's
    (stem width 4) `fast_seconds`; records the stem width of each network measured."""
    widths = []

    def measured(model, compile_model, train_ds, val_ds, steps_per_epoch):
        width = model.backbone.get_config()["stem_width"]
        widths.append(width)
        seconds = slow_seconds if width == 8 else fast_seconds
        return {**MEASURED, "epoch_seconds": seconds, "train_step_seconds": (seconds - 6.0) / steps_per_epoch}

    return measured, widths


def test_a_slow_machine_trains_the_cheaper_fallback_network(toy_data, tmp_path, monkeypatch, capsys):
    # The recipe's network: 100-s epochs, ~1.6 of 30 fit in 3 minutes (< half); the fallback's: 20-s epochs, ~8.
    measured, widths = _measured_by_width(100.0, 20.0)
    monkeypatch.setattr(time_budget, "measure_epoch", measured)
    machine_as_measured(monkeypatch)
    recipe = write_recipe(tmp_path / "r.yaml", *toy_data, tmp_path / "run", epochs=30, time_budget_minutes=3,
                          time_budget_fallback=FALLBACK)
    assert main(["train", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert widths == [8, 4]  # both measured, the recipe's first
    assert "so the cheaper network of train.time_budget_fallback" in out
    assert "model.backbone_args.stem_width=4" in out
    run = tmp_path / "run"
    plan = json.loads((run / "metrics.json").read_text())["time_budget"]
    assert plan["fallback"] and 7 <= plan["epochs"] <= 9 and plan["recipe_network"]["passes"] < 2
    trained = keras.saving.load_model(run / "best_model.keras")
    assert trained.backbone.get_config()["stem_width"] == 4
    # recipe.yaml stays the recipe as given, so the finished run is recognised as this recipe's.
    assert "time_budget_fallback" in (run / "recipe.yaml").read_text()
    assert main(["train", str(recipe)]) == 0
    assert "holds a finished run of this recipe" in capsys.readouterr().out


def test_a_fast_machine_keeps_the_recipes_network(toy_data, tmp_path, monkeypatch, capsys):
    # 20-s epochs: 7 of 30 epochs fit, above time_budget_fallback_below=0.2 of them: the fallback is not measured.
    measured, widths = _measured_by_width(20.0, 1.0)
    monkeypatch.setattr(time_budget, "measure_epoch", measured)
    machine_as_measured(monkeypatch)
    recipe = write_recipe(tmp_path / "r.yaml", *toy_data, tmp_path / "run", epochs=30, time_budget_minutes=3,
                          time_budget_fallback=FALLBACK, time_budget_fallback_below=0.2)
    assert main(["train", str(recipe)]) == 0
    assert widths == [8] and "time_budget_fallback" not in capsys.readouterr().out
    trained = keras.saving.load_model(tmp_path / "run" / "best_model.keras")
    assert trained.backbone.get_config()["stem_width"] == 8


def test_a_fallback_network_that_cannot_be_built_stops_the_run_before_the_measurement(toy_data, tmp_path,
                                                                                       monkeypatch, capsys):
    def must_not_measure(*args):
        raise AssertionError("measured before the fallback network was checked")

    monkeypatch.setattr(time_budget, "measure_epoch", must_not_measure)
    # Four widths for resnet20_cifar's three stages: the settings load, the network cannot be built.
    recipe = write_recipe(tmp_path / "r.yaml", *toy_data, tmp_path / "run", epochs=30, time_budget_minutes=3,
                          time_budget_fallback={"model.backbone_args.stackwise_num_filters": [4, 4, 8, 8]})
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "train.time_budget_fallback: the network it makes cannot be built" in err and "Traceback" not in err


def test_a_resumed_run_builds_the_network_its_plan_chose(tmp_path):
    cfg = load_config(None, ["train.epochs=30", "train.time_budget_minutes=5", "model.backbone=resnet18",
                             f"train.time_budget_fallback={json.dumps({'model.backbone_args.stem_width': 16})}"])
    stored = {"epochs": 9, "warmup_epochs": 0.3, "fallback": time_budget.fallback_overrides(cfg.train)}
    (tmp_path / time_budget.PLAN_FILE).write_text(json.dumps(stored))
    planned, _, _ = time_budget.plan_epochs(cfg, None, None, None, None, 10, str(tmp_path), 0.0)
    assert planned.model.backbone_args["stem_width"] == 16 and planned.train.epochs == 9
    (tmp_path / time_budget.PLAN_FILE).write_text(json.dumps({"epochs": 9, "warmup_epochs": 0.3}))
    planned, _, _ = time_budget.plan_epochs(cfg, None, None, None, None, 10, str(tmp_path), 0.0)
    assert "stem_width" not in planned.model.backbone_args  # the recipe's own network


@pytest.mark.parametrize("fallback, message", [
    ({"train.epochs": 3}, "train.epochs cannot change"),
    ({"model.input_shape": [8, 8, 1]}, "model.input_shape cannot change"),
    ({"model.no_such_key": 1}, "train.time_budget_fallback: unknown key 'model.no_such_key'"),
    ({"model.dropout": "x"}, "train.time_budget_fallback: 'model.dropout' must be a float"),
])
def test_a_fallback_that_cannot_work_is_a_config_error(fallback, message, tmp_path):
    cfg = load_config(None, ["train.time_budget_minutes=5", f"train.time_budget_fallback={json.dumps(fallback)}"])
    with pytest.raises(ConfigError, match=message):
        time_budget.check_budget_settings(cfg)
    weights = tmp_path / "w.keras"
    weights.write_bytes(b"")
    cfg = load_config(None, ["train.time_budget_minutes=5", f"model.weights={weights}",
                             "train.time_budget_fallback={\"model.dropout\": 0.1}"])
    with pytest.raises(ConfigError, match="does not combine with model.weights"):
        time_budget.check_budget_settings(cfg)


def test_a_resumed_run_follows_its_stored_plan(tmp_path, monkeypatch, capsys):
    def must_not_measure(*args):
        raise AssertionError("a resumed run measured again")

    monkeypatch.setattr(time_budget, "measure_epoch", must_not_measure)
    cfg = load_config(None, ["train.epochs=30", "train.time_budget_minutes=5", "train.warmup_epochs=3"])
    (tmp_path / time_budget.PLAN_FILE).write_text(json.dumps({"epochs": 4, "warmup_epochs": 0.4}))
    planned, _, callbacks = time_budget.plan_epochs(cfg, None, None, None, None, 10, str(tmp_path), 0.0)
    assert (planned.train.epochs, planned.train.warmup_epochs) == (4, 0.4)
    assert cfg.train.epochs == 30  # the recipe itself is unchanged
    assert callbacks == []  # no deadline for a resumed run
    assert "resuming the plan" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, message", [
    (["train.head_epochs=1"], "does not combine with train.head_epochs=1"),
    (["train.strategy=multi_worker"], "not supported with train.strategy=multi_worker"),
])
def test_budget_settings_it_cannot_honour_are_config_errors(overrides, message):
    cfg = load_config(None, ["train.time_budget_minutes=5", *overrides])
    with pytest.raises(ConfigError, match=message):
        time_budget.check_budget_settings(cfg)


def test_evaluate_names_the_loss_training_reports(tmp_path):
    rng = np.random.default_rng(1)
    dense = keras.layers.Dense(3, activation="softmax")
    model = keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Flatten(), dense])
    dense.set_weights([rng.normal(0, 2e-3, (256, 3)).astype("float32"), np.zeros(3, "float32")])
    images = rng.uniform(0, 255, (24, 16, 16, 1)).astype("float32")
    labels = rng.integers(0, 3, 24)
    val_ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    metrics = evaluate_classifier(model, val_ds, ["a", "b", "c"], str(tmp_path), label_smoothing=0.4)
    probabilities = model.predict(images, verbose=0)
    onehot = keras.ops.one_hot(labels, 3)
    plain = float(keras.losses.CategoricalCrossentropy()(onehot, probabilities))
    smoothed = float(keras.losses.CategoricalCrossentropy(label_smoothing=0.4)(onehot, probabilities))
    assert metrics["loss"] == pytest.approx(plain, rel=1e-4)
    assert metrics["loss_label_smoothed"] == pytest.approx(smoothed, rel=1e-4)
    assert abs(smoothed - plain) > 1e-3  # the two definitions differ, so the check can fail


def test_keep_to_budget_stops_within_the_budget(capsys, monkeypatch):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.zeros((8, 4), "float32"), np.zeros((8, 2), "float32")
    history = model.fit(x, y, batch_size=2, epochs=5, verbose=0,
                        callbacks=[time_budget.KeepToBudget(time.time() + 3600, reserve_seconds=60)])
    assert len(history.history["loss"]) == 5  # far from the deadline: every epoch
    # Past the deadline minus the reserve: the first step ends the epoch, which is still validated and logged.
    history = model.fit(x, y, batch_size=2, epochs=5, verbose=0, validation_data=(x, y),
                        callbacks=[time_budget.KeepToBudget(time.time() + 30, reserve_seconds=60)])
    assert len(history.history["val_loss"]) == 1
    assert "stopping at step 1 of this epoch" in capsys.readouterr().out
    # At an epoch end: another epoch as long as this one (100 s) would end past the deadline (at 150 s).
    clock = {"now": 0.0}
    monkeypatch.setattr(time_budget.time, "time", lambda: clock["now"])
    callback = time_budget.KeepToBudget(150.0)
    callback.set_model(model)
    callback.set_params({"epochs": 5})
    model.stop_training = False
    callback.on_epoch_begin(0)
    clock["now"] = 40.0
    callback.on_epoch_end(0)
    assert not model.stop_training  # 40 s + 44 s < 150 s
    callback.on_epoch_begin(1)
    clock["now"] = 140.0
    callback.on_epoch_end(1)
    assert model.stop_training
    assert "training stops after epoch 2 of 5" in capsys.readouterr().out


class _Clock(keras.callbacks.Callback):
    """A fake `time.time` whose epochs last `seconds[epoch]`; keeps each epoch's kernel and learning rate."""

    def __init__(self, monkeypatch, seconds):
        super().__init__()
        self.now, self.seconds, self.kernels, self.rates = 0.0, seconds, [], []
        monkeypatch.setattr(time_budget.time, "time", lambda: self.now)

    def on_epoch_end(self, epoch, logs=None):
        self.now += self.seconds[min(epoch, len(self.seconds) - 1)]
        self.kernels.append(self.model.layers[0].kernel.numpy().copy())
        self.rates.append(float(self.model.optimizer.learning_rate))


def _fit_with_keeper(monkeypatch, tmp_path, planned, seconds, deadline=1000.0, max_epochs=10):
    """A Dense model trained under a `KeepToBudget` planned for `planned` epochs of 4 steps (SGD without
    momentum on the WarmupSchedule a plan of that length gets), on a fake clock; returns (clock, plan)."""
    from keras_resnet.training.schedules import WarmupSchedule

    def schedule_for(epochs, warmup_epochs):
        return WarmupSchedule(0.05, total_steps=4 * epochs)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = x @ rng.normal(size=(4, 2)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(schedule_for(planned, 0)), loss="mse")
    plan = {"epochs": planned, "recipe_epochs": max_epochs, "warmup_epochs": 0.0}
    clock = _Clock(monkeypatch, seconds)
    keeper = time_budget.KeepToBudget(deadline, plan=plan, plan_path=str(tmp_path / "plan.json"),
                                      schedule_for=schedule_for)
    model.fit(x, y, batch_size=2, epochs=max_epochs, verbose=0, callbacks=[clock, keeper])
    return clock, plan


def test_a_faster_machine_lengthens_the_run_and_its_schedule(monkeypatch, tmp_path, capsys):
    # Planned: 3 of 10 epochs. They take 100 s, and 1000 s are left: after epoch 1, (896 s left) / (104 s x 1.1)
    # = 7 more fit (8 epochs); after epoch 2 (saves measured at 0 s), 800 / 110 = 7 more (9); then it holds.
    clock, plan = _fit_with_keeper(monkeypatch, tmp_path, planned=3, seconds=[100.0])
    assert len(clock.kernels) == 9 and plan["epochs"] == 9
    assert [change["epochs"] for change in plan["replanned"]] == [8, 9]
    assert json.loads((tmp_path / "plan.json").read_text())["epochs"] == 9  # a resumed run follows it
    # The train step follows the new schedule: the weights still move after the 3 planned epochs (with the
    # 3-epoch schedule the learning rate would be 0 from there), and the rate reaches 0 at epoch 9, not 3.
    assert all(np.abs(after - before).max() > 1e-4 for before, after in zip(clock.kernels[2:], clock.kernels[3:]))
    assert clock.rates[2] > 0.01 and clock.rates[-1] < 1e-6
    assert "lengthening the run from 3 to 8 epochs" in capsys.readouterr().out


def test_a_slower_machine_shortens_the_run_and_still_anneals(monkeypatch, tmp_path, capsys):
    # Planned: 8 of 10. Epoch 1 takes 100 s, then 200 s each: after epoch 2, 700 s are left for 3 more (5).
    clock, plan = _fit_with_keeper(monkeypatch, tmp_path, planned=8, seconds=[100.0, 200.0])
    assert len(clock.kernels) == 5 and [change["epochs"] for change in plan["replanned"]] == [5]
    assert clock.rates[-1] < 1e-6  # annealed at the new end (the 8-epoch schedule would be at ~0.02 here)
    assert "shortening the run from 8 to 5 epochs" in capsys.readouterr().out
    # The first epoch alone (tracing in it) does not shorten a run while another epoch fits: after 400 s,
    # 596 s are left, 1 more 404-s epoch (not 2) would fit, and the later 300-s epochs keep the 3 planned.
    clock, plan = _fit_with_keeper(monkeypatch, tmp_path, planned=3, seconds=[400.0, 300.0])
    assert len(clock.kernels) == 3 and "replanned" not in plan


def test_a_budget_run_lengthens_where_the_machine_beats_its_measurement(toy_data, tmp_path, monkeypatch, capsys):
    # Measured (falsely) at 60-s epochs: 3 of 6 epochs planned for 3 minutes; this machine's real epochs take
    # about a second, so after the first epoch the run grows to the recipe's 6, its schedule laid out over 6.
    def measured(model, compile_model, train_ds, val_ds, steps_per_epoch):
        return {**MEASURED, "train_step_seconds": 54.0 / steps_per_epoch}

    monkeypatch.setattr(time_budget, "measure_epoch", measured)
    recipe = write_recipe(tmp_path / "r.yaml", *toy_data, tmp_path / "run", epochs=6, optimizer="sgd",
                          learning_rate=0.05, warmup_epochs=1, schedule="cosine", time_budget_minutes=3)
    assert main(["train", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "training 3 of the recipe's 6 epochs" in out and "lengthening the run from 3 to 6 epochs" in out
    history = read_history_csv(tmp_path / "run" / "history.csv")
    assert history["epoch"] == [0, 1, 2, 3, 4, 5]
    assert history["learning_rate"][2] > 0.01 and history["learning_rate"][-1] < 1e-6
    plan = json.loads((tmp_path / "run" / "metrics.json").read_text())["time_budget"]
    assert plan["epochs"] == 6 and plan["replanned"][0]["after_epoch"] == 1 and plan["warmup_epochs"] == 1.0


@pytest.mark.parametrize("cap, native", [("AVX2", False), ("avx512_core", False), ("", None)])
def test_auto_precision_follows_a_onednn_isa_cap(cap, native, monkeypatch):
    """`mixed_precision: auto` on CPU: a oneDNN cap below AVX512-BF16 means no native bfloat16 (float32)."""
    from keras_resnet.training import devices

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    monkeypatch.setattr(devices.tf.config, "list_logical_devices", lambda kind=None: [])
    has_flag = "avx512_bf16" in open("/proc/cpuinfo").read()
    expected = has_flag if native is None else native
    assert devices.cpu_has_native_bfloat16() is expected
    assert devices.resolve_precision("auto") == ("mixed_bfloat16" if expected else "float32")


def test_long_epochs_without_progress_bars_announce_their_time(capsys, monkeypatch):
    """One line after the first timed steps (`keras-resnet qat` was silent for 25 minutes after `Epoch 1/2`)."""
    from keras_resnet.training import fit

    clock = iter(float(second) for second in range(100))  # one second per step
    monkeypatch.setattr(fit.time, "perf_counter", lambda: next(clock))
    estimate = fit.EpochEstimate(steps_per_epoch=600, epochs=2)
    for batch in range(40):
        estimate.on_train_batch_end(batch)
    printed = capsys.readouterr().out
    assert printed.count("s/step") == 1
    assert "~1 s/step here: an epoch's 600 steps take ~10.0 min, the 2 epoch(s) of this phase ~20 min" in printed
