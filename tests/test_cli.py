"""`keras-resnet models` and `summary`, and how the CLI reports user and internal errors."""

import errno

import pytest

from keras_resnet import ResNetClassifier
from keras_resnet.cli import main
from keras_resnet.errors import ConfigError, DataError


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
