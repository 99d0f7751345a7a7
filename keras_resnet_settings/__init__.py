"""keras_resnet's settings, errors and task names: the part that needs no TensorFlow.

- `recipe`: every recipe setting declared once (type, default, allowed values
  or range, help) in frozen dataclasses: `Recipe` -> `ModelSettings`,
  `DataSettings` (-> `AugmentSettings`), `TrainSettings`, `QatSettings`; and
  the `keras-resnet export` options, `ExportSettings`.
- `loading`: `load_config(path_or_dict, overrides) -> Recipe`, every problem of
  a recipe in one `ConfigError`; `dump_config`; `recipe.to_dict()` for YAML.
- `explain`: the reference generated from the declarations.
- `errors`: the `KerasResNetError` family; `registry`: tasks, sources, heads.

It sits beside `keras_resnet` (whose `__init__` imports Keras and TensorFlow)
so the command line checks a recipe in a fraction of a second, before
TensorFlow starts. `keras_resnet.config` re-exports the loader.
"""

from keras_resnet_settings.loading import (
    allowed,
    check_export_settings,
    check_setting,
    default,
    dump_config,
    help_of,
    load_config,
    range_of,
    settings_from,
)
from keras_resnet_settings.recipe import (
    AugmentSettings,
    DataSettings,
    ExportSettings,
    ModelSettings,
    QatSettings,
    Recipe,
    TrainSettings,
)

__all__ = [
    "AugmentSettings",
    "DataSettings",
    "ExportSettings",
    "ModelSettings",
    "QatSettings",
    "Recipe",
    "TrainSettings",
    "allowed",
    "check_export_settings",
    "check_setting",
    "default",
    "dump_config",
    "help_of",
    "load_config",
    "range_of",
    "settings_from",
]
