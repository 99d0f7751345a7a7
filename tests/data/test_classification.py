"""Tests for keras_resnet.data: image folders, Fashion-MNIST idx files, pipelines."""

import gzip
import logging
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_resnet.config import load_config
from keras_resnet.data import (
    FASHION_MNIST_CLASSES,
    DataError,
    build_classification_datasets,
    find_fashion_mnist,
    load_fashion_mnist,
    scan_image_folder,
)
from keras_resnet.data.fashion_mnist import (
    DEBIAN_FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
)
from keras_resnet.training.preflight import epoch_steps
from keras_resnet_settings.errors import ConfigError
from tests.helpers import write_idx_gz

CLASS_VALUES = {"cat": 40, "dog": 210}  # each class is a flat image of this brightness


def write_image(path, value, size, mode):
    """Write a flat image; RGB images get a slightly different value per channel."""
    if mode == "L":
        array = np.full(size, value, np.uint8)
    else:
        array = np.stack([np.full(size, value + offset, np.uint8) for offset in range(len(mode))], -1)
        if mode == "RGBA":
            array[..., 3] = 255
    Image.fromarray(array, mode).save(path)


def write_image_folder(root, images_per_class=6):
    """Two classes with mixed formats, colour modes and sizes."""
    formats = [("png", "RGB", (8, 8)), ("jpg", "L", (10, 12)), ("PNG", "RGBA", (9, 7)),
               ("bmp", "RGB", (8, 8)), ("gif", "L", (6, 6)), ("jpeg", "RGB", (16, 16))]
    for name, value in CLASS_VALUES.items():
        (root / name).mkdir(parents=True)
        for index in range(images_per_class):
            extension, mode, size = formats[index % len(formats)]
            write_image(root / name / f"{index}.{extension}", value, size, mode)
    return root


@pytest.fixture
def folders(tmp_path):
    return write_image_folder(tmp_path / "train"), write_image_folder(tmp_path / "val", images_per_class=3)


def folder_config(train, val, *overrides):
    return load_config(
        {"model": {"num_classes": 2}, "data": {"source": "image_folder", "train": str(train), "val": str(val)}},
        ["data.batch_size=4", *overrides],
    )


@pytest.fixture
def tiny_fashion_dir(tmp_path, monkeypatch):
    directory = tmp_path / "fashion"
    directory.mkdir()
    rng = np.random.default_rng(0)
    for split, count in (("train", 40), ("test", 12)):
        write_idx_gz(directory / FASHION_MNIST_FILES[f"{split}_images"], rng.integers(0, 256, (count, 28, 28)))
        write_idx_gz(directory / FASHION_MNIST_FILES[f"{split}_labels"], np.arange(count) % 10)
    monkeypatch.setenv("KERAS_RESNET_FASHION_MNIST_DIR", str(directory))
    return directory


# --------------------------------------------------------------------------- image folders


def test_scan_image_folder_lists_classes_and_labels(folders):
    paths, labels, class_names = scan_image_folder(folders[0], num_classes=2)
    assert class_names == ["cat", "dog"]
    assert len(paths) == 12 and labels == [0] * 6 + [1] * 6


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_batches(folders, channels):
    config = folder_config(*folders, f"model.input_shape=[8,8,{channels}]", "data.augment.random_erasing=0.5")
    train, val, info = build_classification_datasets(config, seed=1)
    assert info["class_names"] == ["cat", "dog"]
    assert (info["num_train"], info["num_val"]) == (12, 6)
    assert len(info["mean"]) == len(info["std"]) == channels
    assert 40 < info["mean"][0] < 215
    train_batches = list(train)
    assert len(train_batches) == 3
    for images, labels in train_batches:
        assert images.shape == (4, 8, 8, channels) and images.dtype == "float32"
        assert labels.dtype == "int32"
        assert 0.0 <= images.numpy().min() and images.numpy().max() <= 255.0
    val_images, val_labels = (np.concatenate(parts) for parts in zip(*[(x.numpy(), y.numpy()) for x, y in val]))
    assert val_images.shape == (6, 8, 8, channels)
    # Un-augmented flat images: brightness tells the class.
    expected = np.where(val_labels == 0, CLASS_VALUES["cat"], CLASS_VALUES["dog"])
    np.testing.assert_allclose(val_images.mean(axis=(1, 2, 3)), expected, atol=6)


def test_image_folder_training_is_seeded(folders):
    config = folder_config(*folders, "model.input_shape=[8,8,3]", "data.augment.random_erasing=1.0")
    first = [x.numpy() for x, _ in build_classification_datasets(config, seed=3)[0]]
    train = build_classification_datasets(config, seed=3)[0]
    second = [x.numpy() for x, _ in train]
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(second))
    # Each epoch augments anew (seen without shuffling: same images in the same order, other crops and erasing).
    ordered = build_classification_datasets(folder_config(*folders, "model.input_shape=[8,8,3]",
                                                          "data.augment.random_erasing=1.0", "data.shuffle_buffer=1"),
                                            seed=3)[0]
    epochs = [np.concatenate([x.numpy() for x, _ in ordered]) for _ in range(2)]
    assert not np.array_equal(*epochs)
    images = np.concatenate(first)
    assert (images == 0).any()  # zero padding shows after the random crop
    flat_or_padding = np.isclose(images[..., None], [0, 40, 41, 42, 210, 211, 212], atol=3).any(-1)
    assert (~flat_or_padding).mean() > 0.02  # random erasing noise


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="data.train folder .*missing does not exist"):
        scan_image_folder(tmp_path / "missing")


def test_folder_without_class_subfolders(tmp_path):
    with pytest.raises(DataError, match="no class subfolders"):
        scan_image_folder(tmp_path)


def test_class_folder_without_images(folders):
    (folders[0] / "empty").mkdir()
    with pytest.raises(DataError, match="empty has no images"):
        scan_image_folder(folders[0])


def test_corrupt_image_is_named(folders):
    corrupt = folders[0] / "cat" / "broken.png"
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(DataError) as error:
        scan_image_folder(folders[0])
    assert str(corrupt) in str(error.value) and "data.skip_corrupt=true" in str(error.value)


def test_skip_corrupt_drops_it_with_a_warning(folders, caplog):
    corrupt = folders[0] / "cat" / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8 truncated")
    with caplog.at_level(logging.WARNING):
        paths, labels, _ = scan_image_folder(folders[0], skip_corrupt=True)
    assert str(corrupt) not in paths and len(paths) == len(labels) == 12
    assert "broken.jpg" in caplog.text


def test_skip_corrupt_pipelines_keep_their_length(folders):
    """With data.skip_corrupt the datasets keep a known length (Keras warned "ran out of data" without it)."""
    (folders[0] / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    config = folder_config(*folders, "model.input_shape=[8,8,3]", "data.skip_corrupt=true")
    train, val, info = build_classification_datasets(config, seed=1)
    assert (info["num_train"], info["num_val"]) == (12, 6)
    assert int(train.cardinality()) == 3 and len(list(train)) == 3
    assert int(val.cardinality()) == 2 and sum(len(labels) for _, labels in val) == 6


def test_a_constant_channel_is_not_divided_by_almost_zero(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for index in range(3):
                image = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
                image[..., 2] = 50  # e.g. an empty channel of a two-stain image saved as RGB
                Image.fromarray(image).save(tmp_path / split / name / f"{index}.png")
    config = folder_config(tmp_path / "train", tmp_path / "val", "model.input_shape=[8,8,3]")
    _, _, info = build_classification_datasets(config, seed=1)
    assert info["mean"][2] == pytest.approx(50.0) and info["std"][2] == 1.0 and info["std"][0] > 50


def test_num_classes_mismatch(folders):
    config = folder_config(*folders, "model.num_classes=10")
    with pytest.raises(DataError, match=r"data.train has 2 class folders \(cat, dog\) but model.num_classes is 10"):
        build_classification_datasets(config)


def test_val_classes_differ(folders):
    (folders[1] / "dog").rename(folders[1] / "bird")
    with pytest.raises(DataError, match="data.val class folders .*missing dog.*extra bird"):
        build_classification_datasets(folder_config(*folders))


def test_image_folder_requires_val_or_a_val_split(folders):
    with pytest.raises(ConfigError, match="data.val is required .* or set data.val_split"):
        folder_config(folders[0], folders[1], "data.val=null")
    with pytest.raises(ConfigError, match="both given: keep one"):
        folder_config(folders[0], folders[1], "data.val_split=0.2")


def test_a_val_split_is_stratified_seeded_and_recorded(folders):
    config = folder_config(folders[0], folders[1], "data.val=null", "data.val_split=0.25", "train.seed=3")
    _, val, info = build_classification_datasets(config, seed=3)
    split = info["val_split"]
    held = sorted(Path(path).parent.name for path in split["val_files"])
    per_class = {name: held.count(name) for name in set(held)}
    assert len(per_class) == len(info["class_names"]) and len(set(per_class.values())) == 1  # stratified
    assert info["num_val"] == len(split["val_files"]) and split["seed"] == 3 and split["fraction"] == 0.25
    # Seeded by train.seed, whatever seed the pipeline shuffles with (export samples use their own).
    again = build_classification_datasets(config, seed=9)[2]["val_split"]["val_files"]
    other_config = folder_config(folders[0], folders[1], "data.val=null", "data.val_split=0.25", "train.seed=4")
    other = build_classification_datasets(other_config, seed=3)[2]["val_split"]["val_files"]
    assert again == split["val_files"] and other != split["val_files"]
    images = [path for path in Path(folders[0]).rglob("*") if path.is_file()]
    assert info["num_train"] + info["num_val"] == len(images)  # every image once: trained on or held out


def test_batch_size_larger_than_training_set(folders):
    with pytest.raises(DataError, match=r"data.batch_size=64 is larger than the \d+ training examples; .*"
                                        r"or set data.repeat=\d+"):
        build_classification_datasets(folder_config(*folders, "data.batch_size=64"))


def test_repeat_fills_an_epoch_from_a_handful_of_images(folders):
    plain = folder_config(*folders)
    _, _, info = build_classification_datasets(plain)
    num_train = info["num_train"]
    cfg = folder_config(*folders, f"data.batch_size={num_train + 2}", "data.repeat=3")
    train, _, info = build_classification_datasets(cfg)
    batches = list(train.as_numpy_iterator())
    assert len(batches) == 3 * num_train // (num_train + 2) == epoch_steps(cfg, info)
    assert all(len(labels) == num_train + 2 for _, labels in batches)
    labels = np.concatenate([labels for _, labels in batches])
    # Every example up to 3 times in the epoch: each class 3x as often as once over the set.
    assert np.bincount(labels).max() <= 3 * num_train // 2


# --------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_from_env_dir(tiny_fashion_dir):
    assert find_fashion_mnist()["train_images"] == tiny_fashion_dir / FASHION_MNIST_FILES["train_images"]
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    assert x_train.shape == (40, 28, 28) and y_train.shape == (40,) and x_test.shape == (12, 28, 28)
    assert x_train.dtype == np.uint8 and y_test.dtype == np.uint8


def test_fashion_mnist_pipeline_resizes_and_repeats_channels(tiny_fashion_dir):
    config = load_config(None, ["model.input_shape=[20,20,3]", "data.batch_size=8", "data.limit_val=5"])
    train, val, info = build_classification_datasets(config)
    assert info["class_names"] == list(FASHION_MNIST_CLASSES)
    assert (info["num_train"], info["num_val"]) == (40, 5)
    images, labels = next(iter(train))
    assert images.shape == (8, 20, 20, 3) and labels.dtype == "int32"
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    assert [x.shape[0] for x, _ in val] == [5]


def test_fashion_mnist_env_dir_incomplete(tiny_fashion_dir):
    (tiny_fashion_dir / FASHION_MNIST_FILES["test_labels"]).unlink()
    with pytest.raises(DataError, match="KERAS_RESNET_FASHION_MNIST_DIR"):
        load_fashion_mnist()


def test_fashion_mnist_offline_with_no_local_copy_is_one_data_error(tmp_path, monkeypatch):
    import keras

    import keras_resnet.data.fashion_mnist as fashion_mnist

    monkeypatch.delenv("KERAS_RESNET_FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian-package")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))

    def offline():
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- [Errno -3]")

    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", offline)
    with pytest.raises(DataError, match="download failed too .*URL fetch failure.*set KERAS_RESNET_FASHION_MNIST_DIR"):
        load_fashion_mnist()


@pytest.mark.parametrize("damage", ["truncated_payload", "bad_magic", "truncated_gzip"])
def test_corrupt_idx_file_is_named(tiny_fashion_dir, damage):
    path = tiny_fashion_dir / FASHION_MNIST_FILES["train_images"]
    if damage == "truncated_payload":
        write_idx_gz(path, np.zeros((40, 28, 28), np.uint8))
        with gzip.open(path, "rb") as stream:
            raw = stream.read()
        with gzip.open(path, "wb") as stream:
            stream.write(raw[:-100])
    elif damage == "bad_magic":
        with gzip.open(path, "wb") as stream:
            stream.write(b"\x12\x34\x56\x78" + bytes(100))
    else:
        path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DataError, match="corrupt Fashion-MNIST file .*train-images-idx3-ubyte.gz"):
        load_fashion_mnist()


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST_DIR.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist_debian_copy(monkeypatch, tmp_path):
    monkeypatch.delenv("KERAS_RESNET_FASHION_MNIST_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # empty Keras cache: the Debian copy is used
    assert find_fashion_mnist()["train_images"].parent == DEBIAN_FASHION_MNIST_DIR
    config = load_config(
        None, ["model.input_shape=[32,32,3]", "data.limit_train=64", "data.limit_val=40", "data.batch_size=32"]
    )
    train, val, info = build_classification_datasets(config)
    assert (info["num_train"], info["num_val"]) == (64, 40)
    assert 30 < info["mean"][0] < 120 and info["std"][0] > 30
    train_batches = list(train)
    assert [x.shape for x, _ in train_batches] == [(32, 32, 32, 3)] * 2
    assert [x.shape[0] for x, _ in val] == [32, 8]
    labels = np.concatenate([y.numpy() for _, y in train_batches])
    assert len(set(labels.tolist())) > 3  # the seeded shuffle mixes classes


def test_color_jitter_changes_colours_within_its_bounds_and_nothing_else():
    from keras_resnet.data.classification import jitter_colors, make_augment
    from keras_resnet_settings.recipe import AugmentSettings

    gray = tf.fill([40, 8, 8, 3], 128.0)
    shifts = tf.reduce_mean(jitter_colors(gray, tf.constant([3, 1]), 0.2, 3), axis=[1, 2, 3]).numpy() - 128.0
    # Each image of the batch gets its own brightness.
    assert max(abs(v) for v in shifts) <= 0.2 * 255 + 1e-3 and len({round(float(v), 3) for v in shifts}) > 30
    image = np.zeros((16, 16, 16, 3), np.float32)
    image[:, 3, 11] = (250.0, 20.0, 20.0)  # one red pixel: where crops and flips put it must not depend on jitter
    seed = tf.constant([5, 9])
    plain = make_augment(AugmentSettings(random_crop_padding=2), (16, 16, 3))(tf.constant(image), 0, seed)[0]
    jittered = make_augment(AugmentSettings(random_crop_padding=2, color_jitter=0.3),
                            (16, 16, 3))(tf.constant(image), 0, seed)[0]
    for one_plain, one_jittered in zip(np.asarray(plain), np.asarray(jittered)):
        assert np.unravel_index(np.argmax(one_plain[..., 0]), (16, 16)) == np.unravel_index(
            np.argmax(one_jittered[..., 0] - one_jittered[..., 1]), (16, 16))
    assert not np.allclose(plain, jittered) and 0.0 <= float(tf.reduce_min(jittered)) <= float(
        tf.reduce_max(jittered)) <= 255.0
    # Saturation: a colour keeps its hue; with jitter some images are more and some less saturated.
    red = tf.constant(np.tile(np.array([200.0, 100.0, 100.0], np.float32), (64, 4, 4, 1)))
    out = jitter_colors(red, tf.constant([2, 2]), 0.3, 3).numpy()
    assert (out[..., 0] >= out[..., 1] - 1e-3).all() and np.allclose(out[..., 1], out[..., 2], atol=1e-3)


def test_batch_augmentations_draw_per_image_and_keep_their_bounds():
    from keras_resnet.data.classification import random_crop, random_erase, random_flip

    count = 256
    marked = np.full((count, 12, 12, 1), 100.0, np.float32)
    marked[:, 5, 3] = 200.0
    crops = random_crop(tf.constant(marked), tf.constant([1, 2]), 2).numpy()
    positions = [tuple(np.argwhere(image[..., 0] == 200.0)[0]) for image in crops]
    rows, cols = np.array(positions).T
    assert set(rows.tolist()) == {3, 4, 5, 6, 7} and set(cols.tolist()) == {1, 2, 3, 4, 5}  # offsets -2..2
    for image, (row, col) in zip(crops, positions):  # the rest is the image shifted, or the zero padding
        shifted = np.pad(marked[0, ..., 0], 2)[7 - row:7 - row + 12, 5 - col:5 - col + 12]
        np.testing.assert_array_equal(image[..., 0], shifted)
    ramp = np.tile(np.arange(12, dtype=np.float32)[None, None, :, None], (count, 12, 1, 1))
    flips = random_flip(tf.constant(ramp), tf.constant([3, 4])).numpy()
    flipped = np.array([np.array_equal(image, ramp[0, :, ::-1]) for image in flips])
    assert all(flipped | np.array([np.array_equal(image, ramp[0]) for image in flips]))
    assert 0.4 < flipped.mean() < 0.6
    erased = random_erase(tf.constant(marked), tf.constant([5, 6]), 0.5).numpy()
    changed = erased != marked
    touched = changed.reshape(count, -1).any(1)
    assert 0.4 < touched.mean() < 0.6  # a coin per image, not one per batch
    areas = []
    for image_changed in changed[touched][..., 0]:
        rows_hit, cols_hit = np.nonzero(image_changed)
        box = (rows_hit.max() - rows_hit.min() + 1) * (cols_hit.max() - cols_hit.min() + 1)
        assert len(rows_hit) >= 0.8 * box  # one rectangle (noise may equal a pixel now and then)
        areas.append(box / 144)
    assert min(areas) >= 0.01 and max(areas) <= 0.5 and np.std(areas) > 0.05


    with pytest.raises(ConfigError, match="color_jitter"):
        load_config("tasks/classification/fashion_mnist_resnet20.yaml", ["data.augment.color_jitter=1.5"])
