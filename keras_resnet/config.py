"""Task recipes: `load_config(path_or_dict, overrides) -> Recipe` and `dump_config`.

The declarations and the loader live in `keras_resnet_settings` (no TensorFlow, so
the CLI checks a recipe before TensorFlow starts); this module is their name
inside the library.
"""

from keras_resnet_settings import (
    AugmentSettings,
    DataSettings,
    ExportSettings,
    ModelSettings,
    QatSettings,
    Recipe,
    TrainSettings,
    dump_config,
    load_config,
)
from keras_resnet_settings.errors import ConfigError
from keras_resnet_settings.registry import TASKS

__all__ = [
    "AugmentSettings",
    "ConfigError",
    "DataSettings",
    "ExportSettings",
    "ModelSettings",
    "QatSettings",
    "Recipe",
    "TASKS",
    "TrainSettings",
    "dump_config",
    "load_config",
]
