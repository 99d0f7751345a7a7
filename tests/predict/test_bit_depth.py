"""Prediction reads 16-bit images at the bit depth the run recorded (run.json `bit_depth`), as training did."""

import json

import keras
import numpy as np
from PIL import Image

from keras_resnet.predict.classification import predict_files
from keras_resnet.predict.segmentation import predict_masks
from keras_resnet.predict.tiling import predict_tiled


def brightness_classifier():
    """Class 1 when the mean pixel is above 128, class 0 below (8x8 grey inputs)."""
    inputs = keras.Input((8, 8, 1))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    dense = keras.layers.Dense(2, activation="softmax")
    outputs = dense(pooled)
    dense.set_weights([np.asarray([[-0.1, 0.1]], np.float32), np.asarray([12.8, -12.8], np.float32)])
    return keras.Model(inputs, outputs)


def threshold_segmenter():
    """Per-pixel class 1 above 128, class 0 below (8x8 grey inputs)."""
    inputs = keras.Input((8, 8, 1))
    conv = keras.layers.Conv2D(2, 1)
    outputs = conv(inputs)
    conv.set_weights([np.asarray([-0.1, 0.1], np.float32).reshape(1, 1, 1, 2), np.asarray([12.8, -12.8], np.float32)])
    return keras.Model(inputs, outputs)


def write_run(folder, model, task, **run_info):
    folder.mkdir()
    model.save(folder / "best_model.keras")
    (folder / "run.json").write_text(json.dumps({"task": task, "input_shape": [8, 8, 1], **run_info}))
    return folder


def flat16(path, value):
    Image.fromarray(np.full((8, 8), value, np.uint16)).save(path)
    return path


def test_predict_reads_16_bit_images_at_the_recorded_depth(tmp_path):
    # The audit's case: trained on dim (1000-6000) and bright (40000-45000) 16-bit images, bit_depth 16.
    dim = flat16(tmp_path / "a4000.png", 4000)  # 4000 / 257 = 16: dark
    tiff = flat16(tmp_path / "a4100.tif", 4100)
    classifier = brightness_classifier()
    run = write_run(tmp_path / "run", classifier, "classification", bit_depth=16, class_names=["dim", "bright"])
    assert [r["top"][0]["class"] for r in predict_files(run, [dim, tiff])] == ["dim", "dim"]
    # a run without the record (trained before it): each image at its own depth, 4000 of 4095 reads 249
    old = write_run(tmp_path / "old", classifier, "classification", class_names=["dim", "bright"])
    assert [r["top"][0]["class"] for r in predict_files(old, [dim])] == ["bright"]

    segmenter = write_run(tmp_path / "seg", threshold_segmenter(), "segmentation", bit_depth=16, num_classes=2)
    (result,) = predict_masks(segmenter, [dim], tmp_path / "masks")
    with Image.open(result["mask"]) as mask:
        assert np.asarray(mask).max() == 0
    tiled = predict_tiled(segmenter / "best_model.keras", str(dim))
    assert tiled["mask"].max() == 0 and tiled["mask"].shape == (8, 8)
