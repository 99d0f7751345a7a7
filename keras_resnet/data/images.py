"""Image files: finding, reading, decoding, letterboxing.

One decoder for every path: `read_image` (PIL) decodes the training pipelines'
images (`decode_image` / `decode_image_file` call it through
`tf.numpy_function` inside tf.data), evaluation, calibration, parity samples
and prediction (`load_image(s)`), so they all see the same pixels. It loads the
whole file (a truncated file fails) and converts modes explicitly: palette ->
RGB (or L) through the palette, 16-bit -> 8-bit at one bit depth per dataset
(`dataset_bit_depth`, recorded in run.json as `bit_depth`: /257 for
full-range data), 1-bit -> 0/255, CMYK -> RGB, alpha dropped, then L or RGB
for the model's channel count. A
JPEG's EXIF orientation is applied first (`ImageOps.exif_transpose`): pixels
come out as a photo viewer shows them, and every size check uses that
orientation (`displayed_size`). The rule for labels: boxes (VOC, COCO) and
masks are in the displayed orientation, as annotation tools draw them.
`image_problem` is the same full decode, for the data scans. Resizing and
augmentation stay in TensorFlow. Training scans read `TRAINING_IMAGE_EXTENSIONS`.
`letterbox_images` is the one letterbox of prediction, export and the
detection pipeline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tensorflow as tf
from PIL import Image, ImageOps

from keras_resnet.data.scanning import progress
from keras_resnet_settings.errors import DataError
from keras_resnet_settings.registry import TRAINING_IMAGE_EXTENSIONS  # noqa: F401  (re-exported for the data scans)

# What the PIL readers (prediction, export samples) accept.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LETTERBOX_TEXT = (
    "letterbox: scale s = min(H / h, W / w); resize to round(h * s) x round(w * s) (bilinear, antialias), "
    "round to uint8, pad bottom/right with 0 to H x W; original box = box / s, clipped to the image"
)


def find_image_files(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Expand image files and folders into a list of image files.

    Folders are searched recursively for files with an image extension
    (any case; hidden entries skipped) and listed in sorted order; files are
    kept as given, whatever their extension.

    Args:
        paths: one path or several.

    Returns:
        Image file paths, folders expanded in place.

    Raises:
        DataError: a path does not exist, or a folder holds no images.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[str] = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(str(path))
        elif path.is_dir():
            found = sorted(
                str(p)
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise DataError(f"folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            files.extend(found)
        else:
            raise DataError(f"image path {path} does not exist")
    return files


# PIL modes of 16- and 32-bit integer pixels; scaled to 8 bits at a bit depth (`bit_depth_of`).
WIDE_INTEGER_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
BIT_DEPTHS = (8, 10, 12, 14, 16)
# The smallest per-channel std (0..255 pixels) of a normalisation from the training set's statistics: a channel
# that is constant in the training images (grey data in RGB files, an empty fluorescence channel) would otherwise
# be divided by ~0 and any later image that differs there blown up ~1000x.
MIN_PIXEL_STD = 1.0
WIDE_INTEGER_SUFFIXES = (".png", ".tif", ".tiff")  # the formats that can hold 16-bit pixels
# The run.json (and export metadata) entry of a run's `dataset_bit_depth`.
BIT_DEPTH_KEY = "bit_depth"


def bit_depth_of(maximum: float) -> int:
    """The container of 16/32-bit integer values up to `maximum`: the one rule choosing the bit depth.

    Cameras write 10-, 12- and 14-bit data into 16-bit files, and many
    microscopy images use a small part of the range, so the depth is the
    smallest of 8, 10, 12, 14 bits that holds `maximum`, else 16 (a plain
    /257 would turn a 0..235 fluorescence image black). Training takes it
    over the whole training set (`dataset_bit_depth`), so every image of a
    run is scaled alike and brightness order is kept across images.
    """
    return next((bits for bits in BIT_DEPTHS[:-1] if maximum <= 2**bits - 1), BIT_DEPTHS[-1])


def wide_integer_scale(bit_depth: int) -> float:
    """The factor mapping `bit_depth`-bit values to 8 bits: 255 / (2**bit_depth - 1) (16 bits: 1/257).

    Raises:
        DataError: `bit_depth` is not one of 8, 10, 12, 14, 16.
    """
    if bit_depth not in BIT_DEPTHS:
        raise DataError(f"bit depth {bit_depth!r} is not one of {', '.join(map(str, BIT_DEPTHS))}")
    return 255.0 / (2 ** int(bit_depth) - 1)


def dataset_bit_depth(paths) -> int | None:
    """The one bit depth of a training set's 16/32-bit integer images, or None when it has none.

    `bit_depth_of` the largest value over all of them (8-bit files are only
    opened for their header). Training decodes every image at it and records
    it in run.json (`BIT_DEPTH_KEY`); prediction reads it back
    (`recorded_bit_depth`), so a flat 4000 stays darker than a flat 40000 in
    training and in prediction alike.
    """
    maximum = None
    # JPEG, GIF, BMP and WebP hold 8-bit pixels only: only PNG and TIFF files are opened.
    paths = [path for path in paths if os.fsdecode(path).lower().endswith(WIDE_INTEGER_SUFFIXES)]
    for path in progress(paths, f"reading the bit depth of {len(paths)} images"):
        with Image.open(os.fsdecode(path)) as image:
            if image.mode in WIDE_INTEGER_MODES:
                high = int(np.asarray(image).max(initial=0))
                maximum = high if maximum is None else max(maximum, high)
    return None if maximum is None else bit_depth_of(maximum)


def recorded_bit_depth(info: dict) -> int | None:
    """The `dataset_bit_depth` a run recorded (run.json or export metadata), checked; None when it has none.

    Runs from before the record (and runs without 16-bit images) have
    none: their 16-bit images are then read at the depth of each image's
    own values.
    """
    bit_depth = (info or {}).get(BIT_DEPTH_KEY)
    if bit_depth is None:
        return None
    wide_integer_scale(bit_depth)  # checks it
    return int(bit_depth)


def pixels_of(image: Image.Image, channels: int, bit_depth: int | None = None) -> np.ndarray:
    """uint8 `(h, w, channels)` pixels of an open PIL image, its mode converted explicitly.

    Palette (P, PA) -> RGB through the palette (L when `channels` is 1),
    16-bit / 32-bit integer -> 8-bit by `wide_integer_scale(bit_depth)`
    (rounded; values above the depth saturate; `bit_depth` None: the depth
    of this image's own values, `bit_depth_of` its maximum), 1-bit -> 0/255,
    CMYK -> RGB, alpha dropped; then L or RGB.
    """
    if channels not in (1, 3):
        raise DataError(f"models take 1 or 3 channel images, not {channels}")
    if image.mode in WIDE_INTEGER_MODES:
        wide = np.asarray(image, dtype=np.float64)
        scale = wide_integer_scale(bit_depth_of(wide.max()) if bit_depth is None else bit_depth)
        image = Image.fromarray(np.clip(np.round(wide * scale), 0, 255).astype(np.uint8), "L")
    elif image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    elif image.mode in ("1", "CMYK"):
        image = image.convert("L" if image.mode == "1" else "RGB")
    pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    return pixels.reshape(pixels.shape[0], pixels.shape[1], channels)


EXIF_ORIENTATION = 0x0112  # 1: as stored; 2-8: flipped and/or rotated; 5-8 swap width and height


def orientation(image: Image.Image) -> int:
    """The EXIF orientation of an open image (1 when it has none)."""
    try:
        return int(image.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a malformed EXIF block: take the pixels as stored
        return 1


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """`(width, height)` of an open image as shown, its EXIF orientation applied."""
    width, height = image.size
    return (height, width) if orientation(image) in (5, 6, 7, 8) else (width, height)


def image_size(path) -> tuple[int, int]:
    """`(width, height)` of an image file as shown (EXIF orientation applied), from its header."""
    with Image.open(path) as image:
        return displayed_size(image)


def _decoded(path: str, channels: int, bit_depth: int | None = None) -> np.ndarray:
    with Image.open(path) as image:
        image.load()
        if orientation(image) != 1:
            image = ImageOps.exif_transpose(image)
        return pixels_of(image, channels, bit_depth)


def read_image(path: str | os.PathLike | bytes, channels: int, bit_depth: int | None = None) -> np.ndarray:
    """Decode an image file to uint8 `(h, w, channels)`: the one decoder of training and prediction.

    The whole file is loaded (a truncated file fails here, not later) and
    converted by `pixels_of`; `bit_depth` is the run's depth of 16/32-bit
    images (`dataset_bit_depth`; None: each image's own).

    Raises:
        DataError: the file is missing or cannot be decoded (names the file).
    """
    path = os.fsdecode(path)
    try:
        return _decoded(path, channels, bit_depth)
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except DataError:
        raise
    except Exception as error:  # PIL raises many exception types for bad files
        raise DataError(
            f"cannot decode image {path} ({type(error).__name__}: {error}); delete or replace it"
        ) from None


def encoded_paths(paths) -> np.ndarray:
    """File paths as bytes for tf.data (`os.fsencode`): names that are not valid UTF-8 survive.

    TensorFlow strings must be UTF-8 when built from Python `str`; a file name
    with other bytes (read by Python with surrogate escapes) becomes its
    original bytes instead, and `read_image` decodes it back with `os.fsdecode`.
    """
    return np.asarray([os.fsencode(path) for path in paths], dtype=object)


def load_image(path: str | os.PathLike, height: int, width: int, channels: int,
               bit_depth: int | None = None) -> np.ndarray:
    """Read one image as float32 raw pixels 0..255, shape `(height, width, channels)`.

    Args:
        path: image file.
        height, width: model input size; the image is resized to it (bilinear).
        channels: 1 (converted to grayscale) or 3 (converted to RGB).
        bit_depth: the run's depth of 16/32-bit images (`recorded_bit_depth`; None: the image's own).

    Raises:
        DataError: the file is missing or is not a readable image (names the file).
    """
    array = read_image(path, channels, bit_depth).astype(np.float32)
    if array.shape[:2] == (height, width):
        return array
    return tf.image.resize(array, [height, width], method="bilinear").numpy()


def load_images(paths: Sequence[str], height: int, width: int, channels: int,
                bit_depth: int | None = None) -> np.ndarray:
    """Stack `load_image` over several files into a `(N, height, width, channels)` array."""
    return np.stack([load_image(path, height, width, channels, bit_depth) for path in paths]).astype(np.float32)


def image_problem(path: str) -> str | None:
    """Full decode check (as `read_image`); returns the error text, or None when the image decodes."""
    try:
        _decoded(os.fsdecode(path), 3)
    except Exception as error:  # PIL raises many exception types for bad files
        return f"{type(error).__name__}: {error}"
    return None


def to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """`(h, w, 1|2|3|4)` -> `(h, w, channels)`: drops alpha, converts gray <-> RGB, keeps the dtype.

    Gray+alpha keeps 1 channel, RGBA keeps 3; the conversions are
    `tf.image.grayscale_to_rgb` / `tf.image.rgb_to_grayscale` (which rounds
    integer pixels, so convert after casting to float to keep fractions).
    """
    if image.shape[-1] is not None:  # arrays: the channel count is static
        image = image[..., :3] if image.shape[-1] >= 3 else image[..., :1]
        if image.shape[-1] == channels:
            return image
        return tf.image.grayscale_to_rgb(image) if channels == 3 else tf.image.rgb_to_grayscale(image)
    image = image[..., : tf.where(tf.shape(image)[-1] >= 3, 3, 1)]
    gray = lambda: tf.ensure_shape(image, [None, None, 1])  # noqa: E731
    rgb = lambda: tf.ensure_shape(image, [None, None, 3])  # noqa: E731
    is_gray = tf.equal(tf.shape(image)[-1], 1)
    if channels == 3:
        image = tf.cond(is_gray, lambda: tf.image.grayscale_to_rgb(gray()), rgb)
    else:
        image = tf.cond(is_gray, gray, lambda: tf.image.rgb_to_grayscale(rgb()))
    return tf.ensure_shape(image, [None, None, channels])


def decode_image(path: tf.Tensor, channels: int, as_float: bool = True, bit_depth: int | None = None) -> tf.Tensor:
    """Decode one image file at its own size inside tf.data, with `read_image` (`tf.numpy_function`).

    Args:
        path: string tensor.
        channels: 1 or 3.
        as_float: cast to float32 (0..255); False keeps uint8.
        bit_depth: the training set's depth of 16/32-bit images (`dataset_bit_depth`; None: each image's own).
    """
    image = tf.numpy_function(lambda name: read_image(np.asarray(name).item(), channels, bit_depth), [path],
                              tf.uint8, stateful=False)
    image = tf.ensure_shape(image, [None, None, channels])
    return tf.cast(image, tf.float32) if as_float else image


def decode_image_file(path: tf.Tensor, height: int, width: int, channels: int,
                      bit_depth: int | None = None) -> tf.Tensor:
    """Read, decode, convert channels and resize one image to float32 (H, W, C) in 0..255 (`decode_image`)."""
    image = tf.image.resize(decode_image(path, channels, bit_depth=bit_depth), [height, width], method="bilinear")
    return tf.ensure_shape(image, [height, width, channels])


def letterbox_scale(height: int, width: int, input_height: int, input_width: int) -> float:
    """The letterbox factor ``min(input_height / height, input_width / width)``."""
    return min(input_height / height, input_width / width)


def letterbox_images(images, height: int, width: int, scale=None):
    """Letterbox images to `(height, width)` in TensorFlow.

    Scale `s = min(height / h, width / w)`, bilinear resize with
    antialiasing to `round((h, w) * s)`, rounded to 0..255, padded
    bottom/right with 0. The one implementation behind prediction, export
    and the detection pipeline (`keras_resnet.data.detection.letterbox`).

    Args:
        images: `(N, h, w, C)` batch of same-size images, or one `(h, w, C)`
            image; uint8 or float pixels 0..255.
        height, width: the model input size.
        scale: the factor, when already known (`letterbox_scale`); default
            computed in float32 from the image size.

    Returns:
        `(float32 (N, height, width, C) or (height, width, C) pixels, scale)`.
    """
    images = tf.convert_to_tensor(images)
    size = tf.cast(tf.shape(images)[-3:-1], tf.float32)
    if scale is None:
        scale = tf.minimum(height / size[0], width / size[1])
    else:
        scale = tf.cast(scale, tf.float32)
    new_size = tf.clip_by_value(tf.cast(tf.round(size * scale), tf.int32), 1, [height, width])
    resized = tf.image.resize(tf.cast(images, tf.float32), new_size, method="bilinear", antialias=True)
    resized = tf.clip_by_value(tf.round(resized), 0.0, 255.0)
    padded = tf.image.pad_to_bounding_box(resized, 0, 0, height, width)
    return padded, scale
