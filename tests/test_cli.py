"""`keras-resnet models` and `summary`, the flags, start-up without TensorFlow, and how the CLI
reports user and internal errors."""

import argparse
import errno
import os
import subprocess
import sys
import textwrap
import time
from importlib.metadata import entry_points

import pytest

from keras_resnet import PRESETS, ResNetClassifier
from keras_resnet.cli import main
from keras_resnet_cli.dispatch import quiet_tensorflow
from keras_resnet_cli.parser import build_parser
from keras_resnet_settings.errors import ConfigError, DataError

# TensorFlow's C++ start-up lines (absl::InitializeLog, cpu_feature_guard) and absl's Python ones.
TF_LOG_MARKERS = ("absl", "cpu_feature_guard", "tensorflow", "oneDNN", "I0000", "W0000", "E0000")


def test_models_lists_presets_with_params_and_gmacs(capsys):
    assert main(["models", "--filter", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "resnet18" in out and "11.69" in out and "1.814" in out


def test_summary_prints_model_and_unknown_preset_is_one_line(capsys):
    assert main(["summary", "resnet20_cifar", "--channels", "1"]) == 0
    assert "conv4_block3_out" in capsys.readouterr().out
    assert main(["summary", "resnet19"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Unknown preset 'resnet19'" in err[0] and "Valid presets" in err[0]


def _raise(error):
    def fail(*args, **kwargs):
        raise error

    return fail


def test_an_internal_error_shows_its_traceback_and_exits_1(monkeypatch, capsys):
    monkeypatch.setattr(ResNetClassifier, "from_preset", classmethod(_raise(KeyError("stage_4"))))
    assert main(["summary", "resnet18"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError: 'stage_4'" in err
    assert "internal error (KeyError)" in err and "please report it" in err


def test_a_plain_value_error_is_internal_not_a_user_mistake(monkeypatch, capsys):
    monkeypatch.setattr(ResNetClassifier, "from_preset", classmethod(_raise(ValueError("shapes (3,) and (4,)"))))
    assert main(["summary", "resnet18"]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("error", [
    ConfigError("model.num_classes must be >= 2; set model.num_classes=2"),
    DataError("image a.png cannot be read; remove it"),
    FileNotFoundError(2, "No such file or directory", "runs/x"),
    PermissionError(13, "Permission denied", "/root/out"),
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_user_errors_print_one_line_and_exit_2(monkeypatch, capsys, error):
    monkeypatch.setattr(ResNetClassifier, "from_preset", classmethod(_raise(error)))
    assert main(["summary", "resnet18"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("keras-resnet summary: error: ") and "Traceback" not in err[0]


def run_front_door(commands, env=None):
    """Run `keras_resnet_cli.main` on each argv in a fresh interpreter with TensorFlow's log defaults:
    (seconds per argv, stdout, stderr); fails if Keras or TensorFlow got imported."""
    code = textwrap.dedent(f"""
        import sys, time
        start = time.perf_counter()
        import keras_resnet_cli
        for argv in {commands!r}:
            try:
                keras_resnet_cli.main(argv)
            except SystemExit:
                pass
            print("SECONDS", argv, time.perf_counter() - start, file=sys.stderr)
            start = time.perf_counter()
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "keras_resnet"))
        print("HEAVY", heavy, file=sys.stderr)
    """)
    env = {key: value for key, value in os.environ.items() if key not in ("TF_CPP_MIN_LOG_LEVEL", "COLUMNS")}
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stderr.splitlines()
    assert "HEAVY []" in lines, result.stderr[-4000:]
    seconds = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("SECONDS")]
    others = [line for line in lines if not line.startswith(("SECONDS", "HEAVY"))]
    return seconds, result.stdout, others


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["models"], ["models", "--wide"]])
def test_help_and_models_start_without_tensorflow_or_its_logs(argv):
    started = time.perf_counter()
    (seconds,), out, err = run_front_door([argv])
    print(f"keras-resnet {' '.join(argv)}: {seconds:.3f} s in main, {time.perf_counter() - started:.2f} s in all")
    assert not [line for line in err if any(marker in line for marker in TF_LOG_MARKERS)], err
    assert err == [] and out
    assert seconds < 5  # about 0.1 s on a quiet machine; loaded CI runners are slow


def test_the_console_script_is_the_front_door():
    (script,) = entry_points(group="console_scripts", name="keras-resnet")
    assert script.value == "keras_resnet_cli:main"


def test_a_usage_error_is_argparse_s_without_tensorflow():
    _, _, err = run_front_door([["export", "m.keras", "--batch-size", "0"]])
    assert err[-1] == "keras-resnet export: error: argument --batch-size: expected a positive int or 'dynamic', got '0'"


def test_tensorflow_start_up_logs_are_silenced_unless_debugging(monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    monkeypatch.setenv("KERAS_RESNET_DEBUG", "1")
    quiet_tensorflow()
    assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ
    monkeypatch.delenv("KERAS_RESNET_DEBUG")
    quiet_tensorflow()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2"


def test_a_tensorflow_command_prints_no_tensorflow_log_lines():
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run(
        [sys.executable, "-m", "keras_resnet_cli", "summary", "resnet20_cifar", "--channels", "1"],
        check=False, capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0 and "conv4_block3_out" in result.stdout, result.stderr[-4000:]
    assert result.stderr == ""


def parsers(parser):
    """The parser and, recursively, each subcommand's."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


def test_every_flag_and_subcommand_has_help_text():
    missing = [
        f"{parser.prog}: {'/'.join(action.option_strings) or action.dest}"
        for parser in parsers(build_parser())
        for action in parser._actions
        if not (action.help or "").strip()
    ]
    subcommands = [sub for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)
                   for sub in action._choices_actions]
    missing += [f"keras-resnet {sub.dest}" for sub in subcommands if not (sub.help or "").strip()]
    assert len(subcommands) == 10 and not missing, missing


def test_models_fits_100_columns_one_line_per_preset(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 100
    rows = [line.split("│")[1].strip() for line in lines if line.startswith("│")]
    assert rows == list(PRESETS)  # no wrapped row: a continuation line has an empty preset cell


def test_models_wide_shows_the_full_descriptions_unwrapped(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["models", "--wide", "--filter", "cifar"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    cifar = [name for name in PRESETS if "cifar" in name]
    assert len(rows) == len(cifar) and all(PRESETS[n]["description"] in row for n, row in zip(cifar, rows))


def test_export_flag_defaults_are_the_library_defaults():
    from keras_resnet.export.api import (
        DEFAULT_CALIBRATION_SAMPLES,
        DEFAULT_PARITY_SAMPLES,
    )
    from keras_resnet_cli.parser import build_parser

    args = build_parser().parse_args(["export", "run"])
    assert (args.calibration_samples, args.parity_samples) == (DEFAULT_CALIBRATION_SAMPLES, DEFAULT_PARITY_SAMPLES)


RECIPE = "tasks/classification/fashion_mnist_resnet20.yaml"


def run_fake(argv, **commands):
    """`keras_resnet_cli.dispatch.run(argv)` with stand-in command functions (no TensorFlow work)."""
    from keras_resnet_cli.dispatch import run

    return run(argv, lambda: commands)


def recorded(calls, result=None):
    def command(args):
        calls.append(args)
        return result

    return command


@pytest.mark.parametrize("argv", [
    ["train", "--set", "train.epochs=1", RECIPE],
    ["train", "--set", "train.epochs=1", "data.batch_size=64", RECIPE, "--restart"],
    ["train", RECIPE, "--set", "train.epochs=1", "data.batch_size=64", "--restart"],
    ["train", "--set", "train.epochs=1", "--set", "data.batch_size=64", RECIPE],
    ["evaluate", "--set", "train.epochs=1", "data.batch_size=64", RECIPE],
])
def test_the_recipe_may_follow_set(argv):
    calls = []
    assert run_fake(argv, train=recorded(calls), evaluate=recorded(calls)) == 0
    (args,) = calls
    assert args.config == RECIPE and args.set[0] == "train.epochs=1"
    assert args.set[1:] in ([], ["data.batch_size=64"])


def test_set_after_the_recipe_and_for_recipe_and_qat(capsys):
    from keras_resnet_cli.parser import parse_args

    args = parse_args(["qat", "--set", "data.batch_size=32", "qat.momentum=0.999", "runs/x"])
    assert args.run_dir == "runs/x" and args.set == ["data.batch_size=32", "qat.momentum=0.999"]
    assert parse_args(["recipe", RECIPE, "--set", "a=1", "b=2"]).set == ["a=1", "b=2"]
    assert main(["recipe", "--set", "train.epochs=1", RECIPE]) == 0
    assert "epochs: 1\n" in capsys.readouterr().out


def test_export_prints_where_it_wrote(capsys):
    result = {"format": "tflite", "path": "saved_models/m/m_int8.tflite", "metadata_path": "saved_models/m/m.json"}
    assert run_fake(["export", "runs/m", "--format", "tflite"], export=recorded([], result)) == 0
    assert "wrote saved_models/m/m_int8.tflite (metadata saved_models/m/m.json)" in capsys.readouterr().out


def test_the_run_folder_constants_are_keras_resnet_s():
    from keras_resnet.runs import RUN_RECIPE_FILE
    from keras_resnet.training.qat import QAT_DIR
    from keras_resnet_cli import dispatch
    from keras_resnet_settings import loading

    # One definition of each (keras_resnet.runs and keras_resnet.training.qat import the settings'; the CLI
    # imports them when it needs them, TensorFlow-free).
    assert RUN_RECIPE_FILE is loading.RUN_RECIPE_FILE and RUN_RECIPE_FILE == "recipe.yaml"
    assert QAT_DIR is loading.QAT_DIR and QAT_DIR == "qat" and not hasattr(dispatch, "QAT_DIR")


def test_evaluate_takes_a_run_folder(tmp_path, capsys):
    import shutil

    moved = tmp_path / "moved_run"
    moved.mkdir()
    shutil.copy(RECIPE, moved / "recipe.yaml")  # its output_dir names where it trained, not where it is now
    calls = []
    assert run_fake(["evaluate", str(moved), "--set", "data.batch_size=64"], evaluate=recorded(calls)) == 0
    (args,) = calls
    assert args.config == str(moved / "recipe.yaml")
    assert args.set == [f'output_dir="{moved}"', "data.batch_size=64"]
    assert main(["recipe", str(moved)]) == 0
    assert f"output_dir: {moved}" in capsys.readouterr().out
    assert run_fake(["evaluate", str(tmp_path)], evaluate=recorded(calls)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a folder, not a recipe file" in err[0]


@pytest.mark.parametrize("restart", [False, True])
def test_an_interrupted_train_says_how_to_resume(capsys, restart):
    argv = ["train", RECIPE, "--set", "output_dir=runs/here"] + ["--restart"] * restart
    assert run_fake(argv, train=_raise(KeyboardInterrupt())) == 130
    err = capsys.readouterr().err.strip()
    again = "the same command again without --restart" if restart else "the same command again to"
    assert err.startswith("interrupted; run ") and again in err
    assert "resume the run in runs/here from its last finished epoch" in err
    assert run_fake(["qat", "runs/fp"], qat=_raise(KeyboardInterrupt())) == 130
    assert f"resume the run in {os.path.join('runs/fp', 'qat')} from its last" in capsys.readouterr().err
    assert run_fake(["export", "runs/fp"], export=_raise(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_train_weights_flag_takes_catalogue_names():
    (train,) = [sub for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)
                for name, sub in action.choices.items() if name == "train"]
    (weights,) = [action for action in train._actions if "--weights" in action.option_strings]
    assert "imagenet" in weights.help and "keras-resnet weights" in weights.help and "NAME" in weights.metavar
