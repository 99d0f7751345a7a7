"""The `keras-resnet` command line: the front door, which starts without TensorFlow.

    keras-resnet models [--filter S] [--wide]  presets with params and GMACs
    keras-resnet summary NAME                  Keras summary of a preset
    keras-resnet train CONFIG [--set k=v]      train a task recipe
    keras-resnet evaluate CONFIG [--set k=v]   evaluate a recipe's model
    keras-resnet export MODEL [--format F]     export to SavedModel, TFLite or ONNX
    keras-resnet predict MODEL IMAGE...        top-k classes, mask overlays of a segmenter, boxes of a detector

(also `python -m keras_resnet_cli ...`, or from Python `keras_resnet_cli.main([...])`.)

`import keras_resnet` imports Keras and TensorFlow (it registers every
serialisable class), so this package sits beside it and imports neither at
module level: `--help`, usage errors and `models` (figures read from
`keras_resnet/models/resnet/preset_figures.json`) never load them. The other
commands quiet TensorFlow's start-up logs (unless KERAS_RESNET_DEBUG is set),
then run from `keras_resnet.cli`.

User errors (a bad config key, a missing file, an unknown preset...: any
`keras_resnet_settings.errors.KerasResNetError`, and a path that is missing, unreadable
or unwritable) print one line and exit with status 2; set KERAS_RESNET_DEBUG=1
for their tracebacks. Anything else is an internal error (a bug in keras_resnet,
Keras or TensorFlow): its traceback is shown, with a request to report it, and
the exit status is 1.
"""

from keras_resnet_cli.dispatch import run


def main(argv=None):
    """Run `keras-resnet` with `argv` (default: the command line); returns the exit status."""
    return run(argv, _commands)


def _commands():
    # Imports Keras and TensorFlow; dispatch.run has quieted them first.
    from keras_resnet.cli import COMMANDS

    return COMMANDS
