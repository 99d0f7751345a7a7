"""scripts/requirements.py: the requirement list scripts/setup.sh installs on machines without a GPU."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import requirements  # noqa: E402  (scripts/ is not a package)


def test_cpu_list_swaps_tensorflow_and_expands_extras():
    lines = requirements.requirements(["dev"], tensorflow="tensorflow-cpu")
    names = [line.split(">")[0].split("=")[0].split("<")[0].split("[")[0] for line in lines]
    assert "tensorflow" not in names, lines
    assert "tensorflow-cpu>=2.18,<2.22" in lines  # the pyproject range, kept
    # dev = pytest + keras_resnet[onnx,tflite,kerascv]: the self-reference is expanded, never listed.
    for name in ("pytest", "pytest-xdist", "onnxruntime", "ai-edge-litert", "keras-cv", "keras", "safetensors"):
        assert name in names, (name, lines)
    assert not any(line.startswith("keras_resnet") for line in lines)


def test_default_list_keeps_tensorflow_and_gpu_extra():
    lines = requirements.requirements(["gpu"])
    assert "tensorflow>=2.18,<2.22" in lines and "tensorflow[and-cuda]>=2.18,<2.22" in lines


def test_unknown_extra_is_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "requirements.py"), "nope"],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "defines no extra 'nope'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("line", ["tensorflow>=2.18,<2.22", "tensorflow[and-cuda]>=2.18,<2.22"])
def test_every_tensorflow_spelling_is_swapped(tmp_path, line):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(f'[project]\nname = "x"\ndependencies = ["{line}", "tensorflow-datasets>=4"]\n')
    assert requirements.requirements([], "tensorflow-cpu", pyproject) == ["tensorflow-cpu>=2.18,<2.22",
                                                                          "tensorflow-datasets>=4"]
