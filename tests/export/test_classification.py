"""Tests for keras_resnet.export (classifiers) and keras_resnet.predict.classification and their CLI commands.

Models are tiny (one block per stage, 32x32 inputs). A module-scoped run
dir holds a classifier trained for a few seconds on three colour classes
(reddish / greenish / bluish noise images), with `run.json` and a
`recipe.yaml` over image folders, as a training run writes them.

What is asserted:
* float exports (SavedModel, ONNX, TFLite fp32) pass `export_model`'s own
  check (relative max diff <= 1e-4) and the test re-checks the figures;
* float16 / dynamic-range TFLite: top-1 agreement 1.0 with the trained model
  (their error is reported, not bounded, by export_model);
* int8 TFLite on the trained model: top-1 agreement >= 0.99 on the
  validation images (with 24 images: every one agrees), calibrated on the
  recipe's training images;
* every backbone family (random BN statistics, logits output) converts to
  all three formats with a dynamic batch, within 1e-4 relative;
* `predict_files` gives the same top class for `.keras`, run dir,
  SavedModel, TFLite and ONNX.
"""

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml
from PIL import Image

from keras_resnet.cli import main
from keras_resnet.data.images import find_image_files
from keras_resnet.export import export_model, load_exported_model
from keras_resnet.export import parity as export_parity
from keras_resnet.export.keras_model import load_model_source
from keras_resnet.predict.classification import predict_files
from keras_resnet_settings.errors import ExportParityError, ModelError
from tests.helpers import randomize_batch_norm, tiny_classifier

CLASS_COLOURS = {"blue": (30, 60, 200), "green": (40, 190, 60), "red": (210, 40, 40)}
TRAIN_PER_CLASS = 16
VAL_PER_CLASS = 8
SIZE = 32


def colour_images(colour, count, rng):
    """Noisy images around one colour, with random sizes (resizing is exercised)."""
    images = []
    for _ in range(count):
        height, width = rng.integers(28, 44, size=2)
        noise = rng.normal(0, 35, size=(height, width, 3))
        images.append(np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8))
    return images


def write_class_folders(root, per_class, rng):
    for name, colour in CLASS_COLOURS.items():
        (root / name).mkdir(parents=True)
        for index, image in enumerate(colour_images(colour, per_class, rng)):
            Image.fromarray(image).save(root / name / f"{index}.png")


def load_folder(root):
    """(images at SIZE x SIZE, labels) of a class-folder tree, via the predict loader."""
    from keras_resnet.data.images import load_images

    files, labels = [], []
    for label, name in enumerate(sorted(CLASS_COLOURS)):
        class_files = find_image_files(root / name)
        files += class_files
        labels += [label] * len(class_files)
    return load_images(files, SIZE, SIZE, 3), np.asarray(labels)


@pytest.fixture(scope="module")
def run_dir(classifier_run):
    """The trained run (a session fixture of tests/export/conftest.py, shared with test_int8_io)."""
    return classifier_run


def make_run_dir(tmp_path_factory):
    """A trained tiny classifier in a run output_dir, as training writes it."""
    root = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    write_class_folders(root / "data" / "train", TRAIN_PER_CLASS, rng)
    write_class_folders(root / "data" / "val", VAL_PER_CLASS, rng)
    keras.utils.set_random_seed(0)
    model = tiny_classifier()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    images, labels = load_folder(root / "data" / "train")
    model.fit(images, labels, batch_size=16, epochs=8, verbose=0)
    val_images, val_labels = load_folder(root / "data" / "val")
    accuracy = np.mean(np.argmax(model.predict(val_images, verbose=0), -1) == val_labels)
    assert accuracy == 1.0, f"the tiny model should learn the colour classes, got val accuracy {accuracy}"
    output = root / "output"
    output.mkdir()
    model.save(output / "best_model.keras")
    recipe = {
        "task": "classification",
        "model": {"backbone": "resnet20_cifar", "num_classes": 3, "input_shape": [SIZE, SIZE, 3]},
        "data": {
            "source": "image_folder",
            "train": str(root / "data" / "train"),
            "val": str(root / "data" / "val"),
            "batch_size": 8,
        },
        "output_dir": str(output),
    }
    (output / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run_info = {
        "task": "classification",
        "preset": "resnet20_cifar",
        "input_shape": [SIZE, SIZE, 3],
        "num_classes": 3,
        "class_names": sorted(CLASS_COLOURS),
        "preprocessing": {"mean": [127.5] * 3, "std": [63.75] * 3},
    }
    (output / "run.json").write_text(json.dumps(run_info))
    return output


@pytest.fixture(scope="module")
def run_exports(run_dir, tmp_path_factory):
    """The run exported to SavedModel, ONNX and TFLite fp32 (batch 1)."""
    output = tmp_path_factory.mktemp("exports")
    return {
        fmt: export_model(run_dir, format=fmt, output=output, parity_samples=24)
        for fmt in ("saved_model", "onnx", "tflite")
    }


def assert_float_parity(result):
    parity = result["parity"]
    assert parity["passed"], parity
    assert parity["relative_max_diff"] <= 1e-4
    assert parity["top1_agreement"] == 1.0


# --------------------------------------------------------------------------- loading


def test_load_model_source_reads_run_dir(run_dir):
    source = load_model_source(run_dir)
    assert source.path.endswith("best_model.keras")
    assert source.name == "output"
    assert source.class_names == ["blue", "green", "red"]
    assert source.recipe_path.endswith("recipe.yaml")


def test_load_model_source_falls_back_to_last_model(tmp_path):
    tiny_classifier().save(tmp_path / "last_model.keras")
    assert load_model_source(tmp_path).path.endswith("last_model.keras")


def test_load_model_source_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model_source(tmp_path / "missing.keras")
    with pytest.raises(ValueError, match="neither best_model.keras nor last_model.keras"):
        load_model_source(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a Keras model"):
        load_model_source(tmp_path / "notes.txt")
    (tmp_path / "broken.keras").write_text("not a zip")
    with pytest.raises(ValueError, match="broken.keras is not a valid .keras archive"):
        load_model_source(tmp_path / "broken.keras")


def test_export_argument_errors(tmp_path):
    model_file = tmp_path / "model.keras"
    tiny_classifier().save(model_file)
    with pytest.raises(ValueError, match="applies only to format='tflite'"):
        export_model(model_file, format="onnx", quantize="int8", output=tmp_path)
    with pytest.raises(ValueError, match="'format' must be one of 'saved_model', 'tflite', 'onnx', got 'coreml'"):
        export_model(model_file, format="coreml", output=tmp_path)
    with pytest.raises(ValueError, match="batch_size must be a positive int or 'dynamic'"):
        export_model(model_file, format="onnx", batch_size=0, output=tmp_path)
    with pytest.raises(ValueError, match="int8 quantization needs calibration images"):
        export_model(model_file, format="tflite", quantize="int8", output=tmp_path)
    with pytest.raises(ValueError, match="calibration path .* does not exist"):
        export_model(model_file, format="tflite", quantize="int8", calibration=tmp_path / "nope", output=tmp_path)


# --------------------------------------------------------------------------- float exports


def test_run_dir_float_exports(run_exports, run_dir):
    assert {fmt: Path(r["path"]).name for fmt, r in run_exports.items()} == {
        "saved_model": "saved_model",
        "onnx": "output.onnx",
        "tflite": "output_fp32.tflite",
    }
    for result in run_exports.values():
        assert_float_parity(result)
        assert result["parity"]["sample_source"].startswith("validation images of")
        metadata = json.loads(Path(result["metadata_path"]).read_text())
        assert metadata["class_names"] == ["blue", "green", "red"]
        assert metadata["preset"] == "resnet20_cifar"
        assert metadata["input_shape"] == [SIZE, SIZE, 3]
        assert metadata["batch_size"] == 1
        assert metadata["input"]["format"] == "float32 raw pixels 0..255, NHWC"
        assert metadata["preprocessing"]["mean"] == [0.5] * 3
        assert metadata["source_model"] == str((run_dir / "best_model.keras").resolve())
        assert metadata["parity"]["passed"] is True
        assert "tensorflow" in metadata["tool_versions"]
    assert "onnxruntime" in json.loads(Path(run_exports["onnx"]["metadata_path"]).read_text())["tool_versions"]


def test_saved_model_signatures(run_exports, run_dir):
    loaded = tf.saved_model.load(run_exports["saved_model"]["path"])
    assert set(loaded.signatures) == {"serving_default", "serve_float"}
    model = load_model_source(run_dir).model
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(2, 45, 38, 3), dtype=np.uint8)  # any size: resized inside
    outputs = loaded.signatures["serving_default"](images=tf.constant(pixels))
    assert set(outputs) == {"probabilities", "top_class", "top_score"}
    resized = tf.image.resize(pixels.astype(np.float32), [SIZE, SIZE], method="bilinear")
    expected = model(resized, training=False).numpy()
    np.testing.assert_allclose(outputs["probabilities"].numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(outputs["top_class"].numpy(), np.argmax(expected, -1))
    np.testing.assert_allclose(outputs["top_score"].numpy(), expected.max(-1), atol=1e-5)
    serving = run_exports["saved_model"]["parity"]["checks"]["serving_default"]
    assert serving["relative_max_diff"] <= 1e-4 and serving["top_class_matches_argmax"]


def test_input_size_override_rebuilds_the_model(run_dir, tmp_path):
    result = export_model(run_dir, format="onnx", input_size=(40, 48), output=tmp_path, parity_samples=8)
    assert_float_parity(result)
    exported = load_exported_model(result["path"])
    assert exported.input_shape == (40, 48, 3) and exported.batch_size == 1


def test_an_int8_miss_says_how_to_get_past_it(run_dir, tmp_path, monkeypatch):
    from keras_resnet.export.classification import ClassificationExport

    monkeypatch.setattr(ClassificationExport, "int8_rule", lambda self, figures: ("top-1 agreement >= 2", False))
    with pytest.raises(ExportParityError, match="for int8: calibrate on more or other images .*keras-resnet qat "
                                                ".*--int8-min-agreement"):
        export_model(run_dir, format="tflite", quantize="int8", output=tmp_path, parity_samples=4,
                     calibration_samples=4)


def test_a_failing_export_never_replaces_the_passing_one(run_dir, tmp_path, monkeypatch):
    passing = export_model(run_dir, format="onnx", output=tmp_path, parity_samples=4)
    artefact, metadata_file = Path(passing["path"]), Path(passing["metadata_path"])
    kept = artefact.read_bytes(), metadata_file.read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(export_parity, "FLOAT_RELATIVE_TOLERANCE", -1.0)
        with pytest.raises(ExportParityError, match="fails its parity check .* kept for inspection as .*"
                                                    "output.rejected.onnx .the earlier .*output.onnx is unchanged"):
            export_model(run_dir, format="onnx", output=tmp_path, parity_samples=4)
    assert (artefact.read_bytes(), metadata_file.read_bytes()) == kept  # artefact and metadata untouched
    rejected = json.loads((tmp_path / "output.rejected.onnx.json").read_text())
    assert rejected["parity"]["passed"] is False and rejected["rejected"]["intended_path"] == str(artefact)
    with pytest.raises(ModelError, match="failed its parity check .* kept for inspection only"):
        load_exported_model(tmp_path / "output.rejected.onnx")
    load_exported_model(artefact)  # the passing one still serves
    export_model(run_dir, format="onnx", output=tmp_path, parity_samples=4)  # passes again: the stale reject goes
    assert sorted(path.name for path in tmp_path.iterdir()) == ["output.onnx", "output.onnx.json"]


def test_mixed_precision_model_exports_in_float32(tmp_path):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = tiny_classifier()
    keras.mixed_precision.set_global_policy("float32")
    model_file = tmp_path / "mixed.keras"
    model.save(model_file)
    for fmt in ("onnx", "tflite"):
        result = export_model(model_file, format=fmt, output=tmp_path, parity_samples=4)
        assert_float_parity(result)
        metadata = json.loads(Path(result["metadata_path"]).read_text())
        assert "mixed_bfloat16" in metadata["source_dtype_policies"]


# --------------------------------------------------------------------------- quantized TFLite


@pytest.mark.slow
def test_quantized_tflite(run_dir, tmp_path):
    train_folder = run_dir.parent / "data" / "train"
    for quantize in ("float16", "dynamic"):
        result = export_model(run_dir, format="tflite", quantize=quantize, calibration=train_folder, output=tmp_path)
        assert Path(result["path"]).name == f"output_{quantize}.tflite"
        assert result["parity"]["sample_source"] == f"images in {train_folder}"
        assert result["parity"]["top1_agreement"] == 1.0
        assert result["parity"]["criterion"] == "reported only"
    # int8: calibrated on the recipe's training images, checked on its validation images.
    recipe = run_dir / "recipe.yaml"
    result = export_model(
        run_dir, format="tflite", quantize="int8", calibration=recipe, output=tmp_path, batch_size="dynamic"
    )
    parity = result["parity"]
    assert parity["samples"] == len(CLASS_COLOURS) * VAL_PER_CLASS
    assert parity["top1_agreement"] >= 0.99 and parity["passed"]
    metadata = json.loads(Path(result["metadata_path"]).read_text())
    assert metadata["int8"]["io"].startswith("float32 input and output")
    assert metadata["int8"]["calibration_samples"] == len(CLASS_COLOURS) * TRAIN_PER_CLASS
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=result["path"])
    assert interpreter.get_input_details()[0]["dtype"] == np.float32
    assert interpreter.get_output_details()[0]["dtype"] == np.float32
    tensor_types = {detail["dtype"] for detail in interpreter.get_tensor_details()}
    assert np.int8 in tensor_types


# --------------------------------------------------------------------------- backbone families

IMAGENET_SMALL = dict(stackwise_num_blocks=[1, 1, 1, 1], stackwise_num_filters=[16, 16, 32, 32])
FAMILIES = {
    "v1": ("resnet50_v1", {}),
    "v1.5": ("resnet50", {}),
    "v2": ("resnet50_v2", {}),
    "resnext": ("resnext50_32x4d", {}),
    "se": ("seresnet50", {}),
    "dilated_os16": ("resnet50", {"output_stride": 16}),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_backbone_family_exports(family, tmp_path):
    preset, overrides = FAMILIES[family]
    keras.utils.set_random_seed(0)
    # Logits, not softmax: a random network's softmax often saturates to one-hot,
    # which would make the parity check trivially exact.
    model = tiny_classifier(preset=preset, num_classes=4, activation=None, **IMAGENET_SMALL, **overrides)
    randomize_batch_norm(model)  # converters fold BN: non-trivial statistics test the folding
    model_file = tmp_path / f"{family}.keras"
    model.save(model_file)
    # The converters (tf2onnx, TFLite) are where a family's ops (groups, SE, dilation, pre-activation) can go
    # wrong; a SavedModel is TensorFlow itself, checked once.
    for fmt in (("saved_model",) if family == "v1.5" else ()) + ("onnx", "tflite"):
        result = export_model(model_file, format=fmt, batch_size="dynamic", output=tmp_path, parity_samples=6)
        assert_float_parity(result)
        assert result["parity"]["sample_source"].startswith("random uniform")
        exported = load_exported_model(result["path"])
        assert exported.batch_size is None
        logits = exported.predict(np.full((3, SIZE, SIZE, 3), 128.0, np.float32))  # batch of 3
        assert logits.shape == (3, 4)
    assert json.loads(Path(result["metadata_path"]).read_text())["output"]["values"] == "logits (no activation)"


def test_grayscale_model_exports_with_fixed_batch(tmp_path):
    model_file = tmp_path / "gray.keras"
    tiny_classifier(channels=1).save(model_file)
    for fmt in ("saved_model", "onnx", "tflite"):
        result = export_model(model_file, format=fmt, batch_size=2, output=tmp_path, parity_samples=5)
        assert_float_parity(result)
        assert load_exported_model(result["path"]).batch_size == 2  # 5 samples: last batch padded


# --------------------------------------------------------------------------- predict


def test_predict_same_top_class_in_every_form(run_dir, run_exports):
    val_folder = run_dir.parent / "data" / "val"
    forms = [run_dir, run_dir / "best_model.keras"] + [r["path"] for r in run_exports.values()]
    results = {str(form): predict_files(form, val_folder, top_k=2) for form in forms}
    expected_classes = [Path(r["image"]).parent.name for r in results[str(run_dir)]]
    for form, result in results.items():
        assert [r["image"] for r in result] == find_image_files(val_folder)
        assert [r["top"][0]["class"] for r in result] == expected_classes, form
        assert all(len(r["top"]) == 2 and r["top"][0]["score"] >= r["top"][1]["score"] for r in result)


# --------------------------------------------------------------------------- CLI


def test_cli_export_and_predict(run_dir, tmp_path, capsys):
    output = tmp_path / "cli"
    assert main(["export", str(run_dir), "--format", "tflite", "--output", str(output), "--parity-samples", "6"]) == 0
    assert "parity tflite fp32" in capsys.readouterr().out
    tflite_file = output / "output_fp32.tflite"
    assert tflite_file.is_file() and (output / "output_fp32.tflite.json").is_file()
    val_folder = run_dir.parent / "data" / "val"
    assert main(["predict", str(tflite_file), str(val_folder / "red"), "--top-k", "1", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["top"][0]["class"] for r in results] == ["red"] * VAL_PER_CLASS
    assert main(["predict", str(run_dir), str(val_folder / "blue" / "0.png")]) == 0
    assert "blue" in capsys.readouterr().out


def test_tflite_export_and_predict_print_no_native_runtime_noise(run_dir, tmp_path, capfd):
    # The converter's "fully_quantize: 0, ..." and the runtime's "INFO: Created TensorFlow Lite XNNPACK delegate"
    # come from C++ on file descriptor 2; the CLI keeps them out of what a user reads.
    assert main(["export", str(run_dir), "--format", "tflite", "--quantize", "dynamic", "--output", str(tmp_path),
                 "--parity-samples", "4"]) == 0
    (artefact,) = tmp_path.glob("*.tflite")
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(image)
    assert main(["predict", str(artefact), str(image), "--json"]) == 0
    out, err = capfd.readouterr()
    for noise in ("XNNPACK", "fully_quantize", "inference_type"):
        assert noise not in out + err, (noise, out + err)
    assert "parity tflite dynamic" in out


@pytest.mark.slow
def test_cli_int8_calibrates_on_the_run_recipe(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--format", "tflite", "--quantize", "int8", "--output", str(tmp_path)]) == 0
    *_, line, written = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("parity tflite int8:") and "validation images of" in line and line.endswith(": ok]")
    assert written == f"wrote {tmp_path / 'output_int8.tflite'} (metadata {tmp_path / 'output_int8.tflite.json'})"
    metadata = json.loads((tmp_path / "output_int8.tflite.json").read_text())
    assert metadata["int8"]["calibration"] == f"training images of {run_dir / 'recipe.yaml'}"


def test_cli_errors_return_2(run_dir, tmp_path, capsys, monkeypatch):
    assert main(["export", str(tmp_path / "missing"), "--format", "onnx"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--format", "onnx", "--quantize", "int8", "--output", str(tmp_path)]) == 2
    assert main(["predict", str(run_dir), str(tmp_path / "missing.png")]) == 2
    assert "missing.png does not exist" in capsys.readouterr().err
    monkeypatch.setattr(export_parity, "FLOAT_RELATIVE_TOLERANCE", -1.0)
    assert main(["export", str(run_dir), "--format", "onnx", "--output", str(tmp_path), "--parity-samples", "4"]) == 2
    assert "fails its parity check" in capsys.readouterr().err
