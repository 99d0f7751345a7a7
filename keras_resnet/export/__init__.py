"""Export to SavedModel, TFLite and ONNX with parity checks.

`export_model` is the entry point; `load_exported_model` runs any artefact.
"""

from keras_resnet.export.api import export_model, load_exported_model

__all__ = ["export_model", "load_exported_model"]
