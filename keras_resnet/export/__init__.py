"""Export to SavedModel, TFLite and ONNX with parity checks.

`export_model` is the entry point; `load_exported_model` runs any artefact.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_resnet.export.api import export_model  # noqa: E402
from keras_resnet.export.loading import load_exported_model  # noqa: E402

__all__ = ["export_model", "load_exported_model"]
