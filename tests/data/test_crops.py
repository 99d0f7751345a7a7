"""Native-resolution windows (`data.sampling: crop`): window size, masks and boxes moving with the pixels,
empty windows, epoch length, validation tiles and `val_full`, the recipe keys.

The images are `coordinate_image`s (R = x, G = y, B = 200; padding reads B = 0), so every window says
where it was cut from and whether it was flipped.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

from keras_resnet.config import ConfigError, load_config
from keras_resnet.data import SegmentationDataError, crops
from keras_resnet.data.detection import build_detection_datasets
from keras_resnet.data.detection.geometry import make_detection_crop, window_boxes
from keras_resnet.data.segmentation import build_segmentation_datasets
from keras_resnet.training.preflight import announce_run, epoch_steps
from tests.helpers import coordinate_image, write_mask_pair, write_voc_image

INPUT = (16, 24, 3)
MARKER = 200  # B of every image pixel; window padding has B = 0


def class_of(x, y):
    """The mask value at pixel (x, y) of the coordinate masks: stripes of classes 0, 1, 2."""
    return (np.asarray(x) // 5 + np.asarray(y) // 7) % 3


def coordinate_pair(height, width):
    rows, cols = np.mgrid[:height, :width]
    return coordinate_image(height, width, MARKER), class_of(cols, rows).astype(np.uint8)


def seed(value):
    return tf.constant([value, 5], tf.int64)


def segmentation_cfg(tmp_path, **data):
    data = {"source": "mask_folder", "train": str(tmp_path / "train"), "val": str(tmp_path / "val"),
            "batch_size": 2, "sampling": "crop", "augment": {"scale_range": [1.0, 1.0]}, **data}
    return load_config({"task": "segmentation", "model": {"backbone": "resnet18", "num_classes": 3,
                                                          "input_shape": list(INPUT)},
                        "data": data, "output_dir": str(tmp_path / "run")})


def window_origin(pixels):
    """`(top, left, flipped)` of a scale-1 window from its coordinate pixels (the first image row / column inside)."""
    inside = pixels[..., 2] == MARKER
    rows, cols = np.nonzero(inside)
    row, col = rows[0], cols[0]  # some pixel inside the image
    step = np.diff(pixels[row, :, 0].astype(int))[inside[row, 1:] & inside[row, :-1]]
    flipped = bool(step.size) and step[0] < 0
    # Output column c shows source x = left + c, or left + (W - 1 - c) when flipped.
    left = pixels[row, col, 0] + (col - (pixels.shape[1] - 1) if flipped else -col)
    return int(pixels[row, col, 1]) - row, int(left), flipped


def reference_boxes(boxes, top, left, height, width, flipped, min_visible=0.25):
    """The window boxes by hand: shift, clip, drop (< min_visible of the area or a side < 2 px), mirror."""
    kept = []
    for x0, y0, x1, y1 in boxes:
        shifted = np.array([x0 - left, y0 - top, x1 - left, y1 - top], float)
        clipped = np.clip(shifted, 0, [width, height, width, height])
        sides = clipped[2:] - clipped[:2]
        if sides.prod() >= min_visible * (shifted[2:] - shifted[:2]).prod() and (sides >= 2).all():
            if flipped:
                clipped = np.array([width - clipped[2], clipped[1], width - clipped[0], clipped[3]])
            kept.append(clipped)
    return np.array(sorted(map(tuple, kept))).reshape(-1, 4)


# --------------------------------------------------------------------------- window functions


@pytest.mark.parametrize("size", [(60, 80), (7, 9)])
def test_windows_have_the_input_size_for_large_and_small_images(size):
    image, mask = coordinate_pair(*size)
    rows = crops.foreground_rows(mask, 255)
    boxes, classes = tf.constant([[1.0, 1.0, 6.0, 5.0], [0, 0, 0, 0]]), tf.constant([0, -1])
    for scale_range in ((1.0, 1.0), (0.5, 1.5)):
        mask_crop = crops.make_mask_crop(INPUT, scale_range, horizontal_flip=True, empty_crop_rate=0.5)
        box_crop = make_detection_crop(INPUT, scale_range=scale_range, empty_crop_rate=0.5)
        for value in range(4):
            pixels, window = mask_crop(image, mask, rows, seed(value))
            assert pixels.shape == INPUT and pixels.dtype == tf.float32
            assert window.shape == INPUT[:2] and window.dtype == tf.int32
            box_pixels, _, _ = box_crop(image, boxes, classes, seed(value))
            assert box_pixels.shape == INPUT and box_pixels.dtype == tf.uint8
            if scale_range == (1.0, 1.0) and size == (7, 9):  # the whole image inside, padding around it
                pixels, window = pixels.numpy(), window.numpy()
                inside = pixels[..., 2] == MARKER
                assert inside.sum() == 7 * 9 and (window != 255).sum() == 7 * 9
                assert (box_pixels.numpy()[..., 2] == MARKER).sum() == 7 * 9
                assert not pixels[~inside].any() and (window[~inside] == 255).all()


def test_offset_containing_an_object_holds_it_and_stays_on_the_image():
    for value in range(20):
        # A 6-px object at 40..46 in a 100-px image, 16-px window: offsets 30..40, all holding it.
        offset = int(crops.offset_containing(seed(value), 40.0, 46.0, 100, 16))
        assert 30 <= offset <= 40
        # Wider than the window: its centre (43) inside; near the border: clamped onto the image.
        assert 27 <= int(crops.offset_containing(seed(value), 20.0, 66.0, 100, 16)) <= 43
        assert 0 <= int(crops.offset_containing(seed(value), 0.0, 3.0, 100, 16)) <= 0
        # Image smaller than the window: the image anywhere inside it (offsets -6..0).
        assert -6 <= int(crops.offset_containing(seed(value), 2.0, 3.0, 10, 16)) <= 0


def test_masks_are_cut_and_rescaled_with_their_pixels():
    image, mask = coordinate_pair(60, 80)
    rows = crops.foreground_rows(mask, 255)
    crop = crops.make_mask_crop(INPUT, (2.0, 2.0), horizontal_flip=True, empty_crop_rate=1.0)
    for value in range(6):  # a 2x zoom: 8 x 12 source pixels; nearest mask = class of the rounded coordinates
        pixels, window = (t.numpy() for t in crop(image, mask, rows, seed(value)))
        np.testing.assert_array_equal(window, class_of(np.round(pixels[..., 0]), np.round(pixels[..., 1])))
        assert np.ptp(pixels[..., 1]) == pytest.approx(7.0) and np.ptp(pixels[..., 0]) == pytest.approx(11.0)


def test_boxes_move_into_a_known_window_exactly():
    boxes = tf.constant([[10.0, 20, 30, 40], [0, 0, 20, 20], [0, 10, 10, 30], [12, 16, 16, 20]])
    classes = tf.constant([1, 2, 3, 4])
    # Window at top 15, left 5, 16 x 24 source pixels = the input size.
    out, out_classes, keep = window_boxes(boxes, classes, 15, 5, 16, 24, 16, 24, 0.25)
    np.testing.assert_allclose(out.numpy(), [[5, 5, 24, 16], [0, 0, 0, 0], [0, 0, 5, 15], [7, 1, 11, 5]])
    assert out_classes.numpy().tolist() == [1, -1, 3, 4]  # box 2 keeps 75 / 400 px (< 25 %): dropped
    assert keep.numpy().tolist() == [True, False, True, True]
    # 8 x 8 source pixels at top 18, left 8 onto 16 x 24: x 3 across, x 2 down; a box 0.5 px wide becomes
    # 1.5 px (< 2 px): dropped.
    out, out_classes, _ = window_boxes(tf.constant([[10.0, 20, 14, 24], [9, 19, 9.5, 25]]), tf.constant([0, 1]),
                                       18, 8, 8, 8, 16, 24, 0.25)
    np.testing.assert_allclose(out.numpy(), [[6, 4, 18, 12], [0, 0, 0, 0]])
    assert out_classes.numpy().tolist() == [0, -1]


# --------------------------------------------------------------------------- pipelines


def test_segmentation_windows_keep_mask_and_pixels_together(tmp_path):
    write_mask_pair(tmp_path / "train", "big", *coordinate_pair(60, 80))
    write_mask_pair(tmp_path / "train", "small", *coordinate_pair(12, 10))
    write_mask_pair(tmp_path / "val", "v", *coordinate_pair(20, 20))
    cfg = segmentation_cfg(tmp_path, crops_per_image=5, empty_crop_rate=1.0)
    train, _, info = build_segmentation_datasets(cfg, seed=0)
    assert info["sampling"] == "crop" and info["num_train_windows"] == 10
    origins, flips = set(), set()
    for images, masks in train.as_numpy_iterator():
        for pixels, window in zip(images, masks):
            inside = pixels[..., 2] == MARKER
            np.testing.assert_array_equal(window[inside], class_of(pixels[..., 0], pixels[..., 1])[inside])
            assert (window[~inside] == 255).all() and not pixels[~inside].any()
            top, left, flipped = window_origin(pixels)
            origins.add((top, left))
            flips.add(flipped)
    assert len(origins) >= 5 and flips == {False, True}  # windows move and flip


def test_detection_window_boxes_match_the_window_the_pixels_came_from(tmp_path):
    boxes = [[10, 20, 30, 40], [50, 5, 58, 13], [0, 44, 12, 60], [70, 50, 80, 60]]
    write_voc_image(tmp_path / "voc", "a", coordinate_image(60, 80, MARKER), boxes)
    train, _, info = build_detection_datasets(
        "voc", tmp_path / "voc", tmp_path / "voc", input_shape=INPUT, batch_size=4, max_boxes=6,
        augment={"scale_range": (1.0, 1.0)}, sampling="crop", crops_per_image=12, empty_crop_rate=1.0,
    )
    assert info["num_train_windows"] == 12
    checked = 0
    for images, targets in train.as_numpy_iterator():
        for pixels, out_boxes, out_classes in zip(images, targets["boxes"], targets["classes"]):
            top, left, flipped = window_origin(pixels)
            expected = reference_boxes(boxes, top, left, 16, 24, flipped)
            found = np.array(sorted(map(tuple, out_boxes[out_classes >= 0]))).reshape(-1, 4)
            np.testing.assert_allclose(found, expected, atol=1e-4)
            checked += len(expected)
    assert checked >= 3  # some windows hold boxes


def write_one_small_object(tmp_path):
    """A 200 x 200 image with a single 6 x 6 object at x 30..36, y 150..156: as a mask folder and as VOC."""
    image = coordinate_image(200, 200, MARKER)
    mask = np.zeros((200, 200), np.uint8)
    mask[150:156, 30:36] = 1
    write_mask_pair(tmp_path / "train", "a", image, mask)
    write_mask_pair(tmp_path / "val", "a", image[:20, :20], mask[:20, :20])
    write_voc_image(tmp_path / "voc", "a", image, [[30, 150, 36, 156]])


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_empty_crop_rate_moves_empty_windows_onto_the_object(tmp_path, rate):
    write_one_small_object(tmp_path)
    cfg = segmentation_cfg(tmp_path, crops_per_image=24, batch_size=24, empty_crop_rate=rate,
                           augment={"scale_range": [1.0, 1.25]})  # zoom in only: nearest keeps every pixel
    (_, masks), = build_segmentation_datasets(cfg, seed=0)[0].as_numpy_iterator()
    with_object = [((m >= 1) & (m != 255)).any() for m in masks]
    _, targets = next(build_detection_datasets(
        "voc", tmp_path / "voc", tmp_path / "voc", input_shape=INPUT, batch_size=24, max_boxes=2,
        augment={"scale_range": (0.8, 1.25)}, sampling="crop", crops_per_image=24, empty_crop_rate=rate,
    )[0].as_numpy_iterator())
    with_box = [(classes >= 0).any() for classes in targets["classes"]]
    if rate == 0.0:
        assert all(with_object) and all(with_box)
    else:  # uniform windows: a 16 x 24 window rarely meets a 6 x 6 object in 200 x 200
        assert sum(with_object) <= 12 and sum(with_box) <= 12


def test_images_without_objects_give_uniform_windows():
    image, mask = coordinate_image(100, 100, MARKER), np.zeros((100, 100), np.uint8)
    crop = crops.make_mask_crop(INPUT, horizontal_flip=False, empty_crop_rate=0.0)
    rows = crops.foreground_rows(mask, 255)
    origins = {window_origin(crop(image, mask, rows, seed(v))[0].numpy())[:2] for v in range(8)}
    assert len(origins) == 8


def test_epoch_is_images_x_crops_x_repeat(tmp_path):
    for index in range(3):
        write_mask_pair(tmp_path / "train", f"t{index}", *coordinate_pair(30, 40))
        write_voc_image(tmp_path / "voc", f"t{index}", coordinate_image(30, 40), [[2, 3, 12, 14]])
    write_mask_pair(tmp_path / "val", "v", *coordinate_pair(20, 20))
    cfg = segmentation_cfg(tmp_path, crops_per_image=4, repeat=2, batch_size=5)
    train, _, info = build_segmentation_datasets(cfg, seed=0)
    assert info["num_train_windows"] == 24 and info["crops_per_image"] == 4
    assert int(train.cardinality()) == len(list(train)) == 24 // 5 == epoch_steps(cfg, info)
    train, _, info = build_detection_datasets(
        "voc", tmp_path / "voc", tmp_path / "voc", input_shape=INPUT, batch_size=5, max_boxes=2,
        sampling="crop", crops_per_image=4, repeat=2,
    )
    assert info["num_train_windows"] == 24 and int(train.cardinality()) == len(list(train)) == 4
    # One batch may use every window of the epoch (3 x 2 x 4 = 24), not more.
    with pytest.raises(SegmentationDataError, match=r"3 training examples x data.repeat=2 x data.crops_per_image=4"):
        build_segmentation_datasets(segmentation_cfg(tmp_path, crops_per_image=4, repeat=2, batch_size=25))
    build_segmentation_datasets(segmentation_cfg(tmp_path, crops_per_image=4, repeat=2, batch_size=24))
    with pytest.raises(ConfigError, match="'data.sampling' must be one of 'resize', 'crop', got 'tiles'"):
        build_detection_datasets("voc", tmp_path / "voc", tmp_path / "voc", sampling="tiles")


def test_announcement_counts_windows(capsys):
    cfg = load_config({"task": "detection", "model": {"num_classes": 1, "backbone": "resnet18"},
                       "data": {"source": "voc", "train": "voc", "val": "voc", "sampling": "crop",
                                "crops_per_image": 8, "batch_size": 4}})
    info = {"num_train": 12, "num_val": 3, "sampling": "crop", "crops_per_image": 8, "num_train_windows": 96,
            "num_val_windows": 7}
    steps = announce_run(cfg, info, SimpleNamespace(num_replicas_in_sync=1), SimpleNamespace(root="run"), "m")
    assert steps == 24 and "12 train images x 8 crops = 96 windows / 3 val images (7 tiles)" in capsys.readouterr().out


# --------------------------------------------------------------------------- validation tiles, val_full


def test_validation_tiles_cover_each_image_row_by_row_and_val_full_is_native(tmp_path):
    write_mask_pair(tmp_path / "train", "t", *coordinate_pair(30, 40))
    write_mask_pair(tmp_path / "val", "a", *coordinate_pair(40, 50))  # 3 x 3 tiles of 16 x 24
    write_mask_pair(tmp_path / "val", "b", *coordinate_pair(10, 10))  # one padded tile
    _, val, info = build_segmentation_datasets(segmentation_cfg(tmp_path, batch_size=4, crops_per_image=4), seed=0)
    full = list(info["val_full"].as_numpy_iterator())
    sizes = [image.shape[:2] for image, _ in full]
    assert sorted(sizes) == [(10, 10), (40, 50)] and info["num_val_windows"] == 10
    assert all(image.dtype == np.float32 and mask.dtype == np.int32 and mask.shape == image.shape[:2]
               for image, mask in full)
    tiles = [(image, mask) for images, masks in val.as_numpy_iterator() for image, mask in zip(images, masks)]
    assert len(tiles) == 10
    grids = {(40, 50): [(top, left) for top in (0, 16, 32) for left in (0, 24, 48)], (10, 10): [(0, 0)]}
    offsets = [offset for size in sizes for offset in grids[size]]  # val_full order, each image row by row
    for (image, mask), (top, left) in zip(tiles, offsets):
        assert (image[0, 0, 0], image[0, 0, 1]) == (left, top)  # tile order: the first image's grid, row by row
        inside = image[..., 2] == MARKER
        np.testing.assert_array_equal(mask[inside], class_of(image[..., 0], image[..., 1])[inside])
        assert (mask[~inside] == 255).all() and not image[~inside].any()
    (height, width), first_mask = sizes[0], full[0][1]
    np.testing.assert_array_equal(tiles[0][1][:height, :width], first_mask[:16, :24])


def test_detection_tiles_clip_boxes_and_val_full_is_native(tmp_path):
    write_voc_image(tmp_path / "voc", "a", coordinate_image(40, 50, MARKER), [[10, 20, 30, 40]])
    _, val, info = build_detection_datasets(
        "voc", tmp_path / "voc", tmp_path / "voc", input_shape=INPUT, batch_size=4, max_boxes=3, sampling="crop",
        crops_per_image=4,
    )
    (image,) = list(info["val_full"].as_numpy_iterator())
    assert image.shape == (40, 50, 3) and image.dtype == np.uint8 and info["sampling"] == "crop"
    assert info["val_images"][0]["scale"] == pytest.approx(min(16 / 40, 24 / 50))  # still the letterbox scale
    boxes = np.concatenate([targets["boxes"][:, 0] for _, targets in val.as_numpy_iterator()])
    classes = np.concatenate([targets["classes"][:, 0] for _, targets in val.as_numpy_iterator()])
    assert len(classes) == info["num_val_windows"] == 9
    # Tiles (1, 0) and (2, 0) keep 42 % and 28 % of the box; (1, 1) and (2, 1) under 25 %: dropped.
    assert np.nonzero(classes >= 0)[0].tolist() == [3, 6]
    np.testing.assert_allclose(boxes[[3, 6]], [[10, 4, 24, 16], [10, 0, 24, 8]])


def test_resize_sampling_also_gives_val_full(tmp_path):
    write_mask_pair(tmp_path / "train", "t", *coordinate_pair(30, 40))
    write_mask_pair(tmp_path / "val", "v", *coordinate_pair(20, 26))
    cfg = segmentation_cfg(tmp_path, sampling="resize", batch_size=1)
    _, val, info = build_segmentation_datasets(cfg, seed=0)
    assert info["sampling"] == "resize" and info["num_train_windows"] == 1
    (image, mask), = info["val_full"].as_numpy_iterator()
    assert image.shape == (20, 26, 3) and image.dtype == np.float32 and mask.dtype == np.int32
    images, _ = next(iter(val))
    assert images.shape == (1, *INPUT)
    write_voc_image(tmp_path / "voc", "a", coordinate_image(20, 26), [[1, 2, 10, 12]])
    _, _, info = build_detection_datasets("voc", tmp_path / "voc", tmp_path / "voc", input_shape=INPUT, batch_size=1)
    assert info["sampling"] == "resize" and next(iter(info["val_full"])).shape == (20, 26, 3)


# --------------------------------------------------------------------------- recipe keys


def crop_recipe(task="segmentation", source="mask_folder", **data):
    num_classes = 1 if task == "detection" else 11 if source == "mosaic" else 3
    files = {"train": "train", "val": "val"} if source != "mosaic" else {}
    return {"task": task, "model": {"backbone": "resnet18", "num_classes": num_classes},
            "data": {"source": source, **files, **data}}


def test_crop_keys_load_with_their_defaults():
    cfg = load_config(crop_recipe(sampling="crop", crops_per_image=8, empty_crop_rate=0, tile_overlap=0.5))
    data = cfg.data
    assert (data.crops_per_image, data.empty_crop_rate, data.tile_overlap) == (8, 0.0, 0.5)
    assert load_config(crop_recipe("detection", "coco", sampling="crop")).data.sampling == "crop"
    defaults = load_config(None).data
    assert (defaults.sampling, defaults.crops_per_image, defaults.empty_crop_rate) == ("resize", 1, 0.1)
    assert defaults.tile_overlap == 0.25


@pytest.mark.parametrize("recipe, message", [
    (crop_recipe("classification", "fashion_mnist", sampling="crop"),
     r"'data.sampling'='crop' .* task 'classification', source 'fashion_mnist'\); set data.sampling=resize"),
    (crop_recipe("segmentation", "mosaic", sampling="crop"), r"'data.sampling'='crop' .*source 'mosaic'"),
    (crop_recipe("detection", "mosaic", sampling="crop"), r"'data.sampling'='crop' .*source 'mosaic'"),
    (crop_recipe(sampling="tiles"), r"'data.sampling' must be one of 'resize', 'crop'"),
    (crop_recipe(sampling="crop", crops_per_image=0), r"'data.crops_per_image' must be >= 1"),
    (crop_recipe(sampling="crop", crops_per_image=2.5), r"'data.crops_per_image' must be an int"),
    (crop_recipe(sampling="crop", empty_crop_rate=1.5), r"'data.empty_crop_rate' must be in \[0, 1\]"),
    (crop_recipe(sampling="crop", tile_overlap=0.95), r"'data.tile_overlap' must be in \[0, 0.9\]"),
    (crop_recipe(crops_per_image=4), r"'data.crops_per_image'=4 only applies with data.sampling=crop"),
    (crop_recipe(empty_crop_rate=0.5), r"'data.empty_crop_rate'=0.5 only applies with data.sampling=crop"),
])
def test_bad_crop_keys_are_one_line_errors(recipe, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(recipe)
    assert "\n" not in str(error.value)
