"""Sample images of an export: int8 calibration and the parity check against Keras.

Each task reads samples its own way (a `SampleReader`): classifiers and
segmenters resize images (`DENSE_SAMPLES`), detectors letterbox them
(`DETECTION_SAMPLES`). Calibration uses a recipe's training split or a
folder; the parity check prefers the validation split of the calibration
recipe or of the run's recipe, then the calibration folder, then
deterministic random images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from keras_resnet.config import load_config
from keras_resnet.data.images import (
    find_image_files,
    letterbox_images,
    load_images,
    read_image,
    recorded_bit_depth,
)
from keras_resnet_settings.errors import ConfigError, DataError, ExportError
from keras_resnet_settings.registry import DETECTION, SEGMENTATION

SAMPLE_SEED = 0


def is_recipe(path) -> bool:
    return path is not None and Path(path).suffix.lower() in (".yaml", ".yml")


def sample_files(files: list, count: int) -> list:
    """`files`, or a seeded sample of `count` of them (in order) when there are more."""
    if len(files) > count:
        keep = np.sort(np.random.default_rng(SAMPLE_SEED).choice(len(files), count, replace=False))
        files = [files[i] for i in keep]
    return files


def random_images(input_shape, count: int) -> np.ndarray:
    return np.random.default_rng(SAMPLE_SEED).uniform(0, 255, (count, *input_shape)).astype(np.float32)


def recipe_images(recipe_path: str, input_shape, split: str, count: int) -> np.ndarray:
    """Up to `count` un-augmented images of a recipe's train or val split, at `input_shape`.

    Classification and segmentation recipes alike (a segmentation recipe's
    images without their masks; a mosaic recipe's validation mosaic is the
    recipe's own, its training mosaic is generated at `count` canvases).
    """
    from keras_resnet.data.classification import build_classification_datasets

    height, width, channels = input_shape
    task = load_config(recipe_path).task
    overrides = [
        f"model.input_shape=[{height},{width},{channels}]",
        "data.batch_size=1",
        "data.cache=false",
        f"data.limit_train={count}",
        f"data.limit_val={count}",
        "data.augment.horizontal_flip=false",
    ]
    if task == SEGMENTATION:
        overrides += ["data.augment.scale_range=[1.0,1.0]", f"data.mosaic_train_size={count}"]
    else:
        overrides += ["data.augment.random_crop_padding=0", "data.augment.random_erasing=0.0"]
    cfg = load_config(recipe_path, overrides=overrides)
    if task == SEGMENTATION:
        from keras_resnet.data.segmentation import build_segmentation_datasets

        train, val, _ = build_segmentation_datasets(cfg, seed=SAMPLE_SEED)
    else:
        train, val, _ = build_classification_datasets(cfg, seed=SAMPLE_SEED)
    dataset = train if split == "train" else val
    images = [batch.numpy() for batch, _ in dataset.take(count)]
    return np.concatenate(images).astype(np.float32)


def folder_images(folder: str, input_shape, count: int, bit_depth=None) -> np.ndarray:
    """Up to `count` images from a folder (recursive), a seeded sample when there are more.

    A segmentation folder (`images/` beside `masks/`) gives its `images/` only.
    16-bit images are read at `bit_depth` (the run's; None: each image's own).
    """
    if (Path(folder) / "images").is_dir() and (Path(folder) / "masks").is_dir():
        folder = str(Path(folder) / "images")
    return load_images(sample_files(find_image_files(folder), count), *input_shape, bit_depth=bit_depth)


def detection_recipe_images(recipe_path: str, input_shape, split: str, count: int):
    """Up to `count` un-augmented letterboxed images of a detection recipe's split, and the data info.

    The validation split is the recipe's own (a mosaic recipe's validation
    canvases; a seeded subset when larger); the training split is
    un-augmented (a mosaic's is generated at `count` canvases).

    Returns:
        `(float32 images (n, H, W, C), info)` with `info` from
        `build_detection_datasets` (its `val_images` / `val_coco` describe
        the validation images returned, in order).
    """
    from keras_resnet.data.detection import (
        build_detection_datasets,
        recipe_dataset_args,
    )

    cfg = load_config(recipe_path)
    args = recipe_dataset_args(cfg)  # the run's data and its validation split (train.seed), then:
    args.update(
        input_shape=tuple(int(v) for v in input_shape), batch_size=1, seed=SAMPLE_SEED, shuffle_buffer=1,
        augment={"horizontal_flip": False, "scale_range": (1.0, 1.0)}, cache=False, repeat=1, sampling="resize",
        crops_per_image=1, empty_crop_rate=0.1,
        limit_train=count if split == "train" else 1, limit_val=count,
        mosaic_args={"train_size": count if split == "train" else 1, "val_size": cfg.data.mosaic_val_size},
    )
    train, val, info = build_detection_datasets(**args)
    dataset = train if split == "train" else val
    images = np.concatenate([batch.numpy() for batch, _ in dataset.take(count)]).astype(np.float32)
    return images, info


def letterboxed_folder_images(folder: str, input_shape, count: int, bit_depth=None) -> np.ndarray:
    """Up to `count` letterboxed images of a folder (recursive; a seeded sample when there are more)."""
    height, width, channels = input_shape
    return np.concatenate([
        letterbox_images(read_image(path, channels, bit_depth)[None], height, width)[0].numpy()
        for path in sample_files(find_image_files(folder), count)
    ])


def recipe_has_task(path, task: str) -> bool:
    """True when `path` is a readable recipe of `task`."""
    try:
        return load_config(str(path)).task == task
    except Exception:  # not a readable recipe: the caller reports it
        return False


@dataclass(frozen=True)
class SampleReader:
    """How a task reads sample images.

    Attributes:
        recipe: `(recipe path, input_shape, split, count) -> (images, info or None)`.
        folder: `(folder, input_shape, count, bit_depth=None) -> images` (16-bit images at the run's depth).
        folder_text: the description of folder images ("images in").
        training_text: the description of a recipe's calibration images, a format string.
        recipe_task: the task a calibration recipe must have (None: any).
        fallback_errors: errors of the run's recipe that make the parity check use random images.
    """

    recipe: Callable
    folder: Callable
    folder_text: str
    training_text: str
    recipe_task: str | None
    fallback_errors: tuple

    def check_recipe(self, recipe) -> None:
        if self.recipe_task is not None and not recipe_has_task(recipe, self.recipe_task):
            raise DataError(f"calibration recipe {recipe} is not a {self.recipe_task} recipe")


DENSE_SAMPLES = SampleReader(
    recipe=lambda *args: (recipe_images(*args), None),
    folder=folder_images,
    folder_text="images in",
    training_text="training images of {}",
    recipe_task=None,
    fallback_errors=(ConfigError, DataError),
)
DETECTION_SAMPLES = SampleReader(
    recipe=detection_recipe_images,
    folder=letterboxed_folder_images,
    folder_text="letterboxed images in",
    training_text="training images of {} (letterboxed, un-augmented)",
    recipe_task=DETECTION,
    fallback_errors=(ConfigError, DataError, KeyError),
)


def calibration_images(reader: SampleReader, calibration, source, input_shape, count: int):
    """`(images, description)` calibrating int8: a recipe's training split or a folder (default: the run's recipe)."""
    if calibration is None:
        if source.recipe_path is None:
            raise ExportError(
                "int8 quantization needs calibration images: pass calibration= a recipe YAML or an image folder"
            )
        calibration = source.recipe_path
    if not Path(calibration).exists():
        raise DataError(f"calibration path {calibration} does not exist; pass a recipe YAML or an image folder")
    if is_recipe(calibration):
        reader.check_recipe(calibration)
        images, _ = reader.recipe(str(calibration), input_shape, "train", count)
        return images, reader.training_text.format(calibration)
    if not Path(calibration).is_dir():
        raise DataError(f"calibration {calibration} is neither a recipe YAML nor an image folder")
    return (reader.folder(str(calibration), input_shape, count, bit_depth=recorded_bit_depth(source.run_info)),
            f"{reader.folder_text} {calibration}")


def parity_images(reader: SampleReader, calibration, source, input_shape, count: int):
    """`(images, description, info or None)` compared with Keras; a detection recipe's info holds ground truth.

    Order of preference: the validation split of the calibration recipe or
    of the run's recipe, the calibration folder, deterministic random images.
    A run recipe whose data cannot be loaded falls back to random images,
    and the description says why.
    """
    if is_recipe(calibration):
        reader.check_recipe(calibration)
        images, info = reader.recipe(str(calibration), input_shape, "val", count)
        return images, f"validation images of {calibration}", info
    if calibration is not None:
        images = reader.folder(str(calibration), input_shape, count, bit_depth=recorded_bit_depth(source.run_info))
        return images, f"{reader.folder_text} {calibration}", None
    random_text = f"random uniform 0..255 images (seed {SAMPLE_SEED})"
    if source.recipe_path is not None:
        try:
            images, info = reader.recipe(source.recipe_path, input_shape, "val", count)
            return images, f"validation images of {source.recipe_path}", info
        except reader.fallback_errors as error:
            return random_images(input_shape, count), f"{random_text}; run recipe data unavailable: {error}", None
    return random_images(input_shape, count), random_text, None
