"""Head warm-up then fine-tuning (`train.head_epochs`), for every task (`keras_resnet.training.fit.fit_in_phases`).

What must hold: in phase 1 the backbone does not move and the head does; phase 2 trains the backbone (but
`model.freeze_stages`) at `train.fine_tune_learning_rate`; history.csv has each epoch once; a rerun of a
finished head phase restores it instead of training it again; detection and segmentation runs take the
two phases from their recipes.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_resnet.config import load_config
from keras_resnet.runs import RunPaths
from keras_resnet.training import fit
from tests.helpers import SEGMENTATION_RECIPE, TINY_BACKBONE, tiny_classifier

CLASSIFICATION_RECIPE = "tasks/classification/fashion_mnist_resnet20.yaml"


def weights_of(layer):
    return [w.copy() for w in layer.get_weights()]


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


class Snapshots(keras.callbacks.Callback):
    """The backbone's and the head's weights at the end of every epoch, and the learning rate used."""

    def __init__(self):
        super().__init__()
        self.backbone, self.head = {}, {}

    def on_epoch_end(self, epoch, logs=None):
        self.backbone[epoch] = weights_of(self.model.backbone)
        self.head[epoch] = weights_of(self.model.get_layer("predictions"))


def test_phase_one_moves_the_head_only_and_phase_two_the_rest(tmp_path, capsys):
    keras.utils.set_random_seed(0)
    cfg = load_config(CLASSIFICATION_RECIPE, ["train.epochs=3", "train.head_epochs=1", "train.warmup_epochs=0",
                                              "train.learning_rate=0.05", "train.fine_tune_learning_rate=0.001",
                                              "model.freeze_stages=0", "train.optimizer=adamw",
                                              "train.schedule=constant"])
    model = tiny_classifier(channels=1, num_classes=2, size=16)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (32, 16, 16, 1)).astype(np.float32)
    labels = tf.one_hot(rng.integers(0, 2, 32), 2)
    train = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    paths = RunPaths.of(tmp_path / "run")
    (tmp_path / "run").mkdir()
    start_backbone, start_head = weights_of(model.backbone), weights_of(model.get_layer("predictions"))
    stem = [weights_of(model.backbone.get_layer(name)) for name in ("conv1_conv", "conv1_bn")]
    snapshots = Snapshots()

    def compile_model(target, optimizer):
        target.compile(optimizer=optimizer, loss="categorical_crossentropy", metrics=["accuracy"])

    fit.fit_in_phases(model, cfg, train, train, paths, compile_model=compile_model, steps_per_epoch=4,
                      extra_callbacks=[snapshots], monitor="val_accuracy", title="t", best_key="accuracy",
                      panels=(("loss", "loss"),))
    out = capsys.readouterr().out
    assert "phase 1: 1 epoch(s)" in out and "phase 2: fine-tuning epochs 2-3" in out
    assert same(snapshots.backbone[0], start_backbone)  # frozen, BatchNorm statistics included
    assert not same(snapshots.head[0], start_head)
    assert not same(snapshots.backbone[2], start_backbone)
    # freeze_stages=0: the stem stays as it was in phase 2 too
    assert all(same(weights_of(model.backbone.get_layer(name)), before)
               for name, before in zip(("conv1_conv", "conv1_bn"), stem))
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    rows = [dict(zip(history[0].split(","), line.split(","))) for line in history[1:]]
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2]
    assert [float(row["learning_rate"]) for row in rows] == pytest.approx([0.05, 0.001, 0.001])
    assert (tmp_path / "run" / "backup" / "head_phase.weights.h5").exists()

    # Run again: the finished head phase is restored, not trained again.
    fit.fit_in_phases(model, cfg, train, train, paths, compile_model=compile_model, steps_per_epoch=4,
                      monitor="val_accuracy", title="t", best_key="accuracy", panels=(("loss", "loss"),))
    assert "head phase already finished; restoring" in capsys.readouterr().out


def test_segmentation_recipes_train_in_two_phases(tiny_fashion_mnist, tmp_path, capsys, monkeypatch):
    from keras_resnet.cli import main

    monkeypatch.setenv("KERAS_RESNET_MOSAIC_CACHE", str(tmp_path / "mosaic"))
    run = tmp_path / "run"
    overrides = ["train.epochs=2", "train.head_epochs=1", "data.mosaic_train_size=16", "data.mosaic_val_size=8",
                 "data.batch_size=8", "model.input_shape=[32,32,1]", "train.mixed_precision=false",
                 f"output_dir={run}", "model.backbone_args=" + json.dumps({"output_stride": 16, **TINY_BACKBONE})]
    assert main(["train", SEGMENTATION_RECIPE, "--set", *overrides]) == 0
    out = capsys.readouterr().out
    assert "phase 1: 1 epoch(s) training the head with the backbone frozen" in out
    assert "phase 2: fine-tuning epochs 2-2" in out
    assert len((run / "history.csv").read_text().splitlines()) == 3
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2


@pytest.mark.parametrize("recipe", ["tasks/classification/finetune_image_folder.yaml",
                                    "tasks/detection/finetune_voc_retinanet_resnet50.yaml",
                                    "tasks/segmentation/finetune_mask_folder_fpn_resnet50.yaml"])
def test_fine_tune_recipes_start_from_imagenet_with_a_head_warm_up(recipe):
    cfg = load_config(recipe)
    assert cfg.model.weights == "imagenet" and cfg.model.input_shape[-1] == 3
    assert 0 < cfg.train.head_epochs < cfg.train.epochs
    assert cfg.train.fine_tune_learning_rate < cfg.train.learning_rate


@pytest.mark.parametrize("reference, factor", [(None, 1.0), (128, 4.0), (1024, 0.5)])
def test_learning_rate_batch_size_scales_both_phases_linearly(reference, factor):
    from keras_resnet.training.optimizers import make_optimizer

    cfg = load_config(CLASSIFICATION_RECIPE, ["data.batch_size=512", "train.learning_rate=0.1",
                                              "train.schedule=constant", "train.warmup_epochs=0",
                                              f"train.learning_rate_batch_size={reference or 'null'}"])
    for given, expected in ((None, 0.1 * factor), (0.02, 0.02 * factor)):  # train.learning_rate, a phase's own
        optimizer = make_optimizer(cfg.train, 10, 2, given, warmup=False, batch_size=cfg.data.batch_size)
        assert float(optimizer.learning_rate) == pytest.approx(expected)
