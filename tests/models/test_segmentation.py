"""ResNetSegmenter: heads, output sizes, serialisation; segmentation losses and metrics."""

import json

import keras
import numpy as np
import pytest

from keras_resnet.layers.core import ImageNormalization
from keras_resnet.layers.fpn import apply_fpn
from keras_resnet.models.resnet.backbone import ResNetBackbone
from keras_resnet.models.segmentation.losses import (
    CombinedSegmentationLoss,
    DiceLoss,
    SegmentationCrossEntropy,
)
from keras_resnet.models.segmentation.metrics import (
    PixelAccuracy,
    SegmentationMeanIoU,
    confusion_to_iou,
)
from keras_resnet.models.segmentation.segmenter import (
    ResNetSegmenter,
    default_aspp_rates,
)
from tests.helpers import (
    TINY_BACKBONE,
)

ONE_BLOCK = {"stackwise_num_blocks": [1, 1, 1, 1]}


def tiny_segmenter(head="deeplabv3plus", input_shape=(32, 32, 3), num_classes=4, output_stride=16, **kwargs):
    backbone = ResNetBackbone.from_preset(
        "resnet18", input_shape=input_shape, output_stride=output_stride, **TINY_BACKBONE
    )
    return ResNetSegmenter(backbone, num_classes, head=head, head_width=16, decoder_width=8, **kwargs)


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("head", ["deeplabv3plus", "fpn"])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_output_matches_input_size_for_every_head_and_stride(head, output_stride):
    backbone = ResNetBackbone.from_preset(
        "resnet18", input_shape=(40, 56, 3), output_stride=output_stride, **ONE_BLOCK
    )
    assert backbone.feature_info[-1]["stride"] == output_stride
    model = ResNetSegmenter(backbone, num_classes=5, head=head, head_width=16, decoder_width=8)
    logits = model.predict(np.zeros((2, 40, 56, 3), np.float32), verbose=0)
    assert logits.shape == (2, 40, 56, 5) and logits.dtype == np.float32


def test_aspp_rates_follow_the_output_stride():
    assert default_aspp_rates(16) == (6, 12, 18)
    assert default_aspp_rates(8) == (12, 24, 36)
    model = tiny_segmenter(output_stride=8)
    assert model.get_layer("aspp_rate24_conv").dilation_rate == (24, 24)


def test_decoder_level_picks_the_fused_features_and_round_trips(tmp_path):
    # Stride-1 stem + strided first stage: C2..C5 at strides 2, 4, 8, 16.
    backbone = ResNetBackbone.from_preset(
        "resnet18", input_shape=(64, 64, 1), stem_type="cifar", stackwise_strides=[2, 2, 2, 2], **TINY_BACKBONE
    )
    assert [info["stride"] for info in backbone.feature_info] == [2, 4, 8, 16]
    model = ResNetSegmenter(backbone, 3, head_width=16, decoder_width=8, aspp_rates=[1, 2, 3], decoder_level="C3")
    assert tuple(model.get_layer("decoder_low_level_conv").output.shape[1:3]) == (16, 16)
    assert tuple(model.get_layer("decoder_refine2_conv").output.shape[1:3]) == (16, 16)
    default = ResNetSegmenter(backbone, 3, head_width=16, decoder_width=8, aspp_rates=[1, 2, 3])
    assert tuple(default.get_layer("decoder_refine2_conv").output.shape[1:3]) == (32, 32)
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 1)).astype(np.float32)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert loaded.decoder_level == "C3"
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)
    with pytest.raises(ValueError, match="decoder_level='C7'"):
        ResNetSegmenter(backbone, 3, decoder_level="C7")
    with pytest.raises(ValueError, match="head='deeplabv3plus'"):
        ResNetSegmenter(backbone, 3, head="fpn", decoder_level="C3")
    with pytest.raises(ValueError, match="distinct"):
        ResNetSegmenter(backbone, 3, aspp_rates=[1, 1, 2])


def test_wasted_aspp_rates_warning_suggests_a_fix_that_fits_the_map():
    with pytest.warns(UserWarning, match=r"4x4 coarsest feature map.*e\.g\. \[1, 2, 3\]"):
        tiny_segmenter(input_shape=(64, 64, 3))  # stride 16 -> 4x4, default rates (6, 12, 18)
    with pytest.warns(UserWarning, match=r"2x2 coarsest feature map.*larger input or a smaller output_stride"):
        tiny_segmenter(input_shape=(32, 32, 3), aspp_rates=[1, 2, 3])  # 2x2: no three distinct rates fit


def test_decoder_levels_list_fuses_each_level_coarse_to_fine(tmp_path):
    backbone = ResNetBackbone.from_preset(
        "resnet18", input_shape=(64, 64, 1), stem_type="cifar", stackwise_strides=[2, 2, 2, 2], **TINY_BACKBONE
    )
    model = ResNetSegmenter(
        backbone, 3, head_width=16, decoder_width=8, aspp_rates=[1, 2, 3], decoder_level=["C4", "C3"]
    )
    # ASPP at stride 16 (4x4) -> fused with C4 at stride 8 (8x8) -> the paper's decoder on C3 (16x16).
    assert tuple(model.get_layer("decoder_C4_refine_conv").output.shape[1:3]) == (8, 8)
    assert model.get_layer("decoder_C4_concat").output.shape[-1] == 16 + 8
    assert tuple(model.get_layer("decoder_refine2_conv").output.shape[1:3]) == (16, 16)
    assert model.output_shape == (None, 64, 64, 3)
    single = ResNetSegmenter(backbone, 3, head_width=16, decoder_width=8, aspp_rates=[1, 2, 3], decoder_level="C3")
    extra = {"decoder_C4_low_level_conv", "decoder_C4_refine_conv"}
    assert extra <= {layer.name for layer in model.layers} and not extra & {layer.name for layer in single.layers}
    images = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 1)).astype(np.float32)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert loaded.decoder_level == ["C4", "C3"]
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)
    for bad in (["C3", "C4"], ["C4", "C4"], ["C4", "C9"], []):
        with pytest.raises(ValueError, match="coarse to fine"):
            ResNetSegmenter(backbone, 3, decoder_level=bad)


def test_separable_deeplabv3plus_uses_depthwise_convs_and_round_trips(tmp_path):
    backbone = ResNetBackbone.from_preset("resnet18", input_shape=(64, 64, 3), output_stride=16, **ONE_BLOCK)
    dense = ResNetSegmenter(backbone, 3, head_width=32, decoder_width=8, aspp_rates=[1, 2, 3])
    separable = ResNetSegmenter(backbone, 3, head_width=32, decoder_width=8, aspp_rates=[1, 2, 3], separable=True)
    # Every 3x3 of the ASPP and the decoder is depthwise (rate kept) then 1x1; the 1x1 branches are unchanged.
    for name, rate in [("aspp_rate2", 2), ("decoder_refine1", 1), ("decoder_refine2", 1)]:
        assert separable.get_layer(f"{name}_depthwise").dilation_rate == (rate, rate)
        assert separable.get_layer(f"{name}_conv").kernel_size == (1, 1)
        assert dense.get_layer(f"{name}_conv").kernel_size == (3, 3)
    assert separable.get_layer("aspp_1x1_conv").kernel_size == (1, 1)
    head_params = lambda model: model.count_params() - backbone.count_params()  # noqa: E731
    # 3x3 x Cin x Cout against 3x3 x Cin + Cin x Cout (+ the depthwise BN): far fewer head weights.
    assert head_params(separable) < 0.3 * head_params(dense)
    images = np.random.default_rng(2).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    separable.save(tmp_path / "separable.keras")
    loaded = keras.saving.load_model(tmp_path / "separable.keras")
    assert loaded.separable is True and loaded.get_layer("decoder_refine2_depthwise") is not None
    np.testing.assert_allclose(loaded.predict(images, verbose=0), separable.predict(images, verbose=0), atol=1e-6)
    # A configuration saved before the argument existed (no "separable" key) builds the dense head it was.
    config = dense.get_config()
    del config["separable"]
    assert ResNetSegmenter.from_config(config).get_layer("decoder_refine2_conv").kernel_size == (3, 3)
    with pytest.raises(ValueError, match="separable=True needs head='deeplabv3plus'"):
        ResNetSegmenter(backbone, 3, head="deeplabv3", separable=True)


def test_odd_and_dynamic_input_sizes_and_float32_output_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = tiny_segmenter("fpn", input_shape=(None, None, 3))
    logits = model(np.zeros((1, 37, 45, 3), np.float32))
    assert tuple(logits.shape) == (1, 37, 45, 4) and logits.dtype == "float32"


def test_fpn_levels_share_width_and_keep_strides():
    backbone = ResNetBackbone.from_preset("resnet18", input_shape=(40, 56, 3), **TINY_BACKBONE)
    features = apply_fpn(backbone.pyramid_outputs, width=12)
    assert list(features) == ["P2", "P3", "P4", "P5"]
    assert [tuple(f.shape[1:]) for f in features.values()] == [(10, 14, 12), (5, 7, 12), (3, 4, 12), (2, 2, 12)]


@pytest.mark.parametrize("head", ["deeplabv3plus", "fpn"])
def test_keras_file_round_trip_is_exact(head, tmp_path):
    model = tiny_segmenter(
        head, preprocessing=ImageNormalization(mean=100.0, std=50.0), activation="softmax", num_classes=3
    )
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    path = tmp_path / "segmenter.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    as_json = lambda config: json.loads(json.dumps(config))  # noqa: E731  (tuples and lists compare equal)
    assert isinstance(loaded, ResNetSegmenter) and as_json(loaded.get_config()) == as_json(model.get_config())
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), model.predict(images, verbose=0))


# --------------------------------------------------------------------------- losses and metrics


def test_mean_iou_of_a_perfect_prediction_is_one_and_ignores_255():
    masks = np.array([[[0, 1, 2], [255, 1, 255]]])
    logits = np.eye(3)[np.where(masks == 255, 2, masks)] * 5.0
    logits[0, 1, 0] = [9.0, 0.0, 0.0]  # wrong class on an ignored pixel
    miou, accuracy = SegmentationMeanIoU(num_classes=3), PixelAccuracy()
    miou.update_state(masks, logits)
    accuracy.update_state(masks, logits)
    assert float(miou.result()) == 1.0 and float(accuracy.result()) == 1.0
    confusion = keras.ops.convert_to_numpy(miou.confusion)
    assert confusion.sum() == 4  # the two ignored pixels are not counted
    # A class absent from truth and prediction is left out of the mean.
    miou = SegmentationMeanIoU(num_classes=5)
    miou.update_state(np.array([[0, 1]]), np.array([[0, 0]]))
    per_class, mean = confusion_to_iou(keras.ops.convert_to_numpy(miou.confusion))
    assert per_class[0] == 0.5 and per_class[1] == 0.0 and np.isnan(per_class[2:]).all()
    assert float(miou.result()) == pytest.approx(mean) == pytest.approx(0.25)


def test_cross_entropy_with_ignore_equals_cross_entropy_over_valid_pixels():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
    masks = rng.integers(0, 3, (2, 4, 5))
    masks[0, 0, :] = 255
    masks[1, 2, 1] = 255
    valid = masks != 255
    expected = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(masks[valid], logits[valid])
    assert float(SegmentationCrossEntropy()(masks, logits)) == pytest.approx(float(expected), rel=1e-5)
    weights = np.array([1.0, 2.0, 0.5])
    per_pixel = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)(
        masks[valid], logits[valid]
    )
    weighted = float(np.sum(weights[masks[valid]] * per_pixel) / weights[masks[valid]].sum())
    assert float(SegmentationCrossEntropy(class_weights=weights)(masks, logits)) == pytest.approx(weighted, rel=1e-5)


def test_dice_is_zero_for_a_perfect_prediction_and_losses_serialise():
    masks = np.array([[[0, 1], [1, 255]]])
    logits = np.eye(2)[np.where(masks == 255, 0, masks)] * 50.0
    logits[0, 1, 1] = [-50.0, 50.0]  # ignored pixel, any prediction
    assert float(DiceLoss()(masks, logits)) == pytest.approx(0.0, abs=1e-6)
    for loss in (SegmentationCrossEntropy(class_weights=[1, 2]), DiceLoss(smooth=0.5),
                 CombinedSegmentationLoss(ce_weight=0.5, dice_weight=2.0)):
        clone = keras.losses.deserialize(keras.losses.serialize(loss))
        assert type(clone) is type(loss) and clone.get_config() == loss.get_config()
        assert float(clone(masks, logits)) == pytest.approx(float(loss(masks, logits)))


def test_loss_falls_over_twenty_steps():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 50, (8, 32, 32, 1)).astype(np.float32)
    masks = np.zeros((8, 32, 32), np.int32)
    for i in range(8):  # a bright square of class 1 or 2 on background 0
        top, left = rng.integers(0, 16, 2)
        images[i, top : top + 14, left : left + 14] += 180
        masks[i, top : top + 14, left : left + 14] = 1 + i % 2
    model = tiny_segmenter(input_shape=(32, 32, 1), num_classes=3, preprocessing=ImageNormalization(60.0, 80.0))
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=CombinedSegmentationLoss())
    losses = [float(model.train_on_batch(images, masks)) for _ in range(20)]
    assert losses[-1] < 0.6 * losses[0], losses


# --------------------------------------------------------------------------- data


