"""Pretrained weights by name: the catalogue's files fetched by URL or from the Hugging Face Hub, verified, cached.

- `resolve_weights("imagenet", "resnet50")`, `weights_file(entry)`: catalogue
  names to files (`keras_resnet.weights.catalogue`; the table is
  `keras_resnet_settings.weights.CATALOGUE`, listed by `keras-resnet weights`).
- `fetch`, `fetch_hf`: download, verify and cache one file (`keras_resnet.weights.download`, `keras_resnet.weights.hub`).
"""

from keras_resnet.weights.catalogue import resolve_weights, weights_file
from keras_resnet.weights.download import (
    MIRROR_VARIABLE,
    WeightsDownloadError,
    cache_dir,
    fetch,
)
from keras_resnet.weights.hub import fetch_hf

__all__ = ["MIRROR_VARIABLE", "WeightsDownloadError", "cache_dir", "fetch", "fetch_hf", "resolve_weights",
           "weights_file"]
