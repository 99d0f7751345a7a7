"""Export of segmenters (SavedModel, TFLite, ONNX) and prediction with the exports.

Models are tiny (ResNet-18 with one block per stage and 16..128 filters,
head width 16, 32x32 inputs). A module-scoped run dir holds a DeepLabV3+
trained for a few seconds to find a red and a green rectangle on dark
noise (3 classes), with `run.json` and a `mask_folder` `recipe.yaml`, as
segmentation training writes them.

What is asserted:
* float exports (SavedModel, ONNX, TFLite fp32) of the trained run pass
  `export_model`'s check (per-pixel probabilities within 1e-4 relative of
  Keras) on the recipe's validation images, and their masks agree with
  Keras on every pixel; their outputs are "probabilities" (float32
  `(N, H, W, classes)`) and "mask" (int32 `(N, H, W)`);
* the SavedModel's uint8 `serving_default` takes any image size and
  returns probabilities and mask at that size;
* an untrained FPN segmenter (random BN statistics, softmax output) saved
  under mixed_bfloat16 exports in float32 with a dynamic batch, to ONNX at
  another input size (fractional resize ratios) and to TFLite;
* int8 TFLite, calibrated on the run recipe's training images, reports
  pixel agreement and mask mIoU against Keras and passes the 0.98 gate;
* `keras-resnet export` of the run dir and `keras-resnet predict` with the
  exported TFLite write mask and overlay PNGs matching the Keras masks.
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
from keras_resnet.export import export_model, load_exported_model
from keras_resnet.export.loading import model_task
from keras_resnet.layers.core import ImageNormalization
from keras_resnet.models.resnet.backbone import ResNetBackbone
from keras_resnet.models.segmentation.losses import SegmentationCrossEntropy
from keras_resnet.models.segmentation.segmenter import ResNetSegmenter
from keras_resnet.predict.classification import predict_files
from keras_resnet.predict.segmentation import predict_masks
from tests.helpers import randomize_batch_norm

SIZE = 32
CLASS_NAMES = ["background", "red", "green"]
COLOURS = {1: (220, 60, 50), 2: (50, 200, 80)}
NARROW = {"stackwise_num_blocks": [1, 1, 1, 1], "stackwise_num_filters": [16, 32, 64, 128]}
TRAIN_IMAGES, VAL_IMAGES = 32, 8
# The run's decoder fuses C3 (stride 8) then C2 (stride 4): exports must carry a two-level decoder too.
DECODER_LEVELS = ["C3", "C2"]


def tiny_segmenter(head="deeplabv3plus", input_shape=(SIZE, SIZE, 3), num_classes=3, output_stride=8, **kwargs):
    """Output stride 8 by default: dilated convs in the last two stages and in ASPP (rates 2, 3)."""
    backbone = ResNetBackbone.from_preset("resnet18", input_shape=input_shape, output_stride=output_stride, **NARROW)
    kwargs.setdefault("preprocessing", ImageNormalization(mean=[70.0] * 3, std=[60.0] * 3))
    if head == "deeplabv3plus":
        kwargs.setdefault("aspp_rates", [1, 2, 3])  # the 4x4 stride-8 map of a 32x32 input
    return ResNetSegmenter(backbone, num_classes, head=head, head_width=16, decoder_width=8, **kwargs)


def scene(rng, height=SIZE, width=SIZE):
    """Dark noise with a red and a green rectangle; the mask labels them 1 and 2."""
    image = rng.normal(40, 15, (height, width, 3))
    mask = np.zeros((height, width), np.uint8)
    for label, colour in COLOURS.items():
        box_h, box_w = rng.integers(height // 4, height // 2 + 1), rng.integers(width // 4, width // 2 + 1)
        top, left = rng.integers(0, height - box_h + 1), rng.integers(0, width - box_w + 1)
        image[top : top + box_h, left : left + box_w] = np.asarray(colour) + rng.normal(0, 15, (box_h, box_w, 3))
        mask[top : top + box_h, left : left + box_w] = label
    return np.clip(image, 0, 255).astype(np.uint8), mask


def write_split(folder, count, rng):
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    images, masks = [], []
    for index in range(count):
        image, mask = scene(rng)
        Image.fromarray(image).save(folder / "images" / f"{index}.png")
        Image.fromarray(mask, mode="L").save(folder / "masks" / f"{index}.png")
        images.append(image)
        masks.append(mask)
    (folder / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    return np.stack(images).astype(np.float32), np.stack(masks).astype(np.int32)


@pytest.fixture(scope="module")
def run_dir(segmenter_run):
    """The trained run (a session fixture of tests/export/conftest.py, shared with test_int8_io)."""
    return segmenter_run


def make_run_dir(tmp_path_factory):
    """A trained tiny DeepLabV3+ (two-level decoder) in a segmentation run output_dir, as training writes it."""
    root = tmp_path_factory.mktemp("segmentation_run")
    rng = np.random.default_rng(0)
    images, masks = write_split(root / "data" / "train", TRAIN_IMAGES, rng)
    val_images, val_masks = write_split(root / "data" / "val", VAL_IMAGES, rng)
    keras.utils.set_random_seed(0)
    model = tiny_segmenter(decoder_level=DECODER_LEVELS)
    model.compile(optimizer=keras.optimizers.Adam(5e-3), loss=SegmentationCrossEntropy())
    model.fit(images, masks, batch_size=8, epochs=15, verbose=0)
    accuracy = np.mean(np.argmax(model.predict(val_images, verbose=0), -1) == val_masks)
    assert accuracy > 0.9, f"the tiny segmenter should find the rectangles, got pixel accuracy {accuracy}"
    output = root / "output"
    output.mkdir()
    model.save(output / "best_model.keras")
    recipe = {
        "task": "segmentation",
        "model": {
            "backbone": "resnet18",
            "backbone_args": {"output_stride": 8, **NARROW},
            "head": "deeplabv3plus",
            "head_args": {
                "head_width": 16, "decoder_width": 8, "aspp_rates": [1, 2, 3], "decoder_level": DECODER_LEVELS
            },
            "num_classes": 3,
            "input_shape": [SIZE, SIZE, 3],
        },
        "data": {
            "source": "mask_folder",
            "train": str(root / "data" / "train"),
            "val": str(root / "data" / "val"),
            "batch_size": 8,
        },
        "train": {"loss": "ce"},
        "output_dir": str(output),
    }
    (output / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run_info = {
        "task": "segmentation",
        "preset": "resnet18",
        "head": "deeplabv3plus",
        "output_stride": 8,
        "input_shape": [SIZE, SIZE, 3],
        "num_classes": 3,
        "class_names": CLASS_NAMES,
        "ignore_index": 255,
        "preprocessing": {"mean": [70.0] * 3, "std": [60.0] * 3, "input_range": [0, 255]},
    }
    (output / "run.json").write_text(json.dumps(run_info))
    return output


@pytest.fixture(scope="module")
def run_exports(run_dir, tmp_path_factory):
    """The run exported to SavedModel, ONNX and TFLite fp32 (batch 1)."""
    output = tmp_path_factory.mktemp("segmentation_exports")
    return {
        fmt: export_model(run_dir, format=fmt, output=output, parity_samples=VAL_IMAGES)
        for fmt in ("saved_model", "onnx", "tflite")
    }


def assert_float_parity(parity):
    assert parity["passed"], parity
    assert parity["relative_max_diff"] <= 1e-4
    # a logits model: what logits agreeing to 1e-4 allow (test_parity_catches.py), at least 1e-4
    assert parity["criterion"].startswith("relative max diff <= ")
    assert parity.get("probability_tolerance", 1e-4) >= 1e-4
    assert parity["pixel_agreement"] >= 0.999 and parity["mask_miou"] >= 0.99


# --------------------------------------------------------------------------- float exports


def test_run_dir_float_exports(run_exports, run_dir):
    assert {fmt: Path(r["path"]).name for fmt, r in run_exports.items()} == {
        "saved_model": "saved_model",
        "onnx": "output.onnx",
        "tflite": "output_fp32.tflite",
    }
    images = np.random.default_rng(3).uniform(0, 255, (3, SIZE, SIZE, 3)).astype(np.float32)
    keras_outputs = load_exported_model(run_dir).predict_outputs(images)
    for fmt, result in run_exports.items():
        assert result["task"] == "segmentation"
        parity = result["parity"]
        assert_float_parity(parity)
        assert parity["sample_source"] == f"validation images of {run_dir / 'recipe.yaml'}"
        assert parity["samples"] == VAL_IMAGES and parity["pixels"] == VAL_IMAGES * SIZE * SIZE
        metadata = json.loads(Path(result["metadata_path"]).read_text())
        assert metadata["task"] == "segmentation" and metadata["class_names"] == CLASS_NAMES
        assert metadata["num_classes"] == 3 and metadata["input_shape"] == [SIZE, SIZE, 3]
        assert [o["name"] for o in metadata["outputs"]] == ["probabilities", "mask"]
        assert metadata["outputs"][0]["shape"] == [1, SIZE, SIZE, 3] and metadata["outputs"][1]["dtype"] == "int32"
        assert metadata["segmentation"] == {
            "head": "deeplabv3plus", "output_stride": 8, "model_output": "logits", "ignore_index": 255
        }
        assert metadata["preprocessing"]["mean"] == [70.0] * 3
        assert metadata["parity"]["pixel_agreement"] == parity["pixel_agreement"]
        exported = load_exported_model(result["path"])
        assert exported.task == "segmentation" and exported.output_names == ("probabilities", "mask")
        outputs = exported.predict_outputs(images)  # 3 images through a batch-1 artefact
        assert outputs["probabilities"].shape == (3, SIZE, SIZE, 3) and outputs["probabilities"].dtype == np.float32
        assert outputs["mask"].shape == (3, SIZE, SIZE) and outputs["mask"].dtype == np.int32, fmt
        np.testing.assert_allclose(outputs["probabilities"].sum(-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(outputs["probabilities"], keras_outputs["probabilities"], atol=1e-4)
        assert np.mean(outputs["mask"] == keras_outputs["mask"]) >= 0.999, fmt


def test_saved_model_uint8_signature_answers_at_the_image_size(run_exports, run_dir):
    loaded = tf.saved_model.load(run_exports["saved_model"]["path"])
    assert set(loaded.signatures) == {"serving_default", "serve_float"}
    pixels = np.random.default_rng(1).integers(0, 256, size=(2, 45, 38, 3), dtype=np.uint8)
    outputs = loaded.signatures["serving_default"](images=tf.constant(pixels))
    assert set(outputs) == {"probabilities", "mask"}
    assert outputs["probabilities"].shape == (2, 45, 38, 3) and outputs["mask"].shape == (2, 45, 38)
    model = keras.saving.load_model(run_dir / "best_model.keras")
    logits = model(tf.image.resize(pixels.astype(np.float32), [SIZE, SIZE], method="bilinear"))
    logits = tf.image.resize(logits, [45, 38], method="bilinear")
    np.testing.assert_allclose(outputs["probabilities"].numpy(), tf.nn.softmax(logits).numpy(), atol=1e-5)
    assert np.mean(outputs["mask"].numpy() == np.argmax(logits, -1)) >= 0.999
    serving = run_exports["saved_model"]["parity"]["checks"]["serving_default"]
    assert serving["relative_max_diff"] <= 1e-4 and serving["pixel_agreement"] >= 0.999


def test_untrained_mixed_precision_fpn_exports_in_float32(tmp_path):
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = tiny_segmenter("fpn", num_classes=4, activation="softmax", output_stride=16)
    keras.mixed_precision.set_global_policy("float32")
    randomize_batch_norm(model)  # converters fold BN: non-trivial statistics test the folding
    model_file = tmp_path / "fpn.keras"
    model.save(model_file)
    assert model_task(model_file) == "segmentation"  # a bare .keras: from its class
    # ONNX at 40x48: the FPN resizes 3x3 -> 5x6, a fractional scale tf2onnx alone gets wrong.
    for fmt, size in (("onnx", (40, 48)), ("tflite", None)):
        result = export_model(
            model_file, format=fmt, input_size=size, batch_size="dynamic", output=tmp_path, parity_samples=4
        )
        assert_float_parity(result["parity"])
        assert result["parity"]["sample_source"].startswith("random uniform")
        metadata = json.loads(Path(result["metadata_path"]).read_text())
        assert "mixed_bfloat16" in metadata["source_dtype_policies"] and metadata["task"] == "segmentation"
        assert metadata["segmentation"]["model_output"] == "softmax"
        exported = load_exported_model(result["path"])
        height, width = size or (SIZE, SIZE)
        assert exported.batch_size is None and exported.input_shape == (height, width, 3)
        outputs = exported.predict_outputs(np.full((3, height, width, 3), 128.0, np.float32))
        assert outputs["probabilities"].shape == (3, height, width, 4) and outputs["mask"].shape == (3, height, width)


def test_a_segmenter_with_huge_logits_reports_their_scale_and_passes(tmp_path):
    # An untrained deep segmenter can output logits of 1e5: the float gate allows what logits agreeing to 1e-4 of
    # their magnitude allow (tests/export/test_parity_catches.py tests the rule on near-tied logits).
    keras.utils.set_random_seed(0)
    model = tiny_segmenter("fpn", num_classes=4)
    last = [layer for layer in model.layers if getattr(layer, "kernel", None) is not None][-1]
    last.kernel.assign(last.kernel * 3e4)
    model_file = tmp_path / "loud.keras"
    model.save(model_file)
    result = export_model(model_file, format="tflite", output=tmp_path, parity_samples=4)
    parity = result["parity"]
    assert parity["logit_scale"] > 1e3 and parity["passed"], parity
    assert parity["criterion"].startswith("relative max diff <=") and "softmax of logits up to" in parity["criterion"]
    assert parity["pixel_agreement"] >= 0.99


# --------------------------------------------------------------------------- int8


def test_int8_reports_pixel_agreement_against_keras(run_dir, tmp_path, capsys):
    result = export_model(run_dir, format="tflite", quantize="int8", output=tmp_path, batch_size="dynamic")
    parity = result["parity"]
    assert parity["criterion"] == "pixel agreement >= 0.98" and parity["passed"], parity
    assert parity["pixel_agreement"] >= 0.98 and 0.9 <= parity["mask_miou"] <= 1.0
    assert parity["samples"] == VAL_IMAGES and parity["sample_source"].startswith("validation images of")
    printed = capsys.readouterr().out
    line = printed.strip().splitlines()[-1]
    assert line.startswith("parity tflite int8:") and "pixel agreement" in line and "mask mIoU" in line
    metadata = json.loads(Path(result["metadata_path"]).read_text())
    # A dilated (output stride < 32) segmenter: the converter's min/max, said and recorded (see calibration.py)
    assert "has dilated convolutions" in printed and metadata["int8"]["calibration_method"] == "minmax"
    assert metadata["int8"]["calibration"] == f"training images of {run_dir / 'recipe.yaml'}"
    assert metadata["int8"]["calibration_samples"] == TRAIN_IMAGES and metadata["int8"]["min_agreement"] == 0.98
    assert metadata["parity"]["pixel_agreement"] == parity["pixel_agreement"]
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=result["path"])
    assert interpreter.get_input_details()[0]["dtype"] == np.float32
    assert {detail["dtype"] for detail in interpreter.get_output_details()} == {np.float32, np.int32}
    assert np.int8 in {detail["dtype"] for detail in interpreter.get_tensor_details()}


# --------------------------------------------------------------------------- CLI and predict


def test_cli_export_and_predict_overlays_with_the_tflite(run_dir, tmp_path, capsys):
    output = tmp_path / "cli"
    assert main(["export", str(run_dir), "--format", "tflite", "--output", str(output), "--parity-samples", "4"]) == 0
    assert "parity tflite fp32" in capsys.readouterr().out
    tflite_file = output / "output_fp32.tflite"
    assert model_task(tflite_file) == "segmentation"
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(5)
    for name, (height, width) in {"wide": (36, 52), "square": (SIZE, SIZE)}.items():
        Image.fromarray(scene(rng, height, width)[0]).save(photos / f"{name}.png")
    assert main(["predict", str(tflite_file), str(photos), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [Path(r["image"]).name for r in results] == ["square.png", "wide.png"]
    assert Path(results[0]["overlay"]).parent == output / "predictions"
    keras_results = predict_masks(run_dir, photos, tmp_path / "keras")
    for result, keras_result in zip(results, keras_results):
        with Image.open(result["overlay"]) as overlay, Image.open(result["image"]) as image:
            assert overlay.size == image.size and overlay.mode == "RGB"
        with Image.open(result["mask"]) as mask, Image.open(keras_result["mask"]) as keras_mask:
            assert mask.mode == "P" and np.asarray(mask).max() < 3
            assert np.mean(np.asarray(mask) == np.asarray(keras_mask)) >= 0.999
    with pytest.raises(ValueError, match="is a segmentation model; use"):
        predict_files(tflite_file, photos)
