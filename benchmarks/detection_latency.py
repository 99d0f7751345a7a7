"""Per-image latency of a trained RetinaNet detector in every deployed form, side by side.

Exports the detection run (`keras_resnet.export.export_model`, each export
checked against Keras on the run's validation images) or, with `--reuse`,
loads exports already in `--work-dir`, then times batch-1 calls on the same
real validation images (letterboxed by the recipe's pipeline), forms
interleaved round by round so machine noise hits all of them alike:

* keras: `make_inference_model(batch_size=1)` (network + `DetectionDecoder`
  with class-wise NMS) in a `tf.function`;
* saved_model: the SavedModel's `serve_float` signature (decoded);
* tflite_fp32 / tflite_float16 / tflite_dynamic / tflite_int8: TFLite
  exports with NMS inside, run by `ai_edge_litert` (XNNPACK) with
  `--threads` threads; quantized ones keep the decoder in float32;
* tflite_fp32_raw / onnx_raw: raw-output exports; the timing includes
  decoding with the metadata's `DetectionDecoder` in TensorFlow;
* onnx / onnx_dynamic: ONNX exports with NMS inside (static batch 1 /
  dynamic batch), run by onnxruntime with `--threads` intra-op threads.

Every call returns the decoded boxes, scores, classes and num_detections.
Prints one line per form and a markdown table (median and p90 ms per image,
images/s = 1000 / median, and each export's parity figures: exact matches
of Keras detections, agreement at IoU >= 0.5, mAP against the validation
ground truth).

    python benchmarks/detection_latency.py runs/mosaic_retinanet_resnet18
    python benchmarks/detection_latency.py RUN_DIR --forms keras tflite_fp32 onnx --images 20 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

# form -> (format, quantize, detection_outputs, batch_size)
EXPORTS = {
    "saved_model": ("saved_model", "none", "decoded", 1),
    "tflite_fp32": ("tflite", "none", "decoded", 1),
    "tflite_fp32_raw": ("tflite", "none", "raw", 1),
    "tflite_float16": ("tflite", "float16", "decoded", 1),
    "tflite_dynamic": ("tflite", "dynamic", "decoded", 1),
    "tflite_int8": ("tflite", "int8", "decoded", 1),
    "onnx": ("onnx", "none", "decoded", 1),
    "onnx_dynamic": ("onnx", "none", "decoded", "dynamic"),
    "onnx_raw": ("onnx", "none", "raw", 1),
}
FORMS = ("keras", *EXPORTS)
DEFAULT_FORMS = ("keras", "saved_model", "tflite_fp32", "tflite_int8", "onnx")


def export_or_load(run_dir: Path, form: str, work_dir: Path, args):
    """`(ExportedModel, parity figures)` of one export form."""
    from keras_resnet.export import export_model, load_exported_model
    from keras_resnet_settings.errors import ExportParityError

    fmt, quantize, outputs, batch = EXPORTS[form]
    output = work_dir / form
    existing = sorted(output.glob("*.json")) if output.is_dir() else []
    if args.reuse and existing:
        metadata = json.loads(existing[0].read_text())
        path = output / metadata["artefact"]
        parity = metadata.get("parity", {})
    else:
        try:
            result = export_model(
                run_dir, format=fmt, quantize=quantize, batch_size=batch, output=output,
                parity_samples=args.parity_samples, calibration_samples=args.calibration_samples,
                detection_outputs=outputs, int8_min_agreement=0.0,
            )
            path, parity = Path(result["path"]), result["parity"]
        except ExportParityError as error:  # the artefact and its metadata are written: time it anyway
            print(f"{form}: {error}", flush=True)
            metadata = json.loads(sorted(output.glob("*.json"))[0].read_text())
            path, parity = output / metadata["artefact"], metadata["parity"]
    return load_exported_model(path, num_threads=args.threads), parity


def keras_runner(run_dir: Path):
    from keras_resnet.export.keras_model import load_model_source, make_decoder

    source = load_model_source(run_dir)
    model = source.model
    decoder = make_decoder(model, source.run_info)
    spec = tf.TensorSpec([1, *model.input_shape[1:]], tf.float32)
    function = tf.function(lambda images: decoder(model(images, training=False)), input_signature=[spec])

    def run(image):
        return {key: value.numpy() for key, value in function(tf.constant(image)).items()}

    return run, source


def time_form(run, images, warmup: int) -> list[float]:
    for image in images[:warmup]:
        run(image)
    times = []
    for image in images:
        start = time.perf_counter()
        run(image)
        times.append(1000.0 * (time.perf_counter() - start))
    return times


def parity_text(parity: dict) -> str:
    if not parity:
        return "reference"
    text = (
        f"{parity.get('matched', 0)}/{parity.get('compared', 0)} exact, "
        f"IoU>=0.5 {100 * parity.get('agreement_iou50', 0):.1f}%"
    )
    if parity.get("export_mAP") is not None:
        text += f", mAP {parity['export_mAP']:.4f}"
    return text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a detection training run dir (best_model.keras, run.json, recipe.yaml)")
    parser.add_argument("--forms", nargs="+", default=list(DEFAULT_FORMS), choices=FORMS)
    parser.add_argument("--images", type=int, default=50, help="validation images timed (batch 1)")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the images, forms interleaved")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per form and round")
    parser.add_argument("--threads", type=int, default=2, help="threads for TF, TFLite and onnxruntime")
    parser.add_argument("--parity-samples", type=int, default=100, help="validation images each export is checked on")
    parser.add_argument("--calibration-samples", type=int, default=200, help="training images calibrating int8")
    parser.add_argument("--work-dir", default=None, help="export folder (default RUN_DIR/latency_exports)")
    parser.add_argument("--reuse", action="store_true", help="load exports already in --work-dir")
    parser.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from keras_resnet.export.samples import detection_recipe_images

    run_dir = Path(args.run_dir)
    work_dir = Path(args.work_dir) if args.work_dir else run_dir / "latency_exports"
    keras_run, source = keras_runner(run_dir)
    if source.recipe_path is None:
        raise SystemExit(f"{run_dir} has no recipe.yaml: the benchmark times the run's validation images")
    images, _ = detection_recipe_images(source.recipe_path, source.model.input_shape[1:], "val", args.images)
    images = [image[None] for image in images]
    runners, parities = {}, {}
    for form in args.forms:
        if form == "keras":
            runners[form], parities[form] = keras_run, {}
        else:
            exported, parities[form] = export_or_load(run_dir, form, work_dir, args)
            runners[form] = exported.predict_outputs
    times = {form: [] for form in args.forms}
    for round_index in range(args.rounds):
        for form in args.forms:
            times[form] += time_form(runners[form], images, args.warmup)
            print(f"round {round_index + 1}: {form} median {statistics.median(times[form]):.2f} ms", flush=True)
    rows = []
    for form in args.forms:
        ordered = sorted(times[form])
        median = statistics.median(ordered)
        p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
        rows.append({"form": form, "median_ms": median, "p90_ms": p90, "images_per_s": 1000.0 / median,
                     "calls": len(ordered), "parity": parities[form]})
    height, width, channels = source.model.input_shape[1:]
    print(
        f"\n{run_dir.name}: {height}x{width}x{channels}, {len(images)} validation images x {args.rounds} rounds, "
        f"batch 1, {args.threads} threads\n"
    )
    print("| form | median ms | p90 ms | images/s | vs keras | parity vs Keras |")
    print("|---|---:|---:|---:|---:|---|")
    keras_median = next((row["median_ms"] for row in rows if row["form"] == "keras"), None)
    for row in rows:
        ratio = f"{keras_median / row['median_ms']:.2f}x" if keras_median else "-"
        print(f"| {row['form']} | {row['median_ms']:.2f} | {row['p90_ms']:.2f} | {row['images_per_s']:.1f} | "
              f"{ratio} | {parity_text(row['parity'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
