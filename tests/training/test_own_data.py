"""`keras-resnet train --data FOLDER`: a folder of one's own images trains without a recipe, for every task."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from keras_resnet.cli import main
from keras_resnet_settings import load_config
from keras_resnet_settings.errors import ConfigError
from keras_resnet_settings.folder_recipe import detect_layout, recipe_for_folder


def stripes_folder(root: Path, per_class=20, size=32, seed=0):
    """Two classes as a person might have them: noisy horizontal vs vertical stripes, JPEG, one folder each."""
    rng = np.random.default_rng(seed)
    for name, axis in (("horizontal", 0), ("vertical", 1)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            lines = (np.arange(size) // 4 % 2 * 150 + 50).astype(np.float64)
            image = np.repeat(lines[:, None] if axis == 0 else lines[None, :], size, axis=1 - axis)
            image = np.clip(image + rng.normal(0, 35, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(np.stack([image] * 3, -1)).save(root / name / f"{name}_{index}.jpg", quality=90)
    return root


def mask_folder(root: Path, count=10, size=96, seed=0):
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        mask = np.zeros((size, size), np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, size - 16, 2)
            mask[y : y + 14, x : x + 14] = rng.integers(1, 3)
        image = (mask[..., None] * 80 + rng.integers(0, 30, (size, size, 1))).astype(np.uint8).repeat(3, -1)
        Image.fromarray(image).save(root / "images" / f"{index}.png")
        Image.fromarray(mask).save(root / "masks" / f"{index}.png")
    return root


def voc_folder(root: Path, count=10, size=160, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = rng.integers(0, 40, (size, size, 3)).astype(np.uint8)
        objects = []
        for name in ("box", "dot")[: 1 + index % 2]:
            y, x = rng.integers(0, size - 40, 2)
            image[y : y + 30, x : x + 30] = (220, 200, 30) if name == "box" else (30, 200, 220)
            objects.append(f"<object><name>{name}</name><bndbox><xmin>{x + 1}</xmin><ymin>{y + 1}</ymin>"
                           f"<xmax>{x + 30}</xmax><ymax>{y + 30}</ymax></bndbox></object>")
        Image.fromarray(image).save(root / f"{index}.jpg")
        (root / f"{index}.xml").write_text(f"<annotation><filename>{index}.jpg</filename>{''.join(objects)}</annotation>")
    return root


def test_two_classes_of_twenty_images_train_to_090_with_no_recipe(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stripes_folder(tmp_path / "stripes")
    assert main(["train", "--data", "stripes"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("--data stripes: classification (image_folder), 2 classes, input 32x32x3, resnet20_cifar")
    run = tmp_path / "runs" / "stripes_classification"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["top1"] >= 0.9, metrics
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())  # the whole recipe, to repeat or edit
    assert recipe["data"]["val_split"] == 0.2 and recipe["data"]["val"] is None
    assert recipe["model"]["num_classes"] == 2 and load_config(run / "recipe.yaml").output_dir == "runs/stripes_classification"
    split = json.loads((run / "run.json").read_text())["val_split"]
    held = [Path(path).parent.name for path in split["val_files"]]
    assert split["stratified_by_class"] and sorted(held) == ["horizontal"] * 4 + ["vertical"] * 4
    # The same folder again: finished, nothing retrained.
    assert main(["train", "--data", "stripes"]) == 0
    assert "holds a finished run of this recipe: nothing to train" in capsys.readouterr().out


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_mask_and_voc_folders_train_with_no_recipe(task, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = mask_folder(tmp_path / "cells") if task == "segmentation" else voc_folder(tmp_path / "fields")
    assert main(["train", "--data", folder.name, "--epochs", "1", "--task", task]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / f"{folder.name}_{task}"
    recipe = load_config(run / "recipe.yaml")
    size = 96 if task == "segmentation" else 128  # 96 px masks; 160 px photos: the largest standard size below
    assert recipe.task == task and recipe.data.val_split == 0.2 and recipe.model.input_shape == [size, size, 3]
    if task == "segmentation":
        assert recipe.model.num_classes == 3 and "mIoU=" in out
    else:
        assert recipe.data.class_names == ["box", "dot"] and recipe.model.num_classes == 2 and "mAP=" in out
    assert len(json.loads((run / "run.json").read_text())["val_split"]["val_files"]) == 2


def test_layouts_are_recognised(tmp_path):
    classes = stripes_folder(tmp_path / "split" / "train", per_class=3)
    stripes_folder(tmp_path / "split" / "val", per_class=2)
    layout = detect_layout(tmp_path / "split")
    assert (layout["task"], layout["train"], layout["val"]) == ("classification", classes, tmp_path / "split" / "val")
    recipe = load_config(recipe_for_folder(tmp_path / "split"))
    assert recipe.data.val == str(tmp_path / "split" / "val") and recipe.data.val_split is None
    coco = tmp_path / "coco"
    (coco / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((600, 800, 3), np.uint8)).save(coco / "images" / "a.jpg")
    Image.fromarray(np.zeros((600, 800, 3), np.uint8)).save(coco / "images" / "b.jpg")
    (coco / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "width": 800, "height": 600},
                   {"id": 2, "file_name": "b.jpg", "width": 800, "height": 600}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 30, 40]}],
        "categories": [{"id": 3, "name": "tree"}]}))
    recipe = load_config(recipe_for_folder(coco))
    assert (recipe.task, recipe.data.source, recipe.data.class_names) == ("detection", "coco", ["tree"])
    assert recipe.data.train_images == str(coco / "images") and recipe.model.input_shape == [512, 512, 3]
    # Large images with small objects: trained on windows at native resolution.
    assert recipe.data.sampling == "resize"  # 800 px is below twice the 512 input
    with pytest.raises(ConfigError, match="laid out for detection, not --task classification"):
        recipe_for_folder(coco, task="classification")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no layout found"):
        recipe_for_folder(tmp_path / "empty")


def test_recipe_paths_are_absolute_and_a_corrupt_file_is_left_to_the_data_scan(tmp_path, monkeypatch):
    stripes_folder(tmp_path / "photos", per_class=3)
    (tmp_path / "photos" / "vertical" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "resnet18.weights.h5").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    # The recipe.yaml of the run repeats it from any working directory.
    recipe = recipe_for_folder("photos", weights="resnet18.weights.h5", model="resnet18")
    assert recipe["data"]["train"] == str(tmp_path / "photos")
    assert recipe["model"]["weights"] == str(tmp_path / "resnet18.weights.h5")
    # The unreadable file is not a recipe error: the data scan names it (and data.skip_corrupt skips it).
    assert recipe["model"]["input_shape"] == [32, 32, 3]
    (tmp_path / "bad").mkdir()
    for name in ("a", "b"):
        (tmp_path / "bad" / name).mkdir()
        (tmp_path / "bad" / name / "x.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="none of the images read could be opened"):
        recipe_for_folder("bad")


def test_binary_masks_of_0_and_255_are_an_error_not_an_ignored_foreground(tmp_path):
    folder = mask_folder(tmp_path / "cells", count=3)
    for path in (folder / "masks").iterdir():
        mask = np.asarray(Image.open(path))
        Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8)).save(path)
    with pytest.raises(ConfigError, match="hold only 0 and 255, and 255 means 'ignore'"):
        recipe_for_folder(folder)


@pytest.mark.parametrize("side", [40, 70, 150])
def test_small_mask_images_get_aspp_rates_inside_their_coarsest_map(tmp_path, side):
    recipe = recipe_for_folder(mask_folder(tmp_path / "cells", count=3, size=side))
    size, stride = recipe["model"]["input_shape"][0], recipe["model"]["backbone_args"]["output_stride"]
    # The ASPP's largest rate stays inside the coarsest map (else every build warns of wasted taps).
    assert size // stride >= 4 > max(recipe["model"]["head_args"]["aspp_rates"]), recipe["model"]


def test_tiny_data_gets_enough_steps_and_pretrained_weights_a_lower_rate(tmp_path):
    stripes_folder(tmp_path / "few", per_class=5)
    scratch = recipe_for_folder(tmp_path / "few")
    steps = scratch["train"]["epochs"] * (8 * scratch["data"]["repeat"] // scratch["data"]["batch_size"])
    assert steps >= 600 and scratch["data"]["batch_size"] <= 4
    # One training image (a single large photo): still at least 16 steps an epoch and 600 in all.
    (tmp_path / "one" / "images").mkdir(parents=True)
    (tmp_path / "one" / "masks").mkdir()
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(tmp_path / "one" / "images" / "a.png")
    Image.fromarray(np.eye(300, dtype=np.uint8)).save(tmp_path / "one" / "masks" / "a.png")
    (tmp_path / "one" / "val").mkdir()  # an empty val/ is not a validation set
    with pytest.raises(ConfigError, match="1 image.s. and no val/ folder"):
        recipe_for_folder(tmp_path / "one")
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(tmp_path / "one" / "images" / "b.png")
    Image.fromarray(np.eye(300, dtype=np.uint8)).save(tmp_path / "one" / "masks" / "b.png")
    single = recipe_for_folder(tmp_path / "one")  # 2 images: 1 held out, 1 trained on
    assert single["data"]["val"] is None and single["data"]["val_split"] == 0.2
    per_epoch = 1 * single["data"]["repeat"] // single["data"]["batch_size"]
    assert per_epoch >= 16 and per_epoch * single["train"]["epochs"] >= 600, single
    tuned = recipe_for_folder(tmp_path / "few", weights="resnet18.pth", model="resnet18")
    assert tuned["train"]["learning_rate"] < scratch["train"]["learning_rate"]
    assert tuned["model"]["backbone"] == "resnet18" and tuned["model"]["weights"] == "resnet18.pth"


def test_flags_that_need_data_and_a_recipe_with_data_are_refused(tmp_path, capsys):
    assert main(["train", "--epochs", "3", str(tmp_path / "r.yaml")]) == 2
    assert "--epochs go with --data FOLDER" in capsys.readouterr().err
    assert main(["train"]) == 2
    assert "train needs a recipe" in capsys.readouterr().err


def test_fine_tuning_ones_own_keras_model_keeps_its_network_and_normalisation(tmp_path, capsys, monkeypatch):
    """`--weights runs/X/best_model.keras`: that model's network (not the preset the new images would pick) and
    its normalisation, not the new training set's statistics."""
    from keras_resnet import ImageNormalization, ResNetClassifier

    monkeypatch.chdir(tmp_path)
    source = ResNetClassifier.from_preset(
        "resnet20_cifar", num_classes=2, input_shape=(32, 32, 3), stackwise_num_filters=[16, 24, 32],
        preprocessing=ImageNormalization(mean=[10.0, 20.0, 30.0], std=[40.0, 50.0, 60.0], name="normalization"))
    source.save(tmp_path / "mine.keras")
    stripes_folder(tmp_path / "photos", per_class=6, size=160)  # alone, these would choose resnet18 at 160 px
    assert main(["train", "--data", "photos", "--weights", "mine.keras", "--epochs", "1", "--set", "data.repeat=3"]) == 0
    out = capsys.readouterr().out
    assert "(each image 3x per epoch)" in out  # the plan line shows the --set overrides
    run = tmp_path / "runs" / "photos_classification"
    recipe = load_config(run / "recipe.yaml")
    assert recipe.model.backbone == "resnet20_cifar"
    assert recipe.model.backbone_args["stackwise_num_filters"] == [16, 24, 32]
    assert recipe.model.weights == str(tmp_path / "mine.keras")
    preprocessing = json.loads((run / "run.json").read_text())["preprocessing"]
    assert preprocessing["mean"] == [10.0, 20.0, 30.0] and preprocessing["std"] == [40.0, 50.0, 60.0]
    assert "the normalisation of the .keras model" in out
