"""Import of torchvision RetinaNets, checked against real torchvision detections without torch installed.

tests/fixtures/torch/detection/torchvision_retinanet_*.npz hold what torchvision's
`retinanet_resnet50_fpn` and `retinanet_resnet50_fpn_v2` computed
(scripts/make_torch_detection_fixtures.py, run in a torch environment) on
weights that the script's formula defines: the tests rebuild the same state
dicts in NumPy, convert them and compare anchors, raw head outputs and the
post-processed detections (same classes, boxes within 1 px, scores within
1e-3). The LIVE test compares against a torchvision module directly and runs
only where torch and torchvision import.
"""

import importlib.util
import re
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_resnet import ImageNormalization, ResNetBackbone
from keras_resnet.convert import ConversionError, convert_source, from_torch
from keras_resnet.convert.torch_retinanet import (
    COCO_CATEGORIES,
    TORCHVISION_DECODER,
    TorchRetinaNetWeights,
    detection_source_parity,
    detections_of,
    detector_from_torch,
    load_detector,
    match_detections,
    upgrade_keys,
)
from keras_resnet.convert.weight_files import read_state_dict
from keras_resnet.models.retinanet import (
    AnchorGenerator,
    DetectionDecoder,
    RetinaNetDetector,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "torch" / "detection"
SCRIPT = ROOT / "scripts" / "make_torch_detection_fixtures.py"
RAW_TOLERANCE = 1e-4  # max abs diff over max abs of the reference
BOX_TOLERANCE = 1.0  # pixels
SCORE_TOLERANCE = 1e-3


def _load_script():
    spec = importlib.util.spec_from_file_location("make_torch_detection_fixtures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


formula = _load_script()
NAMES = list(formula.MODELS)


def fixture(name):
    with np.load(FIXTURES / f"torchvision_{name}.npz") as data:
        return {key: data[key] for key in data.files}


def relative_diff(reference, ours):
    reference, ours = np.asarray(reference), np.asarray(ours)
    assert reference.shape == ours.shape
    return float(np.abs(reference - ours).max() / np.abs(reference).max())


def zeros_like_layout(data):
    """All-zero stand-ins of the fixture's state dict (no memory): enough for key and shape checks."""
    return {key: np.broadcast_to(np.zeros((), dtype), shape) for key, shape, dtype in formula.fixture_layout(data)}


@pytest.fixture(scope="module")
def converted():
    """{name: (fixture, state, detector, raw outputs, detections)}: each model converted and run once."""
    pixels = formula.detection_pixels()
    results = {}
    for name in NAMES:
        data = fixture(name)
        state = formula.state_dict_for(name, data)
        # v1 through from_torch (its dispatch), v2 through detector_from_torch.
        if name == "retinanet_resnet50_fpn":
            model = from_torch(state, input_shape=(*formula.IMAGE_SIZE, 3))
        else:
            model = detector_from_torch(state, "fixture", arch=name, input_shape=(*formula.IMAGE_SIZE, 3))
        raw = np.asarray(model(pixels))
        # What predict_detections and exports run (decoder(model(images))), without tracing ResNet-50 again.
        results[name] = (data, state, model, raw[0], detections_of(model.make_decoder()(raw)))
    return results


def test_fixtures_are_there_and_small():
    for name in NAMES:
        path = FIXTURES / f"torchvision_{name}.npz"
        assert path.stat().st_size < 300_000, path
        data = fixture(name)
        pixels = formula.detection_pixels()
        assert pixels.sum(dtype="float64") == data["pixels_sum"]  # the formula reproduces the input
        np.testing.assert_array_equal(pixels[0, 0, :8, 0], data["pixels_corner"])
        assert 10 <= len(data["scores"]) <= 100  # tens of detections, not near-ties by the thousand


@pytest.mark.parametrize("name", NAMES)
def test_anchors_and_raw_outputs_equal_torchvision(converted, name):
    data, _, model, raw, _ = converted[name]
    assert isinstance(model, RetinaNetDetector) and model.name == name
    np.testing.assert_array_equal(model.anchors(), data["anchors"])  # torchvision's anchors, bit for bit
    logits = raw[:, 4:]
    diffs = {
        "box deltas": relative_diff(data["box_regression"], raw[:, :4]),
        "max logit": relative_diff(data["cls_logits_max"], logits.max(axis=1)),
        "logits of classes": relative_diff(data["cls_logits_subset"], logits[:, data["subset_classes"]]),
    }
    print(f"{name}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) < RAW_TOLERANCE, diffs
    np.testing.assert_array_equal(logits.argmax(axis=1), data["cls_logits_argmax"])


@pytest.mark.parametrize("name", NAMES)
def test_detections_equal_torchvision_postprocessing(converted, name):
    data, _, model, _, found = converted[name]
    # One deliberate difference: boxes clipped to nothing (outside the image) are no detections of ours
    # (DetectionDecoder); torchvision keeps them (NMS cannot suppress them: IoU 0/0).
    boxes = np.asarray(data["boxes"])
    kept = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    reference = {"boxes": boxes[kept], "scores": np.asarray(data["scores"])[kept],
                 "labels": np.asarray(data["labels"])[kept]}
    result = match_detections(reference, found, score_tolerance=SCORE_TOLERANCE, box_tolerance=BOX_TOLERANCE)
    print(f"{name}: {len(data['scores'])} torchvision detections, {len(found['scores'])} ours: {result}")
    assert result["missing"] == 0 and result["extra"] == 0, result
    assert result["pairs"] >= len(reference["scores"]) - result["near_threshold"]
    assert result["max_box_diff"] <= BOX_TOLERANCE and result["max_score_diff"] <= SCORE_TOLERANCE, result
    # The detector carries torchvision's settings: its defaults are what predict and exports use.
    decoder = model.make_decoder()
    assert {key: getattr(decoder, key) for key in TORCHVISION_DECODER} == TORCHVISION_DECODER
    assert decoder.box_variance == (1.0, 1.0, 1.0, 1.0) and decoder.anchor_generator.layout == "torchvision"
    assert model.class_names == list(COCO_CATEGORIES) and model.class_names[1] == "person"
    assert model.get_config()["preprocessing"]["config"]["mean"] == [0.485, 0.456, 0.406]


def test_v1_and_v2_layouts(converted):
    v1, v2 = converted["retinanet_resnet50_fpn"][2], converted["retinanet_resnet50_fpn_v2"][2]
    assert (v1.extra_levels_from, v1.head_norm, v1.backbone.bn_epsilon) == ("P5", None, 0.0)
    assert (v2.extra_levels_from, v2.head_norm, v2.backbone.bn_epsilon) == ("C5", "group", 1e-5)
    assert v2.get_layer("box_head_gn1").epsilon == 1e-5
    assert v1.get_layer("fpn").extra_convs[0].kernel.shape == (3, 3, 256, 256)
    assert v2.get_layer("fpn").extra_convs[0].kernel.shape == (3, 3, 2048, 256)
    # torchvision's parameters (weights=None: BatchNorm2d; its v1 meta, 34,014,999, has FrozenBatchNorm2d buffers).
    assert sum(int(np.prod(w.shape)) for w in v1.trainable_weights) == 34_068_119
    assert sum(int(np.prod(w.shape)) for w in v2.trainable_weights) == 38_198_935


def test_torchvision_version1_keys_and_inference_from_shapes(converted):
    state = converted["retinanet_resnet50_fpn"][1]
    # torchvision's COCO_V1 file predates its key upgrade: fpn.inner_blocks.0.weight, head conv.0/2/4/6.
    def version1(key):
        key = re.sub(r"^(backbone\.fpn\.\w+_blocks\.\d+)\.0\.", r"\1.", key)
        return re.sub(r"^(head\.\w+_head\.conv)\.(\d+)\.0\.", lambda m: f"{m.group(1)}.{2 * int(m.group(2))}.", key)

    old = {version1(key): value for key, value in state.items()}
    assert "backbone.fpn.inner_blocks.0.weight" in old and "head.regression_head.conv.6.weight" in old
    assert list(upgrade_keys(old)) == list(state)
    assert TorchRetinaNetWeights(old).arch == "retinanet_resnet50_fpn"
    for name in NAMES:
        weights = TorchRetinaNetWeights(zeros_like_layout(fixture(name)))
        assert weights.arch == name and weights.num_classes == 91 and weights.backbone.preset == "resnet50"
        assert (weights.fpn_width, weights.head_depth, weights.num_anchors) == (256, 4, 9)
        assert weights.describe().startswith(f"torchvision {name} (resnet50 backbone")


def test_mismatches_name_the_keys_and_the_fix(converted):
    data, state, model = converted["retinanet_resnet50_fpn"][:3]
    zeros = zeros_like_layout(data)
    with pytest.raises(ConversionError, match=r"arch='retinanet_resnet50_fpn_v2' does not match.*head_norm None "
                                              r"\(not 'group'\).*look like retinanet_resnet50_fpn"):
        TorchRetinaNetWeights(zeros, arch="retinanet_resnet50_fpn_v2")
    with pytest.raises(ConversionError, match="not a torchvision RetinaNet we import; allowed"):
        TorchRetinaNetWeights(zeros, arch="fasterrcnn_resnet50_fpn")
    with pytest.raises(ConversionError, match=r"keys outside backbone.body/backbone.fpn/head \(roi_heads.x\)"):
        TorchRetinaNetWeights({**zeros, "roi_heads.x": np.zeros(1)})
    no_p7 = {k: v for k, v in zeros.items() if "p7" not in k}
    with pytest.raises(ConversionError, match="has no backbone.fpn.extra_blocks.p7.weight"):
        TorchRetinaNetWeights(no_p7)
    four = {**zeros, "head.regression_head.bbox_reg.weight": np.zeros((16, 256, 3, 3), "float32")}
    with pytest.raises(ConversionError, match="predicts 4 anchors per location; only torchvision's default"):
        TorchRetinaNetWeights(four)
    # Loading checks both ways, naming keys and torch shapes (reusing the converted detector).
    bad = dict(state, **{"head.regression_head.conv.1.0.weight": state["head.regression_head.conv.1.0.weight"][:128]})
    with pytest.raises(ConversionError, match=r"conv.1.0.weight \(128, 256, 3, 3\) \(ours needs \(256, 256, 3, 3\)\)"):
        load_detector(model, TorchRetinaNetWeights(bad, "bad.pth"))
    extra = dict(state, **{"head.regression_head.conv.4.0.weight": np.zeros((256, 256, 3, 3), "float32"),
                           "head.classification_head.conv.4.0.weight": np.zeros((256, 256, 3, 3), "float32")})
    with pytest.raises(ConversionError, match=r"2 keys our detector does not use \(head.\w+_head.conv.4.0.weight"):
        load_detector(model, TorchRetinaNetWeights(extra, "extra.pth"))
    missing = {k: v for k, v in state.items() if k != "backbone.fpn.extra_blocks.p6.bias"}
    with pytest.raises(ConversionError, match=r"missing.pth does not fit our retinanet_resnet50_fpn: missing "
                                              r"backbone.fpn.extra_blocks.p6.bias"):
        load_detector(model, TorchRetinaNetWeights(missing, "missing.pth"))
    with pytest.raises(ConversionError, match="include_top=False applies to classifiers and segmenters"):
        from_torch(zeros, include_top=False)
    with pytest.raises(ConversionError, match=r"input_shape=\(None, None, 3\) must be a fixed"):
        detector_from_torch(zeros, input_shape=(None, None, 3))


def test_a_fresh_class_head_through_convert_source(converted, tmp_path):
    from safetensors.numpy import save_file

    _, state, source = converted["retinanet_resnet50_fpn"][:3]
    path = tmp_path / "retinanet.safetensors"
    save_file(state, str(path))
    model, report = convert_source(path, num_classes=3)
    text = "\n".join(report)
    print(text)
    assert "torchvision retinanet_resnet50_fpn (resnet50 backbone" in report[0]
    assert "model: RetinaNetDetector retinanet_resnet50_fpn, 3 classes" in text and "top 1000 per level" in text
    assert "a fresh 3-class output conv" in text and "parameters: 32,295,679" in text
    assert model.num_classes == 3 and model.class_names is None
    for name in ("box_head_output", "classification_head_conv4", "fpn"):
        for ours, theirs in zip(model.get_layer(name).weights, source.get_layer(name).weights):
            np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    bias = model.get_layer("classification_head_output").bias.numpy()
    np.testing.assert_allclose(1 / (1 + np.exp(-bias)), 0.01, rtol=1e-5)  # torchvision's prior too


def test_torchvision_like_options_serialise(tmp_path):
    backbone = ResNetBackbone.from_preset("resnet18", input_shape=(64, 96, 3), stackwise_num_filters=[8, 8, 16, 16])
    model = RetinaNetDetector(
        backbone, 2, fpn_width=16, head_depth=1, head_norm="group", head_norm_epsilon=1e-5,
        anchor_layout="torchvision", aspect_ratios=(2.0, 1.0, 0.5), fpn_extra_padding="symmetric",
        box_variance=(1, 1, 1, 1), preprocessing=ImageNormalization(mean=127.5, std=127.5),
        decoder_args={"max_detections": 7, "top_k_per_level": True}, class_names=["cat", "dog"],
    )
    path = tmp_path / "detector.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    config = loaded.get_config()
    assert config["anchor_layout"] == "torchvision" and config["fpn_extra_padding"] == "symmetric"
    assert config["decoder_args"] == {"max_detections": 7, "top_k_per_level": True}
    assert config["class_names"] == ["cat", "dog"] and config["head_norm_epsilon"] == 1e-5
    images = np.random.default_rng(0).uniform(0, 255, (1, 64, 96, 3)).astype("float32")
    np.testing.assert_array_equal(loaded(images), model(images))
    assert loaded.make_inference_model().layers[-1].get_config()["max_detections"] == 7
    decoder = loaded.make_decoder(score_threshold=0.2)
    assert (decoder.max_detections, decoder.top_k_per_level, decoder.score_threshold) == (7, True, 0.2)
    assert DetectionDecoder.from_config(decoder.get_config()).get_config() == decoder.get_config()
    with pytest.raises(ValueError, match=r"decoder_args has unknown keys \['nms'\]; allowed: score_threshold"):
        RetinaNetDetector(backbone, 2, fpn_width=16, head_depth=1, decoder_args={"nms": 0.5})
    with pytest.raises(ValueError, match="class_names has 1 names for num_classes=2"):
        RetinaNetDetector(backbone, 2, fpn_width=16, head_depth=1, class_names=["cat"])
    with pytest.raises(ValueError, match="layout='detectron' is not an anchor layout"):
        AnchorGenerator(layout="detectron")


def test_torchvision_anchor_layout_is_its_anchor_generator():
    # torchvision's cell anchors of P3 (sizes 32, 40, 50; its ratios 0.5, 1, 2 are height / width).
    generator = AnchorGenerator(aspect_ratios=(2.0, 1.0, 0.5), layout="torchvision")
    anchors = generator.level_anchors((160, 192))
    expected = [[-23, -11, 23, 11], [-28, -14, 28, 14], [-35, -18, 35, 18], [-16, -16, 16, 16], [-20, -20, 20, 20],
                [-25, -25, 25, 25], [-11, -23, 11, 23], [-14, -28, 14, 28], [-18, -35, 18, 35]]
    np.testing.assert_array_equal(anchors[3][:9], expected)
    np.testing.assert_array_equal(anchors[3][9:10], [[-15, -11, 31, 11]])  # the next cell: x + 8, no half stride
    # P6 of 160x192 is 3x3: torchvision's strides are 160 // 3 = 53 and 192 // 3 = 64.
    np.testing.assert_array_equal(anchors[6][9 * 4, :2] - anchors[6][0, :2], [64, 53])
    assert [len(a) for a in anchors.values()] == [9 * h * w for h, w in generator.feature_sizes((160, 192))]


def torchvision_decode(deltas, anchors, image_shape):
    """torchvision's `BoxCoder(weights=(1, 1, 1, 1)).decode_single` and `clip_boxes_to_image`, in NumPy."""
    widths, heights = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ctr_x, ctr_y = anchors[:, 0] + 0.5 * widths, anchors[:, 1] + 0.5 * heights
    dw, dh = np.minimum(deltas[:, 2], np.log(1000.0 / 16)), np.minimum(deltas[:, 3], np.log(1000.0 / 16))
    x, y = deltas[:, 0] * widths + ctr_x, deltas[:, 1] * heights + ctr_y
    w, h = np.exp(dw) * widths, np.exp(dh) * heights
    boxes = np.stack([x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h], axis=1)
    return np.clip(boxes, 0, [image_shape[1], image_shape[0]] * 2)


def test_box_coder_is_torchvision_s_clip_included():
    image_shape = (1600, 2000)  # large enough for boxes of 62.5 anchors (the log(1000/16) clip) to show
    anchors = np.array([[-11, -23, 11, 23], [900, 700, 932, 732], [1500, 100, 1628, 164]] * 4, "float32")
    deltas = np.random.default_rng(0).normal(0, 1, (12, 4)).astype("float32")
    deltas[:6, 2:] += 4.0  # dw, dh past log(1000/16) = 4.135 for some
    deltas[:3, :2] *= 20.0  # centres far off, so that the clipped size decides where the box ends
    raw = np.zeros((1, AnchorGenerator(layout="torchvision").num_anchors(image_shape), 5), "float32")
    raw[..., 4] = -20.0
    raw[0, :12, :4], raw[0, :12, 4] = deltas, np.linspace(5.0, 1.0, 12)
    decoder = DetectionDecoder(1, image_shape, AnchorGenerator(layout="torchvision"), box_variance=(1, 1, 1, 1),
                               iou_threshold=1.0, max_detections=12)
    decoder.anchors = np.concatenate([anchors, decoder.anchors[12:]])  # these anchors first
    found = decoder(raw)
    np.testing.assert_allclose(found["boxes"][0], torchvision_decode(deltas, anchors, image_shape), atol=1e-3)


def test_decoder_top_k_per_level_keeps_every_level():
    image_shape = (64, 64)
    generator = AnchorGenerator()
    counts = [h * w * 9 for h, w in generator.feature_sizes(image_shape)]
    raw = np.full((1, sum(counts), 5), -10.0, "float32")
    raw[0, :, :4] = 0.0
    raw[0, :20, 4] = 5.0  # P3's first 20 anchors outscore the one candidate of P7
    last = sum(counts) - 1
    raw[0, last, 4] = 4.0
    overall = DetectionDecoder(1, image_shape, pre_nms_top_k=5, iou_threshold=1.0)(raw)
    per_level = DetectionDecoder(1, image_shape, pre_nms_top_k=5, iou_threshold=1.0, top_k_per_level=True)(raw)
    assert int(overall["num_detections"][0]) == 5
    assert int(per_level["num_detections"][0]) == 6  # 5 of P3 and P7's
    np.testing.assert_allclose(per_level["boxes"][0, 5], np.clip(generator(image_shape)[last], 0, 64), atol=1e-4)


def test_match_detections_pairs_by_class_and_box():
    reference = {"boxes": np.array([[0, 0, 10, 10], [0, 50, 40, 50], [5, 5, 20, 20]], "float32"),
                 "scores": np.array([0.9, 0.5, 0.0505]), "labels": np.array([1, 2, 3])}
    ours = {"boxes": np.array([[0.5, 0, 10, 10], [0, 50, 40.2, 50], [0, 0, 10, 10]], "float32"),
            "scores": np.array([0.8995, 0.5, 0.2]), "classes": np.array([1, 2, 4])}
    result = match_detections(reference, ours)
    assert result == {"pairs": 2, "max_box_diff": 0.5, "max_score_diff": pytest.approx(5e-4), "missing": 0,
                      "extra": 1, "near_threshold": 1}


def test_live_torchvision_module():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    height, width = 128, 160
    module = torchvision.models.detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=height, max_size=width
    ).eval()
    state = {key: torch.from_numpy(formula.detection_tensor_for("retinanet_resnet50_fpn", key, tuple(value.shape),
                                                                str(value.dtype).replace("torch.", "")))
             for key, value in module.state_dict().items()}
    module.load_state_dict(state)
    # A module built with weights=None has nn.BatchNorm2d, eps 1e-5 (torchvision's COCO_V1 weights run with 0.0).
    model = detector_from_torch(*read_state_dict(module), input_shape=(height, width, 3), bn_epsilon=1e-5)
    pixels = formula.detection_pixels((height, width))
    with torch.no_grad():
        (reference,) = module([torch.from_numpy((pixels[0] / np.float32(255.0)).transpose(2, 0, 1).copy())])
    result = match_detections({k: v.numpy() for k, v in reference.items()},
                              detections_of(model.predict_detections(pixels)))
    print("live torchvision retinanet_resnet50_fpn", result)
    assert result["missing"] == 0 and result["extra"] == 0
    assert result["max_box_diff"] <= BOX_TOLERANCE and result["max_score_diff"] <= SCORE_TOLERANCE
    # The report's check: torchvision built from the state dict in a child Python, on a random image.
    parity, name = detection_source_parity(model, TorchRetinaNetWeights(*read_state_dict(module)))
    print(name, parity)
    assert parity["max_rel_diff"] < RAW_TOLERANCE and parity["missing"] == 0 and parity["extra"] == 0
