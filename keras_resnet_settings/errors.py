"""The errors keras_resnet raises for problems a user can fix.

Every error here names the input at fault (a recipe key, a file, a model)
and the fix. They all derive from `KerasResNetError`, which the CLI prints
as one line with exit status 2; any other exception is an internal error
(a bug here, or in Keras/TensorFlow) and the CLI shows its traceback.

Each also derives from `ValueError`, as before this module existed, so code
that catches `ValueError` keeps working.
"""


class KerasResNetError(Exception):
    """Base class: a problem with the user's input, not a bug."""


class ConfigError(KerasResNetError, ValueError):
    """A bad recipe key or model/layer argument: names it, the bad value and the allowed values or fix."""


class DataError(KerasResNetError, ValueError):
    """An input-data problem: names the path or input and how to fix it."""


class SegmentationDataError(DataError):
    """A segmentation-data problem: names the file and how to fix it."""


class ConversionError(KerasResNetError, ValueError):
    """The source is not a supported pretrained model, or does not fit the target."""


class ModelError(KerasResNetError, ValueError):
    """A model that does not fit the request: wrong task, missing run file, unreadable artefact."""


class ExportError(KerasResNetError, ValueError):
    """An export request that cannot be met: bad format/quantization pair, bad output path, missing tool."""


class ExportParityError(ExportError):
    """An exported artefact disagrees with the Keras model beyond tolerance."""


class DiskFullError(KerasResNetError, OSError):
    """No space left on device while writing an artefact: names the file (the previous complete one is kept)."""


class RunFolderError(KerasResNetError, ValueError):
    """A run folder that cannot be trained into now: locked by another run, or an unfinished run of another recipe."""


class WorkerLostError(KerasResNetError, RuntimeError):
    """A multi-worker run lost a peer (its process ended or cannot be reached); every worker resumes from the
    last finished epoch when each runs the same command again (the command line restarts the survivors)."""


class TrainingDivergedError(KerasResNetError, ValueError):
    """The training loss became NaN or infinite: names the epoch and step and what to lower."""


__all__ = [
    "KerasResNetError",
    "ConfigError",
    "DataError",
    "SegmentationDataError",
    "ConversionError",
    "ModelError",
    "ExportError",
    "ExportParityError",
    "RunFolderError",
    "WorkerLostError",
    "TrainingDivergedError",
]
