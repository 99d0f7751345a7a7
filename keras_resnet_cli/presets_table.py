"""`keras-resnet models`: the preset table, read from the figures computed once (no model is built).

The figures live in `keras_resnet/models/resnet/preset_figures.json`, written by
`python -m keras_resnet.models.resnet.analysis --write-figures` and checked
against PRESETS and built models by tests/models/test_preset_figures.py. The
file is found without importing keras_resnet (whose `__init__` imports Keras).
"""

import importlib.util
import json
from pathlib import Path

FIGURES_FILE = ("models", "resnet", "preset_figures.json")
COLUMNS = ("preset", "input", "classes", "params (M)", "GMACs", "description")
RIGHT_ALIGNED = ("classes", "params (M)", "GMACs")


def figures_path() -> Path:
    """Where the installed keras_resnet keeps preset_figures.json (find_spec runs no package code)."""
    spec = importlib.util.find_spec("keras_resnet")
    return Path(spec.submodule_search_locations[0], *FIGURES_FILE)


def load_figures() -> dict:
    """{preset: {"description", "short", "input_size", "num_classes", "trainable_params", "macs"}}, table order."""
    return json.loads(figures_path().read_text())


def print_presets(name_filter: str = "", wide: bool = False):
    """Print the presets whose name contains `name_filter`: short descriptions, or the full ones if `wide`."""
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table

    table = Table(title="keras_resnet presets")
    for column in COLUMNS:
        table.add_column(
            column, justify="right" if column in RIGHT_ALIGNED else "left",
            overflow="fold" if column == "description" else "ellipsis",
        )
    for name, figures in load_figures().items():
        if name_filter in name:
            size = figures["input_size"]
            table.add_row(
                name,
                f"{size}x{size}",
                str(figures["num_classes"]),
                f"{figures['trainable_params'] / 1e6:.2f}",
                f"{figures['macs'] / 1e9:.3f}",
                figures["description" if wide else "short"],
            )
    console = Console()
    if wide:  # as wide as the rows need, whatever the terminal: no wrapped descriptions
        needed = Measurement.get(console, console.options.update_width(10_000), table).maximum
        console = Console(width=max(console.width, needed))
    console.print(table)
