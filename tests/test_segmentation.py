"""Semantic segmentation: heads, losses, metrics, data loaders, training end to end."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml
from PIL import Image
from tests.helpers import write_idx_gz

from keras_resnet.models.resnet.backbone import ResNetBackbone
from keras_resnet.config import ConfigError, load_config
from keras_resnet.data import DataError
from keras_resnet.data.segmentation import (
    SegmentationDataError,
    build_segmentation_datasets,
    make_mosaic,
)
from keras_resnet.layers.core import ImageNormalization
from keras_resnet.models.segmentation.losses import CombinedSegmentationLoss, DiceLoss, SegmentationCrossEntropy
from keras_resnet.models.segmentation.metrics import PixelAccuracy, SegmentationMeanIoU, confusion_to_iou
from keras_resnet.layers.fpn import apply_fpn
from keras_resnet.models.segmentation.segmenter import ResNetSegmenter, default_aspp_rates

ONE_BLOCK = {"stackwise_num_blocks": [1, 1, 1, 1]}
TINY_BACKBONE = {**ONE_BLOCK, "stackwise_num_filters": [8, 16, 16, 16], "stem_width": 8}
RECIPE = "tasks/segmentation/mosaic_deeplabv3plus_resnet18.yaml"


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


@pytest.fixture
def tiny_fashion_mnist(tmp_path, monkeypatch):
    """Fashion-MNIST stand-in: a bright blob per item, 30 train / 10 test items."""
    directory = tmp_path / "fashion"
    directory.mkdir()
    rng = np.random.default_rng(0)
    for split, prefix, count in (("train", "train", 30), ("test", "t10k", 10)):
        items = np.zeros((count, 28, 28), np.uint8)
        items[:, 6:22, 8:20] = rng.integers(100, 255, (count, 1, 1))
        write_idx_gz(directory / f"{prefix}-images-idx3-ubyte.gz", items)
        write_idx_gz(directory / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    monkeypatch.setenv("KERAS_RESNET_FASHION_MNIST_DIR", str(directory))


# 24 training canvases of 32x32 (3 batches), no random geometry, new canvases each epoch (the flag last)
FRESH_MOSAIC_OVERRIDES = ("data.mosaic_train_size=24", "data.mosaic_val_size=8", "data.batch_size=8",
                          "model.input_shape=[32,32,1]", "data.augment.horizontal_flip=false",
                          "data.augment.scale_range=[1.0,1.0]", "data.mosaic_fresh_each_epoch=true")


def _epochs(dataset, count):
    return [np.concatenate([masks for _, masks in dataset.as_numpy_iterator()]) for _ in range(count)]


def test_fresh_mosaics_change_every_epoch_and_validation_stays(tiny_fashion_mnist):
    overrides = list(FRESH_MOSAIC_OVERRIDES)
    train, val, info = build_segmentation_datasets(load_config(RECIPE, overrides), seed=0)
    first, second = _epochs(train, 2)
    assert first.shape == second.shape == (24, 32, 32)  # cardinality kept: same steps per epoch
    assert int(train.cardinality()) == 3
    assert not np.array_equal(np.sort(first.reshape(24, -1), 0), np.sort(second.reshape(24, -1), 0))
    val_first, val_second = _epochs(val, 2)
    np.testing.assert_array_equal(val_first, val_second)
    assert info["num_train"] == 24 and len(info["mean"]) == 1
    # Same seed, same sequence of epochs; without the flag every epoch repeats the same canvases.
    again, _, _ = build_segmentation_datasets(load_config(RECIPE, overrides), seed=0)
    np.testing.assert_array_equal(np.sort(_epochs(again, 2)[1].reshape(24, -1), 0), np.sort(second.reshape(24, -1), 0))
    fixed, _, _ = build_segmentation_datasets(
        load_config(RECIPE, [*overrides[:-1], "data.mosaic_fresh_each_epoch=false"]), seed=0
    )
    fixed_first, fixed_second = _epochs(fixed, 2)
    np.testing.assert_array_equal(np.sort(fixed_first.reshape(24, -1), 0), np.sort(fixed_second.reshape(24, -1), 0))


def test_a_resumed_run_trains_on_the_canvases_of_its_epochs(tiny_fashion_mnist, tmp_path, monkeypatch):
    overrides = list(FRESH_MOSAIC_OVERRIDES)
    cfg = load_config(RECIPE, overrides)
    uninterrupted, _, info = build_segmentation_datasets(cfg, seed=0)
    epochs = [np.sort(masks.reshape(24, -1), 0) for masks in _epochs(uninterrupted, 3)]
    resumed, _, resumed_info = build_segmentation_datasets(cfg, seed=0, start_epoch=2)
    resumed_first = np.sort(_epochs(resumed, 1)[0].reshape(24, -1), 0)
    np.testing.assert_array_equal(resumed_first, epochs[2])  # epoch 3's canvases, not epoch 1's again
    assert not np.array_equal(resumed_first, epochs[0])
    assert resumed_info["mean"] == info["mean"] and resumed_info["std"] == info["std"]  # same statistics sample

    # train_segmentation builds its data for the epoch BackupAndRestore will resume at
    from keras_resnet.training import segmentation as segmentation_training
    from keras_resnet.training.engine import backup_epoch

    run = tmp_path / "run"
    backup = run / "backup" / "main"
    assert backup_epoch(str(backup)) == 0
    backup.mkdir(parents=True)
    (backup / "training_metadata.json").write_text('{"epo')  # killed while writing it
    with pytest.raises(ValueError, match=r"training_metadata.json is unreadable .*delete .*backup/main"):
        backup_epoch(str(backup))
    (backup / "training_metadata.json").write_text(json.dumps({"epoch": 2, "batch": 0}))
    assert backup_epoch(str(backup)) == 2
    seen = {}

    def record(cfg, seed=0, start_epoch=0):
        seen["start_epoch"] = start_epoch
        raise RuntimeError("stop after the data")

    monkeypatch.setattr(segmentation_training, "build_segmentation_datasets", record)
    with pytest.raises(RuntimeError, match="stop after the data"):
        segmentation_training.train_segmentation(load_config(RECIPE, [*overrides, f"output_dir={run}"]))
    assert seen == {"start_epoch": 2}


def test_fresh_mosaics_only_for_segmentation_mosaics():
    with pytest.raises(ConfigError, match="mosaic_fresh_each_epoch.*only applies to task 'segmentation'"):
        load_config("tasks/detection/mosaic_retinanet_resnet18.yaml", ["data.mosaic_fresh_each_epoch=true"])


# --------------------------------------------------------------------------- end to end


def test_cli_train_evaluate_and_predict_masks(tiny_fashion_mnist, tmp_path, capsys):
    from keras_resnet.cli import main
    from keras_resnet.predict.segmentation import predict_masks

    run = tmp_path / "run"
    overrides = [
        "train.epochs=1", "data.mosaic_train_size=32", "data.mosaic_val_size=8", "data.batch_size=8",
        "model.input_shape=[32,32,1]", "train.mixed_precision=false", f"output_dir={run}",
        "model.backbone_args=" + json.dumps({"output_stride": 16, **TINY_BACKBONE}),
    ]
    assert main(["train", RECIPE, "--set", *overrides]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["mIoU"] <= 1.0 and 0.0 <= metrics["pixel_accuracy"] <= 1.0
    assert len(metrics["per_class_iou"]) == 11 and metrics["epochs"] == 1
    assert json.loads((run / "run.json").read_text())["task"] == "segmentation"
    for name in ("best_model.keras", "history.csv", "training_curves.png", "val_predictions.png", "recipe.yaml"):
        assert (run / name).exists(), name
    assert "per-class IoU" in capsys.readouterr().out
    assert yaml.safe_load((run / "recipe.yaml").read_text())["task"] == "segmentation"

    assert main(["evaluate", RECIPE, "--set", *overrides]) == 0
    assert json.loads((run / "metrics.json").read_text())["mIoU"] == pytest.approx(metrics["mIoU"])

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.full((45, 61, 3), 200, np.uint8)).save(photos / "wide.png")
    Image.fromarray(np.full((20, 18), 90, np.uint8)).save(photos / "small.jpg")
    results = predict_masks(run, photos, tmp_path / "out")
    assert [r["image"] for r in results] == [str(photos / "small.jpg"), str(photos / "wide.png")]
    with Image.open(results[1]["mask"]) as mask:
        assert mask.size == (61, 45) and mask.mode == "P" and np.asarray(mask).max() < 11
    with Image.open(results[0]["overlay"]) as overlay:
        assert overlay.size == (18, 20) and overlay.mode == "RGB"
    # the CLI's predict dispatches segmentation runs to the overlay writer
    capsys.readouterr()
    assert main(["predict", str(run), str(photos / "wide.png"), "--output", str(tmp_path / "cli_out"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert Path(printed[0]["overlay"]).exists() and Path(printed[0]["overlay"]).parent == tmp_path / "cli_out"
