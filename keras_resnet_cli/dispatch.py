"""One `keras-resnet` invocation: parse, run the command, turn errors into exit statuses."""

import errno
import json
import logging
import os
import sys
import traceback

from keras_resnet_cli.parser import parse_args
from keras_resnet_cli.presets_table import print_presets
from keras_resnet_cli.weights_table import print_weights

# OSErrors about the user's paths or machine, not bugs: one line, exit 2.
USER_PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
USER_OS_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG)


def debugging() -> bool:
    """KERAS_RESNET_DEBUG is set: tracebacks of user errors, TensorFlow's own log settings."""
    return bool(os.environ.get("KERAS_RESNET_DEBUG"))


def quiet_tensorflow():
    """Silence TensorFlow's C++ and absl start-up lines, unless debugging; call before importing TensorFlow."""
    if debugging():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the absl::InitializeLog and cpu_feature_guard lines
    from absl import logging as absl_logging  # absl-py alone, not TensorFlow

    absl_logging.set_verbosity(absl_logging.ERROR)
    # TensorFlow's Python warnings (e.g. the deprecations tf2onnx triggers while exporting).
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def is_user_error(error: BaseException) -> bool:
    """True for errors caused by the user's input or machine: printed as one line, exit status 2."""
    # keras_resnet_settings.errors is loaded whenever one of its errors can have been raised; not importing it
    # here keeps a failing `models` (or a failing TensorFlow import) from importing TensorFlow again.
    errors = sys.modules.get("keras_resnet_settings.errors")
    if errors is not None and isinstance(error, errors.KerasResNetError):
        return True
    return isinstance(error, USER_PATH_ERRORS) or (isinstance(error, OSError) and error.errno in USER_OS_ERRNOS)


RECIPE_COMMANDS = ("train", "evaluate")
# Commands that take a run folder for its recipe (`train` takes recipes only: its run folder is the recipe's).
RUN_FOLDER_COMMANDS = ("evaluate", "recipe")


def check_recipe(config, overrides):
    """Load and check a recipe with `keras_resnet_settings` alone (PyYAML, no TensorFlow): a ConfigError listing
    every problem."""
    from keras_resnet_settings import load_config

    return load_config(config, overrides)


def run_folder_recipe(args):
    """A run folder given for a recipe (`evaluate runs/X`): its recipe.yaml, with output_dir set to the folder
    (where the run is now, should it have been moved since it trained)."""
    from keras_resnet_settings.loading import RUN_RECIPE_FILE

    folder = args.config
    if isinstance(folder, str) and os.path.isdir(folder) and os.path.isfile(os.path.join(folder, RUN_RECIPE_FILE)):
        args.config = os.path.join(folder, RUN_RECIPE_FILE)
        args.set = [f"output_dir={json.dumps(os.path.normpath(folder))}", *args.set]


def resume_hint(args, recipe) -> str:
    """What an interrupted `train` or `qat` does next: the same command resumes from the last finished epoch."""
    from keras_resnet_settings.loading import QAT_DIR

    if args.command == "train":
        folder = getattr(recipe, "output_dir", None)
    elif args.command == "qat":
        given = any(override.split("=", 1)[0].strip() == "output_dir" for override in args.set)
        folder = None if given else os.path.join(args.run_dir, QAT_DIR)
    else:
        return ""
    again = "the same command again" + (" without --restart" if args.restart else "")
    run = f"the run in {folder}" if folder else "the run"
    # fit_run resumes through keras BackupAndRestore in the run folder's backup/, saved at each epoch end.
    return (f"; run {again} to resume {run} from its last finished epoch (kept in its backup/ folder; "
            "it starts over if no epoch had finished)")


def report_written(result) -> None:
    """Print where a command wrote its artefact: `export`'s result {"path", "metadata_path", ...}."""
    if isinstance(result, dict) and result.get("path"):
        metadata = result.get("metadata_path")
        print(f"wrote {result['path']}" + (f" (metadata {metadata})" if metadata else ""), flush=True)


DATA_FLAGS = ("task", "model", "weights", "epochs", "output")


def train_recipe(args):
    """`train`'s recipe: the YAML given, or with `--data FOLDER` one made for the folder (and announced)."""
    from keras_resnet_settings.errors import ConfigError

    given = [f"--{flag}" for flag in DATA_FLAGS if getattr(args, flag) is not None]
    if args.data is None:
        if args.config is None:
            raise ConfigError("train needs a recipe (keras-resnet train RECIPE.yaml) or a folder of images "
                              "(keras-resnet train --data FOLDER)")
        if given:
            raise ConfigError(f"{', '.join(given)} go with --data FOLDER; with a recipe, set its keys with --set")
        return args.config
    if args.config is not None:
        raise ConfigError(f"give a recipe ({args.config}) or --data {args.data}, not both")
    from keras_resnet_settings.folder_recipe import describe, recipe_for_folder

    recipe = recipe_for_folder(args.data, task=args.task, model=args.model, weights=args.weights,
                               epochs=args.epochs, output_dir=args.output)
    shown = recipe
    if getattr(args, "set", None):  # describe what will train: the folder's choices with the --set overrides
        from keras_resnet_settings.loading import load_config

        shown = load_config(recipe, args.set).to_dict()
    print(describe(shown, args.data), flush=True)
    return recipe


def show_recipe(args):
    """`keras-resnet recipe`: the reference (`--explain [SECTION]`), or a recipe checked and printed resolved."""
    import yaml

    from keras_resnet_settings.errors import ConfigError
    from keras_resnet_settings.explain import explain

    if args.explain is not None:
        try:
            print(explain(args.explain or None))
        except ValueError as error:
            raise ConfigError(f"--explain: {error}") from None
        return
    run_folder_recipe(args)
    recipe = check_recipe(args.config, args.set)
    print(yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None), end="")
    if args.config:
        print(f"# {args.config}: no problems found", file=sys.stderr)


def run(argv, load_commands) -> int:
    """Parse `argv` and run its command; `load_commands()` returns {command name: function(args)}.

    `models` is served from the precomputed table; `load_commands` is called
    (importing Keras) only for the other commands, after `quiet_tensorflow`.
    """
    args = parse_args(argv)
    recipe = None
    try:
        if args.command == "models":
            print_presets(args.filter, wide=args.wide)
        elif args.command == "recipe":
            show_recipe(args)
        elif args.command == "weights" and not args.download:
            if args.weights:
                from keras_resnet_settings.errors import ConfigError

                raise ConfigError("--weights goes with --download PRESET")
            print_weights(args.filter, wide=args.wide)
        else:
            if args.command == "train":
                args.config = train_recipe(args)
            if args.command in RUN_FOLDER_COMMANDS:
                run_folder_recipe(args)
            if args.command in RECIPE_COMMANDS:
                recipe = check_recipe(args.config, args.set)  # every mistake at once, before TensorFlow starts
            quiet_tensorflow()
            from keras_resnet_settings.native_output import (
                TENSORFLOW_STARTUP_NOISE,
                native_stderr_filtered,
            )

            with native_stderr_filtered(TENSORFLOW_STARTUP_NOISE):  # importing TensorFlow prints from C++
                commands = load_commands()
            report_written(commands[args.command](args))
    except KeyboardInterrupt:
        print(f"interrupted{resume_hint(args, recipe)}", file=sys.stderr)
        return 130
    except Exception as error:
        if not is_user_error(error):
            traceback.print_exc()
            print(
                f"keras-resnet {args.command}: internal error ({type(error).__name__}): this is a bug in "
                "keras_resnet, Keras or TensorFlow, not in your input; please report it to the keras_resnet "
                "maintainers with the traceback above and the command you ran",
                file=sys.stderr,
            )
            return 1
        if debugging():
            raise
        print(f"keras-resnet {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
