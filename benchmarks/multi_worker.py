"""Multi-worker scaling on CPU workers: 1 process with 2 threads vs 2 worker processes with 1 thread each.

For each task's default recipe (classification: the main job's narrow
ResNet-18 on Fashion-MNIST; detection: RetinaNet ResNet-18 on 256x256
mosaics; segmentation: DeepLabV3+ ResNet-18 on mosaics), same global batch,
float32, `keras-resnet train` runs in three set-ups, interleaved round by
round so that machine noise hits them alike:

* `1proc-2thr`: one process, `train.strategy=one_device`, TensorFlow's
  intra-op pool at 2 threads (the usual way to use 2 cores);
* `2workers-1thr`: two processes on localhost, `train.strategy=multi_worker`
  (TF_CONFIG), each pinned to its own core (`taskset`) with 1 intra-op
  thread: MultiWorkerMirroredStrategy's gradient all-reduce over gRPC;
* `1proc-1thr`: one process on one core, the per-core baseline.

Throughput is images/s of the global batch, from the chief's timing of
steps 5 to 14 (`fit.EpochEstimate`: after tracing and pipeline start-up). Scaling efficiency of the two
workers = their images/s / (2 x `1proc-1thr`); the ratio to `1proc-2thr`
says whether two worker processes beat threads on the same two cores.
Prints one line per run and a markdown table of medians.

    python benchmarks/multi_worker.py                       # 3 tasks, 2 rounds
    python benchmarks/multi_worker.py --tasks detection --rounds 1

Long (about 20 minutes per round on 2 cores): a benchmark, not a test.
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.helpers import free_ports  # noqa: E402  (the tests' local-cluster ports)

RECIPES = {
    "classification": ("tasks/classification/fashion_mnist_resnet18_narrow.yaml",
                       ["train.time_budget_minutes=null"]),
    "detection": ("tasks/detection/mosaic_retinanet_resnet18.yaml",
                  ["data.mosaic_train_size=512", "data.mosaic_val_size=16"]),
    "segmentation": ("tasks/segmentation/mosaic_deeplabv3plus_resnet18.yaml",
                     ["data.mosaic_train_size=512", "data.mosaic_val_size=16"]),
}
SETUPS = ("1proc-2thr", "2workers-1thr", "1proc-1thr")
STEP_TIME = re.compile(r"~([0-9.e+-]+) s/step here")  # the run's EpochEstimate line: steps 5-14, timed


def seconds_per_step(output):
    """Seconds per training step from the run's EpochEstimate line (steps 5 to 14 timed after 4 warm-up steps)."""
    found = STEP_TIME.findall(output)
    if not found:
        raise RuntimeError("no '~X s/step here' line in the output:\n" + output[-3000:])
    return float(found[-1])


def run_setup(task, setup, args, work):
    recipe, overrides = RECIPES[task]
    output_dir = Path(tempfile.mkdtemp(prefix=f"{task}_{setup}_", dir=work))
    common = [sys.executable, "-m", "keras_resnet.cli", "train", recipe, "--set", *overrides,
              "train.epochs=1", f"train.steps_per_epoch={args.steps}", "train.mixed_precision=false",
              "train.jit_compile=false", f"output_dir={output_dir}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_NUM_INTEROP_THREADS": "1"}
    if setup == "2workers-1thr":
        workers = [f"localhost:{port}" for port in free_ports(2)]
        processes = []
        for index in range(2):
            tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
            processes.append(subprocess.Popen(
                ["taskset", "-c", str(index), *common, "train.strategy=multi_worker"], cwd=ROOT, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env={**env, "TF_CONFIG": json.dumps(tf_config), "TF_NUM_INTRAOP_THREADS": "1"}))
        outputs = [process.communicate()[0] for process in processes]
        if any(process.returncode for process in processes):
            raise RuntimeError(f"{task} {setup} failed:\n" + outputs[0][-3000:] + outputs[1][-3000:])
        output = outputs[0]
    else:
        threads = "2" if setup == "1proc-2thr" else "1"
        pin = ["taskset", "-c", "0,1" if threads == "2" else "0"]
        result = subprocess.run([*pin, *common, "train.strategy=one_device"], cwd=ROOT, text=True,
                                capture_output=True, env={**env, "TF_NUM_INTRAOP_THREADS": threads})
        if result.returncode:
            raise RuntimeError(f"{task} {setup} failed:\n" + result.stdout[-3000:] + result.stderr[-3000:])
        output = result.stdout
    batch = int(re.search(r"batch (\d+) over", output).group(1))
    return batch / seconds_per_step(output), batch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=21, help="steps of the one epoch (above 20: timed)")
    parser.add_argument("--work-dir", default=None, help="run folders (default: a temporary folder)")
    args = parser.parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="multi_worker_bench_")
    os.makedirs(work, exist_ok=True)
    flags = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
             if flag in Path("/proc/cpuinfo").read_text()] if Path("/proc/cpuinfo").exists() else []
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, flags {flags}, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    rates = {(task, setup): [] for task in args.tasks for setup in SETUPS}
    batches = {}
    for round_index in range(args.rounds):
        for task in args.tasks:
            for setup in SETUPS:
                started = time.time()
                rate, batches[task] = run_setup(task, setup, args, work)
                rates[task, setup].append(rate)
                print(f"round {round_index + 1} {task:14s} {setup:14s} {rate:8.1f} images/s "
                      f"(batch {batches[task]}, run {time.time() - started:.0f} s, load "
                      f"{os.getloadavg()[0]:.2f})", flush=True)
    print("\n| task | global batch | 1 process x 2 threads | 2 workers x 1 thread | 1 process x 1 thread | "
          "2 workers / (2 x 1 thread) | 2 workers / 2 threads |")
    print("|---|---|---|---|---|---|---|")
    for task in args.tasks:
        two_threads, workers, one = (statistics.median(rates[task, setup]) for setup in SETUPS)
        print(f"| {task} | {batches[task]} | {two_threads:.1f} | {workers:.1f} | {one:.1f} | "
              f"{workers / (2 * one):.2f} | {workers / two_threads:.2f} |")


if __name__ == "__main__":
    main()
