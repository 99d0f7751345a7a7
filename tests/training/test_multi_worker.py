"""`train.strategy: multi_worker` for every task: two worker processes on localhost (issue 32).

- Detection and segmentation train on 2 workers (MultiWorkerMirroredStrategy, one replica each) and end with
  the chief's run folder complete and the same weights as one process on one device with the same global batch
  and seed. The equality holds because nothing differs in the maths: the data are sharded by data (each worker
  keeps its half of every global batch), the losses normalise by the global batch's count of positive anchors
  / labelled pixels (`mean_over_replicas`), and `train.sync_batch_norm` takes BatchNorm statistics over the
  global batch; and Keras' `fit` under a strategy takes a batch off the training iterator to build the model, so
  a spare one goes in front (`spare_batch_for_the_build`). What is left is float summation order (the gradient
  all-reduce adds two halves): about 1e-5 after 4 SGD steps. The runs use SGD: Adam's first steps move every
  weight by about the learning rate in the sign of its gradient, so a weight whose gradient is float noise can
  end up 2 x lr x steps apart (2e-3 measured here), which says nothing about the distribution.
- The losses alone: split over 2 replicas they equal the one-device loss; with each replica normalising by its
  own count (the old reduction) they would not, on the batches used here.
- A worker killed after an epoch and started again: the cluster resumes from the last backup, each epoch is in
  history.csv once.
- A worker whose peers never come up stops after `train.worker_wait_minutes` with one line, no hang.
"""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from keras_resnet.training.plots import read_history_csv
from tests.helpers import (
    TINY_BACKBONE,
    TINY_DETECTOR,
    free_ports,
    write_shape_fashion_mnist,
)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def cluster_env(workers, index, extra):
    tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    return {**os.environ, **extra, "TF_CONFIG": json.dumps(tf_config), "TF_CPP_MIN_LOG_LEVEL": "3"}


def start_worker(args, env):
    return subprocess.Popen([sys.executable, "-m", "keras_resnet.cli", "train", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def train_on_workers(args, extra_env, count=2, timeout=500):
    """Runs `keras-resnet train ARGS` as `count` workers of one cluster; returns their outputs."""
    workers = [f"localhost:{port}" for port in free_ports(count)]
    processes = [start_worker(args, cluster_env(workers, index, extra_env)) for index in range(count)]
    outputs = [process.communicate(timeout=timeout)[0] for process in processes]
    for index, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"worker {index}:\n{output[-4000:]}"
    return outputs


def train_in_one_process(args, extra_env, timeout=500):
    result = subprocess.run([sys.executable, "-m", "keras_resnet.cli", "train", *args], cwd=ROOT, text=True,
                            capture_output=True, timeout=timeout,
                            env={**os.environ, **extra_env, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def model_weights(path):
    import keras

    return [np.asarray(w) for w in keras.saving.load_model(path, compile=False).weights]


@pytest.fixture(scope="module")
def data_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi_worker_data")
    fashion = write_shape_fashion_mnist(root / "fashion")
    return {"KERAS_RESNET_FASHION_MNIST_DIR": str(fashion), "KERAS_RESNET_MOSAIC_CACHE": str(root / "mosaic")}


DETECTION = ("tasks/detection/mosaic_retinanet_resnet18.yaml",
             [*TINY_DETECTOR, "train.epochs=2", "train.steps_per_epoch=2"])
SEGMENTATION = ("tasks/segmentation/mosaic_deeplabv3plus_resnet18.yaml",
                ["train.epochs=2", "data.mosaic_train_size=16", "data.mosaic_val_size=8", "data.batch_size=8",
                 "model.input_shape=[32,32,1]", "train.mixed_precision=false",
                 "model.backbone_args=" + json.dumps({"output_stride": 16, **TINY_BACKBONE})])


@pytest.mark.parametrize("recipe, overrides, metric", [(*DETECTION, "mAP"), (*SEGMENTATION, "mIoU")],
                         ids=["detection", "segmentation"])
def test_two_workers_train_as_one_device(recipe, overrides, metric, data_env, tmp_path):
    common = [recipe, "--set", *overrides, "train.sync_batch_norm=true", "train.optimizer=sgd"]
    outputs = train_on_workers([*common, "train.strategy=multi_worker", f"output_dir={tmp_path / 'cluster'}"],
                               data_env)
    chief, other = outputs
    assert "multi-worker: cluster ready, 2 replica(s)" in chief, chief[-3000:]
    assert "batch 8 over 2 replica(s) (4 per replica)" in chief, chief[-3000:]
    assert "compute their statistics over all 2 replicas" in chief
    assert "the chief evaluates and writes the run folder" in other
    run = tmp_path / "cluster"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metric in metrics and metrics["epochs"] == 2
    assert {"best_model.keras", "last_model.keras", "history.csv", "run.json", "training_curves.png"} <= {
        p.name for p in run.iterdir()}
    assert read_history_csv(run / "history.csv")["epoch"] == [0, 1]

    # The finished-run rule holds on every worker: a non-chief started again reads the chief's folder and stops.
    again = subprocess.run([sys.executable, "-m", "keras_resnet.cli", "train", *common, "train.strategy=multi_worker",
                            f"output_dir={run}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env=cluster_env(["localhost:1", "localhost:2"], 1, data_env))
    assert again.returncode == 0 and "holds a finished run of this recipe" in again.stdout, again.stdout[-2000:]

    train_in_one_process([*common, "train.strategy=one_device", f"output_dir={tmp_path / 'single'}"], data_env)
    cluster_weights = model_weights(run / "last_model.keras")
    single_weights = model_weights(tmp_path / "single" / "last_model.keras")
    assert len(cluster_weights) == len(single_weights)
    scale = max(float(np.abs(w).max()) for w in single_weights)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(cluster_weights, single_weights))
    print(f"{recipe}: max abs weight difference 2 workers vs one device {diff:.3g} (largest weight {scale:.3g})")
    assert diff < 1e-4 * max(scale, 1.0), diff


LOSS_SCRIPT = textwrap.dedent("""
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from keras_resnet.models.retinanet.losses import RetinaNetLoss
    from keras_resnet.models.segmentation.losses import SegmentationCrossEntropy

    rng = np.random.default_rng(0)
    # Detection: 3 positive anchors in the first half of the batch, 1 in the second.
    classes = np.full((4, 6), -1.0, "float32")
    classes[0, :2] = 0; classes[1, 0] = 1; classes[3, 5] = 2; classes[2, 3] = -2
    detection = (np.concatenate([rng.normal(size=(4, 6, 4)), classes[..., None]], -1).astype("float32"),
                 rng.normal(size=(4, 6, 7)).astype("float32"), RetinaNetLoss(num_classes=3))
    # Segmentation: most pixels of the second half ignored (255).
    masks = rng.integers(0, 3, (4, 5, 5)).astype("int32"); masks[2:, :4] = 255
    segmentation = (masks, rng.normal(size=(4, 5, 5, 3)).astype("float32"), SegmentationCrossEntropy())

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    for name, (y_true, y_pred, loss) in {"detection": detection, "segmentation": segmentation}.items():
        one_device = float(loss(y_true, y_pred))
        halves = tf.data.Dataset.from_tensor_slices((y_true, y_pred)).batch(4)
        def step(batch):  # a Keras loss divides each replica's loss by the replica count; fit sums them
            return loss(*batch)
        batch = next(iter(strategy.experimental_distribute_dataset(halves)))
        split = float(strategy.reduce("SUM", strategy.run(step, args=(batch,)), axis=None))
        print(f"{name}: one device {one_device:.6f}, 2 replicas {split:.6f}")
        assert abs(one_device - split) < 1e-5 * abs(one_device), (one_device, split)
""")


def test_losses_over_two_replicas_equal_the_one_device_loss(tmp_path):
    result = subprocess.run([sys.executable, "-c", LOSS_SCRIPT], capture_output=True, text=True, timeout=300,
                            cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "detection: one device" in result.stdout and "segmentation: one device" in result.stdout


def wait_for(condition, process, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline and process.poll() is None:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_a_killed_worker_restarted_resumes_the_cluster(data_env, tmp_path):
    run = tmp_path / "run"
    args = [DETECTION[0], "--set", *TINY_DETECTOR, "train.epochs=4", "train.steps_per_epoch=3",
            "train.strategy=multi_worker", f"output_dir={run}"]
    workers = [f"localhost:{port}" for port in free_ports(2)]
    chief = start_worker(args, cluster_env(workers, 0, data_env))
    worker = start_worker(args, cluster_env(workers, 1, data_env))
    history, backup = run / "history.csv", run / "backup" / "main" / "training_metadata.json"
    backed_up = wait_for(lambda: backup.exists() and backup.read_text().strip(), chief, 400)
    assert backed_up, "no epoch was backed up:\n" + (chief.communicate()[0] if chief.poll() is not None else "")
    worker.kill()  # after the first epoch's backup, like a lost machine
    worker.wait()
    worker = start_worker(args, cluster_env(workers, 1, data_env))  # the same command, the same TF_CONFIG
    chief_output = chief.communicate(timeout=500)[0]
    worker_output = worker.communicate(timeout=100)[0]
    assert chief.returncode == 0, chief_output[-4000:]
    assert worker.returncode == 0, worker_output[-4000:]
    assert "lost a peer of its multi-worker run" in chief_output, chief_output[-4000:]
    assert "restarting this worker (1 of train.worker_restarts=3)" in chief_output
    assert "multi-worker: this is worker 0 (restart 1)" in chief_output
    assert "resuming from epoch" in chief_output, chief_output[-6000:]
    assert read_history_csv(history)["epoch"] == [0, 1, 2, 3]
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 4


def test_a_worker_whose_cluster_never_comes_up_stops_with_one_line(tmp_path):
    recipe = ROOT / DETECTION[0]
    workers = [f"localhost:{port}" for port in free_ports(2)]
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "keras_resnet.cli", "train", str(recipe), "--set", "train.strategy=multi_worker",
         "train.worker_wait_minutes=0.1", f"output_dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=cluster_env(workers, 0, {}))
    assert result.returncode == -9, result.stdout + result.stderr  # ended by its watchdog (TensorFlow holds on)
    assert time.time() - started < 90
    lines = [line for line in result.stderr.splitlines() if "train.worker_wait_minutes=0.1" in line]
    assert len(lines) == 1 and "worker 1 at " + workers[1] in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_crop_sampling_trains_on_two_workers(tmp_path):
    """`data.sampling: crop` (windows of large images, tiled validation) under multi_worker, with weight averaging."""
    from tests.training.test_own_data import mask_folder

    train, val = mask_folder(tmp_path / "train", count=6, size=96), mask_folder(tmp_path / "val", count=2, seed=1)
    overrides = [f"data.train={train}", f"data.val={val}", "model.num_classes=3", "model.backbone=resnet18",
                 "model.input_shape=[32,32,3]", "model.backbone_args=" + json.dumps(TINY_BACKBONE),
                 "model.head_args={head_width: 16}", "data.sampling=crop", "data.crops_per_image=4",
                 "data.batch_size=8", "train.epochs=2", "train.mixed_precision=false", "train.ema_momentum=0.9",
                 "train.strategy=multi_worker", f"output_dir={tmp_path / 'run'}"]
    chief, _ = train_on_workers(["tasks/segmentation/mask_folder_fpn_resnet50.yaml", "--set", *overrides], {})
    assert "6 train images x 4 crops = 24 windows" in chief, chief[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and "mIoU" in metrics
    assert read_history_csv(tmp_path / "run" / "history.csv")["epoch"] == [0, 1]


@pytest.mark.parametrize("tf_config, expected", [
    ("{'cluster': 1}", "TF_CONFIG is not JSON (Expecting property name enclosed in double quotes at character 1)"),
    ('{"task": {"type": "worker", "index": 0}}', "TF_CONFIG needs a 'cluster' and a 'task' object"),
    ('{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 1}}',
     "TF_CONFIG's task {'type': 'worker', 'index': 1} is not one of its cluster's"),
])
def test_a_malformed_tf_config_is_one_line_before_tensorflow_starts(tf_config, expected, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "keras_resnet.cli", "train", DETECTION[0], "--set", "train.strategy=multi_worker",
         f"output_dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "TF_CONFIG": tf_config})
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "docs/cluster.md" in result.stderr
