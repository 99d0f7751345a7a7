"""16-bit images read at one bit depth per training set, and TIFF files in every training scan."""

import numpy as np
import pytest
from PIL import Image

from keras_resnet.data import build_classification_datasets, scan_image_folder
from keras_resnet.data.detection import read_voc
from keras_resnet.data.images import dataset_bit_depth
from keras_resnet.data.segmentation import build_segmentation_datasets
from tests.data.test_classification import folder_config
from tests.data.test_detection import voc_xml, write_image
from tests.data.test_segmentation import segmentation_cfg, write_pair


def flat16(path, value, size=(8, 8)):
    """A flat 16-bit grey image (PIL mode I;16) of `value`; the format follows the suffix (PNG or TIFF)."""
    Image.fromarray(np.full(size, value, np.uint16)).save(path)
    with Image.open(path) as saved:
        assert saved.mode.startswith("I")
    return path


def write_dim_bright(root, dim=(1000, 4000), bright=(40000, 45000)):
    """Class folders of flat 16-bit images: "bright" and "dim", one PNG and one TIFF of each value."""
    for name, values in (("bright", bright), ("dim", dim)):
        (root / name).mkdir(parents=True)
        for value in values:
            flat16(root / name / f"{value}.png", value)
            flat16(root / name / f"{value}.TIF", value + 1)
    return root


def first_pixels(dataset):
    """The first pixel of every image of a batched (images, labels) dataset, in order."""
    return np.concatenate([images[:, 0, 0, 0].numpy() for images, _ in dataset])


def test_a_classification_folder_reads_its_16_bit_images_at_one_depth(tmp_path):
    train = write_dim_bright(tmp_path / "train")
    val = write_dim_bright(tmp_path / "val", dim=(4000, 4100), bright=(40000, 42000))
    paths, _, _ = scan_image_folder(train)
    assert len(paths) == 8 and sum(p.endswith(".TIF") for p in paths) == 4  # the TIFFs are trained on
    train_ds, val_ds, info = build_classification_datasets(folder_config(train, val))
    assert info["num_train"] == 8 and info["bit_depth"] == 16  # max 45001 -> 16 bits
    # per image, flat 4000 would read 249 (12 bits) and 4100 64 (14 bits): now all /257, order kept
    expected = np.round(np.asarray([40000, 40001, 42000, 42001, 4000, 4001, 4100, 4101]) / 257)
    np.testing.assert_array_equal(np.sort(first_pixels(val_ds)), np.sort(expected))
    # 8-bit data get no bit depth
    assert dataset_bit_depth([]) is None


def test_a_mask_folder_of_16_bit_tiffs_is_read_at_one_depth(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[4:] = 1
    for index, value in enumerate((100, 900)):  # 10-bit data: one scale 255/1023 for every image
        write_pair(tmp_path / "train", f"a{index}", np.full((8, 8), value, np.uint16), mask, image_ext=".tiff")
    write_pair(tmp_path / "val", "b", np.full((8, 8), 200, np.uint16), mask, image_ext=".tif")
    cfg = segmentation_cfg(tmp_path, "mask_folder", tmp_path / "train", tmp_path / "val", num_classes=2)
    _, _, info = build_segmentation_datasets(cfg)
    assert (info["num_train"], info["num_val"], info["bit_depth"]) == (2, 1, 10)
    (image, _), = info["val_full"].take(1).as_numpy_iterator()
    assert image[0, 0, 0] == round(200 * 255 / 1023)  # not 200: the image's own values would fit 8 bits


def test_a_flat_voc_folder_reads_tiff(tmp_path):
    root = tmp_path / "voc"
    root.mkdir()
    write_image(root / "cat.tif", (20, 16), "RGB")
    # its <filename> (cat.png) does not exist: the image is found by its stem
    (root / "cat.xml").write_text(voc_xml("cat", "png", (20, 16), [("cat", 2, 2, 10, 10, 0)]))
    write_image(root / "empty.tiff", (20, 16), "L")  # no XML: an image without objects
    records, _ = read_voc(root, class_names=["cat"])
    assert sorted(r.image.rsplit("/", 1)[-1] for r in records) == ["cat.tif", "empty.tiff"]


@pytest.mark.parametrize("values, depth", [((235, 0), 8), ((4000, 100), 12), ((4096, 100), 14), ((60000, 5), 16)])
def test_dataset_bit_depth_is_the_depth_of_the_largest_value(tmp_path, values, depth):
    paths = [flat16(tmp_path / f"{value}.png", value) for value in values]
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "eight.png")  # 8-bit files do not count
    assert dataset_bit_depth([*paths, tmp_path / "eight.png"]) == depth
