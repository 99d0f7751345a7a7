"""Inference latency of keras_resnet models in every deployed form.

For each model (random weights: speed does not depend on them) and batch
size, times the median and 90th-percentile latency over `--runs` calls
after `--warmup` calls, in each form:

* keras_eager: `model(x, training=False)` eagerly;
* keras_function: the same call in a `tf.function` (what `predict_on_batch`
  compiles);
* keras_xla: the same with `jit_compile=True`;
* saved_model: the exported SavedModel's `serve_float` signature;
* tflite_fp32 / tflite_float16 / tflite_dynamic / tflite_int8: the TFLite
  exports run by `ai_edge_litert` with `--threads` threads (XNNPACK);
* onnx_fp32: the ONNX export run by onnxruntime with `--threads` intra-op
  threads.

Every export goes through `keras_resnet.export.export_model` (the stock
TFLite converter and tf2onnx), including keras.applications ResNet50
(`keras_applications_resnet50`, no preprocessing layer inside), so the
comparison with our `resnet50_v1` (same layout plus an `ImageNormalization`
layer) is like for like. int8 is calibrated on random images and its
top-1 agreement is not enforced: with random weights only its speed means
anything. Achieved GFLOP/s (2 x MACs per image) is compared with a
measured float32 matmul peak of TensorFlow on the same threads.

    python benchmarks/inference.py                       # full run (long)
    python benchmarks/inference.py --quick --models resnet18
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

KERAS_APPLICATIONS_RESNET50 = "keras_applications_resnet50"
DEFAULT_MODELS = ("resnet18", "resnet50_v1", KERAS_APPLICATIONS_RESNET50)
FORMS = (
    "keras_eager",
    "keras_function",
    "keras_xla",
    "saved_model",
    "tflite_fp32",
    "tflite_float16",
    "tflite_dynamic",
    "tflite_int8",
    "onnx_fp32",
)
KERAS_BASELINE = "keras_function"


def build_model(name: str, size: int):
    """A random-weight 1000-class model at `size` x `size` x 3.

    Args:
        name: a keras_resnet preset, or `keras_applications_resnet50`.
        size: input height and width.
    """
    import keras

    from keras_resnet import ImageNormalization, ResNetClassifier

    if name == KERAS_APPLICATIONS_RESNET50:
        return keras.applications.ResNet50(weights=None, input_shape=(size, size, 3), classes=1000)
    mode = "caffe" if name.endswith("_v1") else "torch"
    return ResNetClassifier.from_preset(
        name, num_classes=1000, input_shape=(size, size, 3), preprocessing=ImageNormalization.from_mode(mode)
    )


def write_calibration_folder(folder: Path, count: int, size: int) -> Path:
    """Random RGB PNGs used to calibrate int8 (timing only)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return folder


def build_runners(model, name: str, forms, work_dir: Path, calibration: Path, parity_samples: int, threads: int):
    """`{form: callable(batch) -> outputs}` for the requested forms (exports written to work_dir)."""
    from keras_resnet.export import export_model, load_exported_model

    runners = {}
    if "keras_eager" in forms:
        runners["keras_eager"] = lambda batch: model(batch, training=False).numpy()
    if "keras_function" in forms:
        function = tf.function(lambda batch: model(batch, training=False))
        runners["keras_function"] = lambda batch: function(batch).numpy()
    if "keras_xla" in forms:
        xla_function = tf.function(lambda batch: model(batch, training=False), jit_compile=True)
        runners["keras_xla"] = lambda batch: xla_function(batch).numpy()
    exports = {
        "saved_model": ("saved_model", "none"),
        "tflite_fp32": ("tflite", "none"),
        "tflite_float16": ("tflite", "float16"),
        "tflite_dynamic": ("tflite", "dynamic"),
        "tflite_int8": ("tflite", "int8"),
        "onnx_fp32": ("onnx", "none"),
    }
    for form, (fmt, quantize) in exports.items():
        if form not in forms:
            continue
        result = export_model(
            model,
            format=fmt,
            quantize=quantize,
            calibration=calibration if quantize == "int8" else None,
            batch_size="dynamic",
            output=work_dir / name,
            parity_samples=parity_samples,
            int8_min_agreement=0.0,
            name=name,
        )
        runners[form] = load_exported_model(result["path"], num_threads=threads).predict_batch
    return runners


def time_calls(run, batch: np.ndarray, warmup: int, runs: int) -> tuple[float, float]:
    """Median and 90th-percentile latency in milliseconds."""
    for _ in range(warmup):
        run(batch)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(batch)
        times.append(1000.0 * (time.perf_counter() - start))
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]


def matmul_peak_gflops(size: int, repeats: int = 5) -> float:
    """Best float32 GFLOP/s of a `size` x `size` TensorFlow matmul."""
    a = tf.random.normal([size, size])
    b = tf.random.normal([size, size])
    matmul = tf.function(lambda: tf.matmul(a, b))
    matmul().numpy()
    best = min(_timed(lambda: matmul().numpy()) for _ in range(repeats))
    return 2.0 * size**3 / best / 1e9


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def markdown_table(rows, peak: float) -> str:
    lines = [
        "| model | form | batch | median ms | p90 ms | images/s | GFLOP/s | % of peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['form']} | {row['batch']} | {row['median_ms']:.2f} | {row['p90_ms']:.2f} "
            f"| {row['images_per_s']:.1f} | {row['gflops']:.1f} | {100 * row['gflops'] / peak:.1f} |"
        )
    return "\n".join(lines)


def ratio_lines(rows) -> list[str]:
    """Median-latency ratios: ours vs keras.applications, int8 and ONNX vs Keras fp32."""
    median = {(r["model"], r["form"], r["batch"]): r["median_ms"] for r in rows}
    lines = []
    for (model, form, batch), value in sorted(median.items()):
        reference = median.get((KERAS_APPLICATIONS_RESNET50, form, batch))
        if model == "resnet50_v1" and reference:
            lines.append(f"resnet50_v1 / keras.applications ResNet50, {form}, bs{batch}: {value / reference:.2f}x time")
    for model, form, batch in sorted(median):
        baseline = median.get((model, KERAS_BASELINE, batch))
        if form in ("tflite_int8", "onnx_fp32") and baseline:
            speedup = baseline / median[(model, form, batch)]
            lines.append(f"{model} bs{batch}: {form} is {speedup:.2f}x the speed of Keras fp32 ({KERAS_BASELINE})")
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=list(DEFAULT_MODELS), help="presets and/or keras_applications_resnet50"
    )
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--runs", type=int, default=50, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2, help="threads for TF, TFLite and onnxruntime")
    parser.add_argument("--parity-samples", type=int, default=8, help="images each export is checked on")
    parser.add_argument("--calibration-images", type=int, default=32, help="random images calibrating int8")
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--work-dir", default=None, help="where exports are written (default: a temp folder)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke run: 64x64 inputs, 3 runs, 1 warm-up, batch sizes 1 and 2, 2 parity and 4 calibration images",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.input_size, args.runs, args.warmup, args.batch_sizes = 64, 3, 1, [1, 2]
        args.parity_samples, args.calibration_images, args.matmul_size = 2, 4, 1024
    return args


def main(argv=None):
    args = parse_args(argv)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from keras_resnet.models.resnet.analysis import count_macs

    peak = matmul_peak_gflops(args.matmul_size)
    print(f"float32 matmul peak ({args.matmul_size}^2, {args.threads} threads): {peak:.1f} GFLOP/s")
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="keras_resnet_bench_") as tmp:
        work_dir = Path(args.work_dir) if args.work_dir else Path(tmp)
        calibration = write_calibration_folder(work_dir / "calibration", args.calibration_images, args.input_size)
        for name in args.models:
            model = build_model(name, args.input_size)
            flops_per_image = 2.0 * count_macs(model)
            runners = build_runners(model, name, args.forms, work_dir, calibration, args.parity_samples, args.threads)
            for batch_size in args.batch_sizes:
                batch = rng.uniform(0, 255, (batch_size, args.input_size, args.input_size, 3)).astype(np.float32)
                for form in args.forms:
                    median_ms, p90_ms = time_calls(runners[form], batch, args.warmup, args.runs)
                    gflops = flops_per_image * batch_size / (median_ms / 1000.0) / 1e9
                    rows.append(
                        {
                            "model": name,
                            "form": form,
                            "batch": batch_size,
                            "median_ms": median_ms,
                            "p90_ms": p90_ms,
                            "images_per_s": 1000.0 * batch_size / median_ms,
                            "gflops": gflops,
                        }
                    )
                    print(f"{name} {form} bs{batch_size}: median {median_ms:.2f} ms, p90 {p90_ms:.2f} ms", flush=True)
    print(
        f"\n{args.input_size}x{args.input_size}, {args.runs} runs after {args.warmup} warm-up, "
        f"{args.threads} threads, random weights; % of peak is against the float32 matmul peak, "
        "so int8 and float16 forms can exceed 100%\n"
    )
    print(markdown_table(rows, peak))
    print()
    for line in ratio_lines(rows):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_gflops": peak, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
