"""Reading other libraries' weight files into NumPy arrays (the file formats, no architecture).

- `read_state_dict`: a PyTorch state dict (`{key: array}`) from a `.pth`/`.pt`/`.bin`
  file (`torch_pickle.load_torch_checkpoint`: both `torch.save` formats, NumPy
  only, tensors and containers only, so a checkpoint never runs code), a
  `.safetensors` file, a dict of NumPy arrays or torch tensors, or a live
  `torch.nn.Module`. No file needs PyTorch.
- `read_keras_h5`: a legacy Keras HDF5 weight file (the keras.applications layout)
  as `{layer: {weight: array}}`.

Architecture knowledge (which key is which layer) lives with each model family,
e.g. `keras_resnet.convert.torch_resnet`.
"""

import os

import numpy as np

from keras_resnet.convert.torch_pickle import load_torch_checkpoint
from keras_resnet_settings.errors import ConversionError

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
# Containers that training scripts wrap a state dict in ({"state_dict": ...}, {"model": ...}).
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


def is_torch_file(path) -> bool:
    """True for the suffixes `read_state_dict` reads: .pth, .pt, .bin, .safetensors."""
    return str(path).lower().endswith((*TORCH_SUFFIXES, SAFETENSORS_SUFFIX))


def read_state_dict(source):
    """A flat `{key: np.ndarray}` state dict, and a name for messages.

    Args:
        source: a `.pth`/`.pt`/`.bin` path (read without torch by
            `load_torch_checkpoint`, which refuses pickles of anything but
            tensors and containers), a `.safetensors` path, a dict of
            arrays or tensors, or a module with `state_dict()`.
            `{"state_dict": ...}` / `{"model": ...}` wrappers and a
            "module." key prefix (DataParallel) are removed.

    Returns:
        `(state, name)`.

    Raises:
        ConversionError: a missing or unreadable file, a pickle that
            holds more than tensors and containers, or something that is
            not a state dict.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise ConversionError(f"Weight file {path} does not exist.")
        lower = path.lower()
        if lower.endswith(SAFETENSORS_SUFFIX):
            raw = _load_safetensors(path)
        elif lower.endswith(TORCH_SUFFIXES):
            raw = _load_torch_file(path)
        else:
            raise ConversionError(
                f"{path}: unknown weight file type; expected a PyTorch state dict ({', '.join(TORCH_SUFFIXES)} or "
                f"{SAFETENSORS_SUFFIX})."
            )
        name = path
    elif callable(getattr(source, "state_dict", None)):
        raw, name = source.state_dict(), f"module {type(source).__name__}"
    elif isinstance(source, dict):
        raw, name = source, "the state dict"
    else:
        raise ConversionError(
            f"Expected a state dict file, a dict of arrays or a torch.nn.Module, got {type(source).__name__}."
        )
    return _flatten(raw, name), name


def _load_safetensors(path):
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise ConversionError(f"reading {path} needs safetensors: pip install safetensors") from None
    try:
        return load_file(path)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError, and others
        raise ConversionError(f"{path} is not a readable .safetensors file ({_first_line(error)}).") from None


def _load_torch_file(path):
    """A `.pth`/`.pt`/`.bin` file's object, tensors as NumPy arrays, without torch.

    Raises:
        ConversionError: one line: a pickle of more than tensors and
            containers ("... unpickling arbitrary objects can execute code
            ..."), or "<path> is not a PyTorch state dict file: ...".
    """
    return load_torch_checkpoint(path)


def _first_line(error):
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0].split(". ")[0][:200] if lines else "no message"


def _flatten(raw, name):
    for _ in range(3):
        if not isinstance(raw, dict):
            break
        wrapped = [key for key in WRAPPER_KEYS if isinstance(raw.get(key), dict)]
        if not wrapped:
            break
        raw = raw[wrapped[0]]
    if not isinstance(raw, dict) or not raw:
        raise ConversionError(
            f"{name} is not a state dict: expected a dict of tensors, got "
            f"{type(raw).__name__ if raw else 'an empty dict'}."
        )
    if all(str(key).startswith("module.") for key in raw):
        raw = {str(key)[len("module."):]: value for key, value in raw.items()}
    state = {}
    for key, value in raw.items():
        array = _to_numpy(value)
        if array is None:
            raise ConversionError(
                f"{name} is not a state dict: key {key!r} holds a {type(value).__name__}, not a tensor."
            )
        state[str(key)] = array
    return state


def _to_numpy(value):
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
            value = value.float()
        return value.numpy()
    if isinstance(value, (int, float, np.generic)):
        return np.asarray(value)
    return None


def read_keras_h5(path):
    """Reads a legacy Keras HDF5 weight file into {layer: {weight: array}}."""
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise ConversionError(f"{path} is not a readable HDF5 weight file ({error}).") from None
    with handle as f:
        group = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in group.attrs:
            hint = (
                " It looks like a Keras 3 `.weights.h5` file: load it with `model.load_weights()` into the same model."
                if "layers" in group or "vars" in group
                else ""
            )
            raise ConversionError(
                f"{path} is not a keras.applications weight file: it has no 'layer_names' attribute.{hint}"
            )
        weights = {}
        for raw_layer in group.attrs["layer_names"]:
            layer = raw_layer.decode() if isinstance(raw_layer, bytes) else str(raw_layer)
            layer_group = group[layer]
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in layer_group.attrs.get("weight_names", [])]
            if not names:
                continue
            arrays = {}
            for weight_name in names:
                short = weight_name.split("/")[-1].split(":")[0]
                arrays[short] = np.asarray(layer_group[weight_name])
            weights[layer] = arrays
    return weights


__all__ = ["SAFETENSORS_SUFFIX", "TORCH_SUFFIXES", "is_torch_file", "read_keras_h5", "read_state_dict"]
