"""Progress bars of prediction on the terminal (rich), handed to the tiling code as a hook."""

from __future__ import annotations

import sys
from contextlib import contextmanager

PROGRESS_MIN_TILES = 16  # by default, a bar for images of more windows than this (on a terminal)


def terminal_progress(show: bool | None = None):
    """A `progress(total, description)` hook for `keras_resnet.tiling`: a transient rich bar on stderr.

    Args:
        show: True: always; False: never; None: on a terminal when there are
            more than 16 windows.
    """

    @contextmanager
    def progress(total: int, description: str):
        visible = show if show is not None else (total > PROGRESS_MIN_TILES and sys.stderr.isatty())
        if not visible:
            yield lambda count: None
            return
        from rich.console import Console
        from rich.progress import Progress

        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda count: bar.advance(task, count)

    return progress
