"""int8 calibration by mean batch ranges (`keras_resnet.quantization.calibration`, the export default).

What must hold:
- each activation range is the mean over calibration batches of the batch's
  min and max (checked exactly on the first calibrated range, whose input
  depends on nothing calibrated), the order of the batches does not matter,
  and a single outlier image no longer sets the range for every image;
- the float model is not changed, dropout stays off while calibrating, and
  the quantization-aware copy keeps its saved momentum;
- the export uses it by default and says so in the metadata, and the
  converter's min/max is still there as `calibration_method="minmax"`.
"""

import json

import keras
import numpy as np
import pytest

from keras_resnet.export import export_model
from keras_resnet.quantization import FakeQuant
from keras_resnet.quantization.calibration import calibrate_mean_ranges, observed_ranges
from tests.helpers import randomize_batch_norm, tiny_classifier


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    classifier = tiny_classifier()
    randomize_batch_norm(classifier)
    return classifier


def images(seed, count=12, outlier=False):
    rng = np.random.default_rng(seed)
    batch = rng.uniform(60, 190, (count, 32, 32, 3)).astype(np.float32)
    if outlier:
        batch[-1] = np.where(rng.uniform(size=(32, 32, 3)) > 0.5, 255.0, 0.0)
    return batch


def first_calibrated(calibrated):
    """The first layer (graph order) whose output range calibration sets, and its quantizer.

    Its input comes through the raw-pixel quantizer, whose range is fixed: nothing calibrated is upstream.
    """
    observed = observed_ranges(calibrated)
    for layer in calibrated.layers:
        quantizer = getattr(layer, "output_quantizer", None)
        if quantizer is not None and any(quantizer is q for q in observed):
            return layer, quantizer
    raise AssertionError("no calibrated layer")


def first_range(calibrated):
    _, quantizer = first_calibrated(calibrated)
    return quantizer, float(quantizer.range_min.numpy()), float(quantizer.range_max.numpy())


def test_the_range_is_the_mean_of_the_batch_extremes(model):
    data = images(1, outlier=True)
    calibrated = calibrate_mean_ranges(model, data, batch_size=4)
    layer, quantizer = first_calibrated(calibrated)
    low, high = float(quantizer.range_min.numpy()), float(quantizer.range_max.numpy())
    probe = keras.Model(calibrated.inputs, layer.input)
    quantizer.enabled = False  # the layer's output before its own rounding: what the range was taken of
    batches = [np.asarray(layer(probe(data[i:i + 4], training=False))) for i in range(0, 12, 4)]
    quantizer.enabled = True
    expected_low = np.mean([min(b.min(), 0.0) for b in batches])
    expected_high = np.mean([max(b.max(), 0.0) for b in batches])
    assert (low, high) == pytest.approx((expected_low, expected_high), rel=1e-5, abs=1e-6)
    # ... which is not the min/max over all images (the converter's), unless every batch reaches it
    assert high < max(b.max() for b in batches) or low > min(b.min() for b in batches)


def test_batch_order_does_not_matter_and_an_outlier_counts_once(model):
    data = images(2, outlier=True)
    forward = first_range(calibrate_mean_ranges(model, data, batch_size=4))[1:]
    backward = first_range(calibrate_mean_ranges(model, data[np.r_[8:12, 4:8, 0:4]], batch_size=4))[1:]
    assert forward == pytest.approx(backward, rel=1e-5)
    every_image_one_batch = first_range(calibrate_mean_ranges(model, data, batch_size=12))[1:]
    width = forward[1] - forward[0]
    assert width < every_image_one_batch[1] - every_image_one_batch[0]  # the outlier widens 1 batch of 3, not all


def test_every_range_is_set_the_float_model_untouched_and_settings_kept(model):
    before = [w.copy() for w in model.get_weights()]
    calibrated = calibrate_mean_ranges(model, images(3), batch_size=4)
    for quantizer in observed_ranges(calibrated):
        assert float(quantizer.tracked.numpy()) == 1.0
        assert float(quantizer.range_max.numpy()) > float(quantizer.range_min.numpy())
        assert quantizer.momentum == FakeQuant().momentum
        assert quantizer.observing is False
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_no_images_is_an_error(model):
    with pytest.raises(ValueError, match="at least one image"):
        calibrate_mean_ranges(model, images(4)[:0])


@pytest.mark.parametrize("method", ["mean_range", "minmax"])
def test_export_uses_the_method_and_records_it(model, method, tmp_path):
    model_file = tmp_path / "tiny.keras"
    model.save(model_file)
    folder = tmp_path / "calibration"
    folder.mkdir()
    from PIL import Image

    for index, image in enumerate(images(5, count=8)):
        Image.fromarray(image.astype(np.uint8)).save(folder / f"{index}.png")
    result = export_model(model_file, format="tflite", quantize="int8", calibration=folder, output=tmp_path,
                          parity_samples=8, calibration_samples=8, int8_min_agreement=0.0,
                          calibration_method=method)
    metadata = json.loads(open(result["metadata_path"]).read())
    assert metadata["int8"]["calibration_method"] == method
    assert metadata["int8"]["quantization_source"] == "ptq"
    assert metadata["parity"]["top1_agreement"] >= 0.75


def test_dilated_models_are_told_apart():
    from keras_resnet import ResNetSegmenter
    from keras_resnet.quantization.calibration import has_dilated_convolutions
    from tests.helpers import TINY_BACKBONE

    def segmenter(head, **args):
        return ResNetSegmenter.from_preset("resnet18", 3, head=head, input_shape=(64, 64, 3),
                                           **{**TINY_BACKBONE, **args})

    assert has_dilated_convolutions(segmenter("deeplabv3plus", aspp_rates=[1, 2, 3]))  # atrous ASPP
    assert has_dilated_convolutions(segmenter("fpn", output_stride=8, stackwise_num_blocks=[1, 1, 2, 2]))
    assert not has_dilated_convolutions(segmenter("fpn"))
    assert not has_dilated_convolutions(tiny_classifier())
