"""Pretrained weight files: fetched by URL or from the Hugging Face Hub, verified and cached."""

from keras_resnet.weights.download import (
    MIRROR_VARIABLE,
    WeightsDownloadError,
    cache_dir,
    fetch,
    fetch_hf,
)

__all__ = ["MIRROR_VARIABLE", "WeightsDownloadError", "cache_dir", "fetch", "fetch_hf"]
