"""SavedModel artefacts: written with `keras.export.ExportArchive`, opened by signature.

Every SavedModel (and the temporary one each TFLite conversion starts from)
is a `keras.export.ExportArchive` tracking the Keras model, with one
endpoint per signature. A plain `tf.Module` holding a Keras 3 model is
*not* used: its variables are not tracked as resources the TFLite
converter can freeze, and the converted model outputs NaN.
"""

from __future__ import annotations

from pathlib import Path

import keras
import tensorflow as tf

from keras_resnet.export.signatures import INPUT_NAME, Runtime
from keras_resnet_settings.errors import ExportError, ModelError

SAVED_MODEL_FILE = "saved_model.pb"


def write_saved_model(directory, track, endpoints: dict) -> None:
    """Writes an `ExportArchive` SavedModel.

    Args:
        directory: the SavedModel folder.
        track: the Keras model (or layer) whose variables the endpoints use; None for none.
        endpoints: `{signature name: (function, input signature list)}`, in order.
    """
    archive = keras.export.ExportArchive()
    if track is not None:
        archive.track(track)
    for name, (function, input_signature) in endpoints.items():
        archive.add_endpoint(name, function, input_signature=input_signature)
    archive.write_out(str(directory), verbose=False)


def is_saved_model(path) -> bool:
    """True for a folder holding `saved_model.pb`."""
    path = Path(path)
    return path.is_dir() and (path / SAVED_MODEL_FILE).is_file()


def check_saved_model_target(path: Path) -> None:
    """An `ExportError` when `path` exists and is not a SavedModel (a SavedModel there is replaced whole)."""
    if path.exists() and not (path / SAVED_MODEL_FILE).is_file():
        raise ExportError(f"{path} exists and is not a SavedModel; choose another output folder")


def load_saved_model(path):
    """The restored SavedModel (`tf.saved_model.load`); a `ModelError` naming `path` when it cannot be read."""
    try:
        return tf.saved_model.load(str(path))
    except Exception as error:  # truncated saved_model.pb / variables: OSError, IndexError, DecodeError...
        reason = (str(error).strip().splitlines() or [""])[0]
        raise ModelError(
            f"SavedModel {path} is corrupt or incomplete ({type(error).__name__}: {reason}); export it again"
        ) from None


def signature_runtime(loaded, name: str) -> Runtime:
    """A `Runtime` running signature `name` of a restored SavedModel (one "images" input)."""
    signature = loaded.signatures[name]
    spec = signature.structured_input_signature[1][INPUT_NAME]
    outputs = signature.structured_outputs

    def fetch(batch, handles):
        results = signature(**{INPUT_NAME: tf.constant(batch)})
        return {key: results[handle].numpy() for key, handle in handles.items()}

    fetch.loaded = loaded  # keeps the restored variables alive with the signature
    return Runtime(
        kind="saved_model",
        input_shape=tuple(spec.shape[1:]),
        batch_size=spec.shape[0],
        outputs={name: name for name in outputs},
        shapes={name: value.shape for name, value in outputs.items()},
        first=None,
        fetch=fetch,
    )
