"""Segmentation data: mask folders, VOC, mosaics (fresh each epoch), bad input naming the file."""


import numpy as np
import pytest
from PIL import Image

from keras_resnet.config import ConfigError, load_config
from keras_resnet.data import DataError
from keras_resnet.data.segmentation import (
    SegmentationDataError,
    build_segmentation_datasets,
    make_mosaic,
)
from tests.helpers import FRESH_MOSAIC_OVERRIDES, mask_epochs
from tests.helpers import SEGMENTATION_RECIPE as RECIPE


def write_pair(folder, stem, image, mask, mask_mode="P", image_ext=".png"):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / "images" / f"{stem}{image_ext}")
    if mask is not None:
        mask_image = Image.fromarray(mask.astype(np.uint8), mode="L")
        if mask_mode == "P":
            mask_image = mask_image.convert("P")
            mask_image.putpalette([v for i in range(256) for v in (i * 37 % 256, i * 91 % 256, i * 13 % 256)])
        elif mask_mode == "RGB":
            mask_image = mask_image.convert("RGB")
        mask_image.save(folder / "masks" / f"{stem}.png")


def block_pair(height, width, seed):
    """An image whose grey level is 60 * class, in blocks, and its mask (with an ignored border)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), np.uint8)
    mask[: height // 2, : width // 2] = 1
    mask[height // 2 :, width // 2 :] = rng.integers(1, 3)
    image = np.repeat((mask * 60 + 30)[..., None], 3, axis=-1).astype(np.uint8)
    mask[0, :] = 255
    return image, mask


def segmentation_cfg(tmp_path, source, train, val, num_classes=3, **data):
    return load_config({
        "task": "segmentation",
        "model": {"backbone": "resnet18", "num_classes": num_classes, "input_shape": [16, 24, 3]},
        "data": {"source": source, "train": str(train), "val": str(val), "batch_size": 2, **data},
        "output_dir": str(tmp_path / "run"),
    })


def test_mask_folder_loader_reads_palette_masks_and_augments_consistently(tmp_path):
    for i in range(4):
        write_pair(tmp_path / "train", f"a{i}", *block_pair(30, 44, i))
    for i in range(2):
        write_pair(tmp_path / "val", f"b{i}", *block_pair(20, 20, 10 + i), image_ext=".jpg")
    (tmp_path / "train" / "classes.txt").write_text("background\nsquare\ncircle\n")
    cfg = segmentation_cfg(tmp_path, "mask_folder", tmp_path / "train", tmp_path / "val",
                           augment={"scale_range": [0.5, 1.5], "horizontal_flip": True})
    train_ds, val_ds, info = build_segmentation_datasets(cfg, seed=0)
    assert info["class_names"] == ["background", "square", "circle"]
    assert (info["num_train"], info["num_val"]) == (4, 2) and len(info["mean"]) == 3
    images, masks = next(iter(val_ds))
    assert images.shape == (2, 16, 24, 3) and images.dtype == "float32" and masks.shape == (2, 16, 24)
    assert masks.dtype == "int32" and set(np.unique(masks)) <= {0, 1, 2, 255}
    for _ in range(3):  # same geometry for image and mask, padding ignored
        for images, masks in train_ds:
            images, masks = images.numpy()[..., 0], masks.numpy()
            labelled = (masks != 255) & (images > 0)
            agreement = np.mean(np.round((images[labelled] - 30) / 60) == masks[labelled])
            assert agreement > 0.85 and np.all(images[masks == 255] >= 0)


def write_voc(root, ids_by_split):
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, ids in ids_by_split.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for seed, image_id in enumerate(ids):
            image, mask = block_pair(24, 32, seed)
            mask[mask == 2] = 20  # tvmonitor
            Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg")
            mask_image = Image.fromarray(mask, mode="L").convert("P")
            mask_image.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
            mask_image.save(root / "SegmentationClass" / f"{image_id}.png")


def test_voc_loader_reads_split_lists(tmp_path):
    root = tmp_path / "VOC2012"
    write_voc(root, {"train": ["2007_000001", "2007_000002", "2007_000003"], "val": ["2007_000004"]})
    cfg = segmentation_cfg(tmp_path, "voc", root, root, num_classes=21)
    train_ds, val_ds, info = build_segmentation_datasets(cfg, seed=0)
    assert (info["num_train"], info["num_val"]) == (3, 1) and info["class_names"][20] == "tvmonitor"
    _, masks = next(iter(val_ds))
    assert masks.shape == (1, 16, 24) and set(np.unique(masks)) <= {0, 1, 20, 255} and 1 in np.unique(masks)
    assert next(iter(train_ds))[0].shape == (2, 16, 24, 3)
    with pytest.raises(SegmentationDataError, match="model.num_classes=21"):
        build_segmentation_datasets(segmentation_cfg(tmp_path, "voc", root, root, num_classes=3))


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("size", "bad.png is 10x12 but its image"),
        ("value", "has values [7] >= model.num_classes=3"),
        ("missing", "images/bad.png has no mask"),
        ("rgb", "bad.png is a RGB image"),
    ],
)
def test_bad_mask_folder_inputs_name_the_file(tmp_path, problem, expected):
    image, mask = block_pair(12, 16, 0)
    write_pair(tmp_path / "train", "good", image, mask)
    if problem == "size":
        write_pair(tmp_path / "train", "bad", image, np.zeros((12, 10), np.uint8))
    elif problem == "value":
        write_pair(tmp_path / "train", "bad", image, np.where(mask == 1, 7, mask))
    elif problem == "missing":
        write_pair(tmp_path / "train", "bad", image, None)
    else:
        write_pair(tmp_path / "train", "bad", image, mask, mask_mode="RGB")
    write_pair(tmp_path / "val", "v", image, mask)
    cfg = segmentation_cfg(tmp_path, "mask_folder", tmp_path / "train", tmp_path / "val", batch_size=1)
    with pytest.raises(SegmentationDataError) as error:
        build_segmentation_datasets(cfg)
    assert isinstance(error.value, DataError) and expected in str(error.value)
    assert str(tmp_path / "train") in str(error.value) and "\n" not in str(error.value)


def test_masks_of_only_0_and_255_are_one_error_not_an_ignored_foreground(tmp_path):
    image, mask = block_pair(12, 16, 0)
    binary = np.where(mask > 0, 255, 0)  # binary masks as many tools save them: the foreground is 255
    for stem in ("a", "b"):
        write_pair(tmp_path / "train", stem, image, binary, mask_mode="L")
    write_pair(tmp_path / "val", "v", image, mask)
    cfg = segmentation_cfg(tmp_path, "mask_folder", tmp_path / "train", tmp_path / "val", num_classes=2, batch_size=1)
    with pytest.raises(SegmentationDataError, match="holds only 0 and 255, and 255 means 'ignore'"):
        build_segmentation_datasets(cfg)


def test_mosaic_is_deterministic_and_labels_item_pixels():
    rng = np.random.default_rng(0)
    items = rng.integers(0, 256, (20, 28, 28)).astype(np.uint8)
    labels = np.arange(20) % 10
    images, masks = make_mosaic(items, labels, 6, 32, 40, seed=3)
    again, masks_again = make_mosaic(items, labels, 6, 32, 40, seed=3)
    assert images.shape == masks.shape == (6, 32, 40)
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(masks, masks_again)
    assert masks.max() <= 10 and (masks > 0).any()
    assert np.all(images[masks == 0] == 0) and np.all(images[masks > 0] > 48)


def test_source_must_fit_the_task():
    with pytest.raises(ConfigError, match="is a segmentation or detection source but task is 'classification'"):
        load_config(None, ["data.source=mosaic"])
    with pytest.raises(ConfigError, match="classification source but task is 'segmentation'"):
        load_config(RECIPE, ["data.source=fashion_mnist"])
    with pytest.raises(ConfigError, match="train.class_weights"):
        load_config(RECIPE, ["train.class_weights=[1, 2]"])


def test_fresh_mosaics_change_every_epoch_and_validation_stays(tiny_fashion_mnist):
    overrides = list(FRESH_MOSAIC_OVERRIDES)
    train, val, info = build_segmentation_datasets(load_config(RECIPE, overrides), seed=0)
    first, second = mask_epochs(train, 2)
    assert first.shape == second.shape == (24, 32, 32)  # cardinality kept: same steps per epoch
    assert int(train.cardinality()) == 3
    assert not np.array_equal(np.sort(first.reshape(24, -1), 0), np.sort(second.reshape(24, -1), 0))
    val_first, val_second = mask_epochs(val, 2)
    np.testing.assert_array_equal(val_first, val_second)
    assert info["num_train"] == 24 and len(info["mean"]) == 1
    # Same seed, same sequence of epochs; without the flag every epoch repeats the same canvases.
    again, _, _ = build_segmentation_datasets(load_config(RECIPE, overrides), seed=0)
    np.testing.assert_array_equal(np.sort(mask_epochs(again, 2)[1].reshape(24, -1), 0), np.sort(second.reshape(24, -1), 0))
    fixed, _, _ = build_segmentation_datasets(
        load_config(RECIPE, [*overrides[:-1], "data.mosaic_fresh_each_epoch=false"]), seed=0
    )
    fixed_first, fixed_second = mask_epochs(fixed, 2)
    np.testing.assert_array_equal(np.sort(fixed_first.reshape(24, -1), 0), np.sort(fixed_second.reshape(24, -1), 0))




def test_fresh_mosaics_only_for_segmentation_mosaics():
    with pytest.raises(ConfigError, match="mosaic_fresh_each_epoch.*only applies to task 'segmentation'"):
        load_config("tasks/detection/mosaic_retinanet_resnet18.yaml", ["data.mosaic_fresh_each_epoch=true"])
