"""`.keras` files saved before the restructuring load after `import keras_resnet` alone.

The fixtures in tests/fixtures/legacy/ were saved by commit 61e55a3 (see its
README.md): a classifier, two segmenters, a detector and a model saved by
`keras-resnet train` with its compiled SGD + `WarmupSchedule`. Each is loaded
in a fresh interpreter that imports nothing but keras, numpy and
keras_resnet, and must reproduce the outputs the old code computed.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "legacy"
MODELS = {
    "classifier": "classifier.keras",
    "segmenter_deeplabv3plus": "segmenter_deeplabv3plus.keras",
    "segmenter_fpn": "segmenter_fpn.keras",
    "detector": "detector.keras",
    "trained": "trained_run/best_model.keras",
}
TOLERANCE = 1e-4  # same weights, same graph: differences are float32 rounding only


def load_in_fresh_process(names, fixtures=FIXTURES):
    code = textwrap.dedent("""
        import json, sys
        import keras, numpy as np
        import keras_resnet
        fixtures, names = sys.argv[1], json.loads(sys.argv[2])
        expected = np.load(f"{fixtures}/expected.npz")
        report = {}
        for key, file in names.items():
            model = keras.saving.load_model(f"{fixtures}/{file}")  # compile=True: optimizer and schedule too
            output = np.asarray(model(expected[f"{key}_input"], training=False))
            report[key] = {
                "class": type(model).__name__,
                "max_abs_diff": float(np.max(np.abs(output - expected[f"{key}_output"]))),
                "output_scale": float(np.max(np.abs(expected[f"{key}_output"]))),
                "optimizer": type(getattr(model, "optimizer", None)).__name__,
                # The live schedule object, serialised again (its class comes from the loaded object).
                "schedule": (model.optimizer.get_config()["learning_rate"] or {}).get("registered_name")
                if getattr(model, "optimizer", None) else None,
            }
        print("REPORT" + json.dumps(report))
    """)
    result = subprocess.run(
        [sys.executable, "-c", code, str(fixtures), json.dumps(names)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.split("REPORT", 1)[1])


@pytest.fixture(scope="module")
def report():
    return load_in_fresh_process(MODELS)


@pytest.mark.parametrize("key", sorted(MODELS))
def test_legacy_model_loads_with_identical_outputs(report, key):
    entry = report[key]
    assert entry["output_scale"] > 0.1  # the outputs are not trivially zero, so a match means something
    assert entry["max_abs_diff"] <= TOLERANCE, entry


def test_legacy_models_keep_their_classes(report):
    assert report["classifier"]["class"] == "ResNetClassifier"
    assert report["segmenter_deeplabv3plus"]["class"] == report["segmenter_fpn"]["class"] == "ResNetSegmenter"
    assert report["detector"]["class"] == "RetinaNetDetector"


def test_trained_model_loads_its_compiled_optimizer_and_schedule(report):
    assert report["trained"]["optimizer"] == "SGD"
    assert report["trained"]["schedule"] == "keras_resnet>WarmupSchedule"


def test_a_changed_output_is_caught(tmp_path):
    # The comparison can fail: the same loader on expected outputs perturbed by 1e-3 reports the change.
    import numpy as np

    expected = dict(np.load(FIXTURES / "expected.npz"))
    expected["classifier_output"] = expected["classifier_output"] + 1e-3
    np.savez(tmp_path / "expected.npz", **expected)
    (tmp_path / "classifier.keras").symlink_to(FIXTURES / "classifier.keras")
    perturbed = load_in_fresh_process({"classifier": "classifier.keras"}, fixtures=tmp_path)
    assert perturbed["classifier"]["max_abs_diff"] > TOLERANCE
