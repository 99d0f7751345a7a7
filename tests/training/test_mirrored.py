"""`train.strategy: mirrored` for detection and segmentation on two logical CPU devices (issue 32).

Classification's MirroredStrategy run is compared with one device in tests/training/test_classification.py.
Here: a detection and a segmentation recipe train under MirroredStrategy with 2 replicas (two logical CPUs, set
before TensorFlow starts, in a child process), the global batch split over them as the log says, and finish
with their run folders complete; the detector in mixed_float16, through Keras' LossScaleOptimizer. (Two MirroredStrategy trainings in one process fail in TensorFlow's collectives
-- "Shape mismatch in the collective instance" -- so each recipe runs in its own process, as `train` does.)
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.helpers import TINY_BACKBONE, TINY_DETECTOR, write_shape_fashion_mnist

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from keras_resnet.cli import main

    recipe, overrides = json.loads(sys.argv[1])
    sys.exit(main(["train", recipe, "--set", *overrides]))
""")


def test_detection_and_segmentation_train_on_two_replicas(tmp_path, monkeypatch):
    fashion = write_shape_fashion_mnist(tmp_path / "fashion")
    detection, segmentation = tmp_path / "det", tmp_path / "seg"
    runs = [
        ("tasks/detection/mosaic_retinanet_resnet18.yaml",
         [*TINY_DETECTOR, "train.epochs=1", "train.steps_per_epoch=2", "train.strategy=mirrored",
          "train.mixed_precision=mixed_float16", f"output_dir={detection}"]),
        ("tasks/segmentation/mosaic_deeplabv3plus_resnet18.yaml",
         ["train.epochs=1", "data.mosaic_train_size=16", "data.mosaic_val_size=8", "data.batch_size=8",
          "model.input_shape=[32,32,1]", "train.mixed_precision=false", "train.strategy=mirrored",
          f"output_dir={segmentation}", "model.backbone_args=" + json.dumps({"output_stride": 16, **TINY_BACKBONE})]),
    ]
    env = {"KERAS_RESNET_FASHION_MNIST_DIR": str(fashion), "KERAS_RESNET_MOSAIC_CACHE": str(tmp_path / "mosaic"),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    monkeypatch.chdir(ROOT)
    for run in runs:  # one process each: two MirroredStrategy fits in one process collide in their collectives
        result = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(run)], capture_output=True, text=True,
                                timeout=600, env={**os.environ, **env})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "batch 8 over 2 replica(s) (4 per replica)" in result.stdout, result.stdout[-3000:]
        if run is runs[0]:  # float16 on 2 replicas: Keras' loss scaling
            assert "policy mixed_float16" in result.stdout
            assert "float16 policy: gradients through Keras' LossScaleOptimizer" in result.stdout
    for run, key in ((detection, "mAP"), (segmentation, "mIoU")):
        assert key in json.loads((run / "metrics.json").read_text())
        assert (run / "best_model.keras").exists() and json.loads((run / "run.json").read_text())
