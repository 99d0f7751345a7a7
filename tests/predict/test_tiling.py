"""Tiled (sliding-window) prediction and evaluation: the grid, stitching, the NMS merge, every model form, the CLI.

Models are hand-built and tiny (a few convs on 16x16 inputs), so the module
runs in about a minute on two cores. What is asserted:

* the window grid covers the image, its last window flush with the border;
* stitched segmentation equals the untiled model: everywhere for a per-pixel
  (1x1-conv) model, and on every pixel at least the receptive radius away
  from any inner window edge for a 3x3-conv model ('same' padding), on an
  image 3x the window, one whose size is not a multiple of the stride and
  one smaller than the window (padded);
* a fake detector that reports the visible part of known objects finds an
  object lying across a window border exactly once, at its true box, and
  keeps an overlapping object of another class (class-wise NMS); boxes in
  a window's padding are clipped or dropped;
* `keras-resnet predict --tile` writes masks at the image's own size for the
  `.keras` model and its SavedModel, TFLite and ONNX exports, all agreeing
  with `segment_tiled`, and boxes in image pixels for a detector's, all
  agreeing with the `.keras` model; `--tile auto` tiles a crop-trained run's
  exports (their metadata carries the run's sampling);
* bad `--tile` values and `--tile` on a classifier exit 2 with one error line;
* crop-mode evaluation of a segmenter on full validation images gives the
  confusion matrix computed by hand with `segment_tiled`; of a detector, the
  rows and mAP of `detect_tiled` over each full image.
"""

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_resnet import ImageNormalization, ResNetSegmenter, RetinaNetDetector
from keras_resnet.cli import main
from keras_resnet.config import load_config
from keras_resnet.export import export_model
from keras_resnet.models.resnet.backbone import ResNetBackbone
from keras_resnet.models.retinanet.evaluation import coco_evaluate
from keras_resnet.predict.detection import predict_boxes
from keras_resnet.predict.tiling import predict_tiled, tile_plan
from keras_resnet.tiling import (
    detect_tiled,
    grid_origins,
    grid_tiles,
    keras_segment_function,
    segment_tiled,
    tile_grid,
    tile_weights,
)
from keras_resnet.training.detection import (
    detection_function,
    evaluate_detector,
    tiled_detections,
)
from keras_resnet.training.segmentation import evaluate_segmenter, evaluation_data

TILE = 16
CLASS_NAMES = ["background", "a", "b"]



def tiling_recipe(sampling):
    """A segmentation recipe with `data.sampling` and tile_overlap 0.3."""
    return load_config({"task": "segmentation", "model": {"num_classes": 3},
                        "data": {"source": "mask_folder", "train": "train", "val": "val", "sampling": sampling,
                                 "tile_overlap": 0.3}})

def conv_segmenter(kernel=1, depth=1, input_size=(None, None), classes=3, seed=0):
    """Per-pixel scores of `depth` convs of `kernel` x `kernel` ('same' padding); logits out."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((*input_size, 3))
    x = keras.layers.Rescaling(1 / 64.0, offset=-2.0)(inputs)
    for index in range(depth - 1):
        x = keras.layers.Conv2D(6, kernel, padding="same", activation="tanh", name=f"conv{index}")(x)
    outputs = keras.layers.Conv2D(classes, kernel, padding="same", name="scores")(x)
    return keras.Model(inputs, outputs, name=f"conv{kernel}x{kernel}")


def untiled(model, image):
    return tf.nn.softmax(model(image[None].astype(np.float32)), axis=-1).numpy()[0]


def random_image(height, width, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (height, width, 3)).astype(np.float32)


# --------------------------------------------------------------------------- the grid


def test_the_grid_covers_the_image_and_ends_flush():
    assert tile_grid(100, 64, 32, 32, 0.25) == [(y, x) for y in (0, 24, 48, 68) for x in (0, 24, 32)]
    assert tile_grid(20, 70, 32, 32, 0.5) == [(0, 0), (0, 16), (0, 32), (0, 38)]  # one padded row of windows
    assert tile_grid(10, 12, 32, 32, 0.25) == [(0, 0)]
    assert tile_grid(64, 64, 32, 32, 0.0) == [(0, 0), (0, 32), (32, 0), (32, 32)]
    # the same grid with padding "pad" keeps the stride and hangs the last window over the border
    assert grid_origins(20, 70, 32, 32, 0.5, "pad").numpy().tolist() == [[0, 0], [0, 16], [0, 32], [0, 48]]
    assert grid_origins(65, 64, 32, 32, 0.0, "pad").numpy().tolist() == [
        [y, x] for y in (0, 32, 64) for x in (0, 32)]  # the validation tiles: 3 rows, the last padded
    covered = np.zeros((61, 45), int)
    for y, x in tile_grid(61, 45, 16, 20, 0.3):
        covered[y:y + 16, x:x + 20] += 1
    assert covered.min() >= 1
    # two regular neighbours cross-fade: their weights sum to 1 over the overlap, and never reach 0
    left, right = (tile_weights(16, 64, 16, 32, (0, x), 0.25)[0] for x in (0, 24))
    np.testing.assert_allclose(left[24:] + right[:8], 1.0)
    assert left.min() > 0 and left[0] == 1.0  # full weight on the image border


# --------------------------------------------------------------------------- segmentation



def test_validation_tiles_in_a_graph_are_the_padded_grid():
    image = np.arange(65 * 40 * 2, dtype=np.int32).reshape(65, 40, 2)
    tiles = tf.function(lambda x: grid_tiles(x, 32, 32, fill=-1))(tf.constant(image)).numpy()
    origins = grid_origins(65, 40, 32, 32, 0.0, "pad").numpy()
    assert tiles.shape == (len(origins), 32, 32, 2) == (6, 32, 32, 2)
    padded = np.full((96, 64, 2), -1, np.int32)
    padded[:65, :40] = image
    for tile, (y, x) in zip(tiles, origins):
        np.testing.assert_array_equal(tile, padded[y : y + 32, x : x + 32])

@pytest.mark.parametrize("height, width", [(48, 48), (53, 71), (11, 13), (16, 40)])
def test_tiled_segmentation_of_a_per_pixel_model_is_the_untiled_model(height, width):
    model = conv_segmenter(kernel=1, depth=2)
    image = random_image(height, width)
    stitched = segment_tiled(keras_segment_function(model), image, (TILE, TILE), overlap=0.25, batch_size=3)
    assert stitched.shape == (height, width, 3) and stitched.dtype == np.float32
    np.testing.assert_allclose(stitched, untiled(model, image), atol=2e-6)


def clean_pixels(height, width, overlap, radius):
    """Pixels at least `radius` from every inner edge of every window that covers them."""
    clean = np.ones((height, width), bool)
    rows, columns = np.arange(height)[:, None], np.arange(width)[None, :]
    for y, x in tile_grid(height, width, TILE, TILE, overlap):
        inside = (rows >= y) & (rows < y + TILE) & (columns >= x) & (columns < x + TILE)
        near = np.zeros_like(inside)
        if y > 0:
            near |= rows < y + radius
        if y + TILE < height:
            near |= rows >= y + TILE - radius
        if x > 0:
            near |= columns < x + radius
        if x + TILE < width:
            near |= columns >= x + TILE - radius
        clean &= ~(inside & near)
    return clean


@pytest.mark.parametrize("height, width", [(48, 48), (53, 71)])
def test_tiled_segmentation_of_a_3x3_conv_model_matches_away_from_window_edges(height, width):
    # Two 3x3 convs see 2 pixels around: pixels 2+ from every inner window edge are computed from the same
    # input as in the whole image. Image borders need no margin: windows flush with them pad with 0 as the
    # whole image does.
    model = conv_segmenter(kernel=3, depth=2)
    image = random_image(height, width, seed=1)
    stitched = segment_tiled(keras_segment_function(model), image, (TILE, TILE), overlap=0.5, batch_size=4)
    expected = untiled(model, image)
    clean = clean_pixels(height, width, 0.5, radius=2)
    assert clean.mean() > 0.2
    np.testing.assert_allclose(stitched[clean], expected[clean], atol=2e-6)
    assert np.abs(stitched - expected).max() > 1e-3  # the others do differ: the check is not vacuous


def test_the_segmenter_method_and_predict_tiled_agree():
    backbone = ResNetBackbone.from_preset(
        "resnet18", input_shape=(32, 32, 3), stackwise_num_blocks=[1, 1, 1, 1], stackwise_num_filters=[8, 8, 8, 8]
    )
    model = ResNetSegmenter(backbone, 3, head="fpn", head_width=8)
    image = random_image(40, 75, seed=2)
    out = model.predict_tiled(image, overlap=0.25, batch_size=4)
    assert out["probabilities"].shape == (40, 75, 3) and out["mask"].shape == (40, 75)
    np.testing.assert_allclose(out["probabilities"].sum(-1), 1.0, atol=1e-5)
    again = predict_tiled(model, image, overlap=0.25)
    np.testing.assert_allclose(again["probabilities"], out["probabilities"], atol=1e-4)  # batches of 8 vs 4
    with pytest.raises(ValueError, match="does not fit"):
        model.predict_tiled(image, tile=24)


# --------------------------------------------------------------------------- detection


def visible_parts(windows):
    """A fake detector: per channel (class), the box of the bright pixels a window sees, scored by their area."""
    count, _, _, channels = windows.shape
    boxes = np.zeros((count, channels, 4), np.float32)
    scores = np.zeros((count, channels), np.float32)
    classes = np.full((count, channels), -1, np.int32)
    for index, window in enumerate(windows):
        for channel in range(channels):
            ys, xs = np.nonzero(window[..., channel] > 0)
            if len(ys):
                boxes[index, channel] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                scores[index, channel] = len(ys) / 100.0
                classes[index, channel] = channel
    order = np.argsort(-scores, axis=1, kind="stable")
    boxes, scores, classes = (np.take_along_axis(a, order[..., None] if a.ndim == 3 else order, 1)
                              for a in (boxes, scores, classes))
    return {"boxes": boxes, "scores": scores, "classes": classes, "num_detections": (classes >= 0).sum(1)}


def test_an_object_across_a_window_border_is_found_once():
    # 40x80 image, 32x32 windows, overlap 0.25: columns at 0, 24, 48 and rows at 0, 8. Object A (class 0)
    # spans x 20..30, across the left border of the windows at x=24 (which see 6 of its 10 columns);
    # object B (class 1) overlaps A (IoU 0.68) and must survive A's suppression.
    image = np.zeros((40, 80, 2), np.float32)
    image[12:20, 20:30, 0] = 255
    image[13:21, 21:31, 1] = 255
    found = detect_tiled(visible_parts, image, (32, 32), overlap=0.25, batch_size=4, iou_threshold=0.5)
    assert sorted(found["classes"].tolist()) == [0, 1]
    boxes = {int(c): b.tolist() for c, b in zip(found["classes"], found["boxes"])}
    assert boxes == {0: [20, 12, 30, 20], 1: [21, 13, 31, 21]}
    np.testing.assert_allclose(sorted(found["scores"]), [0.8, 0.8])
    # unmerged, four windows report A: two whole (the same box once shifted to image pixels), two in part
    unmerged = detect_tiled(visible_parts, image, (32, 32), overlap=0.25, iou_threshold=1.0)
    assert sorted(b.tolist() for b, c in zip(unmerged["boxes"], unmerged["classes"]) if c == 0) == [
        [20, 12, 30, 20], [20, 12, 30, 20], [24, 12, 30, 20], [24, 12, 30, 20]
    ]


def test_boxes_in_a_window_s_padding_are_clipped_or_dropped():
    def fixed(windows):
        count = len(windows)
        boxes = np.tile(np.asarray([[2, 25, 8, 30], [2, 15, 8, 26]], np.float32), (count, 1, 1))
        return {"boxes": boxes, "scores": np.tile([0.9, 0.5], (count, 1)), "classes": np.zeros((count, 2), int)}

    found = detect_tiled(fixed, np.zeros((20, 70, 1)), (32, 32), overlap=0.25)  # windows at x 0, 24, 38
    assert sorted(found["boxes"].tolist()) == [[2, 15, 8, 20], [26, 15, 32, 20], [40, 15, 46, 20]]


@pytest.fixture(scope="module")
def detector():
    """An untrained tiny RetinaNet (64x64x1 inputs, 2 classes) whose scores start near 0.3: many detections."""
    keras.utils.set_random_seed(0)
    backbone = ResNetBackbone.from_preset("resnet18", input_shape=(64, 64, 1), stackwise_num_filters=[8, 8, 8, 8],
                                          stackwise_num_blocks=[1, 1, 1, 1])
    return RetinaNetDetector(backbone, 2, fpn_width=8, head_depth=1, min_level=3, max_level=5,
                             anchor_sizes=[8, 16, 32], prior_probability=0.3,
                             preprocessing=ImageNormalization(mean=[128.0], std=[64.0]))


def test_the_detector_method_tiles_a_large_image(detector, tmp_path):
    model = detector
    image = np.random.default_rng(0).uniform(0, 255, (100, 150)).astype(np.uint8)
    found = model.predict_tiled(image, overlap=0.25, score_threshold=0.0, max_detections=7)
    assert found["boxes"].shape == (7, 4) and found["scores"].shape == found["classes"].shape == (7,)
    assert (found["boxes"][:, 2] <= 150).all() and (found["boxes"][:, 3] <= 100).all()
    assert np.all(np.diff(found["scores"]) <= 0)
    model.save(tmp_path / "detector.keras")
    Image.fromarray(image).save(tmp_path / "field.png")
    (result,) = predict_boxes(tmp_path / "detector.keras", [tmp_path / "field.png"], tmp_path / "out",
                              score_threshold=0.0, max_detections=7, tile="auto")
    assert result["tiled"] and len(result["detections"]) == 7
    assert all(0 <= d["box"][0] <= d["box"][2] <= 150 and 0 <= d["box"][1] <= d["box"][3] <= 100
               for d in result["detections"])


def test_predict_tile_boxes_agree_for_every_format(detector, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    detector.save(run / "best_model.keras")
    (run / "run.json").write_text(json.dumps({
        "task": "detection", "input_shape": [64, 64, 1], "num_classes": 2, "class_names": ["a", "b"],
        "decoder": {"score_threshold": 0.2, "max_detections": 10}, "sampling": "crop", "tile_overlap": 0.3,
    }))
    Image.fromarray(np.random.default_rng(1).uniform(0, 255, (100, 150)).astype(np.uint8)).save(tmp_path / "f.png")

    def boxes(model):
        capsys.readouterr()
        assert main(["predict", str(model), str(tmp_path / "f.png"), "--json", "--output", str(tmp_path / "out")]) == 0
        (result,) = json.loads(capsys.readouterr().out)
        assert result["tiled"]  # auto (150 px >= 2 x 64; the run also trained on crops)
        return sorted((d["class"], *d["box"], d["score"]) for d in result["detections"])

    expected = boxes(run)
    assert len(expected) == 10 and all(0 <= b[1] <= b[3] <= 150 and 0 <= b[2] <= b[4] <= 100 for b in expected)
    for fmt in ("saved_model", "tflite", "onnx"):
        result = export_model(run, format=fmt, output=tmp_path / "exports", parity_samples=2)
        got = boxes(result["path"])
        assert [b[0] for b in got] == [b[0] for b in expected], fmt
        np.testing.assert_allclose([b[1:] for b in got], [b[1:] for b in expected], atol=0.11, err_msg=fmt)


# --------------------------------------------------------------------------- every model form, the CLI


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A crop-trained run of a tiny fixed-size segmenter (16x16) and its SavedModel, TFLite and ONNX exports."""
    root = tmp_path_factory.mktemp("tiled")
    run = root / "run"
    run.mkdir()
    conv_segmenter(kernel=3, depth=2, input_size=(TILE, TILE), seed=3).save(run / "best_model.keras")
    (run / "run.json").write_text(json.dumps({
        "task": "segmentation", "input_shape": [TILE, TILE, 3], "num_classes": 3, "class_names": CLASS_NAMES,
        "sampling": "crop", "tile_overlap": 0.5,
    }))
    forms = {"keras": run / "best_model.keras"}
    for fmt in ("saved_model", "tflite", "onnx"):
        forms[fmt] = Path(export_model(run, format=fmt, output=root / "exports", parity_samples=2)["path"])
    photos = root / "photos"
    photos.mkdir()
    Image.fromarray(random_image(37, 53, seed=4).astype(np.uint8)).save(photos / "wide.png")
    Image.fromarray(random_image(20, 18, seed=5).astype(np.uint8)).save(photos / "small.png")
    return run, forms, photos


def test_predict_tile_writes_full_size_masks_for_every_format(exported, tmp_path, capsys):
    run, forms, photos = exported
    model = keras.saving.load_model(run / "best_model.keras")
    pixels = np.asarray(Image.open(photos / "wide.png"), np.float32)
    expected = segment_tiled(keras_segment_function(model), pixels, (TILE, TILE), overlap=0.5).argmax(-1)
    for fmt, path in forms.items():
        metadata = {} if fmt == "keras" else json.loads(Path(f"{path}.json").read_text())
        assert fmt == "keras" or (metadata["sampling"], metadata["tile_overlap"]) == ("crop", 0.5)
        output = tmp_path / fmt
        capsys.readouterr()
        assert main(["predict", str(path), str(photos / "wide.png"), "--tile", str(TILE), "--json",
                     "--output", str(output)]) == 0
        (result,) = json.loads(capsys.readouterr().out)
        assert result["tiled"], fmt
        with Image.open(result["mask"]) as mask, Image.open(result["overlay"]) as overlay:
            assert mask.size == overlay.size == (53, 37), fmt
            assert np.mean(np.asarray(mask) == expected) >= 0.999, fmt
        # a crop-trained run: auto tiles even an image smaller than twice the input (here 20x18)
        assert main(["predict", str(path), str(photos / "small.png"), "--json", "--output", str(output)]) == 0
        (result,) = json.loads(capsys.readouterr().out)
        assert result["tiled"], fmt
        with Image.open(result["mask"]) as mask:
            assert mask.size == (18, 20), fmt
    plan = tile_plan("auto", None, (TILE, TILE), {"sampling": "crop", "tile_overlap": 0.5}, True, "m")
    assert plan.overlap == 0.5 and plan.window(20, 18) == (TILE, TILE)
    plan = tile_plan("auto", None, (TILE, TILE), {}, True, "m")
    assert plan.overlap == 0.25 and plan.window(31, 31) is None and plan.window(20, 32) == (TILE, TILE)


def test_cli_tile_errors_are_one_line(exported, tmp_path, capsys):
    run, forms, photos = exported
    image = str(photos / "wide.png")
    for flags, message in (
        (["--tile", "big"], "argument --tile: expected a positive int tile side, 'auto' or 'off', got 'big'"),
        (["--tile-overlap", "1.5"], "argument --tile-overlap: expected a fraction in [0, 0.9] (as data.tile_overlap), got '1.5'"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["predict", str(forms["tflite"]), image, *flags])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err
        assert [line for line in err.splitlines() if "error" in line] == [f"keras-resnet predict: error: {message}"]
    assert main(["predict", str(forms["onnx"]), image, "--tile", "24"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tile 24 does not fit" in err[0] and "16x16" in err[0]
    classifier = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    classifier.save(tmp_path / "classifier.keras")
    assert main(["predict", str(tmp_path / "classifier.keras"), image, "--tile", "off"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("keras-resnet predict: error: --tile is for segmenters and detectors")


# --------------------------------------------------------------------------- evaluation


def test_crop_mode_evaluation_is_segment_tiled_over_the_full_images(tmp_path):
    model = conv_segmenter(kernel=3, depth=2, input_size=(TILE, TILE), seed=6)
    rng = np.random.default_rng(7)
    pairs = []
    for height, width in ((37, 53), (20, 29)):
        mask = rng.integers(0, 3, (height, width)).astype(np.int32)
        mask[:3] = 255  # ignored
        pairs.append((random_image(height, width, seed=height), mask))
    val_full = tf.data.Dataset.from_generator(
        lambda: iter(pairs), output_signature=(tf.TensorSpec([None, None, 3], tf.float32),
                                               tf.TensorSpec([None, None], tf.int32)))
    cfg = tiling_recipe("crop")
    dataset, overlap = evaluation_data(cfg, "batches", {"val_full": val_full})
    assert dataset is val_full and overlap == 0.3
    assert evaluation_data(tiling_recipe("resize"), "batches", {}) == ("batches", None)

    metrics = evaluate_segmenter(model, dataset, CLASS_NAMES, tmp_path, tile_overlap=overlap, tile_batch_size=5)
    confusion = np.loadtxt(tmp_path / "confusion_matrix.csv", delimiter=",", dtype=np.int64)
    expected = np.zeros((3, 3), np.int64)
    predict = keras_segment_function(model)
    for image, mask in pairs:
        predicted = segment_tiled(predict, image, (TILE, TILE), overlap=0.3).argmax(-1)
        valid = mask != 255
        np.add.at(expected, (mask[valid], predicted[valid]), 1)
    np.testing.assert_array_equal(confusion, expected)
    assert expected.sum() == 34 * 53 + 17 * 29
    assert metrics["num_examples"] == 2 and metrics["tile_overlap"] == 0.3
    assert metrics["pixel_accuracy"] == pytest.approx(np.trace(expected) / expected.sum())


def test_crop_mode_detection_evaluation_merges_the_windows_of_each_full_image(detector, tmp_path):
    rng = np.random.default_rng(8)
    images = [rng.uniform(0, 255, size + (1,)).astype(np.uint8) for size in ((100, 150), (70, 64))]
    decoder_args = {"score_threshold": 0.0, "max_detections": 20}
    traced = detection_function(detector, decoder_args)  # one traced function for all (tracing is slow)

    def detect(windows):
        return {key: value.numpy() for key, value in traced(tf.constant(windows)).items()}

    by_hand = [detect_tiled(detect, image, (64, 64), overlap=0.25, iou_threshold=0.5, max_detections=20)
               for image in images]
    # ground truth: each image's best box (so AP is not 0 by accident), ids 5 and 9
    ids = [5, 9]
    coco = {
        "images": [{"id": i, "height": im.shape[0], "width": im.shape[1], "file_name": f"{i}.png"}
                   for i, im in zip(ids, images)],
        "annotations": [
            {"id": n + 1, "image_id": i, "category_id": int(found["classes"][0]), "iscrowd": 0,
             "bbox": [*map(float, found["boxes"][0][:2]), *map(float, found["boxes"][0][2:] - found["boxes"][0][:2])],
             "area": float(np.prod(found["boxes"][0][2:] - found["boxes"][0][:2]))}
            for n, (i, found) in enumerate(zip(ids, by_hand))
        ],
        "categories": [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}],
    }
    info = {
        "class_names": ["a", "b"], "val_coco": coco,
        "val_images": [{"image_id": i, "scale": 0.4, "height": im.shape[0], "width": im.shape[1]}
                       for i, im in zip(ids, images)],
        "val_full": tf.data.Dataset.from_generator(
            lambda: iter(images), output_signature=tf.TensorSpec([None, None, 1], tf.uint8)),
    }
    rows, examples = tiled_detections(detector, info, decoder_args, tile_overlap=0.25, detect=traced)
    expected = np.concatenate([
        np.column_stack([np.full(len(f["scores"]), i), f["boxes"], f["scores"], f["classes"]])
        for i, f in zip(ids, by_hand)
    ])
    np.testing.assert_allclose(rows, expected, atol=1e-4)
    assert [image.shape for image, _ in examples] == [(100, 150, 1), (70, 64, 1)]
    metrics = evaluate_detector(detector, None, info, decoder_args, tmp_path, verbose=False, tile_overlap=0.25,
                                detect=traced)
    reference = coco_evaluate(coco, expected, ["a", "b"])
    assert metrics["mAP"] == pytest.approx(reference["mAP"]) and metrics["mAP"] > 0
    assert metrics["num_examples"] == 2 and metrics["tile_overlap"] == 0.25
    assert (tmp_path / "val_predictions.png").is_file() and (tmp_path / "metrics.json").is_file()
