"""The export checks can fail: a perturbed export fails parity, int8 calibration sees the recipe's images.

Each test exports a tiny untrained model to TFLite, then wraps the
`ExportedModel` the job checks (`keras_resnet.export.steps.load_exported_model`)
so the artefact's outputs are perturbed by a known amount.

What is asserted:
* classifier: probabilities + 1e-2 raise `ExportParityError`, and the
  reported max |diff| is the injected 1e-2 (the figures compare the
  export's outputs with Keras', not Keras with itself);
* segmenter: probabilities + 1e-2 raise `ExportParityError`, reported max
  |diff| 1e-2; an unperturbed export passes with max |diff| ~0;
* detector: every box moved by 5 px raises `ExportParityError`, with every
  compared Keras detection unmatched and the 5 px shift in no exact match;
* int8: the representative dataset handed to the TFLite converter yields
  exactly the recipe's training images (no noise, nothing else).
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml
from PIL import Image

from keras_resnet.export import export_model
from keras_resnet.export import steps as export_job
from keras_resnet.layers.core import ImageNormalization
from keras_resnet.models.resnet.backbone import ResNetBackbone
from keras_resnet.models.retinanet.detector import RetinaNetDetector
from keras_resnet.models.segmentation.segmenter import ResNetSegmenter
from keras_resnet_settings.errors import ExportParityError
from tests.helpers import tiny_classifier

PERTURBATION = 1e-2
BOX_SHIFT = 5.0


def perturb_export(monkeypatch, change):
    """Makes the job check an artefact whose outputs are changed by `change(name, array) -> array`."""
    real_load = export_job.load_exported_model

    def load(path):
        exported = real_load(path)
        predict, predict_outputs = exported.predict, exported.predict_outputs
        exported.predict = lambda images: change("probabilities", predict(images))
        exported.predict_outputs = lambda images: {
            name: change(name, value) for name, value in predict_outputs(images).items()
        }
        return exported

    monkeypatch.setattr(export_job, "load_exported_model", load)


def add_to_probabilities(name, value):
    return value + np.float32(PERTURBATION) if name == "probabilities" else value


def test_perturbed_classifier_export_fails_parity(tmp_path, monkeypatch, capsys):
    model = tiny_classifier()
    perturb_export(monkeypatch, add_to_probabilities)
    with pytest.raises(ExportParityError):
        export_model(model, format="tflite", output=tmp_path, parity_samples=4)
    assert "FAILED" in capsys.readouterr().out


    (metadata,) = tmp_path.glob("*.json")
    parity = json.loads(metadata.read_text())["parity"]
    assert parity["passed"] is False
    assert parity["max_abs_diff"] == pytest.approx(PERTURBATION, abs=1e-5)


def tiny_segmenter():
    backbone = ResNetBackbone.from_preset(
        "resnet18", input_shape=(32, 32, 3), output_stride=16,
        stackwise_num_blocks=[1, 1, 1, 1], stackwise_num_filters=[8, 16, 16, 16],
    )
    return ResNetSegmenter(backbone, 3, head="fpn", head_width=8, decoder_width=8,
                           preprocessing=ImageNormalization(mean=[127.0] * 3, std=[60.0] * 3))


def test_perturbed_segmenter_export_fails_parity(tmp_path, monkeypatch):
    model = tiny_segmenter()
    result = export_model(model, format="tflite", output=tmp_path / "clean", parity_samples=2)
    assert result["parity"]["passed"] and result["parity"]["max_abs_diff"] < 1e-4
    perturb_export(monkeypatch, add_to_probabilities)
    with pytest.raises(ExportParityError):
        export_model(model, format="tflite", output=tmp_path / "perturbed", parity_samples=2)


    (metadata,) = (tmp_path / "perturbed").glob("*.json")
    parity = json.loads(metadata.read_text())["parity"]
    assert parity["passed"] is False
    assert parity["max_abs_diff"] == pytest.approx(PERTURBATION, abs=1e-5)


def test_moved_boxes_fail_detector_parity(tmp_path, monkeypatch):
    keras.utils.set_random_seed(0)  # the same untrained detector whatever ran before
    backbone = ResNetBackbone.from_preset("resnet18", input_shape=(64, 64, 3), stackwise_num_filters=[8, 16, 16, 16])
    model = RetinaNetDetector(backbone, 3, fpn_width=8, head_depth=1, max_level=5, anchor_sizes=[8, 16, 32],
                              preprocessing=ImageNormalization(mean=[127.0] * 3, std=[60.0] * 3))
    # Spread the untrained scores (all ~ the 0.01 prior otherwise: ties at every cut).
    head = next(layer for layer in model._flatten_layers(include_self=False, recursive=True)
                if layer.name == "classification_head_output")
    kernel, bias = head.get_weights()
    head.set_weights([np.random.default_rng(0).normal(0, 0.3, kernel.shape), bias])
    decoder = {"score_threshold": 0.05, "max_detections": 20}

    def move_boxes(name, value):
        return value + np.float32(BOX_SHIFT) if name == "boxes" else value

    perturb_export(monkeypatch, move_boxes)
    with pytest.raises(ExportParityError):
        export_model(model, format="tflite", output=tmp_path, parity_samples=2, decoder_args=decoder)


    (metadata,) = tmp_path.glob("*.json")
    parity = json.loads(metadata.read_text())["parity"]
    assert parity["passed"] is False
    assert parity["compared"] > 0, "the untrained detector should give detections to compare"
    assert parity["matched"] == 0 and parity["unmatched_keras"] == parity["compared"]


def test_int8_calibration_yields_the_recipe_training_images(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    train = tmp_path / "data" / "train"
    written = []
    for name in ("a", "b", "c"):
        (train / name).mkdir(parents=True)
        for index in range(3):
            image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(image).save(train / name / f"{index}.png")
            written.append(image.astype(np.float32))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "task": "classification",
        "model": {"backbone": "resnet20_cifar", "num_classes": 3, "input_shape": [32, 32, 3]},
        "data": {"source": "image_folder", "train": str(train), "val": str(train), "batch_size": 4},
        "output_dir": str(tmp_path / "run"),
    }))

    seen = []
    real_from_saved_model = tf.lite.TFLiteConverter.from_saved_model

    def from_saved_model(*args, **kwargs):
        converter = real_from_saved_model(*args, **kwargs)
        real_convert = converter.convert

        def convert():
            if converter.representative_dataset is not None:
                for inputs in converter.representative_dataset():
                    seen.extend(np.asarray(image, np.float32) for image in inputs[0])
            return real_convert()

        converter.convert = convert
        return converter

    monkeypatch.setattr(tf.lite.TFLiteConverter, "from_saved_model", staticmethod(from_saved_model))
    result = export_model(tiny_classifier(), format="tflite", quantize="int8", calibration=recipe,
                          output=tmp_path / "export", parity_samples=4, calibration_method="minmax")
    assert result["quantize"] == "int8"
    assert len(seen) == len(written)
    # The default, "mean_range", takes the same images (its ranges come from them, not from the converter).
    from keras_resnet.quantization import calibration as mean_range

    real_calibrate = mean_range.calibrate_mean_ranges
    calibrated_on = []

    def calibrate(model, images, batch_size=mean_range.CALIBRATION_BATCH):
        calibrated_on.extend(np.asarray(images, np.float32))
        return real_calibrate(model, images, batch_size)

    monkeypatch.setattr(mean_range, "calibrate_mean_ranges", calibrate)
    seen.clear()
    export_model(tiny_classifier(), format="tflite", quantize="int8", calibration=recipe,
                 output=tmp_path / "export_mean_range", parity_samples=4)
    assert seen == [] and len(calibrated_on) == len(written)
    assert sorted(map(bytes, calibrated_on)) == sorted(map(bytes, written))

    def key(image):
        return image.tobytes()

    for got, want in zip(sorted(seen, key=key), sorted(written, key=key)):
        np.testing.assert_array_equal(got, want)


def softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)


def test_saturated_logits_do_not_fail_a_correct_segmenter_export_and_real_errors_still_do():
    from keras_resnet.export.parity import SegmentationParity, relative_diff_rule

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1, (2, 8, 8, 3)) * 1e5
    logits[..., 1] = logits[..., 0] + rng.normal(0, 0.05, (2, 8, 8))  # near-ties, as at class boundaries
    rounded = logits * (1 + rng.normal(0, 1e-6, logits.shape))  # another runtime's float32 rounding

    def judged(reference_logits, exported_probabilities, with_logits=True):
        parity = SegmentationParity(3)
        reference = softmax(reference_logits)
        parity.update(reference, exported_probabilities, reference.argmax(-1), exported_probabilities.argmax(-1))
        if with_logits:
            parity.add_logits(reference_logits)
        figures = parity.figures()
        return figures, relative_diff_rule(figures)[1]

    figures, passed = judged(logits, softmax(rounded), with_logits=False)
    assert figures["relative_max_diff"] > 0.01 and not passed  # the old gate: probabilities to 1e-4 refuse it
    figures, passed = judged(logits, softmax(rounded))
    assert passed and figures["probability_tolerance"] == pytest.approx(1e-4 * np.abs(logits).max() / 2)
    # Ordinary logits (a trained model): the tolerance stays near 1e-4, and a 1e-2 error is refused.
    small = rng.normal(0, 3, (2, 8, 8, 3))
    figures, passed = judged(small, softmax(small) + 1e-2)
    assert not passed and figures["probability_tolerance"] < 1e-3
    figures, passed = judged(small, softmax(small * (1 + 1e-7)))
    assert passed
