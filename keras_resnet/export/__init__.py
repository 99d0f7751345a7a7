"""Export to SavedModel, TFLite and ONNX with parity checks.

`export_model` is the entry point; `load_exported_model` runs any artefact and
`model_task` tells its task.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_resnet.export.api import export_model  # noqa: E402
from keras_resnet.export.loading import ExportedModel, load_exported_model, model_task  # noqa: E402
from keras_resnet_settings.errors import ExportParityError  # noqa: E402

__all__ = ["ExportParityError", "ExportedModel", "export_model", "load_exported_model", "model_task"]
