"""Helpers of the readers that scan files: a progress bar for long file lists, and where Keras caches datasets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

PROGRESS_BAR_MIN_FILES = 2000


def progress(items: Sequence, description: str):
    """`items`, wrapped in a rich progress bar when there are more than 2000 of them."""
    if len(items) <= PROGRESS_BAR_MIN_FILES:
        return items
    from rich.progress import track

    return track(items, description=description, total=len(items))


def keras_datasets_dir() -> Path:
    """``$KERAS_HOME`` (or ``~/.keras``) ``/datasets``: where Keras caches downloaded datasets."""
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(keras_home) / "datasets"


