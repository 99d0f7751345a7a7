"""Fashion-MNIST: find the local idx files, read them, or let Keras download them.

The items of the classification source ``fashion_mnist`` and of the synthetic
segmentation and detection mosaics.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from pathlib import Path

import numpy as np

from keras_resnet.data.scanning import keras_datasets_dir
from keras_resnet_settings.errors import DataError

logger = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train_labels": "train-labels-idx1-ubyte.gz",
    "train_images": "train-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
}
FASHION_MNIST_DIR_ENV = "KERAS_RESNET_FASHION_MNIST_DIR"
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def _keras_fashion_mnist_dir() -> Path:
    return keras_datasets_dir() / "fashion-mnist"


def _complete_file_set(directory: Path) -> dict[str, Path] | None:
    paths = {key: directory / name for key, name in FASHION_MNIST_FILES.items()}
    return paths if all(p.is_file() for p in paths.values()) else None


def find_fashion_mnist() -> dict[str, Path]:
    """Locate local Fashion-MNIST idx ``.gz`` files without downloading anything.

    Search order: ``$KERAS_RESNET_FASHION_MNIST_DIR`` (if set it must hold all four
    files), the Keras cache (``$KERAS_HOME`` or ``~/.keras``, under
    ``datasets/fashion-mnist``), then the Debian ``dataset-fashion-mnist`` package
    directory ``/usr/share/datasets/fashion-mnist``.

    Returns:
        Dict with keys ``train_images``, ``train_labels``, ``test_images``,
        ``test_labels`` mapping to file paths.

    Raises:
        DataError: the env-var directory is incomplete, or no directory has the files.
    """
    override = os.environ.get(FASHION_MNIST_DIR_ENV)
    if override:
        found = _complete_file_set(Path(override))
        if found is None:
            raise DataError(
                f"{FASHION_MNIST_DIR_ENV}={override} does not contain all of "
                f"{', '.join(FASHION_MNIST_FILES.values())}; point it at a complete copy or unset it"
            )
        return found
    searched = [_keras_fashion_mnist_dir(), DEBIAN_FASHION_MNIST_DIR]
    for directory in searched:
        found = _complete_file_set(directory)
        if found is not None:
            return found
    raise DataError(
        f"Fashion-MNIST not found in {', '.join(map(str, searched))}; install the Debian package "
        f"dataset-fashion-mnist, set {FASHION_MNIST_DIR_ENV}, or let Keras download it"
    )


def read_idx_gz(path: str | os.PathLike) -> np.ndarray:
    """Read a gzip-compressed idx file of unsigned bytes (the MNIST format).

    Args:
        path: ``*-idx1-ubyte.gz`` (labels) or ``*-idx3-ubyte.gz`` (images) file.

    Returns:
        uint8 array with the shape stored in the header.

    Raises:
        DataError: unreadable gzip, bad magic number, or truncated payload.
    """
    try:
        with gzip.open(path, "rb") as stream:
            raw = stream.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"corrupt Fashion-MNIST file {path}: {error}; delete it and re-download") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise DataError(
            f"corrupt Fashion-MNIST file {path}: bad idx magic number {raw[:4].hex() or '(empty)'} "
            "(expected 0000080N for unsigned bytes); delete it and re-download"
        )
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"corrupt Fashion-MNIST file {path}: truncated header; delete it and re-download")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header_size + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(
            f"corrupt Fashion-MNIST file {path}: {len(raw)} bytes but header shape {shape} "
            f"needs {expected}; delete it and re-download"
        )
    return np.frombuffer(raw, np.uint8, offset=header_size).reshape(shape)


def load_fashion_mnist() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Load Fashion-MNIST from local files (see :func:`find_fashion_mnist`), else download.

    Returns:
        ``((x_train, y_train), (x_test, y_test))``: uint8 arrays of shapes
        ``(N, 28, 28)`` and ``(N,)``.

    Raises:
        DataError: a local file is corrupt or image/label counts disagree.
    """
    try:
        paths = find_fashion_mnist()
    except DataError as not_found:
        if os.environ.get(FASHION_MNIST_DIR_ENV):
            raise
        logger.info("Fashion-MNIST not found locally; downloading with keras.datasets")
        import keras

        try:
            return keras.datasets.fashion_mnist.load_data()
        except Exception as error:  # Keras raises a bare Exception ("URL fetch failure ...") offline
            raise DataError(
                f"{not_found}; the download failed too ({type(error).__name__}: {str(error).splitlines()[0]}). "
                "Offline? Copy the four *-idx*-ubyte.gz files to a folder and set "
                f"{FASHION_MNIST_DIR_ENV} to it"
            ) from None
    splits = []
    for split in ("train", "test"):
        images = read_idx_gz(paths[f"{split}_images"])
        labels = read_idx_gz(paths[f"{split}_labels"])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"Fashion-MNIST {split} files disagree: images {images.shape} in "
                f"{paths[f'{split}_images']}, labels {labels.shape} in {paths[f'{split}_labels']}"
            )
        splits.append((images, labels))
    return splits[0], splits[1]
