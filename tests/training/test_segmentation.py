"""Segmentation training: resume on the right canvases; CLI train, evaluate and predict end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from keras_resnet.config import load_config
from keras_resnet.data.segmentation import (
    build_segmentation_datasets,
)
from tests.helpers import (
    FRESH_MOSAIC_OVERRIDES,
    TINY_BACKBONE,
    mask_epochs,
    write_shape_items,
)
from tests.helpers import SEGMENTATION_RECIPE as RECIPE


def test_a_resumed_run_trains_on_the_canvases_of_its_epochs(tiny_fashion_mnist, tmp_path, monkeypatch):
    overrides = list(FRESH_MOSAIC_OVERRIDES)
    cfg = load_config(RECIPE, overrides)
    uninterrupted, _, info = build_segmentation_datasets(cfg, seed=0)
    epochs = [np.sort(masks.reshape(24, -1), 0) for masks in mask_epochs(uninterrupted, 3)]
    resumed, _, resumed_info = build_segmentation_datasets(cfg, seed=0, start_epoch=2)
    resumed_first = np.sort(mask_epochs(resumed, 1)[0].reshape(24, -1), 0)
    np.testing.assert_array_equal(resumed_first, epochs[2])  # epoch 3's canvases, not epoch 1's again
    assert not np.array_equal(resumed_first, epochs[0])
    assert resumed_info["mean"] == info["mean"] and resumed_info["std"] == info["std"]  # same statistics sample

    # train_segmentation builds its data for the epoch BackupAndRestore will resume at
    from keras_resnet.training import segmentation as segmentation_training
    from keras_resnet.training.fit import backup_epoch

    run = tmp_path / "run"
    backup = run / "backup" / "main"
    assert backup_epoch(str(backup)) == 0
    backup.mkdir(parents=True)
    (backup / "training_metadata.json").write_text('{"epo')  # killed while writing it
    with pytest.raises(ValueError, match=r"training_metadata.json is unreadable .*delete .*backup/main"):
        backup_epoch(str(backup))
    (backup / "training_metadata.json").write_text(json.dumps({"epoch": 2, "batch": 0}))
    assert backup_epoch(str(backup)) == 2
    seen = {}

    def record(cfg, seed=0, start_epoch=0):
        seen["start_epoch"] = start_epoch
        raise RuntimeError("stop after the data")

    monkeypatch.setattr(segmentation_training, "build_segmentation_datasets", record)
    with pytest.raises(RuntimeError, match="stop after the data"):
        segmentation_training.train_segmentation(load_config(RECIPE, [*overrides, f"output_dir={run}"]))
    assert seen == {"start_epoch": 2}



@pytest.fixture
def two_shape_fashion_mnist(tmp_path, monkeypatch):
    """Fashion-MNIST stand-in with two learnable classes: wide dim rectangles (T-shirt/top), narrow bright ones
    (Ankle boot)."""
    directory = write_shape_items(tmp_path / "fashion", classes=(0, 9))
    monkeypatch.setenv("KERAS_RESNET_FASHION_MNIST_DIR", str(directory))
    return directory


def test_cli_train_evaluate_and_predict_masks(two_shape_fashion_mnist, tmp_path, capsys):
    from keras_resnet.cli import main
    from keras_resnet.predict.segmentation import predict_masks

    run = tmp_path / "run"
    # 64 steps at a raised learning rate: enough for the tiny net to segment both classes well above
    # the all-background baseline (measured mIoU 0.56, pixel accuracy 0.884; all-background 0.28, 0.839).
    overrides = [
        "train.epochs=8", "train.warmup_epochs=0", "train.learning_rate=0.005",
        "data.mosaic_train_size=64", "data.mosaic_val_size=8", "data.batch_size=8",
        "model.input_shape=[32,32,1]", "train.mixed_precision=false", f"output_dir={run}",
        "model.backbone_args=" + json.dumps({"output_stride": 16, **TINY_BACKBONE}),
    ]
    assert main(["train", RECIPE, "--set", *overrides]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    # Floors over what predicting background everywhere scores on the same validation masks: a run
    # whose weights do not train, whose masks do not match its images, or whose evaluation is
    # constant stays at or below that baseline.
    _, val_ds, _ = build_segmentation_datasets(load_config(RECIPE, overrides), seed=0)
    masks = np.concatenate([masks for _, masks in val_ds.as_numpy_iterator()])
    background = float(np.mean(masks == 0))  # pixel accuracy of all-background
    all_background_miou = background / len(np.unique(masks))  # IoU 0 for every item class present
    assert np.unique(masks).tolist() == [0, 1, 10]
    assert metrics["pixel_accuracy"] >= background + 0.02, (metrics["pixel_accuracy"], background)
    assert metrics["mIoU"] >= all_background_miou + 0.15, (metrics["mIoU"], all_background_miou)
    for name in ("T-shirt/top", "Ankle boot"):  # each class learned, not just item vs background
        assert metrics["per_class_iou"][name] >= 0.2, (name, metrics["per_class_iou"])
    assert len(metrics["per_class_iou"]) == 11 and metrics["epochs"] == 8
    assert json.loads((run / "run.json").read_text())["task"] == "segmentation"
    for name in ("best_model.keras", "history.csv", "training_curves.png", "val_predictions.png", "recipe.yaml"):
        assert (run / name).exists(), name
    assert "per-class IoU" in capsys.readouterr().out
    assert yaml.safe_load((run / "recipe.yaml").read_text())["task"] == "segmentation"

    assert main(["evaluate", RECIPE, "--set", *overrides]) == 0
    assert json.loads((run / "metrics.json").read_text())["mIoU"] == pytest.approx(metrics["mIoU"])

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.full((45, 61, 3), 200, np.uint8)).save(photos / "wide.png")
    Image.fromarray(np.full((20, 18), 90, np.uint8)).save(photos / "small.jpg")
    results = predict_masks(run, photos, tmp_path / "out")
    assert [r["image"] for r in results] == [str(photos / "small.jpg"), str(photos / "wide.png")]
    with Image.open(results[1]["mask"]) as mask:
        assert mask.size == (61, 45) and mask.mode == "P" and np.asarray(mask).max() < 11
    with Image.open(results[0]["overlay"]) as overlay:
        assert overlay.size == (18, 20) and overlay.mode == "RGB"
    # the CLI's predict dispatches segmentation runs to the overlay writer
    capsys.readouterr()
    assert main(["predict", str(run), str(photos / "wide.png"), "--output", str(tmp_path / "cli_out"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert Path(printed[0]["overlay"]).exists() and Path(printed[0]["overlay"]).parent == tmp_path / "cli_out"
