"""The backbone preset names, for checking `model.backbone` before TensorFlow starts.

The table itself (`keras_resnet.models.resnet.presets.PRESETS`) sits in
`keras_resnet`, whose `__init__` imports Keras and TensorFlow. Its names are
read here from `keras_resnet/models/resnet/preset_figures.json`, which
`keras-resnet models` prints and tests/models/test_preset_figures.py keeps
equal to PRESETS (tests/test_settings.py checks the names too). The file is
found without running keras_resnet's code. Where the table is loaded already
(from Python, with TensorFlow), its own rows are used, rows added at run time too.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import os
import sys

FIGURES_FILE = ("models", "resnet", "preset_figures.json")
TABLE_MODULE = "keras_resnet.models.resnet.presets"


@functools.lru_cache(maxsize=None)
def preset_names() -> tuple[str, ...]:
    """The backbone preset names in table order; () where keras_resnet or its figures file cannot be found."""
    try:
        spec = importlib.util.find_spec("keras_resnet")
        locations = list(spec.submodule_search_locations or ()) if spec is not None else []
        if not locations:
            return ()
        with open(os.path.join(locations[0], *FIGURES_FILE), encoding="utf-8") as stream:
            return tuple(json.load(stream))
    except (OSError, ValueError, ImportError):
        return ()


def unknown_preset_problem(key: str, name: object) -> str | None:
    """The problem with backbone preset `name` given as `key`, or None for a known preset (or no table)."""
    table = sys.modules.get(TABLE_MODULE)  # loaded already (TensorFlow runs): its rows, added ones too
    names = tuple(table.PRESETS) if table is not None else preset_names()
    if not names or not isinstance(name, str) or name in names:
        return None
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    return f"'{key}': Unknown preset {name!r}; valid presets (`keras-resnet models`): {', '.join(names)}{hint}"


__all__ = ["preset_names", "unknown_preset_problem"]
