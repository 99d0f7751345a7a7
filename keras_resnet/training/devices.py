"""Where and how a run computes: the tf.distribute strategy, the dtype policy, TF_CONFIG, and `start_run`
(seed, strategy, precision and the run folder set up together).

Multi-worker runs (`train.strategy: multi_worker`) use `MultiWorkerStrategy`
(tf.distribute's MultiWorkerMirroredStrategy, with the reduction Keras `fit`
needs), wait at most `train.worker_wait_minutes` for every worker of
`TF_CONFIG`, and report a lost peer as a `WorkerLostError` (`lost_worker`),
on which the command line restarts the worker to rejoin the cluster.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager

import keras
import tensorflow as tf

from keras_resnet.runs import (
    RunPaths,
    prepare_output_dir,
    set_aside_unreadable_models,
)
from keras_resnet_settings.errors import ConfigError, WorkerLostError

# Environment variable counting a worker's restarts after a lost peer (set by the command line).
RESTARTS_VARIABLE = "KERAS_RESNET_WORKER_RESTARTS"


# ----------------------------------------------------------------------------
# Multi-worker: the strategy, the wait for the cluster, a lost worker
# ----------------------------------------------------------------------------
# The dtypes TensorFlow's collective all-reduce accepts.
_REDUCIBLE_DTYPES = (tf.bfloat16, tf.float16, tf.float32, tf.float64, tf.int32, tf.int64)


class MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """MultiWorkerMirroredStrategy whose `reduce` takes what Keras 3 `fit` hands it.

    Keras 3.15's TensorFlow trainer reduces a whole data batch (a nested
    structure) and its scalar logs along `axis=0` through `strategy.reduce`;
    MultiWorkerMirroredStrategy accepts one value at a time and no axis on a
    scalar, so `fit` fails under it (keras-team/keras#20585, still failing
    with TF 2.21 / Keras 3.15). Here each leaf is reduced on its own, a
    scalar without an axis: the same reduction, so `fit`, its callbacks and
    `BackupAndRestore` work across workers as documented for TensorFlow.
    Leaves the collectives cannot add (uint8 images of the batch Keras
    builds the model with) are this worker's own.
    """

    def reduce(self, reduce_op, value, axis):
        def reduce_one(leaf):
            local = self.experimental_local_results(leaf)[0]
            if getattr(local, "dtype", None) not in _REDUCIBLE_DTYPES:
                return local  # e.g. uint8 images of the batch Keras builds the model with: collectives refuse them
            scalar = getattr(local, "shape", None) is not None and local.shape.rank == 0
            return super(MultiWorkerStrategy, self).reduce(reduce_op, leaf, None if scalar else axis)

        return tf.nest.map_structure(reduce_one, value)


def shard_by_data(dataset):
    """`dataset` set to be sharded by data across the workers of a multi-worker run.

    Every worker reads the whole pipeline (same files, same seed, same
    order) and keeps its replicas' share of each global batch, so the
    workers together train on exactly the batches one process would. (File
    sharding would need at least as many files as workers and changes which
    images meet in a batch.)
    """
    if not isinstance(dataset, tf.data.Dataset):
        return dataset
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def read_tf_config():
    """The TF_CONFIG environment variable as a dict ({} when unset), checked: a ConfigError naming the problem
    when it is not a JSON object, or its task is not one of its cluster's (`{"cluster": {"worker": [...]},
    "task": {"type": "worker", "index": N}}`)."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        return {}
    fix = ('set it to e.g. {"cluster": {"worker": ["host-a:12345", "host-b:12345"]}, "task": {"type": "worker", '
           '"index": 0}} (docs/cluster.md)')
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"TF_CONFIG is not JSON ({error.msg} at character {error.pos}); {fix}") from None
    cluster, task = (config.get("cluster"), config.get("task")) if isinstance(config, dict) else (None, None)
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ConfigError(f"TF_CONFIG needs a 'cluster' and a 'task' object, got {text[:200]!r}; {fix}")
    addresses, index = cluster.get(task.get("type")), task.get("index", 0)
    if not isinstance(addresses, list) or not isinstance(index, int) or not 0 <= index < len(addresses):
        raise ConfigError(f"TF_CONFIG's task {task} is not one of its cluster's ({cluster}); give each worker "
                          f"its own index 0..N-1 in the same cluster list; {fix}")
    return config


def cluster_addresses():
    """`["worker 0 at host:port", ...]` of TF_CONFIG's cluster (for messages)."""
    cluster = read_tf_config().get("cluster", {})
    return [f"{job} {index} at {address}" for job, addresses in cluster.items()
            for index, address in enumerate(addresses)]


# A watchdog process: waits `seconds` for its standard input to close (the block finished); if it does not,
# prints the message and ends the blocked process.
_WATCHDOG = """
import os, select, signal, sys
parent, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
finished, _, _ = select.select([sys.stdin], [], [], seconds)
if not finished:
    print(message, file=sys.stderr, flush=True)
    os.kill(parent, signal.SIGKILL)
"""


@contextmanager
def deadline(seconds, message):
    """Ends this process with `message` (one line on stderr) unless the block finishes within `seconds`.

    Waiting for a cluster blocks inside TensorFlow's C++ runtime holding
    Python's lock, and TensorFlow then ignores SIGTERM: no Python timer,
    signal handler or exception can end the wait. A small watchdog process
    does: it prints the message and kills this one (exit status 137, -9 in
    Python) unless the block finishes first.
    """
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(seconds), message],
                                stdin=subprocess.PIPE)
    try:
        yield
    finally:
        watchdog.stdin.close()  # the watchdog's select returns: it exits without a word
        watchdog.wait()


def start_multi_worker(wait_minutes):
    """A `MultiWorkerStrategy` once every worker of TF_CONFIG is up (a first all-reduce).

    A cluster still incomplete after `wait_minutes` ends the process with one
    line (`deadline`: exit status 137).

    Args:
        wait_minutes: how long to wait for the whole cluster (`train.worker_wait_minutes`).
    """
    task_type, index, _ = task_info()
    restarts = os.environ.get(RESTARTS_VARIABLE)
    print(f"multi-worker: this is {task_type} {index}{f' (restart {restarts})' if restarts else ''}; waiting up to "
          f"{wait_minutes:g} min for {', '.join(cluster_addresses())}", flush=True)
    message = (f"train.strategy=multi_worker: the cluster of TF_CONFIG ({', '.join(cluster_addresses())}) was not "
               f"complete after train.worker_wait_minutes={wait_minutes:g}; this is {task_type} {index}. Start every "
               "worker with the same command and its own TF_CONFIG task (a worker that stopped: start it again), "
               "or raise train.worker_wait_minutes")
    with deadline(wait_minutes * 60, message):
        strategy = MultiWorkerStrategy()
        workers = int(sum_over_workers(strategy, [1.0])[0])
    print(f"multi-worker: cluster ready, {workers} replica(s)", flush=True)
    return strategy


def sum_over_workers(strategy, values):
    """The element-wise sum of `values` (floats, one list per worker) over the workers: an all-reduce
    that every worker of the strategy must call with a list of the same length."""
    local = tf.constant([float(v) for v in values], tf.float64)
    summed = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: local), axis=None)
    return [float(v) for v in summed.numpy()]


def share_from_chief(strategy, values, is_chief):
    """`values` (floats) as the chief has them, on every worker of a multi-worker run (unchanged elsewhere).

    An all-reduce in which the other workers contribute zeros: figures the
    chief alone computes (e.g. COCO mAP) reach every worker, which then
    takes the same decisions (best model, early stop).
    """
    if not isinstance(strategy, MultiWorkerStrategy):
        return list(values)
    return sum_over_workers(strategy, [v if is_chief else 0.0 for v in values])


# TensorFlow's errors when a collective loses a peer (the peer's process ended or cannot be reached).
_LOST_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
                     tf.errors.InternalError, tf.errors.DeadlineExceededError)
_LOST_PEER_WORDS = ("collective ops is aborted", "failed to connect", "connection refused", "socket closed",
                    "unavailable", "heartbeat", "coordination service", "task has been disconnected",
                    "has been disconnected", "worker is unavailable")


def lost_worker(error):
    """A `WorkerLostError` for a TensorFlow error that says a peer of this multi-worker run is gone, else None."""
    if not isinstance(error, _LOST_PEER_ERRORS):
        return None
    text = str(error).lower()
    if not isinstance(error, tf.errors.UnavailableError) and not any(word in text for word in _LOST_PEER_WORDS):
        return None
    task_type, index, _ = task_info()
    first_line = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return WorkerLostError(
        f"{task_type} {index} lost a peer of its multi-worker run ({type(error).__name__}: {first_line[:200]}); "
        "every worker resumes from the last finished epoch when all of them run the same command again"
    )


def rejoin_cluster(error, allowed):
    """Restarts this worker process (same command line) after `error`, a `WorkerLostError`, at most `allowed` times.

    TensorFlow cannot reset a collective that lost a peer inside the process
    ("Restart your program to reset"); the new process waits for the whole
    cluster again (`start_multi_worker`) and resumes from the chief's backup,
    as do the restarted peers. Past `allowed` restarts the error is raised.
    """
    done = int(os.environ.get(RESTARTS_VARIABLE) or 0)
    if done >= allowed:
        error.args = (f"{error.args[0]} (this worker already restarted {done} time(s): train.worker_restarts="
                      f"{allowed})",)
        raise error
    print(f"{error}\nrestarting this worker ({done + 1} of train.worker_restarts={allowed}) to rejoin the cluster",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.environ[RESTARTS_VARIABLE] = str(done + 1)
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


# ----------------------------------------------------------------------------
# Environment: strategy, precision, run folder
# ----------------------------------------------------------------------------
def make_strategy(name, wait_minutes=10.0):
    """A tf.distribute strategy for `train.strategy`.

    - "auto": MirroredStrategy over all GPUs when there are several, else
      the default strategy.
    - "one_device": the first GPU, else the CPU.
    - "mirrored": MirroredStrategy over all GPUs, or over all logical CPUs
      when there is no GPU.
    - "multi_worker": MultiWorkerMirroredStrategy configured by TF_CONFIG
      (`start_multi_worker`: waits up to `wait_minutes` for the cluster).
    """
    # Collective ops must be configured before anything initialises TF.
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise ConfigError(
                "train.strategy=multi_worker needs the TF_CONFIG environment variable (cluster and task); "
                "see docs/cluster.md."
            )
        return start_multi_worker(wait_minutes)
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    raise ConfigError(f"train.strategy={name!r}; allowed: auto, one_device, mirrored, multi_worker")


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below AVX512_CORE_BF16: bfloat16 is emulated under them, not native.
ISA_CAPS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def cpu_has_native_bfloat16():
    """True on x86 CPUs with AVX512-BF16 or AMX-BF16 (bfloat16 runs fast there).

    False when oneDNN is capped below them (`ONEDNN_MAX_CPU_ISA=AVX2`, as on
    a CPU without them: how BENCHMARKS.md runs the slow CPU kind here).
    """
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() in ISA_CAPS_WITHOUT_BF16:
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(value):
    """The Keras dtype policy for `train.mixed_precision`.

    false/"float32": float32. "auto": mixed_float16 on GPU; on CPU
    mixed_bfloat16 where the CPU has native bfloat16 (AVX512-BF16/AMX; about
    2x faster than float32 for ResNet-20 here), else float32. true:
    mixed_float16 on GPU, mixed_bfloat16 on CPU. A policy name is used as
    given.
    """
    on_gpu = bool(tf.config.list_logical_devices("GPU"))
    if value in (False, "float32"):
        return "float32"
    if value == "auto":
        if on_gpu:
            return "mixed_float16"
        return "mixed_bfloat16" if cpu_has_native_bfloat16() else "float32"
    if value is True:
        return "mixed_float16" if on_gpu else "mixed_bfloat16"
    return value


def task_info():
    """(task type, index, is_chief) from TF_CONFIG; single-process runs are chief."""
    tf_config = read_tf_config()
    task = tf_config.get("task", {})
    task_type, index = task.get("type"), int(task.get("index", 0))
    cluster = tf_config.get("cluster", {})
    is_chief = task_type is None or task_type == "chief" or (task_type == "worker" and index == 0 and "chief" not in cluster)
    return task_type, index, is_chief


def is_chief_process(cfg):
    """False only in a multi-worker run's non-chief workers (which write nothing into output_dir)."""
    return task_info()[2] if cfg.train.strategy == "multi_worker" else True


def start_run(cfg):
    """Sets up a recipe's training process: strategy, seed, dtype policy and run folder.

    Under `train.strategy=multi_worker` only the chief writes into `output_dir`;
    the other workers get a temporary folder (theirs to delete: `leave_run`)
    that starts as a copy of the chief's resume state (`copy_resume_state`),
    so every worker resumes where the chief does and decides as it does.

    Returns:
        `(strategy, paths, is_chief)`, `paths` the `RunPaths` of the (checked
        writable) output folder.
    """
    train_cfg = cfg.train
    strategy = make_strategy(train_cfg.strategy, train_cfg.worker_wait_minutes)
    keras.utils.set_random_seed(train_cfg.seed)
    keras.mixed_precision.set_global_policy(resolve_precision(train_cfg.mixed_precision))
    is_chief = is_chief_process(cfg)
    output_dir = cfg.output_dir if is_chief else tempfile.mkdtemp(prefix="keras_resnet_worker_out_")
    prepare_output_dir(output_dir)
    set_aside_unreadable_models(output_dir)  # a model file a kill left truncated never blocks a re-run
    paths = RunPaths.of(output_dir)
    if not is_chief:
        copy_resume_state(RunPaths.of(cfg.output_dir), paths)
    return strategy, paths, is_chief


def copy_resume_state(chief, worker):
    """Copies what resuming reads (backup/, history.csv, the models) from the chief's run folder to a worker's.

    A non-chief worker then trims the same history, resumes at the same epoch
    and saves its best model at the same epochs as the chief: its saves are
    collective operations that must match the chief's.
    """
    if os.path.isdir(chief.backup_root):
        shutil.copytree(chief.backup_root, worker.backup_root, dirs_exist_ok=True)
    for name in ("history", "best", "last"):
        if os.path.isfile(getattr(chief, name)):
            shutil.copy2(getattr(chief, name), getattr(worker, name))


def leave_run(paths, is_chief):
    """True in a multi-worker run's non-chief worker, after deleting its temporary folder: it has nothing to
    evaluate or report (the chief does). False in the chief or a single-process run."""
    if is_chief:
        return False
    shutil.rmtree(paths.root, ignore_errors=True)
    print("multi-worker: this worker's part is done; the chief evaluates and writes the run folder", flush=True)
    return True
