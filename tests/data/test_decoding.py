"""One image decoder for training and prediction: truncated files, 1-bit/palette BMP, 16-bit PNG, CMYK JPEG."""

import io
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_resnet.data import DataError, build_classification_datasets
from keras_resnet.data.detection import read_voc
from keras_resnet.data.images import (
    decode_image,
    decode_image_file,
    image_size,
    load_image,
    read_image,
)
from keras_resnet.data.segmentation import build_segmentation_datasets
from tests.data.test_classification import folder_config, write_image_folder
from tests.data.test_detection import write_voc_flat
from tests.data.test_segmentation import block_pair, segmentation_cfg, write_pair


def truncated_jpeg(path, size=(64, 48)):
    """A JPEG cut to 60 % of its bytes: PIL's header check passes, a full decode fails."""
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    data = buffer.getvalue()
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


@pytest.mark.parametrize("split", ["train", "val"])
def test_truncated_jpeg_in_an_image_folder_fails_before_training(tmp_path, split):
    train, val = write_image_folder(tmp_path / "train"), write_image_folder(tmp_path / "val", images_per_class=3)
    broken = truncated_jpeg((train if split == "train" else val) / "dog" / "cut.jpg")
    with pytest.raises(DataError, match="delete or replace it") as error:
        build_classification_datasets(folder_config(train, val))
    assert str(broken) in str(error.value)


def test_truncated_jpeg_fails_the_segmentation_and_detection_scans(tmp_path):
    for i in range(2):
        write_pair(tmp_path / "train", f"a{i}", *block_pair(30, 44, i))
        write_pair(tmp_path / "val", f"b{i}", *block_pair(20, 20, 10 + i))
    broken = truncated_jpeg(tmp_path / "val" / "images" / "b1.png")
    with pytest.raises(DataError, match="unreadable image") as error:
        build_segmentation_datasets(segmentation_cfg(tmp_path, "mask_folder", tmp_path / "train", tmp_path / "val"))
    assert str(broken) in str(error.value)
    root = write_voc_flat(tmp_path / "voc")
    truncated_jpeg(root / "car.jpg", size=(25, 20))
    with pytest.raises(DataError, match=r"unreadable image .*car.jpg"):
        read_voc(root)


def training_and_prediction(path, channels):
    """The decoded pixels of the tf.data training path (in a dataset map) and of prediction's `load_image`."""
    with Image.open(path) as image:
        width, height = image.size
    dataset = tf.data.Dataset.from_tensor_slices([str(path)]).map(
        lambda name: decode_image_file(name, height, width, channels)
    )
    trained = next(iter(dataset)).numpy()
    predicted = load_image(path, height, width, channels)
    np.testing.assert_array_equal(trained, predicted)
    uint8 = next(iter(tf.data.Dataset.from_tensor_slices([str(path)]).map(
        lambda name: decode_image(name, channels, as_float=False)))).numpy()
    np.testing.assert_array_equal(uint8, read_image(path, channels))
    return predicted


def test_one_bit_bmp_is_0_and_255(tmp_path):
    bits = np.zeros((6, 8), bool)
    bits[:, :3] = True
    Image.fromarray(bits).convert("1").save(tmp_path / "bits.bmp")
    for channels in (1, 3):
        pixels = training_and_prediction(tmp_path / "bits.bmp", channels)
        assert pixels.shape == (6, 8, channels)
        np.testing.assert_array_equal(pixels[..., 0], np.where(bits, 255.0, 0.0))


def test_palette_bmp_decodes_to_its_colours(tmp_path):
    indices = np.tile(np.arange(4, dtype=np.uint8), (5, 2))
    colours = np.array([[200, 10, 30], [0, 180, 90], [40, 40, 250], [255, 255, 0]], np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(colours.flatten().tolist() + [0] * (768 - colours.size))
    image.save(tmp_path / "palette.bmp")
    with Image.open(tmp_path / "palette.bmp") as saved:
        assert saved.mode == "P"
    np.testing.assert_array_equal(training_and_prediction(tmp_path / "palette.bmp", 3), colours[indices])
    gray = training_and_prediction(tmp_path / "palette.bmp", 1)[..., 0]
    expected = np.asarray(Image.fromarray(colours[indices]).convert("L"), np.float32)
    np.testing.assert_array_equal(gray, expected)


def test_sixteen_bit_png_is_scaled_not_saturated(tmp_path):
    ramp = np.linspace(0, 65535, 8 * 10).reshape(8, 10).astype(np.uint16)
    ramp[0, 0] = 32768
    Image.fromarray(np.full((8, 10), 32768, np.uint16)).save(tmp_path / "half.png")
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    for channels in (1, 3):
        half = training_and_prediction(tmp_path / "half.png", channels)
        assert abs(half.mean() - 127.5) < 0.6
        ramp_pixels = training_and_prediction(tmp_path / "ramp.png", channels)[..., 0]
        np.testing.assert_array_equal(ramp_pixels, np.round(ramp / 257.0))


@pytest.mark.parametrize("maximum, scale", [(235, 1.0), (1000, 255 / 1023), (4095, 255 / 4095), (9000, 255 / 16383)])
def test_sixteen_bit_data_of_fewer_bits_keep_their_contrast(tmp_path, maximum, scale):
    # A dim 16-bit fluorescence image (values 0..235, as StarDist's DSB 2018 sample) or 10/12/14-bit
    # camera data in a 16-bit file: /257 would make it black; the scale follows the bits the values use.
    ramp = np.linspace(0, maximum, 8 * 10).reshape(8, 10).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "dim.png")
    with Image.open(tmp_path / "dim.png") as saved:
        assert saved.mode.startswith("I")
    pixels = training_and_prediction(tmp_path / "dim.png", 1)[..., 0]
    np.testing.assert_array_equal(pixels, np.clip(np.round(ramp * scale), 0, 255))
    assert pixels.max() > 100  # /257 would give at most 35


def test_cmyk_jpeg_decodes_to_rgb(tmp_path):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, :8] = (220, 30, 30)
    rgb[:, 8:] = (30, 30, 220)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    pixels = training_and_prediction(tmp_path / "cmyk.jpg", 3)
    assert np.abs(pixels - rgb).max() < 20


def test_undecodable_file_is_named_in_prediction(tmp_path):
    broken = truncated_jpeg(tmp_path / "cut.jpg")
    with pytest.raises(DataError, match=r"cannot decode image .*cut.jpg .*delete or replace it"):
        load_image(broken, 16, 16, 3)


def test_a_file_name_that_is_not_utf8_trains_and_predicts(tmp_path):
    # Python reads such a name with surrogate escapes; a TF string built from it failed without naming the file.
    train, val = write_image_folder(tmp_path / "train"), write_image_folder(tmp_path / "val", images_per_class=3)
    odd = os.fsdecode(os.fsencode(train / "dog") + b"/\xff\xfe.png")
    Image.fromarray(np.full((8, 8, 3), 77, np.uint8)).save(odd)
    cfg = folder_config(train, val, "model.input_shape=[8,8,3]", "data.augment.random_crop_padding=0",
                        "data.augment.horizontal_flip=false", "data.augment.random_erasing=0.0")
    dataset, _, info = build_classification_datasets(cfg)
    assert info["num_train"] == 13
    seen = np.concatenate([images.numpy().reshape(-1, 3) for images, _ in dataset])
    assert (seen == 77.0).all(axis=1).sum() == 64  # the odd file's 8x8 pixels reached training
    np.testing.assert_array_equal(load_image(odd, 8, 8, 3), np.full((8, 8, 3), 77.0, np.float32))


@pytest.mark.parametrize("orientation, expected_corner", [(1, (0, 0)), (6, (0, -1)), (3, (-1, -1)), (8, (-1, 0))])
def test_exif_orientation_is_applied_in_the_one_decoder(tmp_path, orientation, expected_corner):
    # Stored 40 wide x 20 high with a red block at the top-left; the EXIF tag says how a viewer turns it.
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:6, :6] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo_{orientation}.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    pixels = read_image(path, 3)
    turned = orientation in (5, 6, 7, 8)
    assert pixels.shape == ((40, 20, 3) if turned else (20, 40, 3))
    assert image_size(path) == ((20, 40) if turned else (40, 20))  # (width, height) as shown
    y, x = (0 if c == 0 else s - 3 for c, s in zip(expected_corner, pixels.shape[:2]))
    assert pixels[y : y + 3, x : x + 3, 0].min() > 200 and pixels[y : y + 3, x : x + 3, 1].max() < 60
    # ...and the training pipeline, prediction and export samples share it: a classification folder.
    height, width = pixels.shape[:2]
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(stored).save(tmp_path / split / name / "x.jpg", quality=95, exif=exif)
    config = folder_config(tmp_path / "train", tmp_path / "val", f"model.input_shape=[{height},{width},3]",
                           "data.augment.random_crop_padding=0", "data.augment.horizontal_flip=false",
                           "data.batch_size=2")
    _, val, _ = build_classification_datasets(config)
    images, _ = next(iter(val))
    np.testing.assert_array_equal(images[0].numpy().astype(np.uint8), pixels)
