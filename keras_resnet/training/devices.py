"""Where and how a run computes: the tf.distribute strategy, the dtype policy, TF_CONFIG, and `start_run`
(seed, strategy, precision and the run folder set up together).
"""

import json
import os
import tempfile

import keras
import tensorflow as tf

from keras_resnet.runs import (
    RunPaths,
    prepare_output_dir,
    set_aside_unreadable_models,
)
from keras_resnet_settings.errors import ConfigError


# ----------------------------------------------------------------------------
# Environment: strategy, precision, run folder
# ----------------------------------------------------------------------------
def make_strategy(name):
    """A tf.distribute strategy for `train.strategy`.

    - "auto": MirroredStrategy over all GPUs when there are several, else
      the default strategy.
    - "one_device": the first GPU, else the CPU.
    - "mirrored": MirroredStrategy over all GPUs, or over all logical CPUs
      when there is no GPU.
    - "multi_worker": MultiWorkerMirroredStrategy configured by TF_CONFIG.
    """
    # Collective ops must be configured before anything initialises TF.
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise ConfigError(
                "train.strategy=multi_worker needs the TF_CONFIG environment variable (cluster and task); "
                "see docs/training.md, 'Several machines'."
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
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
    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
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
    the other workers get a temporary folder (theirs to delete).

    Returns:
        `(strategy, paths, is_chief)`, `paths` the `RunPaths` of the (checked
        writable) output folder.
    """
    train_cfg = cfg.train
    strategy = make_strategy(train_cfg.strategy)
    keras.utils.set_random_seed(train_cfg.seed)
    keras.mixed_precision.set_global_policy(resolve_precision(train_cfg.mixed_precision))
    is_chief = is_chief_process(cfg)
    output_dir = cfg.output_dir if is_chief else tempfile.mkdtemp(prefix="keras_resnet_worker_out_")
    prepare_output_dir(output_dir)
    set_aside_unreadable_models(output_dir)  # a model file a kill left truncated never blocks a re-run
    return strategy, RunPaths.of(output_dir), is_chief
