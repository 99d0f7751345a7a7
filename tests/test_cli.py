"""`keras-resnet models` and `summary`."""

from keras_resnet.cli import main


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
