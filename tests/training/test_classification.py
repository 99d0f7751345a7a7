"""Training recipes end to end: learning, strategies, resume, CLI errors."""

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import yaml
from PIL import Image

from keras_resnet.cli import main
from tests.helpers import free_ports

TINY_BACKBONE = {"stackwise_num_blocks": [1, 1, 1], "stackwise_num_filters": [8, 16, 16], "stem_width": 8}


def make_toy_folders(root, per_class=24, size=16):
    """Two separable classes: horizontal vs vertical stripes, with noise."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", per_class // 2)):
        for label, name in enumerate(("horizontal", "vertical")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                stripes = (np.arange(size) // 2 % 2 * 200).astype(np.float32)
                image = np.tile(stripes[:, None], (1, size)) if label == 0 else np.tile(stripes[None, :], (size, 1))
                image = np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(folder / f"{i}.png")
    return root / "train", root / "val"


def write_recipe(path, train_dir, val_dir, output_dir, **train_overrides):
    recipe = {
        "task": "classification",
        "model": {"backbone": "resnet20_cifar", "num_classes": 2, "input_shape": [16, 16, 1],
                  "backbone_args": TINY_BACKBONE},
        "data": {"source": "image_folder", "train": str(train_dir), "val": str(val_dir), "batch_size": 8,
                 "augment": {"random_crop_padding": 0, "horizontal_flip": False}},
        "train": {"epochs": 4, "optimizer": "adamw", "learning_rate": 0.01, "weight_decay": 1.0e-4,
                  "warmup_epochs": 0, **train_overrides},
        "output_dir": str(output_dir),
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return make_toy_folders(tmp_path_factory.mktemp("toy"))


def test_image_folder_run_learns_and_writes_run_dir(toy_data, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", *toy_data, tmp_path / "run")
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "run"
    for name in ("best_model.keras", "last_model.keras", "history.csv", "training_curves.png",
                 "confusion_matrix.png", "metrics.json", "recipe.yaml", "run.json"):
        assert (run / name).exists(), name
    assert (run / "logs").is_dir() and not (run / "backup").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["top1"] > 0.75 and "top5" in metrics
    from keras_resnet.training.plots import read_history_csv

    history = read_history_csv(run / "history.csv")
    assert history["epoch"] == [0, 1, 2, 3]
    assert history["loss"][-1] < history["loss"][0]
    assert "done: resnet20_cifar top1=" in capsys.readouterr().out
    # evaluate re-computes the same metrics from the saved best model
    assert main(["evaluate", str(recipe)]) == 0
    evaluated = json.loads((run / "metrics.json").read_text())
    assert evaluated["top1"] == pytest.approx(metrics["top1"])
    # ... and keeps the training summary finish_run wrote (main.sh's closing line reads "epochs")
    assert evaluated["epochs"] == metrics["epochs"] == 4
    assert evaluated["train_images_per_second"] == metrics["train_images_per_second"]


def test_weight_averaging_validates_and_saves_the_averaged_weights(toy_data, tmp_path):
    import keras

    from keras_resnet.training.plots import read_history_csv

    runs = {}
    for name, ema in (("plain", None), ("ema", 0.9)):
        recipe = write_recipe(tmp_path / f"{name}.yaml", *toy_data, tmp_path / name, epochs=2, ema_momentum=ema)
        assert main(["train", str(recipe)]) == 0
        model = keras.saving.load_model(tmp_path / name / "last_model.keras", compile=False)
        runs[name] = (model, read_history_csv(tmp_path / name / "history.csv"))
    (plain, _), (averaged, history) = runs["plain"], runs["ema"]
    # same seed and data: only the averaging differs
    assert max(np.abs(a - b).max() for a, b in zip(plain.get_weights(), averaged.get_weights())) > 1e-4
    # the saved last model is the one that was validated at the last epoch
    from keras_resnet.config import load_config
    from keras_resnet.data.classification import build_classification_datasets

    cfg = load_config(str(tmp_path / "ema.yaml"))
    _, val_ds, _ = build_classification_datasets(cfg, seed=0)
    correct = total = 0
    for images, labels in val_ds:
        correct += int(np.sum(np.argmax(averaged.predict(images, verbose=0), -1) == labels.numpy()))
        total += len(labels)
    assert correct / total == pytest.approx(history["val_top1"][-1], abs=1e-6)
    with pytest.raises(Exception, match="ema_momentum"):
        load_config(str(tmp_path / "ema.yaml"), ["train.ema_momentum=1.5"])


def test_two_phase_transfer_from_keras_file(toy_data, tmp_path):
    source = write_recipe(tmp_path / "a.yaml", *toy_data, tmp_path / "a", epochs=1)
    assert main(["train", str(source)]) == 0
    recipe = write_recipe(tmp_path / "b.yaml", *toy_data, tmp_path / "b", epochs=2, head_epochs=1)
    assert main(["train", str(recipe), "--set", f"model.weights={tmp_path / 'a' / 'best_model.keras'}",
                 "model.freeze_stages=1"]) == 0
    import keras

    model = keras.saving.load_model(tmp_path / "b" / "best_model.keras")
    assert model.backbone.frozen_stages == 1
    assert not model.backbone.get_layer("conv2_block1_1_conv").trainable
    assert model.backbone.get_layer("conv4_block1_1_conv").trainable


def _error_line(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    return err[0]


def test_user_errors_are_one_line(toy_data, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", *toy_data, tmp_path / "run")
    assert "unknown key 'train.epoch'" in _error_line(capsys, ["train", str(recipe), "--set", "train.epoch=3"])
    assert "'train.epochs' must be an int" in _error_line(capsys, ["train", str(recipe), "--set", "train.epochs=ten"])
    assert "Unknown preset 'resnet21'" in _error_line(
        capsys, ["train", str(recipe), "--set", "model.backbone=resnet21"])
    assert "model.num_classes is 5" in _error_line(capsys, ["train", str(recipe), "--set", "model.num_classes=5"])
    assert "does not exist" in _error_line(
        capsys, ["train", str(recipe), "--set", f"data.train={tmp_path / 'nope'}"])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: {backbone: [unclosed\n")
    assert "bad.yaml" in _error_line(capsys, ["train", str(bad_yaml)])
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    os.chmod(readonly, 0o500)
    if os.access(readonly, os.W_OK):  # root ignores permissions
        blocker = tmp_path / "a_file"
        blocker.write_text("x")
        target = blocker / "run"
    else:
        target = readonly / "run"
    assert "output_dir" in _error_line(capsys, ["train", str(recipe), "--set", f"output_dir={target}"])
    weights = tmp_path / "other.keras"
    import keras_resnet as kr

    kr.ResNetClassifier.from_preset("resnet18", num_classes=2, input_shape=(16, 16, 1)).save(weights)
    assert "another architecture" in _error_line(
        capsys, ["train", str(recipe), "--set", f"model.weights={weights}"])
    assert "no trained model" in _error_line(capsys, ["evaluate", str(recipe)])


def _run_cli(args, env=None, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "keras_resnet.cli", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_killed_run_resumes_from_last_finished_epoch(toy_data, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", *toy_data, tmp_path / "run", epochs=3)
    process = _run_cli(["train", str(recipe)])
    metadata = tmp_path / "run" / "backup" / "main" / "training_metadata.json"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if metadata.exists() and metadata.read_text().strip():
            break
        time.sleep(0.05)
    assert process.poll() is None, "run finished before it could be killed:\n" + process.communicate()[0]
    process.kill()
    process.wait()
    done_epochs = json.loads(metadata.read_text())["epoch"]
    assert done_epochs >= 1
    resumed = _run_cli(["train", str(recipe)])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert f"Epoch {done_epochs + 1}/3" in output and "Epoch 1/3" not in output
    assert f"resuming from epoch {done_epochs + 1} of 3 (backup in " in output
    from keras_resnet.training.plots import read_history_csv

    assert read_history_csv(tmp_path / "run" / "history.csv")["epoch"] == [0, 1, 2]


MIRRORED_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from keras_resnet import ResNetClassifier
    from keras_resnet.training.devices import make_strategy

    x = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 1)).astype("float32")
    y = np.arange(8) % 3
    weights = {}
    for name in ("one_device", "mirrored"):
        strategy = make_strategy(name)
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = ResNetClassifier.from_preset("resnet20_cifar", num_classes=3, input_shape=(16, 16, 1),
                                                 stackwise_num_blocks=[1, 1, 1])
            for layer in model.backbone.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = False  # per-replica batch statistics would differ
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
        model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), epochs=1, verbose=0)
        weights[name] = (strategy.num_replicas_in_sync, [w.numpy() for w in model.trainable_weights])
    assert weights["mirrored"][0] == 2, weights["mirrored"][0]
    diff = max(np.abs(a - b).max() for a, b in zip(weights["one_device"][1], weights["mirrored"][1]))
    moved = max(np.abs(a).max() for a in weights["one_device"][1])
    print(f"replicas={weights['mirrored'][0]} max_weight_diff={diff:.3g}")
    sys.exit(0 if diff < 1e-5 else 1)
""")


def test_mirrored_two_cpus_matches_one_device(tmp_path):
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "replicas=2" in result.stdout


@pytest.mark.slow
def test_multi_worker_two_processes(toy_data, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", *toy_data, tmp_path / "run", epochs=2, strategy="multi_worker",
                          ema_momentum=0.9)  # weight averaging under multi_worker too
    workers = [f"localhost:{p}" for p in free_ports(2)]
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        processes.append(_run_cli(["train", str(recipe)], env={"TF_CONFIG": json.dumps(tf_config)}))
    outputs = [p.communicate(timeout=400)[0] for p in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("*.keras")) == ["best_model.keras", "last_model.keras"]
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2
    assert "done: resnet20_cifar" in outputs[0]


def test_fit_keeps_one_iterator_per_run_for_datasets_of_known_length():
    import tensorflow as tf

    from keras_resnet.training.fit import one_iterator_per_run

    batches = tf.data.Dataset.range(10).shuffle(10, seed=0, reshuffle_each_iteration=True).batch(3, drop_remainder=True)
    repeated, steps = one_iterator_per_run(batches, None)
    assert steps == 3
    iterator = iter(repeated)
    passes = [sorted(int(v) for _ in range(steps) for v in next(iterator)) for _ in range(2)]
    assert len(passes[0]) == len(passes[1]) == 9  # every pass is a full pass of the dataset, then the next one
    # A length tf.data cannot know, and no steps_per_epoch: left as it is.
    unknown = batches.filter(lambda batch: tf.reduce_sum(batch) >= 0)
    assert one_iterator_per_run(unknown, None) == (unknown, None)
    # steps_per_epoch that does not divide a pass (2 of 3 batches): every epoch still gets its 2 batches,
    # continuing where the last epoch stopped (a finite dataset ran dry in every other epoch).
    for dataset in (batches, unknown):
        repeated, steps = one_iterator_per_run(dataset, 2)
        assert steps == 2
        iterator = iter(repeated)
        epochs = [[next(iterator) for _ in range(steps)] for _ in range(5)]
        assert all(len(epoch) == 2 for epoch in epochs)


def test_steps_per_epoch_that_does_not_divide_a_pass_trains_every_step(toy_data, tmp_path, capsys):
    import warnings

    # 48 training images in batches of 8: 6 batches a pass; 4 steps an epoch left the second epoch 2 steps short.
    recipe = write_recipe(tmp_path / "r.yaml", *toy_data, tmp_path / "run", epochs=3, steps_per_epoch=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", str(recipe)]) == 0
    captured = capsys.readouterr()
    messages = [str(warning.message) for warning in caught] + [captured.out + captured.err]
    assert not any("ran out of data" in message for message in messages), messages
