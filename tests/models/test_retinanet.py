"""RetinaNet core: FPN, anchors, box coding, label encoding, losses, detector, decoder."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_resnet import ImageNormalization, ResNetBackbone
from keras_resnet.layers.fpn import FPN, upsample_nearest_like
from keras_resnet.models.retinanet import (
    AnchorGenerator,
    DetectionDecoder,
    RetinaNetDetector,
    RetinaNetLabelEncoder,
    RetinaNetLoss,
    convert_format,
    decode_boxes,
    encode_boxes,
    pairwise_iou,
    sigmoid_focal_loss,
)

TINY = dict(stackwise_num_filters=[16, 32, 64, 128])


def tiny_backbone(height=64, width=64):
    return ResNetBackbone.from_preset("resnet18", input_shape=(height, width, 3), **TINY)


def tiny_detector(height=64, width=64, num_classes=3, **kwargs):
    kwargs = {"fpn_width": 32, "head_depth": 1, **kwargs}
    return RetinaNetDetector(tiny_backbone(height, width), num_classes, **kwargs)


def random_boxes(rng, count, image_size, min_size, max_size):
    sizes = rng.uniform(min_size, max_size, (count, 2))
    corners = rng.uniform(0, 1, (count, 2)) * (image_size - sizes)
    return np.concatenate([corners, corners + sizes], axis=-1).astype(np.float32)


# --------------------------------------------------------------------------- FPN


@pytest.mark.parametrize("size", [(64, 64), (100, 100), (65, 33)])
def test_fpn_levels_have_stride_two_to_the_level(size):
    backbone = ResNetBackbone.from_preset("resnet18", input_shape=(*size, 3), stackwise_num_filters=[8, 8, 8, 16])
    pyramid = FPN(width=24)(backbone.pyramid_outputs)
    assert list(pyramid) == ["P3", "P4", "P5", "P6", "P7"]
    expected = AnchorGenerator().feature_sizes(size)
    assert [tuple(p.shape[1:]) for p in pyramid.values()] == [(h, w, 24) for h, w in expected]
    outputs = keras.Model(backbone.input, pyramid)(np.zeros((1, *size, 3), "float32"))
    assert [tuple(p.shape[1:3]) for p in outputs.values()] == expected


def test_fpn_extra_levels_from_p5_and_level_validation():
    backbone = tiny_backbone()
    fpn = FPN(min_level=2, max_level=6, width=16, extra_levels_from="P5")
    pyramid = fpn(backbone.pyramid_outputs)
    assert [tuple(p.shape[1:3]) for p in pyramid.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert fpn.extra_convs[0].kernel.shape == (3, 3, 16, 16)  # from P5 (16 channels), not C5
    assert FPN(width=16).__class__.from_config(fpn.get_config()).get_config() == fpn.get_config()
    c3_to_c5 = {k: v for k, v in backbone.pyramid_outputs.items() if k != "C2"}
    with pytest.raises(ValueError, match="C2"):
        FPN(min_level=2)(c3_to_c5)
    with pytest.raises(ValueError, match="C4"):
        FPN()({k: v for k, v in c3_to_c5.items() if k != "C4"})
    with pytest.raises(ValueError, match="extra_levels_from"):
        FPN(extra_levels_from="P6")


def test_fpn_upsampling_is_nearest_i_over_2_and_xla_differentiable():
    x = tf.reshape(tf.range(12, dtype=tf.float32), (1, 4, 3, 1))
    out = upsample_nearest_like(x, tf.zeros((1, 7, 5, 8)))
    rows, cols = np.arange(7) // 2, np.arange(5) // 2
    np.testing.assert_array_equal(out[0, ..., 0], x.numpy()[0, ..., 0][rows][:, cols])
    assert upsample_nearest_like(x, tf.zeros((1, 4, 3, 2))) is x

    @tf.function(jit_compile=True)
    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(upsample_nearest_like(x, tf.zeros((1, 7, 5, 1))))
        return tape.gradient(y, x)

    np.testing.assert_array_equal(gradient(x)[0, ..., 0], [[4, 4, 2], [4, 4, 2], [4, 4, 2], [2, 2, 1]])


# --------------------------------------------------------------------------- anchors


@pytest.mark.parametrize("size", [(64, 64), (96, 80)])
def test_anchor_count_matches_detector_outputs(size):
    generator = AnchorGenerator()
    expected = sum(math.ceil(size[0] / s) * math.ceil(size[1] / s) * 9 for s in (8, 16, 32, 64, 128))
    anchors = generator(size)
    assert anchors.shape == (expected, 4) and anchors.dtype == np.float32
    assert generator.num_anchors(size) == expected
    model = tiny_detector(*size)
    assert model.num_anchors == expected and model.output_shape == (None, expected, 4 + 3)


def test_anchor_layout():
    generator = AnchorGenerator(aspect_ratios=(0.5, 1.0, 2.0), scales=(1.0, 2.0))
    anchors = generator((16, 24))  # P3 is 2 x 3 cells
    centers = np.asarray(convert_format(anchors, "xyxy", "center_xywh"))
    first_level = centers[: 2 * 3 * 6].reshape(2, 3, 6, 4)
    np.testing.assert_allclose(first_level[1, 2, :, :2], [[20.0, 12.0]] * 6)  # row 1, column 2: (8*2.5, 8*1.5)
    widths, heights = first_level[0, 0, :, 2], first_level[0, 0, :, 3]
    np.testing.assert_allclose(widths / heights, [0.5, 1.0, 2.0] * 2, rtol=1e-5)
    np.testing.assert_allclose(np.sqrt(widths * heights), [32, 32, 32, 64, 64, 64], rtol=1e-5)
    assert generator.num_anchors_per_location == 6


def test_anchors_match_keras_cv():
    keras_cv = pytest.importorskip("keras_cv")
    generator = AnchorGenerator()
    theirs = keras_cv.layers.AnchorGenerator(
        bounding_box_format="xyxy",
        sizes=generator.sizes,
        scales=generator.scales,
        aspect_ratios=generator.aspect_ratios,
        strides=generator.strides,
    )(image_shape=(96, 80, 3))
    theirs = np.concatenate([np.asarray(v) for v in theirs.values()])
    np.testing.assert_allclose(generator((96, 80)), theirs, atol=1e-3)


# --------------------------------------------------------------------------- boxes


def test_format_conversions_round_trip_and_match_keras_cv():
    rng = np.random.default_rng(0)
    boxes = random_boxes(rng, 20, 200, 1, 100)
    for fmt in ("yxyx", "xywh", "center_xywh"):
        back = convert_format(convert_format(boxes, "xyxy", fmt), fmt, "xyxy")
        np.testing.assert_allclose(back, boxes, atol=1e-4)
    np.testing.assert_allclose(convert_format(boxes, "xyxy", "xywh")[:, 2:], boxes[:, 2:] - boxes[:, :2], atol=1e-4)
    keras_cv = pytest.importorskip("keras_cv")
    for fmt in ("yxyx", "xywh", "center_xywh"):
        np.testing.assert_allclose(
            convert_format(boxes, "xyxy", fmt),
            keras_cv.bounding_box.convert_format(boxes, source="xyxy", target=fmt),
            atol=1e-4,
        )


def test_pairwise_iou_values():
    a = np.array([[0, 0, 10, 10], [0, 0, 0, 0]], "float32")
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], "float32")
    np.testing.assert_allclose(pairwise_iou(a, b), [[1.0, 1 / 3, 0.0], [0.0, 0.0, 0.0]], atol=1e-6)
    assert pairwise_iou(a[None], np.stack([b, b])).shape == (2, 2, 3)


def test_encode_decode_round_trip():
    rng = np.random.default_rng(1)
    anchors = AnchorGenerator()((128, 128))
    boxes = random_boxes(rng, len(anchors), 128, 2, 120)
    deltas = encode_boxes(boxes, anchors)
    assert float(np.max(np.abs(decode_boxes(deltas, anchors) - boxes))) < 1e-4
    batched = encode_boxes(np.stack([boxes, boxes]), anchors)
    np.testing.assert_allclose(batched[1], deltas, atol=1e-6)


def test_encoding_matches_keras_cv_with_variance():
    keras_cv = pytest.importorskip("keras_cv")
    from keras_cv.src.bounding_box.converters import _encode_box_to_deltas

    rng = np.random.default_rng(2)
    anchors = AnchorGenerator()((64, 64))
    boxes = random_boxes(rng, len(anchors), 64, 4, 60)
    variance = (0.1, 0.1, 0.2, 0.2)
    theirs = _encode_box_to_deltas(anchors, boxes, anchor_format="xyxy", box_format="xyxy", variance=variance)
    # keras-cv encodes in center_yxhw: [dy, dx, dh, dw]; ours is [dx, dy, dw, dh].
    np.testing.assert_allclose(encode_boxes(boxes, anchors, variance), np.asarray(theirs)[:, [1, 0, 3, 2]], atol=1e-4)


def test_label_encoder_matches_keras_cv_without_low_quality_matches():
    keras_cv = pytest.importorskip("keras_cv")
    rng = np.random.default_rng(4)
    generator = AnchorGenerator()
    boxes = np.stack([random_boxes(rng, 6, 128, 16, 100) for _ in range(2)])
    classes = np.array([[0, 1, 2, 3, -1, -1], [4, 0, 1, -1, -1, -1]], "int32")
    boxes[classes < 0] = -1.0
    theirs_encoder = keras_cv.models.retinanet.LabelEncoder(
        bounding_box_format="xyxy",
        anchor_generator=keras_cv.layers.AnchorGenerator(
            "xyxy", generator.sizes, generator.scales, generator.aspect_ratios, generator.strides
        ),
    )
    their_boxes, their_classes = theirs_encoder(
        np.zeros((2, 128, 128, 3), "float32"), {"boxes": boxes, "classes": classes.astype("float32")}
    )
    ours = np.asarray(RetinaNetLabelEncoder(generator, (128, 128), allow_low_quality_matches=False)(boxes, classes))
    np.testing.assert_array_equal(ours[..., 4], np.asarray(their_classes))
    positive = ours[..., 4] >= 0
    assert positive.sum() > 10
    np.testing.assert_allclose(ours[positive][:, :4], np.asarray(their_boxes)[positive][:, [1, 0, 3, 2]], atol=1e-4)


# --------------------------------------------------------------------------- label encoder


def matched_boxes(encoder, targets, image_shape):
    """Positive anchors' decoded targets and class ids."""
    targets = np.asarray(targets)
    positive = targets[:, 4] >= 0
    boxes = decode_boxes(targets[positive, :4], encoder.anchors(image_shape)[positive])
    return np.asarray(boxes), targets[positive, 4]


def test_every_ground_truth_box_gets_a_positive_anchor():
    rng = np.random.default_rng(3)
    encoder = RetinaNetLabelEncoder(AnchorGenerator(), image_shape=(256, 256))
    boxes = np.concatenate([random_boxes(rng, 30, 256, 16, 200), random_boxes(rng, 10, 256, 2, 8)])
    classes = np.arange(len(boxes), dtype=np.int32) % 5
    decoded, decoded_classes = matched_boxes(encoder, encoder(boxes, classes), (256, 256))
    for box, cls in zip(boxes, classes):
        hits = np.all(np.abs(decoded - box) < 1e-2, axis=1)
        assert hits.any() and np.all(decoded_classes[hits] == cls), box
    # Without low-quality matches, tiny boxes get no positive anchor (keras-cv's behaviour).
    strict = RetinaNetLabelEncoder(AnchorGenerator(), image_shape=(256, 256), allow_low_quality_matches=False)
    decoded, _ = matched_boxes(strict, strict(boxes, classes), (256, 256))
    assert not any(np.all(np.abs(decoded - box) < 1e-2, axis=1).any() for box in boxes[-10:])


def test_background_ignore_and_padding_semantics():
    encoder = RetinaNetLabelEncoder(AnchorGenerator(), image_shape=(64, 64))
    anchors = encoder.anchors()
    box = anchors[4]  # P3 cell (0, 0), scale 2**(1/3), ratio 1: a square of side ~40 centred at (4, 4)
    targets = np.asarray(encoder(np.stack([box, [1, 2, 3, 4]]), np.array([2, -1])))
    iou = np.asarray(pairwise_iou(anchors, box[None]))[:, 0]
    assert targets[4, 4] == 2.0 and np.allclose(targets[4, :4], 0.0, atol=1e-5)
    np.testing.assert_array_equal(targets[iou >= 0.5, 4], 2.0)
    np.testing.assert_array_equal(targets[(iou >= 0.4) & (iou < 0.5), 4], -2.0)
    np.testing.assert_array_equal(targets[iou < 0.4, 4], -1.0)
    assert ((iou >= 0.4) & (iou < 0.5)).any()
    np.testing.assert_array_equal(targets[targets[:, 4] < 0, :4], 0.0)
    empty = np.asarray(encoder(np.zeros((0, 4)), np.zeros((0,), np.int32)))
    assert empty.shape == (len(anchors), 5) and np.all(empty == np.array([0, 0, 0, 0, -1.0]))


def test_label_encoder_batches_and_runs_in_tf_data():
    encoder = RetinaNetLabelEncoder(AnchorGenerator(), image_shape=(64, 64))
    boxes = np.array([[[4, 4, 30, 40], [0, 0, 0, 0]], [[10, 10, 60, 50], [30, 2, 40, 12]]], "float32")
    classes = np.array([[0, -1], [1, 2]], "int32")
    batched = np.asarray(encoder(boxes, classes))
    single = np.asarray(encoder(boxes[1], classes[1]))
    np.testing.assert_array_equal(batched[1], single)
    dataset = tf.data.Dataset.from_tensor_slices((boxes, classes)).map(encoder).batch(2)
    np.testing.assert_array_equal(next(iter(dataset)).numpy(), batched)


# --------------------------------------------------------------------------- losses


def encoded_targets(num_anchors=50, positives=(3, 7), classes=(1, 0)):
    targets = np.zeros((2, num_anchors, 5), "float32")
    targets[..., 4] = -1.0
    for index, cls in zip(positives, classes):
        targets[0, index] = [0.5, -0.5, 0.2, 0.1, cls]
    targets[0, 10, 4] = -2.0
    return targets


# The values of torchvision.ops.sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2, reduction="none"),
# computed in float64 from its formula (torch is not needed here):
# ce * (1 - p_t) ** gamma * alpha_t with ce = BCE-with-logits, p_t = p if target else 1 - p.
TORCHVISION_FOCAL = [  # (logit, target, loss)
    (0.0, 1.0, 0.04332169878499658), (0.0, 0.0, 0.12996509635498973),
    (2.0, 1.0, 0.0004508907088100953), (2.0, 0.0, 1.2375586345660556),
    (-3.0, 1.0, 0.6915701102563155), (-3.0, 0.0, 8.196249337274796e-05),
    (5.0, 0.0, 3.7049409162525757),
]


def test_focal_loss_matches_closed_form_and_torchvision_values():
    logits, targets, expected = (np.array(column, np.float32) for column in zip(*TORCHVISION_FOCAL))
    got = np.asarray(sigmoid_focal_loss(targets, logits))
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-7)
    # The closed form -alpha_t (1 - p_t)^gamma log(p_t), at other alpha and gamma too.
    p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    p_t = np.where(targets == 1, p, 1.0 - p)
    for alpha, gamma in ((0.5, 0.0), (0.75, 1.0), (None, 3.0)):
        alpha_t = 1.0 if alpha is None else np.where(targets == 1, alpha, 1.0 - alpha)
        closed = -alpha_t * (1.0 - p_t) ** gamma * np.log(p_t)
        np.testing.assert_allclose(np.asarray(sigmoid_focal_loss(targets, logits, alpha=alpha, gamma=gamma)),
                                   closed, rtol=2e-5, atol=1e-7)


def test_focal_loss_finite_without_positives():
    targets = np.zeros((2, 20, 5), "float32")
    targets[..., 4] = -1.0
    predictions = np.random.default_rng(0).normal(0, 3, (2, 20, 4 + 3)).astype("float32")
    loss = float(RetinaNetLoss(3)(targets, predictions))
    expected = float(np.sum(sigmoid_focal_loss(np.zeros((2, 20, 3)), predictions[..., 4:])))
    assert np.isfinite(loss) and loss > 0
    assert loss == pytest.approx(expected, rel=1e-5)  # the batch's sum over max(positives, 1) = 1


@pytest.mark.parametrize("box_loss", ["smooth_l1", "giou"])
def test_loss_ignores_ignored_anchors_and_regresses_only_positives(box_loss):
    loss = RetinaNetLoss(3, box_loss=box_loss)
    targets = encoded_targets()
    rng = np.random.default_rng(1)
    predictions = rng.normal(0, 1, (2, 50, 7)).astype("float32")
    base = float(loss(targets, predictions))
    changed = predictions.copy()
    changed[0, 10, 4:] += 5.0  # the ignored anchor's logits
    changed[:, 20:, :4] += 3.0  # background anchors' boxes
    assert float(loss(targets, changed)) == pytest.approx(base, rel=1e-6)
    perfect = predictions.copy()
    perfect[..., :4] = targets[..., :4]
    box_part = base - float(loss(targets, perfect))
    assert box_part > 0
    assert RetinaNetLoss.from_config(loss.get_config()).get_config() == loss.get_config()


def test_loss_is_float32_under_mixed_precision():
    targets = encoded_targets()
    predictions = tf.cast(np.random.default_rng(2).normal(0, 1, (2, 50, 7)), tf.bfloat16)
    value = RetinaNetLoss(3)(targets, predictions)
    assert value.dtype == tf.float32 and np.isfinite(float(value))


# --------------------------------------------------------------------------- detector


def synthetic_detection_data(count=8, size=64, seed=0):
    """Images with one or two coloured rectangles (class 0 red, class 1 green)."""
    rng = np.random.default_rng(seed)
    images = np.full((count, size, size, 3), 40.0, "float32")
    boxes = np.zeros((count, 2, 4), "float32")
    classes = -np.ones((count, 2), "int32")
    for i in range(count):
        for j in range(1 + i % 2):
            box = random_boxes(rng, 1, size, 14, 36)[0]
            x1, y1, x2, y2 = np.round(box).astype(int)
            cls = int(rng.integers(0, 2))
            images[i, y1:y2, x1:x2, cls] = 230.0
            boxes[i, j], classes[i, j] = [x1, y1, x2, y2], cls
    return images, boxes, classes


def test_tiny_retinanet_loss_falls():
    keras.utils.set_random_seed(0)
    model = tiny_detector(num_classes=2, preprocessing=ImageNormalization(mean=127.5, std=127.5))
    images, boxes, classes = synthetic_detection_data()
    targets = model.make_label_encoder()(boxes, classes)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=RetinaNetLoss(2))
    history = model.fit(images, targets, batch_size=4, epochs=15, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.6 * losses[0], losses


def test_detector_keras_round_trip(tmp_path):
    model = tiny_detector(
        80, 72, num_classes=2, head_depth=2, head_norm="group", extra_levels_from="P5",
        preprocessing=ImageNormalization(mean=127.5, std=127.5), anchor_scales=(1.0, 1.5),
    )
    assert model.num_anchors == len(model.anchors()) and model.anchor_generator.num_anchors_per_location == 6
    images = np.random.default_rng(0).uniform(0, 255, (2, 80, 72, 3)).astype("float32")
    path = tmp_path / "retinanet.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, RetinaNetDetector)
    config, loaded_config = model.get_config(), loaded.get_config()
    assert loaded_config.pop("preprocessing")["config"] == config.pop("preprocessing")["config"]
    assert loaded_config == config
    raw = model.predict(images, verbose=0)
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), raw)
    expected = model.make_decoder(score_threshold=0.0, max_detections=10)(raw)
    got = loaded.predict_detections(images, score_threshold=0.0, max_detections=10)
    assert sorted(got) == ["boxes", "classes", "num_detections", "scores"]
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], atol=1e-5)
    # The inference model is built once per set of decoder arguments and reused, and it survives a save.
    builds = []
    original = RetinaNetDetector.make_inference_model
    RetinaNetDetector.make_inference_model = lambda self, *a, **k: builds.append(k) or original(self, *a, **k)
    try:
        for _ in range(3):
            again = loaded.predict_detections(images, score_threshold=0.0, max_detections=10)
        loaded.predict_detections(images, score_threshold=0.5)
    finally:
        RetinaNetDetector.make_inference_model = original
    assert builds == [{"score_threshold": 0.5}]  # the first set was cached by the call above
    np.testing.assert_array_equal(again["boxes"], got["boxes"])
    loaded.save(tmp_path / "again.keras")
    assert len(keras.models.load_model(tmp_path / "again.keras").weights) == len(model.weights)


def test_classification_bias_prior_and_float32_output():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = tiny_detector(num_classes=4, prior_probability=0.01)
    assert model.output.dtype == "float32"
    bias = model.get_layer("classification_head_output").bias.numpy()
    np.testing.assert_allclose(1 / (1 + np.exp(-bias)), 0.01, rtol=1e-5)


def test_detector_rejects_dynamic_size_and_dilated_backbones():
    with pytest.raises(ValueError, match="static input size"):
        RetinaNetDetector(ResNetBackbone.from_preset("resnet18", input_shape=(None, None, 3), **TINY), 2)
    dilated = ResNetBackbone.from_preset("resnet18", input_shape=(64, 64, 3), output_stride=16, **TINY)
    with pytest.raises(ValueError, match="strides"):
        RetinaNetDetector(dilated, 2)


@pytest.mark.filterwarnings("ignore:The structure of `inputs`")
def test_backbone_plugs_into_keras_cv_retinanet():
    keras_cv = pytest.importorskip("keras_cv")
    model = keras_cv.models.RetinaNet(backbone=tiny_backbone(), num_classes=3, bounding_box_format="xyxy")
    outputs = model(np.zeros((1, 64, 64, 3), "float32"))
    assert outputs["box"].shape == (1, AnchorGenerator().num_anchors((64, 64)), 4)
    assert outputs["classification"].shape == (1, 774, 3)


# --------------------------------------------------------------------------- decoder


def test_decoder_class_wise_nms_and_padding():
    image_shape, num_classes = (64, 64), 3
    anchors = AnchorGenerator()(image_shape)
    raw = np.zeros((2, len(anchors), 4 + num_classes), "float32")
    raw[..., 4:] = -20.0
    # Anchors 0 and 3 share a cell (ratio 0.5, scales 1 and 2**(1/3)): IoU 0.63.
    assert float(pairwise_iou(anchors[0:1], anchors[3:4])[0, 0]) > 0.5
    far = 9 * (8 * 5 + 5)  # P3 cell (5, 5), first anchor
    raw[0, 0, 4 + 1] = 3.0
    raw[0, 3, 4 + 1] = 2.0  # same class, overlaps anchor 0: suppressed
    raw[0, 3, 4 + 2] = 1.0  # other class at the same place: kept
    raw[0, far, 4 + 0] = 0.0  # score 0.5
    raw[0, far + 1, 4 + 0] = -4.0  # score 0.018 < threshold
    decoder = DetectionDecoder(num_classes, image_shape, max_detections=5)
    expected_boxes = np.clip(anchors[[0, 3, far]], 0, 64)
    inputs = keras.Input((len(anchors), 4 + num_classes), batch_size=2)
    for model in (keras.Model(inputs, decoder(inputs)), decoder):
        out = {k: np.asarray(v) for k, v in model(raw).items()}  # static batch loop, then tf.map_fn
        np.testing.assert_array_equal(out["num_detections"], [3, 0])
        np.testing.assert_array_equal(out["classes"], [[1, 2, 0, -1, -1], [-1] * 5])
        np.testing.assert_allclose(out["scores"][0, :3], 1 / (1 + np.exp(-np.array([3.0, 1.0, 0.0]))), rtol=1e-5)
        np.testing.assert_allclose(out["boxes"][0, :3], expected_boxes, atol=1e-4)
        assert np.all(out["scores"][0, 3:] == 0) and np.all(out["boxes"][1] == 0)
    assert out["classes"].dtype == np.int32 and out["num_detections"].dtype == np.int32
    assert DetectionDecoder.from_config(decoder.get_config()).get_config() == decoder.get_config()


def test_decoder_breaks_score_ties_the_same_way_in_tflite():
    """int8 logits sit on a grid, so many candidates share a score; NMS must suppress the same boxes anyway."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from keras_resnet.export.tflite import tflite_bytes

    image_shape, num_classes = (64, 64), 3
    decoder = DetectionDecoder(num_classes, image_shape, max_detections=100, pre_nms_top_k=300)
    rng = np.random.default_rng(0)
    count = len(AnchorGenerator()(image_shape))
    raw = np.zeros((4, count, 4 + num_classes), "float32")
    raw[..., :4] = rng.normal(0, 0.5, raw[..., :4].shape)
    # logits on a coarse grid (an int8 step of 0.25): a few hundred candidates over the threshold, in ties
    raw[..., 4:] = np.round(rng.normal(-3.0, 1.0, raw[..., 4:].shape) / 0.25) * 0.25
    decoder(raw[:1])  # built
    spec = [tf.TensorSpec([1, count, 4 + num_classes], tf.float32, name="raw")]
    interpreter = Interpreter(model_content=tflite_bytes(decoder, spec, track=decoder))
    interpreter.allocate_tensors()
    runner = interpreter.get_signature_runner()
    for image in raw:
        expected = {key: np.asarray(value)[0] for key, value in decoder(image[None]).items()}
        got = {key: value[0] for key, value in runner(raw=image[None]).items()}
        assert expected["num_detections"] > 20  # enough detections for ties to matter
        np.testing.assert_array_equal(got["num_detections"], expected["num_detections"])
        np.testing.assert_array_equal(got["classes"], expected["classes"])
        np.testing.assert_allclose(got["boxes"], expected["boxes"], atol=1e-3)
        np.testing.assert_allclose(got["scores"], expected["scores"], atol=1e-6)


def test_boxes_outside_the_image_are_no_detections():
    """A box clipped to nothing is dropped (NMS cannot suppress zero-area duplicates: TFLite gave one 100 times)."""
    image_shape = (64, 64)
    anchors = AnchorGenerator()(image_shape)
    targets = np.array([[10.0, -40.0, 30.0, -20.0]] * 3 + [[10.0, 12.0, 30.0, 50.0]], "float32")  # 3 above
    indices = [100, 101, 102, 500]
    raw = np.zeros((1, len(anchors), 5), "float32")
    raw[..., 4] = -20.0
    raw[0, indices, :4] = encode_boxes(targets, anchors[indices])
    raw[0, indices, 4] = [3.0, 2.9, 2.8, 1.0]
    out = DetectionDecoder(1, image_shape)(raw)
    assert int(out["num_detections"][0]) == 1
    np.testing.assert_allclose(out["boxes"][0, 0], [10, 12, 30, 50], atol=1e-3)


def test_decoder_boxes_follow_deltas_and_are_clipped():
    image_shape = (64, 64)
    anchors = AnchorGenerator()(image_shape)
    target = np.array([[10.0, 12.0, 30.0, 50.0], [-20.0, 40.0, 30.0, 90.0]], "float32")
    indices = [100, 500]
    raw = np.zeros((1, len(anchors), 5), "float32")
    raw[..., 4] = -20.0
    raw[0, indices, :4] = encode_boxes(target, anchors[indices])
    raw[0, indices, 4] = [2.0, 1.0]
    out = DetectionDecoder(1, image_shape)(raw)
    np.testing.assert_allclose(out["boxes"][0, :2], [[10, 12, 30, 50], [0, 40, 30, 64]], atol=1e-3)
