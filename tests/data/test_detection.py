"""Detection data: VOC / COCO / mosaic readers, letterbox pipelines, box-aware augmentation, COCO mAP."""

import json
import logging

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import keras_resnet.data.detection.mosaic_reader as mosaic_reader
from keras_resnet.data import DataError
from keras_resnet.data.detection import (
    build_detection_datasets,
    make_detection_augment,
    make_detection_mosaic,
    pad_boxes,
    read_coco,
    read_mosaic,
    read_voc,
)
from keras_resnet.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES
from keras_resnet.models.retinanet.evaluation import (
    boxes_to_original,
    coco_evaluate,
    detections_to_original,
)
from keras_resnet.training.detection import print_detection_table
from tests.helpers import write_idx_gz

# --------------------------------------------------------------------------- fixtures

# VOC objects: (name, xmin, ymin, xmax, ymax, difficult), 1-based inclusive pixel coordinates.
VOC_IMAGES = {
    "cats": ("png", "RGB", (40, 30), [("cat", 1, 1, 10, 8, 0), ("dog", 20, 5, 40, 30, 1)]),
    "car": ("jpg", "L", (25, 20), [("car", 3, 4, 12, 16, 0)]),
    "empty": ("png", "RGB", (16, 16), []),
}


def voc_xml(stem, extension, size, objects):
    parts = [f"<annotation><filename>{stem}.{extension}</filename>",
             f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"]
    for name, x0, y0, x1, y1, difficult in objects:
        parts.append(
            f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin>"
            f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


def write_image(path, size, mode, value=90):
    array = np.full((size[1], size[0]) + ((3,) if mode == "RGB" else ()), value, np.uint8)
    Image.fromarray(array, mode).save(path)


def write_voc_flat(root, images=VOC_IMAGES):
    root.mkdir(parents=True, exist_ok=True)
    for stem, (extension, mode, size, objects) in images.items():
        write_image(root / f"{stem}.{extension}", size, mode)
        (root / f"{stem}.xml").write_text(voc_xml(stem, extension, size, objects))
    return root


def write_vocdevkit(root, splits):
    year = root / "VOCdevkit" / "VOC2007"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (year / folder).mkdir(parents=True)
    for stem, (_, mode, size, objects) in VOC_IMAGES.items():
        write_image(year / "JPEGImages" / f"{stem}.jpg", size, mode)
        (year / "Annotations" / f"{stem}.xml").write_text(voc_xml(stem, "jpg", size, objects))
    for split, stems in splits.items():
        (year / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return year


def write_coco(root, annotations=None, drop=None):
    """Three images (one without objects), categories with non-contiguous ids 3 (cat) and 7 (dog)."""
    root.mkdir(parents=True, exist_ok=True)
    images = [{"id": 11, "file_name": "a.png", "width": 40, "height": 30},
              {"id": 12, "file_name": "b.jpg", "width": 20, "height": 20},
              {"id": 13, "file_name": "c.png", "width": 10, "height": 12}]
    for image in images:
        write_image(root / image["file_name"], (image["width"], image["height"]), "RGB")
    if annotations is None:
        annotations = [
            {"id": 1, "image_id": 11, "category_id": 7, "bbox": [2, 3, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 11, "category_id": 3, "bbox": [20, 10, 20, 20], "iscrowd": 1},
            {"id": 3, "image_id": 12, "category_id": 3, "bbox": [0, 0, 20, 20], "iscrowd": 0},
        ]
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]}
    if drop:
        key, item_key = drop
        if item_key is None:
            del data[key]
        else:
            del data[key][0][item_key]
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return path


def blob_items(count, seed):
    """28x28 items: a bright filled ellipse of random size and position, faint pixels around it."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:28, :28]
    items = np.zeros((count, 28, 28), np.uint8)
    for item in items:
        cy, cx = rng.uniform(9, 19, 2)
        ry, rx = rng.uniform(4, 9, 2)
        inside = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1
        item[inside] = rng.integers(120, 256)
        item[0, rng.integers(28)] = 10  # a faint speck below the paste threshold
    return items, np.arange(count) % 10


@pytest.fixture
def tiny_fashion_dir(tmp_path, monkeypatch):
    directory = tmp_path / "fashion"
    directory.mkdir()
    for split, count, seed in (("train", 40, 0), ("test", 12, 1)):
        items, labels = blob_items(count, seed)
        write_idx_gz(directory / FASHION_MNIST_FILES[f"{split}_images"], items)
        write_idx_gz(directory / FASHION_MNIST_FILES[f"{split}_labels"], labels)
    monkeypatch.setenv("KERAS_RESNET_FASHION_MNIST_DIR", str(directory))
    return directory


# --------------------------------------------------------------------------- VOC


def test_voc_flat_folder_converts_one_based_boxes_and_flags_difficult(tmp_path):
    records, names = read_voc(write_voc_flat(tmp_path / "voc"))
    assert len(names) == 20 and names[0] == "aeroplane"
    by_name = {r.image.split("/")[-1]: r for r in records}
    assert sorted(by_name) == ["car.jpg", "cats.png", "empty.png"]
    cats = by_name["cats.png"]
    assert (cats.width, cats.height) == (40, 30)
    np.testing.assert_array_equal(cats.boxes, [[0, 0, 10, 8], [19, 4, 40, 30]])
    assert cats.classes.tolist() == [names.index("cat"), names.index("dog")]
    assert cats.ignore.tolist() == [False, True]
    np.testing.assert_array_equal(by_name["car.jpg"].boxes, [[2, 3, 12, 16]])
    assert by_name["empty.png"].boxes.shape == (0, 4) and by_name["empty.png"].classes.shape == (0,)
    assert sorted(r.image_id for r in records) == [1, 2, 3]


def test_vocdevkit_layout_reads_the_split_from_the_year_or_devkit_folder(tmp_path):
    year = write_vocdevkit(tmp_path, {"train": ["cats", "empty"], "val": ["car"]})
    train, _ = read_voc(year, "train")
    assert [r.image.split("/")[-1] for r in train] == ["cats.jpg", "empty.jpg"]
    np.testing.assert_array_equal(train[0].boxes, [[0, 0, 10, 8], [19, 4, 40, 30]])
    val, _ = read_voc(year.parent, "val")  # the VOCdevkit root holding one year folder
    assert len(val) == 1 and val[0].classes.tolist() == [6]  # car
    with pytest.raises(DataError, match="trainval.txt"):
        read_voc(year, "trainval")


@pytest.mark.parametrize(
    "objects, expected",
    [
        ([("cat", 5, 5, 45, 20, 0)], r"cats.xml object 0 \(cat\): box xmin=5 ymin=5 xmax=45 ymax=20 lies outside"),
        ([("cat", 9, 5, 4, 20, 0)], r"cats.xml object 0 \(cat\): box xmin=9 ymin=5 xmax=4 ymax=20 has x_max < x_min"),
        ([("cat", 1, 1, 5, 5, 0), ("zebra", 1, 1, 5, 5, 0)],
         r"cats.xml object 1 \(zebra\): class 'zebra' is not in class_names .*add it to class_names"),
    ],
)
def test_bad_voc_boxes_and_classes_name_the_file_and_object(tmp_path, objects, expected):
    root = write_voc_flat(tmp_path / "voc", {"cats": ("png", "RGB", (40, 30), objects)})
    with pytest.raises(DataError, match=expected):
        read_voc(root)


def test_clip_boxes_clips_and_drops_degenerate_with_a_warning(tmp_path, caplog):
    objects = [("cat", 5, 5, 45, 20, 0), ("dog", 9, 5, 4, 20, 0), ("car", 2, 2, 3, 3, 0)]
    root = write_voc_flat(tmp_path / "voc", {"cats": ("png", "RGB", (40, 30), objects)})
    with caplog.at_level(logging.WARNING):
        (record,), _ = read_voc(root, clip_boxes=True)
    np.testing.assert_array_equal(record.boxes, [[4, 4, 40, 20], [1, 1, 3, 3]])
    assert "clipped box xmin=5 ymin=5 xmax=45 ymax=20" in caplog.text
    assert "dropped degenerate box xmin=9 ymin=5 xmax=4 ymax=20" in caplog.text


def test_voc_annotation_without_image_and_empty_folder(tmp_path):
    root = write_voc_flat(tmp_path / "voc")
    (root / "car.jpg").unlink()
    with pytest.raises(DataError, match=r"annotation .*car.xml has no image"):
        read_voc(root)
    year = write_vocdevkit(tmp_path / "devkit", {"train": ["cats"]})
    (year / "JPEGImages" / "cats.jpg").unlink()
    with pytest.raises(DataError, match=r"annotation .*cats.xml refers to image .*cats.jpg, which does not exist"):
        read_voc(year)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"VOC folder .*empty has no annotations"):
        read_voc(tmp_path / "empty")


def test_corrupt_image_is_named(tmp_path):
    root = write_voc_flat(tmp_path / "voc")
    (root / "car.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"unreadable image .*car.jpg"):
        read_voc(root)


# --------------------------------------------------------------------------- COCO


def test_coco_maps_categories_converts_xywh_and_keeps_negatives(tmp_path):
    records, names = read_coco(write_coco(tmp_path / "coco"))
    assert names == ["cat", "dog"]  # sorted by category id: 3, 7
    a, b, c = records
    assert [r.image_id for r in records] == [11, 12, 13]
    np.testing.assert_array_equal(a.boxes, [[2, 3, 12, 8], [20, 10, 40, 30]])
    assert a.classes.tolist() == [1, 0] and a.ignore.tolist() == [False, True]
    np.testing.assert_array_equal(b.boxes, [[0, 0, 20, 20]])
    assert c.boxes.shape == (0, 4) and (c.width, c.height) == (10, 12)


@pytest.mark.parametrize(
    "drop, expected",
    [
        (("categories", None), r"instances.json has no 'categories' key"),
        (("annotations", "bbox"), r"instances.json annotations\[0\] has no 'bbox' key"),
        (("images", "file_name"), r"instances.json images\[0\] has no 'file_name' key"),
    ],
)
def test_coco_missing_keys_name_the_json_and_key(tmp_path, drop, expected):
    with pytest.raises(DataError, match=expected):
        read_coco(write_coco(tmp_path / "coco", drop=drop))


def test_coco_bad_annotations_and_images(tmp_path):
    bad = [{"id": 5, "image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1]}]
    with pytest.raises(DataError, match="annotation 5 is for image_id 99, which is not in 'images'"):
        read_coco(write_coco(tmp_path / "a", annotations=bad))
    bad = [{"id": 6, "image_id": 12, "category_id": 3, "bbox": [5, 5, 30, 4]}]
    with pytest.raises(DataError, match=r"annotation 6 \(image b.jpg\): box bbox \[5, 5, 30, 4\] lies outside"):
        read_coco(write_coco(tmp_path / "b", annotations=bad))
    path = write_coco(tmp_path / "c")
    (path.parent / "c.png").unlink()
    with pytest.raises(DataError, match=r"instances.json image 13 refers to image .*c.png, which does not exist"):
        read_coco(path)
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(DataError, match=r"instances.json lists no images"):
        read_coco(path)


# --------------------------------------------------------------------------- mosaic


def test_mosaic_is_deterministic_and_its_boxes_are_tight():
    items, labels = blob_items(30, seed=0)
    options = {"canvas_size": 64, "items_per_canvas": (1, 5), "item_size": (12, 40)}
    first = make_detection_mosaic(items, labels, 12, seed=3, **options)
    second = make_detection_mosaic(items, labels, 12, seed=3, **options)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    other = make_detection_mosaic(items, labels, 12, seed=4, **options)
    assert not np.array_equal(first[0], other[0])
    images, boxes, classes, offsets = first
    assert images.shape == (12, 64, 64) and images.dtype == np.uint8
    assert boxes.dtype == np.float32 and classes.dtype == np.int32 and len(boxes) == len(classes) == offsets[-1]
    counts = np.diff(offsets)
    assert counts.min() >= 1 and counts.max() <= 5 and counts.max() > 1
    assert set(classes.tolist()) <= set(range(10))
    for canvas, start, end in zip(images, offsets[:-1], offsets[1:]):
        covered = np.zeros_like(canvas, bool)
        for x0, y0, x1, y1 in boxes[start:end].astype(int):
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            covered[y0:y1, x0:x1] = True
            inside = canvas[y0:y1, x0:x1]
            # Tight: every edge row/column of the box holds a nonzero pixel.
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        assert not canvas[~covered].any()  # nothing painted outside the boxes
        assert canvas.any()


def test_mosaic_reader_uses_fashion_mnist_splits_and_caches(tiny_fashion_dir, tmp_path, monkeypatch):
    options = {"count": 6, "canvas_size": 48, "item_size": (10, 30), "cache_dir": tmp_path / "cache"}
    records, names = read_mosaic("train", **options)
    assert names == list(FASHION_MNIST_CLASSES) and len(records) == 6
    assert records[0].image.shape == (48, 48) and records[0].image_id == 1
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    generate = mosaic_reader.make_detection_mosaic
    monkeypatch.setattr(mosaic_reader, "make_detection_mosaic", lambda *a, **k: pytest.fail("cache not used"))
    again, _ = read_mosaic("train", **options)
    for a, b in zip(records, again):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.boxes, b.boxes)
    monkeypatch.setattr(mosaic_reader, "make_detection_mosaic", generate)
    val, _ = read_mosaic("val", **options)  # Fashion-MNIST test items, fixed seed 1
    assert not np.array_equal(val[0].image, records[0].image)


# --------------------------------------------------------------------------- augmentation


def white_box_bounds(image):
    """xyxy bounds of the pixels brighter than half white, or None."""
    rows, cols = np.nonzero(image[..., 0] > 127)
    return None if not len(rows) else np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])


@pytest.mark.parametrize("scale_range", [(0.75, 1.25), (2.0, 2.0)])
def test_augmentation_moves_boxes_with_the_pixels_and_drops_cropped_ones(scale_range):
    image = np.zeros((64, 64, 3), np.uint8)
    image[40:58, 44:60] = 255  # box [44, 40, 60, 58] near the bottom-right corner
    boxes = np.array([[44, 40, 60, 58], [0, 0, 0, 0]], np.float32)
    classes = np.array([3, -1], np.int32)
    augment = make_detection_augment((64, 64, 3), scale_range=scale_range, min_visible=0.25)
    kept = dropped = 0
    for seed in range(40):
        out_image, out_boxes, out_classes = (t.numpy() for t in augment(image, boxes, classes, tf.constant([seed, 7])))
        assert out_image.dtype == np.uint8 and out_image.shape == (64, 64, 3)
        assert out_classes[1] == -1 and not out_boxes[1].any()
        visible = white_box_bounds(out_image)
        if out_classes[0] == 3:
            kept += 1
            np.testing.assert_allclose(out_boxes[0], visible, atol=1.0)
        else:
            dropped += 1
            assert not out_boxes[0].any()
            if visible is not None:  # dropped only because too little of it is left
                area = np.prod(visible[2:] - visible[:2])
                assert area < 0.25 * (16 * 18) * scale_range[1] ** 2 or min(visible[2:] - visible[:2]) < 2
    assert kept > 5
    if scale_range[0] == 2.0:
        assert dropped > 5  # a 2x zoom crops the corner box out of many views


def test_pad_boxes_compacts_and_pads():
    boxes = tf.constant([[0, 0, 0, 0], [1, 2, 3, 4], [5, 6, 7, 8]], tf.float32)
    padded, classes = pad_boxes(boxes, tf.constant([-1, 2, 0]), 4)
    assert classes.numpy().tolist() == [2, 0, -1, -1]
    np.testing.assert_array_equal(padded.numpy()[:2], [[1, 2, 3, 4], [5, 6, 7, 8]])
    assert not padded.numpy()[2:].any()
    _, truncated = pad_boxes(boxes, tf.constant([1, 2, 0]), 2)
    assert truncated.numpy().tolist() == [1, 2]


# --------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("channels", [1, 3])
def test_voc_pipeline_letterboxes_and_keeps_metadata(tmp_path, channels):
    root = write_voc_flat(tmp_path / "voc")
    train, val, info = build_detection_datasets(
        "voc", root, root, input_shape=(32, 32, channels), batch_size=2, max_boxes=5, seed=1
    )
    assert info["num_classes"] == 20 and (info["num_train"], info["num_val"]) == (3, 3)
    assert info["num_train_boxes"] == 3
    (images, targets), = list(train)  # 3 images, batch 2, drop_remainder
    assert images.dtype == tf.uint8 and images.shape == (2, 32, 32, channels)
    assert targets["boxes"].shape == (2, 5, 4) and targets["classes"].dtype == tf.int32
    val_batches = list(val)
    assert [b[0].shape[0] for b in val_batches] == [2, 1]
    val_images = np.concatenate([b[0].numpy() for b in val_batches])
    val_boxes = np.concatenate([b[1]["boxes"].numpy() for b in val_batches])
    val_classes = np.concatenate([b[1]["classes"].numpy() for b in val_batches])
    by_id = {image["image_id"]: image for image in info["val_images"]}
    for index, meta in enumerate(info["val_images"]):
        # Letterbox: scaled to fit, padded with 0 at the bottom / right only.
        rows, cols = np.nonzero(val_images[index, ..., 0])
        assert rows.min() == 0 and cols.min() == 0
        assert cols.max() + 1 == round(meta["width"] * meta["scale"])
        assert rows.max() + 1 == round(meta["height"] * meta["scale"])
        truth = [a for a in info["val_coco"]["annotations"] if a["image_id"] == meta["image_id"] and not a["iscrowd"]]
        valid = val_classes[index] >= 0
        assert valid.sum() == len(truth)
        back = boxes_to_original(val_boxes[index][valid], meta["scale"], meta["height"], meta["width"])
        expected = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in truth)]
        np.testing.assert_allclose(back, np.reshape(expected, (-1, 4)), atol=1e-4)
    cats = by_id[next(i["id"] for i in info["val_coco"]["images"] if i["file_name"].endswith("cats.png"))]
    assert cats["scale"] == pytest.approx(32 / 40)
    assert [a["iscrowd"] for a in info["val_coco"]["annotations"]].count(1) == 1  # the difficult dog


@pytest.mark.parametrize("channels", [1, 3])
def test_mosaic_pipeline_and_batch_size_check(tiny_fashion_dir, tmp_path, channels):
    args = {"train_size": 8, "val_size": 4, "canvas_size": 48, "item_size": (10, 30), "cache_dir": tmp_path}
    train, val, info = build_detection_datasets(
        "mosaic", input_shape=(24, 24, channels), batch_size=4, max_boxes=8, mosaic_args=args
    )
    assert info["class_names"] == list(FASHION_MNIST_CLASSES) and info["num_val"] == 4
    assert all(image["scale"] == 0.5 for image in info["val_images"])
    images, targets = next(iter(train))
    assert images.shape == (4, 24, 24, channels) and images.dtype == tf.uint8
    np.testing.assert_array_equal(images[..., 0], images[..., -1])
    assert [x.shape[0] for x, _ in val] == [4]
    classes = targets["classes"].numpy()
    assert (classes >= 0).any() and set(classes.ravel().tolist()) <= set(range(-1, 10))
    with pytest.raises(DataError, match="batch_size=64 is larger than the 8 training images"):
        build_detection_datasets("mosaic", input_shape=(24, 24, 1), batch_size=64, mosaic_args=args)


def test_coco_pipeline_requires_paths(tmp_path):
    with pytest.raises(DataError, match="data.train is required when data.source is coco"):
        build_detection_datasets("coco")


# --------------------------------------------------------------------------- evaluation


def eval_ground_truth():
    """Two classes, three images; class 2 ("absent") has no objects."""
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"} for i in (1, 2, 3)]
    boxes = [(1, 0, [10, 10, 40, 30]), (1, 1, [50, 50, 30, 40]), (2, 0, [5, 60, 50, 35]), (3, 1, [20, 20, 60, 60])]
    annotations = [
        {"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
        for k, (i, c, b) in enumerate(boxes)
    ]
    categories = [{"id": k, "name": n} for k, n in enumerate(["circle", "square", "absent"])]
    return {"images": images, "annotations": annotations, "categories": categories}, boxes


def test_coco_mAP_of_perfect_shifted_and_missing_detections(capsys):
    truth, boxes = eval_ground_truth()
    names = ["circle", "square", "absent"]
    perfect = [[i, x, y, x + w, y + h, 0.9, c] for i, c, (x, y, w, h) in boxes]
    metrics = coco_evaluate(truth, perfect, names)
    assert metrics["mAP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    assert metrics["per_class"]["circle"] == pytest.approx(1.0) and metrics["per_class"]["absent"] is None
    assert metrics["APs"] is None and metrics["APl"] is None  # every object is 32..96 px
    shifted = [[i, x + 0.2 * w, y, x + 1.2 * w, y + h, 0.9, c] for i, c, (x, y, w, h) in boxes]
    worse = coco_evaluate(truth, shifted, names)
    assert 0.0 < worse["mAP"] < 0.9 and worse["AP50"] == pytest.approx(1.0)
    empty = coco_evaluate(truth, [], names)
    assert empty["mAP"] == 0.0 and empty["per_class"] == {"circle": 0.0, "square": 0.0, "absent": None}
    assert empty["APs"] is None and empty["APm"] == 0.0 and empty["APl"] is None
    assert "index" not in capsys.readouterr().out  # pycocotools' prints are captured
    print_detection_table(worse, title="test AP")
    out = capsys.readouterr().out
    assert "test AP" in out and "circle" in out and "mAP" in out


def test_detections_map_back_to_original_pixels():
    images = [{"image_id": 4, "scale": 0.5, "height": 60, "width": 80},
              {"image_id": 5, "scale": 2.0, "height": 10, "width": 10}]
    boxes = np.array([[[10, 10, 20, 30], [0, 0, 50, 50]], [[1, 1, 3, 3], [0, 0, 0, 0]]], np.float32)
    scores = np.array([[0.9, 0.8], [0.7, 0.0]])
    classes = np.array([[1, 0], [2, -1]])
    rows = detections_to_original(boxes, scores, classes, images, num_detections=np.array([1, 2]))
    np.testing.assert_allclose(rows, [[4, 20, 20, 40, 60, 0.9, 1], [5, 0.5, 0.5, 1.5, 1.5, 0.7, 2]], rtol=1e-6)
