"""Catalogue names to files: `weights="imagenet"` (or a tag) becomes a verified file in the cache.

The table itself is `keras_resnet_settings.weights.CATALOGUE` (no
TensorFlow, so `keras-resnet weights` lists it at once); this module fetches
an entry's file with `keras_resnet.weights.download`: the Hugging Face repo
first where timm hosts the weights as safetensors, then the source's URLs;
when neither can be had, one error names both.

Example:
>>> path = weights_file(find_entry("resnet50", "imagenet"))   # resnet50-11ad3fa6.pth, downloaded once
>>> source, arch = resolve_weights("imagenet", "resnet50")
"""

from pathlib import Path

from keras_resnet.weights.download import WeightsDownloadError, fetch
from keras_resnet.weights.hub import fetch_hf
from keras_resnet_settings.weights import HF_FILENAME, find_entry, is_weights_name


def weights_file(entry, progress: bool = True) -> Path:
    """The entry's file in the cache, downloaded and verified if it is not there yet.

    Args:
        entry: a `keras_resnet_settings.weights.WeightsEntry`.
        progress: show a progress bar while downloading.

    Raises:
        WeightsDownloadError: every source failed (one line: every URL tried with its reason, the Hub's and the
            fallback's for timm, where a file put by hand is used, the mirror variable or the mirror paths looked in)
            or the file does not match its hash.
    """
    hub_error = None
    if entry.hf_repo:
        try:
            return fetch_hf(entry.hf_repo, HF_FILENAME, progress=progress)
        except WeightsDownloadError as error:
            if not entry.urls:
                raise
            hub_error = error
    try:
        return fetch(list(entry.urls), entry.filename, hash_prefix=entry.hash_prefix, md5=entry.md5,
                     progress=progress)
    except WeightsDownloadError as error:
        joined = WeightsDownloadError.joined(entry.name, hub_error, error) if hub_error is not None else None
        if joined is None:
            raise
        raise joined from None


def resolve_weights(source, preset, progress: bool = True):
    """`(source, arch)`: a catalogue name of `preset` becomes its cached file and the source's architecture name.

    Anything else (a path, a dict of arrays, a module) is returned as it is, with arch None.

    Raises:
        ConfigError: a catalogue name the preset has no weights for (naming those it has).
        WeightsDownloadError: the file could not be fetched.
    """
    if not is_weights_name(source):
        return source, None
    entry = find_entry(preset, source)
    arch = entry.arch if entry.source in ("torchvision", "timm") else None
    return weights_file(entry, progress), arch


__all__ = ["resolve_weights", "weights_file"]
