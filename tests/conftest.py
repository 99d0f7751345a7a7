import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.helpers import write_idx_gz  # noqa: E402


@pytest.fixture(autouse=True)
def _float32_policy():
    """Tests start in float32, whatever a previous test set."""
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


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


