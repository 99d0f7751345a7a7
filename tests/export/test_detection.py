"""Export of RetinaNet detectors (SavedModel, TFLite, ONNX) and prediction with the exports.

A module-scoped detection run is trained by `keras-resnet train` for two
steps on a tiny mosaic of a Fashion-MNIST stand-in (a ResNet-18 with
8..64 filters, FPN width 16, one head conv, levels 3-5, 64x64x1 input).
Its scores sit near the 0.01 prior, so the exports decode with
`score_threshold` 0.01: dozens of detections per image to compare.

What is asserted:
* SavedModel, TFLite fp32 and ONNX exports with NMS inside pass
  `export_model`'s check on the recipe's validation canvases: every Keras
  detection above the threshold (+ margin) is matched by class with its
  box within 1 px, none extra; the SavedModel's raw outputs are within
  1e-4; the TFLite model uses builtin ops only (NMS included, no Flex);
* the SavedModel's uint8 `serving_default` takes an image of another size,
  letterboxes it inside and returns boxes in that image's pixels, as
  `predict_boxes` does with the run dir;
* a raw TFLite export is decoded with the metadata's decoder; an int8
  TFLite keeps the decoder in float32 and reports its agreement; with
  `io="uint8"` it takes uint8 raw pixels (scale 1, zero point 0) and still
  returns float boxes and scores;
* `keras-resnet predict` with the exported TFLite prints the boxes and
  writes `<stem>_boxes.png`; `detection_parity` tolerates score ties at
  the threshold and catches a shifted box.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_resnet.cli import main
from keras_resnet.export import export_model, load_exported_model
from keras_resnet.export.detection_parity import detection_parity
from keras_resnet.export.loading import model_task
from keras_resnet.export.tflite import tflite_ops
from keras_resnet.predict.detection import predict_boxes
from tests.helpers import DETECTION_RECIPE, TINY_DETECTOR, write_shape_fashion_mnist

RECIPE = DETECTION_RECIPE
TINY = [*TINY_DETECTOR, "train.epochs=1", "train.steps_per_epoch=2"]
DECODER = {"score_threshold": 0.01, "max_detections": 50}
SAMPLES = 8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("detection_export")
    fashion = write_shape_fashion_mnist(root / "fashion")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_RESNET_FASHION_MNIST_DIR", str(fashion))
        patch.setenv("KERAS_RESNET_MOSAIC_CACHE", str(root / "mosaic_cache"))
        run = root / "run"
        assert main(["train", RECIPE, "--set", *TINY, f"output_dir={run}"]) == 0
        yield run


@pytest.fixture(scope="module")
def float_exports(run_dir):
    output = run_dir.parent / "exports"
    return {
        (format, outputs): export_model(run_dir, format=format, output=output, parity_samples=SAMPLES,
                                        decoder_args=DECODER, detection_outputs=outputs)
        for format, outputs in (("saved_model", "decoded"), ("tflite", "decoded"), ("onnx", "decoded"),
                                ("tflite", "raw"))
    }


def test_float_exports_match_keras_detections(float_exports):
    for (format, outputs), result in float_exports.items():
        parity = result["parity"]
        assert result["task"] == "detection" and parity["passed"], (format, outputs)
        assert parity["sample_source"].startswith("validation images of") and parity["images"] == SAMPLES
        assert parity["compared"] >= 20, (format, parity)  # non-trivial: many boxes above the threshold
        assert parity["matched"] == parity["compared"] and parity["unmatched_export"] == 0
        assert parity["max_box_diff"] <= 1e-3 and parity["agreement_iou90"] == 1.0
        assert parity["keras_mAP"] == pytest.approx(parity["export_mAP"], abs=1e-6)
        metadata = json.loads(open(result["metadata_path"]).read())
        assert metadata["task"] == "detection" and metadata["parity"]["passed"]
        assert metadata["detection"]["decoder"]["score_threshold"] == DECODER["score_threshold"]
        assert len(metadata["class_names"]) == metadata["num_classes"] == 10
        exported = load_exported_model(result["path"])
        assert exported.task == "detection" and model_task(result["path"]) == "detection"
        detections = exported.predict_outputs(np.zeros((3, 64, 64, 1), np.float32))
        assert detections["boxes"].shape == (3, 50, 4) and detections["classes"].dtype == np.int32
    saved = float_exports["saved_model", "decoded"]["parity"]
    assert saved["raw"]["relative_max_diff"] <= 1e-4 and saved["checks"]["serving_default"]["unmatched_keras"] == 0
    saved_model = load_exported_model(float_exports["saved_model", "decoded"]["path"])
    assert saved_model.predict(np.zeros((2, 64, 64, 1), np.float32)).shape == (2, 756, 14)  # serve_raw
    raw = float_exports["tflite", "raw"]
    assert raw["path"].endswith("_raw.tflite") and raw["parity"]["raw"]["relative_max_diff"] <= 1e-4
    assert load_exported_model(raw["path"]).output_names[-1] == "raw"


def test_tflite_detector_uses_builtin_ops_only(float_exports):
    for outputs in ("decoded", "raw"):
        ops = tflite_ops(open(float_exports["tflite", outputs]["path"], "rb").read())
        assert not [op for op in ops if op.startswith("CUSTOM") or "FLEX" in op], ops
        assert ("NON_MAX_SUPPRESSION_V5" in ops) == (outputs == "decoded"), ops
    metadata = json.loads(open(float_exports["tflite", "decoded"]["metadata_path"]).read())
    assert "NON_MAX_SUPPRESSION_V5" in metadata["tflite_ops"]


def test_saved_model_serving_default_letterboxes_any_size(run_dir, float_exports, tmp_path):
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 60, (90, 150)).astype(np.uint8)
    image[20:70, 30:60] = 200
    image[10:50, 90:140] = 140
    Image.fromarray(image).save(tmp_path / "scene.png")
    (expected,) = predict_boxes(run_dir, [tmp_path / "scene.png"], tmp_path / "out", **DECODER)
    loaded = tf.saved_model.load(float_exports["saved_model", "decoded"]["path"])
    outputs = loaded.signatures["serving_default"](images=tf.constant(image[None, ..., None]))
    count = int(outputs["num_detections"][0])
    assert count == len(expected["detections"]) > 0
    boxes = outputs["boxes"][0, :count].numpy()
    assert np.abs(boxes - [d["box"] for d in expected["detections"]]).max() <= 0.06  # rounded to 0.1 px
    assert boxes[:, 2].max() <= 150 and boxes[:, 3].max() <= 90


def test_int8_keeps_the_decoder_in_float(run_dir, tmp_path):
    result = export_model(run_dir, format="tflite", quantize="int8", output=tmp_path, parity_samples=SAMPLES,
                          calibration_samples=16, decoder_args=DECODER)
    parity = result["parity"]
    assert parity["passed"] and parity["agreement_iou50"] >= 0.9 and parity["compared"] > 0
    metadata = json.loads(open(result["metadata_path"]).read())
    ops = metadata["tflite_ops"]
    assert {"QUANTIZE", "DEQUANTIZE", "NON_MAX_SUPPRESSION_V5"} <= set(ops) and "int8" in metadata
    assert not [op for op in ops if op.startswith("CUSTOM")]


def test_int8_uint8_io_takes_raw_pixels_and_keeps_float_outputs(run_dir, tmp_path):
    """`io="uint8"`: uint8 input (scale 1, zero point 0) into the int8 network; decoder, NMS and outputs float."""
    from ai_edge_litert.interpreter import Interpreter

    result = export_model(run_dir, format="tflite", quantize="int8", io="uint8", output=tmp_path,
                          parity_samples=SAMPLES, calibration_samples=16, decoder_args=DECODER)
    assert result["path"].endswith("run_int8_uint8io.tflite")
    parity = result["parity"]
    assert parity["passed"] and parity["agreement_iou50"] >= 0.9 and parity["compared"] > 0
    metadata = json.loads(Path(result["metadata_path"]).read_text())
    assert metadata["io"] == "uint8" and metadata["input"]["dtype"] == "uint8"
    assert metadata["input"]["quantization"] == {"scale": 1.0, "zero_point": 0}
    assert {entry["name"]: entry["dtype"] for entry in metadata["outputs"]} == {
        "boxes": "float32", "scores": "float32", "classes": "int32", "num_detections": "int32"}
    assert metadata["int8"]["boundary_ops"]["inputs"]["images"] == ["QUANTIZE(uint8 -> int8)"]
    assert not [op for op in metadata["tflite_ops"] if op.startswith(("CUSTOM", "FLEX"))]
    interpreter = Interpreter(model_path=result["path"])
    runner = interpreter.get_signature_runner()
    assert runner.get_input_details()["images"]["dtype"] == np.uint8
    pixels = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 1), dtype=np.uint8)
    raw = runner(images=pixels)  # raw pixels in, float boxes out: nothing to quantize or dequantize
    assert raw["boxes"].dtype == np.float32 and raw["scores"].dtype == np.float32
    exported = load_exported_model(result["path"]).predict_outputs(pixels.astype(np.float32))
    for name in ("boxes", "scores", "classes", "num_detections"):
        np.testing.assert_array_equal(exported[name], raw[name])


def test_cli_predict_with_the_exported_tflite(run_dir, float_exports, tmp_path, capsys):
    model = float_exports["tflite", "decoded"]["path"]
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((50, 90, 3), 30, np.uint8)).save(photo)
    capsys.readouterr()
    assert main(["predict", model, str(photo), "--output", str(tmp_path / "out"), "--max-detections", "3"]) == 0
    printed = capsys.readouterr().out
    assert "detections of" in printed and "photo.png" in printed
    with Image.open(tmp_path / "out" / "photo_boxes.png") as drawn:
        assert drawn.size == (90, 50)
    assert main(["predict", model, str(photo), "--json", "--output", str(tmp_path / "out"),
                 "--max-detections", "3"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    (expected,) = predict_boxes(run_dir, [photo], tmp_path / "keras", score_threshold=0.01, max_detections=3)
    assert len(result["detections"]) == 3
    for got, want in zip(result["detections"], expected["detections"]):
        assert got["class"] == want["class"] and np.allclose(got["box"], want["box"], atol=0.11)


def _detections(rows, k=5):
    boxes, scores, classes = np.zeros((1, k, 4), np.float32), np.zeros((1, k), np.float32), -np.ones((1, k), np.int32)
    for i, (box, score, cls) in enumerate(rows):
        boxes[0, i], scores[0, i], classes[0, i] = box, score, cls
    return {"boxes": boxes, "scores": scores, "classes": classes, "num_detections": np.array([len(rows)], np.int32)}


def test_detection_parity_tolerates_threshold_ties_and_catches_moved_boxes():
    class Decoder:
        score_threshold, max_detections = 0.05, 5

    keras = _detections([([0, 0, 10, 10], 0.9, 1), ([20, 20, 40, 40], 0.5, 2), ([5, 5, 9, 9], 0.0505, 0)])
    tie = _detections([([0, 0, 10, 10], 0.9, 1), ([20, 20, 40, 40], 0.5, 2)])  # the 0.0505 one fell under 0.05
    figures = detection_parity(keras, tie, Decoder)
    assert figures["compared"] == 2 and figures["matched"] == 2 and figures["unmatched_export"] == 0
    moved = _detections([([0, 0, 10, 10], 0.9, 1), ([22, 20, 42, 40], 0.5, 2)])
    figures = detection_parity(keras, moved, Decoder)
    assert figures["unmatched_keras"] == 1 and figures["unmatched_export"] == 1
    assert figures["agreement_iou50"] == 1.0 and figures["agreement_iou90"] == 0.5
    relabelled = _detections([([0, 0, 10, 10], 0.9, 3), ([20, 20, 40, 40], 0.5, 2)])
    assert detection_parity(keras, relabelled, Decoder)["agreement_iou50"] == 0.5
