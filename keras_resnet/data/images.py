"""Image files: finding, reading, decoding, letterboxing.

One decoder for every path: `read_image` (PIL) decodes the training pipelines'
images (`decode_image` / `decode_image_file` call it through
`tf.numpy_function` inside tf.data), evaluation, calibration, parity samples
and prediction (`load_image(s)`), so they all see the same pixels. It loads the
whole file (a truncated file fails) and converts modes explicitly: palette ->
RGB (or L) through the palette, 16-bit -> 8-bit by the bit depth its values use
(`wide_integer_scale`: /257 for full-range data), 1-bit -> 0/255, CMYK
-> RGB, alpha dropped, then L or RGB for the model's channel count. A
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

from keras_resnet_settings.errors import DataError

# What the PIL readers (prediction, export samples) accept.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# What the training data scans list.
TRAINING_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
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


# PIL modes of 16- and 32-bit integer pixels; scaled to 8 bits by `wide_integer_scale`.
WIDE_INTEGER_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def wide_integer_scale(maximum: float) -> float:
    """The factor that maps a 16/32-bit image with this maximum to 8 bits.

    Cameras write 10-, 12- and 14-bit data into 16-bit files, and many
    microscopy images use a small part of the range, so the scale follows
    the smallest container the image's values fit: maximum <= 255 -> 1 (the
    values are kept; a plain /257 would turn a 0..235 fluorescence image
    black), <= 1023 -> 255/1023, <= 4095 -> 255/4095, <= 16383 -> 255/16383,
    else 255/65535 (= 1/257; 32-bit values above 65535 saturate).
    """
    for bits in (8, 10, 12, 14):
        if maximum <= 2**bits - 1:
            return 255.0 / (2**bits - 1)
    return 1.0 / 257.0


def pixels_of(image: Image.Image, channels: int) -> np.ndarray:
    """uint8 `(h, w, channels)` pixels of an open PIL image, its mode converted explicitly.

    Palette (P, PA) -> RGB through the palette (L when `channels` is 1),
    16-bit / 32-bit integer -> 8-bit by `wide_integer_scale` (rounded), 1-bit ->
    0/255, CMYK -> RGB, alpha dropped; then L or RGB.
    """
    if channels not in (1, 3):
        raise DataError(f"models take 1 or 3 channel images, not {channels}")
    if image.mode in WIDE_INTEGER_MODES:
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(wide * wide_integer_scale(wide.max())), 0, 255).astype(np.uint8), "L")
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


def _decoded(path: str, channels: int) -> np.ndarray:
    with Image.open(path) as image:
        image.load()
        if orientation(image) != 1:
            image = ImageOps.exif_transpose(image)
        return pixels_of(image, channels)


def read_image(path: str | os.PathLike | bytes, channels: int) -> np.ndarray:
    """Decode an image file to uint8 `(h, w, channels)`: the one decoder of training and prediction.

    The whole file is loaded (a truncated file fails here, not later) and
    converted by `pixels_of`.

    Raises:
        DataError: the file is missing or cannot be decoded (names the file).
    """
    path = os.fsdecode(path)
    try:
        return _decoded(path, channels)
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


def load_image(path: str | os.PathLike, height: int, width: int, channels: int) -> np.ndarray:
    """Read one image as float32 raw pixels 0..255, shape `(height, width, channels)`.

    Args:
        path: image file.
        height, width: model input size; the image is resized to it (bilinear).
        channels: 1 (converted to grayscale) or 3 (converted to RGB).

    Raises:
        DataError: the file is missing or is not a readable image (names the file).
    """
    array = read_image(path, channels).astype(np.float32)
    if array.shape[:2] == (height, width):
        return array
    return tf.image.resize(array, [height, width], method="bilinear").numpy()


def load_images(paths: Sequence[str], height: int, width: int, channels: int) -> np.ndarray:
    """Stack `load_image` over several files into a `(N, height, width, channels)` array."""
    return np.stack([load_image(path, height, width, channels) for path in paths]).astype(np.float32)


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


def decode_image(path: tf.Tensor, channels: int, as_float: bool = True) -> tf.Tensor:
    """Decode one image file at its own size inside tf.data, with `read_image` (`tf.numpy_function`).

    Args:
        path: string tensor.
        channels: 1 or 3.
        as_float: cast to float32 (0..255); False keeps uint8.
    """
    image = tf.numpy_function(lambda name: read_image(np.asarray(name).item(), channels), [path], tf.uint8, stateful=False)
    image = tf.ensure_shape(image, [None, None, channels])
    return tf.cast(image, tf.float32) if as_float else image


def decode_image_file(path: tf.Tensor, height: int, width: int, channels: int) -> tf.Tensor:
    """Read, decode, convert channels and resize one image to float32 (H, W, C) in 0..255."""
    image = tf.image.resize(decode_image(path, channels), [height, width], method="bilinear")
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
