"""Prediction of classifiers: channel conversion, class names, bad files named."""

import numpy as np
import pytest
from PIL import Image

from keras_resnet.predict.classification import predict_files
from tests.helpers import tiny_classifier


def test_predict_converts_channels_and_names_bad_files(tmp_path):
    model_file = tmp_path / "gray.keras"
    tiny_classifier(channels=1, num_classes=2).save(model_file)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "rgb.png")
    Image.fromarray(np.zeros((40, 40, 4), np.uint8)).save(tmp_path / "rgba.png")
    result = predict_files(model_file, [tmp_path / "rgb.png", tmp_path / "rgba.png"], top_k=5)
    assert [len(r["top"]) for r in result] == [2, 2]
    assert result[0]["top"][0]["class"] == str(result[0]["top"][0]["index"])  # no class names: index
    (tmp_path / "corrupt.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="corrupt.png"):
        predict_files(model_file, tmp_path / "corrupt.png")
    with pytest.raises(ValueError, match="missing.png does not exist"):
        predict_files(model_file, tmp_path / "missing.png")
    with pytest.raises(ValueError, match="does not exist"):
        predict_files(tmp_path / "missing.onnx", tmp_path / "rgb.png")
