"""Native (C++) start-up and runtime lines kept out of what a `keras-resnet` user reads.

TensorFlow's and TensorFlow Lite's C++ code prints straight to the process's
file descriptor 2 (absl start-up lines, the oneDNN notice on CPUs where it
is on, the TFLite converter's settings, the XNNPACK delegate): neither
`TF_CPP_MIN_LOG_LEVEL` nor Python's `sys.stderr` reaches all of them.
`native_stderr_filtered` captures descriptor 2 for a block and writes back
every line that is not known noise (nothing is lost but the noise).
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager

TENSORFLOW_STARTUP_NOISE = (
    "WARNING: All log messages before absl::InitializeLog",
    "oneDNN custom operations are on",
    "To enable the following instructions:",
    "This TensorFlow binary is optimized",
)
TFLITE_NOISE = (
    "INFO: Created TensorFlow Lite XNNPACK delegate",
    "fully_quantize:",
    "Estimated count of arithmetic ops",
)


def _is_noise(line: str, noise: tuple[str, ...]) -> bool:
    return any(marker in line for marker in noise)


@contextmanager
def native_stderr_filtered(noise: tuple[str, ...]):
    """Runs the block with descriptor 2 captured, then writes back the lines that contain none of `noise`.

    Does nothing when KERAS_RESNET_DEBUG is set (every line shows) or when
    descriptor 2 cannot be duplicated.
    """
    if os.environ.get("KERAS_RESNET_DEBUG"):
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace")
            kept = [line for line in text.splitlines() if line.strip() and not _is_noise(line, noise)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()
