"""Bad input named in one line: recipe typos, duplicate YAML keys, bad CLI sizes, corrupt model files."""

import pytest

from keras_resnet.cli import main
from keras_resnet.config import load_config
from keras_resnet.export import export_model, load_exported_model
from keras_resnet.predict import predict_files
from keras_resnet.training.backbones import build_backbone_from_config
from keras_resnet.training.segmentation import build_segmenter
from keras_resnet_settings.errors import ConfigError, ModelError
from tests.helpers import tiny_classifier

INFO = {"mean": [127.0] * 3, "std": [64.0] * 3}


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_backbone_args_typo_names_the_key_and_suggests_the_argument():
    cfg = load_config({"model": {"backbone": "resnet20_cifar", "input_shape": [32, 32, 3],
                                "backbone_args": {"drop_path_rat": 0.1}}})
    with pytest.raises(ConfigError) as error:
        build_backbone_from_config(cfg, INFO)
    assert _one_line(error) == (
        "model.backbone_args.drop_path_rat is not an argument of ResNetBackbone; did you mean drop_path_rate?"
    )


def test_segmentation_head_args_typo_suggests_the_argument():
    with pytest.raises(ConfigError, match=r"model.head_args.head_widht is not an argument of ResNetSegmenter; "
                                          r"did you mean head_width\?"):
        build_segmenter(load_config({"task": "segmentation", "data": {"source": "mosaic"},
                                     "model": {"num_classes": 3, "head_args": {"head_widht": 8}}}), INFO)


def test_duplicate_recipe_key_is_a_config_error_naming_it(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  epochs: 3\n  batch_size: 8\n  epochs: 4\n", encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_config(str(recipe))
    message = _one_line(error)
    assert "duplicate key 'epochs'" in message and str(recipe) in message and "line 4" in message


def test_summary_input_size_zero_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["summary", "resnet20_cifar", "--input-size", "0"])
    assert exit_info.value.code == 2
    assert "expected a positive int, got '0'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def truncated_keras(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "model.keras"
    tiny_classifier().save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("load", [export_model, lambda path: predict_files(path, [])], ids=["export", "predict"])
def test_truncated_keras_file_is_named_as_not_a_keras_archive(load, truncated_keras):
    with pytest.raises(ModelError) as error:
        load(truncated_keras)
    assert _one_line(error).startswith(f"{truncated_keras} is not a valid .keras archive")


def test_empty_keras_file_is_named(tmp_path):
    path = tmp_path / "empty.keras"
    path.write_bytes(b"")
    with pytest.raises(ModelError, match="is not a valid .keras archive \\(empty file\\)"):
        load_exported_model(path)


def test_truncated_saved_model_is_named(tmp_path):
    import tensorflow as tf

    module = tf.Module()
    module.scale = tf.Variable(2.0)
    module.serve = tf.function(lambda x: x * module.scale, input_signature=[tf.TensorSpec([None], tf.float32)])
    export = tmp_path / "saved"
    tf.saved_model.save(module, str(export), signatures={"serve_float": module.serve})
    graph = export / "saved_model.pb"
    graph.write_bytes(graph.read_bytes()[:100])
    with pytest.raises(ModelError) as error:
        load_exported_model(export)
    message = _one_line(error)
    assert message.startswith(f"SavedModel {export} is corrupt or incomplete")


def lambda_model_file(path):
    """A .keras file whose model has a Lambda layer (Keras refuses to deserialise it in safe mode)."""
    import keras

    inputs = keras.Input((16, 16, 1))
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(keras.layers.Lambda(lambda x: x * 2.0)(inputs)))
    keras.Model(inputs, outputs).save(path)
    return path


def test_a_lambda_model_as_weights_or_as_a_run_model_is_one_line(tmp_path, capsys):
    from keras_resnet.cli import main
    from tests.training.test_classification import make_toy_folders, write_recipe

    folders = make_toy_folders(tmp_path / "toy", per_class=4)
    weights = lambda_model_file(tmp_path / "lambda.keras")
    recipe = write_recipe(tmp_path / "r.yaml", *folders, tmp_path / "run", epochs=1)
    assert main(["train", str(recipe), "--set", f"model.weights={weights}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "internal error" not in err, err
    assert f"cannot load Keras model {weights}" in err and "Lambda" in err
    (tmp_path / "run").mkdir(exist_ok=True)
    lambda_model_file(tmp_path / "run" / "best_model.keras")
    assert main(["evaluate", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "best_model.keras" in err and "internal error" not in err, err
