"""Full-integer TFLite I/O (`--io uint8|int8`) and int8 export of quantization-aware models.

The classifier and segmenter runs are the session fixtures of
tests/export/conftest.py (trained once, shared with `test_classification`
and `test_segmentation`). Each run is exported int8 with float I/O
(as before) and with integer I/O; what is asserted:

* the integer-I/O model takes uint8 raw pixels with scale exactly 1 and
  zero point 0 (int8: zero point -128), returns uint8 / int8
  probabilities (scale 1/256) and an int32 mask, has builtin ops only and
  no float32 tensor anywhere (no float QUANTIZE / DEQUANTIZE at its
  boundary), and its metadata records the I/O and its quantization;
* run bare in `ai_edge_litert` on raw pixels (outputs dequantized by hand)
  it agrees with the float-I/O int8 export: classifier top-1 on every
  validation image (24 / 24), segmenter argmax on >= 99 % of the pixels
  (measured: 99.84 %);
* `load_exported_model` / `predict` feed it float pixels and read
  dequantized probabilities (within 0.05 of the float-I/O int8 model's);
* the input scale is 1 even when the calibration images span 40..200;
  without the [0, 255] FakeQuant it is not, and the export stops with a
  `ModelError`;
* `--io uint8` without `--quantize int8` is a one-line CLI error;
* a quantization-aware model (a hand-made fake-quant layer standing in for
  `keras_resnet.quantization`'s) exports int8 without calibration images,
  "quantization_source": "qat", and exports in float with a note.
"""

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import keras_resnet.quantization
from keras_resnet.cli import main
from keras_resnet.data.images import find_image_files, load_images
from keras_resnet.export import export_model, load_exported_model
from keras_resnet.export import tflite as export_tflite
from keras_resnet.export.tflite import interior_float_tensors, tflite_ops
from keras_resnet.predict.classification import predict_files
from keras_resnet_settings.errors import ExportError, ModelError
from tests.export.test_classification import SIZE as CLASSIFIER_SIZE
from tests.helpers import tiny_classifier

INPUT_QUANTIZATION = {"uint8": (1.0, 0), "int8": (1.0, -128)}
PROBABILITY_QUANTIZATION = {"uint8": (1 / 256, 0), "int8": (1 / 256, -128)}
CALIBRATION = 12  # calibration images of each int8 export (fewer: faster)


def interpreter_of(path):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    return interpreter


def run_raw(path, pixels: np.ndarray) -> dict:
    """The model's signature outputs on uint8 `pixels`, fed as the input dtype says (uint8 as is, int8 - 128).

    Outputs come back as the model gives them (no dequantization), with their details.
    """
    interpreter = interpreter_of(path)
    runner = interpreter.get_signature_runner()
    input_detail = runner.get_input_details()["images"]
    dtype = input_detail["dtype"]
    fed = pixels if dtype == np.uint8 else (pixels.astype(np.int16) - 128).astype(np.int8)
    outputs = {name: [] for name in runner.get_output_details()}
    for image in fed:
        for name, value in runner(images=image[None]).items():
            outputs[name].append(value)
    return {name: np.concatenate(values) for name, values in outputs.items()}, runner.get_output_details()


def dequantized(value, detail):
    scale, zero_point = detail["quantization"]
    return (value.astype(np.float32) - zero_point) * scale


def read_json(path):
    return json.loads(Path(path).read_text())


# --------------------------------------------------------------------------- classifier


@pytest.fixture(scope="module")
def classifier_exports(classifier_run, tmp_path_factory):
    """The trained classifier exported int8 with float I/O (API) and with uint8 and int8 I/O (CLI)."""
    output = tmp_path_factory.mktemp("int8_io_classifier")
    recipe = str(classifier_run / "recipe.yaml")
    exports = {"float": export_model(classifier_run, format="tflite", quantize="int8", calibration=recipe,
                                     output=output, parity_samples=24, calibration_samples=CALIBRATION)}
    for io in ("uint8", "int8"):
        args = ["export", str(classifier_run), "--format", "tflite", "--quantize", "int8", "--io", io,
                "--calibration", recipe, "--output", str(output), "--parity-samples", "24",
                "--calibration-samples", str(CALIBRATION)]
        assert main(args) == 0
        path = output / f"output_int8_{io}io.tflite"
        exports[io] = {"path": str(path), "metadata_path": str(path) + ".json"}
    return exports


def validation_pixels(run_dir):
    """uint8 validation images at the model size, and their class names (folder names)."""
    files = find_image_files(run_dir.parent / "data" / "val")
    images = load_images(files, CLASSIFIER_SIZE, CLASSIFIER_SIZE, 3)
    return np.clip(np.round(images), 0, 255).astype(np.uint8), [Path(f).parent.name for f in files]


@pytest.mark.parametrize("io", ["uint8", "int8"])
def test_integer_io_classifier_takes_raw_pixels_and_matches_the_float_io_int8(
        io, classifier_exports, classifier_run):
    path, float_io = Path(classifier_exports[io]["path"]), classifier_exports["float"]
    assert Path(float_io["path"]).name == "output_int8.tflite" and path.is_file()
    interpreter = interpreter_of(path)
    (input_detail,), (output_detail,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert input_detail["dtype"] == np.dtype(io) and input_detail["quantization"] == INPUT_QUANTIZATION[io]
    assert output_detail["dtype"] == np.dtype(io)
    assert output_detail["quantization"] == pytest.approx(PROBABILITY_QUANTIZATION[io])
    model_bytes = path.read_bytes()
    ops = tflite_ops(model_bytes)
    assert not [op for op in ops if op.startswith(("CUSTOM", "FLEX"))] and "DEQUANTIZE" not in ops, ops
    assert interior_float_tensors(model_bytes) == []
    assert {str(d["dtype"]) for d in interpreter.get_tensor_details()} >= {f"<class 'numpy.{io}'>"}
    assert np.float32 not in {d["dtype"] for d in interpreter.get_tensor_details()}  # integer end to end

    metadata = read_json(classifier_exports[io]["metadata_path"])
    assert metadata["io"] == io and metadata["quantization"] == "int8"
    assert metadata["input"]["dtype"] == io
    assert metadata["input"]["quantization"] == dict(zip(("scale", "zero_point"), INPUT_QUANTIZATION[io]))
    assert metadata["output"]["dtype"] == io
    quantization = metadata["int8"]["io_quantization"]
    assert quantization["images"] == {"dtype": io, "scale": 1.0, "zero_point": INPUT_QUANTIZATION[io][1]}
    assert (quantization["probabilities"]["scale"], quantization["probabilities"]["zero_point"]) == pytest.approx(
        PROBABILITY_QUANTIZATION[io])
    assert metadata["int8"]["quantization_source"] == "ptq" and metadata["int8"]["calibration_samples"] == CALIBRATION
    assert metadata["tflite_ops"] == ops and metadata["parity"]["passed"]
    assert read_json(float_io["metadata_path"])["io"] == "float"

    # bare interpreter, raw pixels in, outputs dequantized by hand
    pixels, classes = validation_pixels(classifier_run)
    raw, details = run_raw(path, pixels)
    probabilities = dequantized(raw["probabilities"], details["probabilities"])
    reference = load_exported_model(float_io["path"]).predict(pixels.astype(np.float32))
    agreement = np.mean(probabilities.argmax(-1) == reference.argmax(-1))
    assert agreement == 1.0, agreement  # measured: 24 / 24
    assert np.abs(probabilities - reference).max() < 0.05
    assert [sorted(["blue", "green", "red"])[i] for i in probabilities.argmax(-1)] == classes

    # load_exported_model feeds float pixels and dequantizes: same probabilities as the bare run
    exported = load_exported_model(path)
    np.testing.assert_allclose(exported.predict(pixels.astype(np.float32)), probabilities, atol=1e-6)


def test_predict_with_the_uint8_io_tflite(classifier_exports, classifier_run, capsys):
    val_folder = classifier_run.parent / "data" / "val"
    results = predict_files(classifier_exports["uint8"]["path"], val_folder, top_k=3)
    assert [r["top"][0]["class"] for r in results] == [Path(r["image"]).parent.name for r in results]
    for result in results:
        scores = [entry["score"] for entry in result["top"]]
        assert 0.0 <= min(scores) and max(scores) <= 1.0 and sum(scores) == pytest.approx(1.0, abs=0.03)
    assert main(["predict", classifier_exports["int8"]["path"], str(val_folder / "red"), "--top-k", "1",
                 "--json"]) == 0
    assert {r["top"][0]["class"] for r in json.loads(capsys.readouterr().out)} == {"red"}


def test_cli_integer_io_needs_int8(classifier_run, tmp_path, capsys):
    for quantize in (["--quantize", "none"], [], ["--quantize", "dynamic"]):
        args = ["export", str(classifier_run), "--format", "tflite", "--io", "uint8", "--output", str(tmp_path)]
        assert main(args + quantize) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert "io='uint8'" in err and "--quantize int8" in err
    assert main(["export", str(classifier_run), "--format", "onnx", "--io", "int8"]) == 2
    assert not list(tmp_path.iterdir())
    with pytest.raises(ExportError, match="'io' must be one of 'float', 'uint8', 'int8', got 'int4'"):
        export_model(classifier_run, format="tflite", quantize="int8", io="int4")


@pytest.mark.parametrize("fake_quant", [True, False])
def test_input_scale_is_one_whatever_the_calibration_images_span(fake_quant, tmp_path, monkeypatch):
    """Calibration images spanning 40..200: the [0, 255] FakeQuant still gives the input scale 1 and zero point 0.

    Without it the calibrated input scale is not 1, and the export stops with a `ModelError`. The converter's
    own calibration ("minmax") is what the FakeQuant corrects; "mean_range" calibrates the quantization-aware
    copy, whose input range is fixed at [0, 255] anyway.
    """
    folder = tmp_path / "calibration"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        Image.fromarray(rng.integers(40, 201, (CLASSIFIER_SIZE, CLASSIFIER_SIZE, 3), dtype=np.uint8)).save(
            folder / f"{index}.png")
    model_file = tmp_path / "tiny.keras"
    tiny_classifier().save(model_file)
    options = {"format": "tflite", "quantize": "int8", "io": "uint8", "calibration": folder, "output": tmp_path,
               "parity_samples": 2, "calibration_samples": 4, "calibration_method": "minmax"}
    if fake_quant:
        result = export_model(model_file, **options)
        assert interpreter_of(result["path"]).get_input_details()[0]["quantization"] == (1.0, 0)
        assert interior_float_tensors(Path(result["path"]).read_bytes()) == []
        return
    monkeypatch.setattr(export_tflite, "integer_input", lambda fn: fn)
    with pytest.raises(ModelError, match="input 'images' of the uint8-input TFLite model is .* not .*scale': 1.0"):
        export_model(model_file, **options)
    assert not (tmp_path / "tiny_int8_uint8io.tflite").exists()


# --------------------------------------------------------------------------- segmenter


def test_uint8_io_segmenter_matches_the_float_io_int8(segmenter_run, tmp_path):
    options = {"format": "tflite", "quantize": "int8", "output": tmp_path, "parity_samples": 8,
               "calibration_samples": CALIBRATION}
    float_io = export_model(segmenter_run, **options)
    result = export_model(segmenter_run, io="uint8", **options)
    path = Path(result["path"])
    assert path.name == "output_int8_uint8io.tflite" and Path(float_io["path"]).name == "output_int8.tflite"
    assert result["parity"]["passed"] and result["parity"]["pixel_agreement"] >= 0.98
    interpreter = interpreter_of(path)
    assert interpreter.get_input_details()[0]["quantization"] == (1.0, 0)
    metadata = read_json(result["metadata_path"])
    outputs = {entry["name"]: entry for entry in metadata["outputs"]}
    assert outputs["probabilities"]["dtype"] == "uint8" and outputs["mask"]["dtype"] == "int32"
    assert "quantization" in outputs["probabilities"] and "quantization" not in outputs["mask"]
    assert metadata["int8"]["io_quantization"]["mask"] == {"dtype": "int32"}
    assert metadata["int8"]["boundary_ops"]["outputs"]["mask"].startswith("ARG_MAX(")
    assert interior_float_tensors(path.read_bytes()) == []

    files = find_image_files(segmenter_run.parent / "data" / "val" / "images")
    pixels = np.clip(np.round(load_images(files, 32, 32, 3)), 0, 255).astype(np.uint8)
    raw, details = run_raw(path, pixels)
    assert raw["mask"].dtype == np.int32 and raw["probabilities"].dtype == np.uint8
    reference = load_exported_model(float_io["path"]).predict_outputs(pixels.astype(np.float32))
    agreement = np.mean(raw["mask"] == reference["mask"])
    assert agreement >= 0.99, agreement  # measured: 0.9984 (8 x 32 x 32 pixels; float-I/O int8 vs Keras: 0.9991)
    probabilities = dequantized(raw["probabilities"], details["probabilities"])
    assert np.abs(probabilities - reference["probabilities"]).max() < 0.05
    exported = load_exported_model(path).predict_outputs(pixels.astype(np.float32))
    np.testing.assert_allclose(exported["probabilities"], probabilities, atol=1e-6)
    np.testing.assert_array_equal(exported["mask"], raw["mask"])


# --------------------------------------------------------------------------- quantization-aware models


@keras.saving.register_keras_serializable("test_int8_io")
class FakeQuant(keras.layers.Layer):
    """Per-tensor fake quantization with fixed (as if trained) ranges: a stand-in for keras_resnet.quantization."""

    def __init__(self, low, high, **kwargs):
        super().__init__(**kwargs)
        self.low, self.high = float(low), float(high)

    def build(self, input_shape):
        self.min = self.add_weight(shape=(), initializer=keras.initializers.Constant(self.low), trainable=False)
        self.max = self.add_weight(shape=(), initializer=keras.initializers.Constant(self.high), trainable=False)

    def call(self, inputs):
        return tf.quantization.fake_quant_with_min_max_vars(inputs, self.min, self.max, num_bits=8)

    def get_config(self):
        return {**super().get_config(), "low": self.low, "high": self.high}


def quantize_aware_classifier():
    """Fake quantization after every op: input 0..255, conv, pooling, logits: class 1 when the mean pixel is over 118."""
    inputs = keras.Input((16, 16, 3), name="images")
    x = FakeQuant(0.0, 255.0)(inputs)
    x = keras.layers.Rescaling(1 / 255)(x)
    x = FakeQuant(0.0, 1.0)(x)
    x = keras.layers.Conv2D(4, 3, activation="relu", kernel_initializer="ones", bias_initializer="zeros")(x)
    x = FakeQuant(0.0, 27.0)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = FakeQuant(0.0, 27.0)(x)
    x = keras.layers.Dense(2, kernel_initializer=keras.initializers.Constant([[-0.25, 0.25]] * 4),
                           bias_initializer=keras.initializers.Constant([12.5, -12.5]))(x)
    x = FakeQuant(-16.0, 16.0)(x)
    return keras.Model(inputs, keras.layers.Softmax()(x), name="qat_tiny")


@pytest.fixture
def qat_model(monkeypatch):
    monkeypatch.setattr(
        keras_resnet.quantization, "is_quantize_aware",
        lambda model: any(isinstance(layer, FakeQuant) for layer in model._flatten_layers()),
    )
    return quantize_aware_classifier()


def test_quantization_aware_model_exports_int8_without_calibration(qat_model, tmp_path):
    for io in ("float", "uint8"):
        result = export_model(qat_model, format="tflite", quantize="int8", io=io, output=tmp_path, parity_samples=16)
        metadata = read_json(result["metadata_path"])
        assert metadata["int8"]["quantization_source"] == "qat"
        assert metadata["int8"]["calibration_samples"] == 0
        assert result["parity"]["passed"] and result["parity"]["top1_agreement"] == 1.0
        assert result["parity"]["max_abs_diff"] < 0.02
        model_bytes = Path(result["path"]).read_bytes()
        assert interior_float_tensors(model_bytes) == []
        assert not [op for op in tflite_ops(model_bytes) if op.startswith(("CUSTOM", "FLEX"))]
    assert metadata["input"]["quantization"] == {"scale": 1.0, "zero_point": 0}


def test_quantization_aware_model_float_export_says_so(qat_model, tmp_path, capsys):
    result = export_model(qat_model, format="tflite", output=tmp_path, parity_samples=4)
    assert result["parity"]["passed"]
    assert "note: qat_tiny is quantization-aware" in capsys.readouterr().out
    with pytest.raises(ExportError, match="quantize='float16' would give an int8 model"):
        export_model(qat_model, format="tflite", quantize="float16", output=tmp_path)
