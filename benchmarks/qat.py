"""Float vs post-training int8 (PTQ) vs quantization-aware int8 (QAT) for a task recipe, measured in one run.

For one recipe (any task) it:

1. trains the float run (`keras-resnet train RECIPE --set output_dir=OUT ...`;
   skipped when OUT already holds a finished run);
2. exports it to int8 TFLite calibrated on the recipe's images (PTQ);
3. fine-tunes it with `keras-resnet qat OUT --epochs N` into OUT/qat and
   exports that to int8 TFLite from the trained ranges (no calibration);
4. measures on the recipe's validation set: the task metric of the float
   Keras model, the PTQ TFLite, the QAT Keras model and the QAT TFLite
   (classification top-1, segmentation mIoU, detection COCO mAP), the QAT
   TFLite's agreement with the QAT Keras model (top-1 / pixel / detections
   at IoU 0.5), TFLite latency at batch 1 (PTQ and QAT interleaved) and the
   file sizes; plus the QAT fine-tuning time.

Train/qat run as `keras-resnet` child processes; exports use the package's
own export path (parity gates included).

    python benchmarks/qat.py tasks/classification/fashion_mnist_resnet18_narrow.yaml \\
        --output runs/qat_bench_cls --set train.time_budget_minutes=8 --qat-epochs 1 --json runs/qat_cls.json
"""

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parent


def _benchmark_module(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(args, log):
    """Runs `keras-resnet ARGS` in a child Python; returns its wall seconds (raises on failure)."""
    command = [sys.executable, "-m", "keras_resnet.cli", *args]
    print("$ keras-resnet " + " ".join(args), flush=True)
    start = time.perf_counter()
    with open(log, "a") as stream:
        status = subprocess.call(command, stdout=stream, stderr=subprocess.STDOUT)
    if status:
        raise SystemExit(f"keras-resnet {' '.join(args)} failed ({status}); see {log}")
    return time.perf_counter() - start


def latency_ms(model, images, repeats=3):
    """Median ms per image at batch 1 of a loaded export (`predict` on one image at a time)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for image in images:
            model.predict(image[None])
        times.append((time.perf_counter() - start) * 1000 / len(images))
    return float(np.median(times))


def classification_rows(run_dir, qat_dir, ptq_path, qat_path):
    from keras_resnet.export import load_exported_model

    images, labels, _ = _benchmark_module("export_parity").validation_set(run_dir)
    rows = {}
    outputs = {}
    for name, source in (("float Keras", run_dir), ("PTQ int8 TFLite", ptq_path), ("QAT Keras", qat_dir),
                         ("QAT int8 TFLite", qat_path)):
        outputs[name] = load_exported_model(source).predict(images)
        rows[name] = {"metric": float((outputs[name].argmax(-1) == labels).mean())}
    rows["QAT int8 TFLite"]["agreement"] = float(
        (outputs["QAT int8 TFLite"].argmax(-1) == outputs["QAT Keras"].argmax(-1)).mean())
    rows["PTQ int8 TFLite"]["agreement"] = float(
        (outputs["PTQ int8 TFLite"].argmax(-1) == outputs["float Keras"].argmax(-1)).mean())
    return rows, images, "top-1"


def segmentation_rows(run_dir, qat_dir, ptq_path, qat_path):
    from keras_resnet.export import load_exported_model

    module = _benchmark_module("segmentation_export_parity")
    images, masks, _ = module.validation_set(run_dir)
    rows, predicted = {}, {}
    for name, source in (("float Keras", run_dir), ("PTQ int8 TFLite", ptq_path), ("QAT Keras", qat_dir),
                         ("QAT int8 TFLite", qat_path)):
        probabilities = load_exported_model(source).predict(images)
        predicted[name] = np.argmax(probabilities, -1)
        num_classes = probabilities.shape[-1]
        rows[name] = {"metric": float(module.truth_figures(masks, predicted[name], num_classes)[0])}
    rows["QAT int8 TFLite"]["agreement"] = float(np.mean(predicted["QAT int8 TFLite"] == predicted["QAT Keras"]))
    rows["PTQ int8 TFLite"]["agreement"] = float(np.mean(predicted["PTQ int8 TFLite"] == predicted["float Keras"]))
    return rows, images, "mIoU"


def detection_rows(ptq_result, qat_result):
    rows = {}
    for prefix, result in (("float Keras", ptq_result), ("QAT Keras", qat_result)):
        rows[prefix] = {"metric": result["parity"].get("keras_mAP")}
    for name, result in (("PTQ int8 TFLite", ptq_result), ("QAT int8 TFLite", qat_result)):
        rows[name] = {"metric": result["parity"].get("export_mAP"),
                      "agreement": result["parity"].get("agreement_iou50")}
    return rows, "COCO mAP"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--output", required=True, help="output_dir of the float run (QAT goes to OUTPUT/qat)")
    parser.add_argument("--set", nargs="*", default=[], help="overrides of the float training run")
    parser.add_argument("--qat-epochs", type=int, default=None)
    parser.add_argument("--qat-set", nargs="*", default=[], help="overrides of the QAT run")
    parser.add_argument("--parity-samples", type=int, default=500)
    parser.add_argument("--latency-images", type=int, default=50)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    log = output.parent / f"{output.name}_benchmark.log"
    timings = {}
    if not (output / "metrics.json").is_file():
        timings["float_train_s"] = run_cli(["train", args.recipe, "--set", f"output_dir={output}", *args.set], log)
    qat_dir = output / "qat"
    if not (qat_dir / "metrics.json").is_file():
        qat_args = ["qat", str(output)]
        if args.qat_epochs:
            qat_args += ["--epochs", str(args.qat_epochs)]
        if args.qat_set:
            qat_args += ["--set", *args.qat_set]
        timings["qat_train_s"] = run_cli(qat_args, log)

    from keras_resnet.atomic_files import read_json
    from keras_resnet.export import export_model, load_exported_model
    from keras_resnet.runs import read_run_info

    task = read_run_info(output)["task"]
    exports = output.parent / f"{output.name}_exports"
    common = dict(format="tflite", quantize="int8", parity_samples=args.parity_samples)
    ptq = export_model(output, output=exports / "ptq", calibration_samples=1000, **common)
    qat = export_model(qat_dir, output=exports / "qat", **common)
    if task == "detection":
        rows, metric_name = detection_rows(ptq, qat)
        images = None
    else:
        make_rows = classification_rows if task == "classification" else segmentation_rows
        rows, images, metric_name = make_rows(output, qat_dir, ptq["path"], qat["path"])
    if images is not None:
        sample = images[: args.latency_images]
        ptq_model, qat_model = load_exported_model(ptq["path"]), load_exported_model(qat["path"])
        latencies = {"PTQ int8 TFLite": [], "QAT int8 TFLite": []}
        for _ in range(3):  # interleaved: the two int8 models see the same machine load
            latencies["PTQ int8 TFLite"].append(latency_ms(ptq_model, sample, repeats=1))
            latencies["QAT int8 TFLite"].append(latency_ms(qat_model, sample, repeats=1))
        for name, values in latencies.items():
            rows[name]["ms_bs1"] = float(np.median(values))
    rows["PTQ int8 TFLite"]["size_mb"] = Path(ptq["path"]).stat().st_size / 1e6
    rows["QAT int8 TFLite"]["size_mb"] = Path(qat["path"]).stat().st_size / 1e6
    qat_metrics = read_json(qat_dir / "metrics.json")
    summary = {
        "recipe": args.recipe, "task": task, "metric": metric_name, "rows": rows, "timings": timings,
        "qat_epochs": qat_metrics.get("epochs"), "qat_train_minutes": qat_metrics.get("train_minutes"),
        "ptq_parity": ptq["parity"], "qat_parity": qat["parity"],
        "float_metrics": read_json(output / "metrics.json"), "qat_metrics": qat_metrics,
    }
    print(f"\n{args.recipe} ({task}), metric {metric_name} on the validation set")
    print(f"| model | {metric_name} | Δ vs float (points) | agreement with its Keras model | ms/image bs1 | MB |")
    print("|---|---:|---:|---:|---:|---:|")
    base = rows["float Keras"]["metric"]
    for name, row in rows.items():
        metric = row.get("metric")
        delta = "" if metric is None or base is None else f"{100 * (metric - base):+.2f}"
        agreement = f"{100 * row['agreement']:.2f} %" if row.get("agreement") is not None else ""
        print(f"| {name} | {metric if metric is None else f'{metric:.4f}'} | {delta} | {agreement} | "
              f"{row.get('ms_bs1', ''):{'.2f' if 'ms_bs1' in row else ''}} | "
              f"{row.get('size_mb', ''):{'.2f' if 'size_mb' in row else ''}} |")
    print(f"timings: {timings}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
