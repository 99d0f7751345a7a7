"""A torchvision ResNet-50 converted to Keras: latency against keras.applications ResNet50, and its int8 TFLite.

Issue 18's bar: "converted resnet50 (torchvision layout, v1.5) vs
keras.applications ResNet50 inference at bs1 and bs32 in one run (ratio), and
the int8 TFLite export of a converted model passing its parity gate".

No download is possible here, so the torchvision state dict is the one the
committed fixture `tests/fixtures/torch/torchvision_resnet50.npz` describes:
its keys, shapes and dtypes (taken from a real `torchvision.models.resnet50`)
filled with the deterministic formula weights of
`scripts/make_torch_fixtures.py` (`state_dict_for`; He-uniform scaled, random
BN statistics). It is written to a temporary `.safetensors` file and
converted with `keras_resnet.convert.from_torch(path)`, as a user would.

1. Latency: the converted classifier (1000-class logits, ImageNet
   normalisation inside) and `keras.applications.ResNet50(weights=None)`
   (softmax, no preprocessing inside), both float32 at 224x224x3, each
   called through a `tf.function` (what `predict_on_batch` compiles). After
   the warm-up the two models are timed interleaved (calls alternate, the
   order flips every repeat), so the machine's drift hits both alike; each
   figure is the median over repeats; the ratio (converted /
   keras.applications time) is printed three ways: of the medians, the
   median of the per-repeat (adjacent, paired) ratios, and of the minima.
2. int8: the converted model is saved as `.keras` and exported by
   `keras_resnet.export.export_model(..., format="tflite", quantize="int8")`
   with a calibration recipe over synthetic images (see `synthetic_image`:
   gratings, blobs and gradients, not noise); calibration uses its train
   folder, the parity gate its disjoint val folder. Printed: the gate
   (top-1 agreement >= 0.99 by default), max abs / relative logit diff, the
   artefact's size, and how meaningful top-1 is on these random weights (the
   number of distinct Keras top-1 classes and the median top-1 vs top-2
   logit margin).

    python benchmarks/torch_weights.py                 # the full run (about 10 min on 2 cores)
    python benchmarks/torch_weights.py --quick         # smoke run: 64x64, bs 1 and 2, few images
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "torch" / "torchvision_resnet50.npz"
FORMULA_SCRIPT = ROOT / "scripts" / "make_torch_fixtures.py"
CONVERTED = "converted torchvision resnet50"
KERAS_APPLICATIONS = "keras.applications ResNet50"
CLASS_FOLDERS = ("a", "b")  # an image_folder recipe needs classes; the labels are never used


def load_formula():
    """`scripts/make_torch_fixtures.py` as a module (its `state_dict_for` makes the formula weights)."""
    spec = importlib.util.spec_from_file_location("make_torch_fixtures", FORMULA_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_state_dict(path: Path) -> int:
    """Writes torchvision resnet50's state dict (fixture layout, formula weights) as `.safetensors`.

    Args:
        path: the file to write (atomically).

    Returns:
        The number of tensors written.
    """
    from safetensors.numpy import save_file

    from keras_resnet.atomic_files import atomic_output

    formula = load_formula()
    with np.load(FIXTURE) as data:
        state = formula.state_dict_for({key: data[key] for key in ("keys", "ndims", "shapes", "dtypes")})
    with atomic_output(path) as temporary:
        save_file({key: np.ascontiguousarray(value) for key, value in state.items()}, str(temporary))
    return len(state)


def synthetic_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A deterministic structured RGB image (uint8): oriented colour gratings, Gaussian blobs, a gradient.

    Args:
        rng: the generator drawing this image's parameters.
        size: height and width.
    """
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.zeros((size, size, 3), np.float32)
    for _ in range(3):  # gratings of random orientation, frequency, phase and colour
        angle, frequency, phase = rng.uniform(0, np.pi), rng.uniform(1, 12), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * frequency * (x * np.cos(angle) + y * np.sin(angle)) + phase)
        image += wave[..., None] * rng.uniform(-1, 1, 3)
    for _ in range(int(rng.integers(1, 5))):  # blobs
        cy, cx, radius = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * radius**2))
        image += 2 * blob[..., None] * rng.uniform(-1, 1, 3)
    image += (rng.uniform(-1, 1) * x + rng.uniform(-1, 1) * y)[..., None] * rng.uniform(-1, 1, 3)
    low, high = image.min(), image.max()
    return np.round(255 * (image - low) / max(high - low, 1e-6)).astype(np.uint8)


def write_calibration_recipe(folder: Path, size: int, calibration: int, parity: int) -> Path:
    """An image_folder classification recipe over synthetic images: train calibrates int8, val checks parity.

    Args:
        folder: where `train/`, `val/` and `recipe.yaml` go.
        size: image height and width.
        calibration, parity: the number of train and val images (disjoint draws).

    Returns:
        The recipe's path.
    """
    import yaml
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", calibration), ("val", parity)):
        for index in range(count):
            class_folder = folder / split / CLASS_FOLDERS[index % len(CLASS_FOLDERS)]
            class_folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(synthetic_image(rng, size)).save(class_folder / f"{index:04d}.png")
    recipe = {
        "task": "classification",
        "model": {"backbone": "resnet50", "num_classes": len(CLASS_FOLDERS), "input_shape": [size, size, 3]},
        "data": {"source": "image_folder", "train": str(folder / "train"), "val": str(folder / "val"),
                 "batch_size": 1},
        "output_dir": str(folder / "unused_run"),
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def timed_interleaved(functions: dict, batches: dict, warmup: int, repeats: int, calls: dict) -> dict:
    """Milliseconds per call of each function at each batch size, timed interleaved.

    Args:
        functions: `{model name: callable(batch)}`.
        batches: `{batch size: float32 array}`.
        warmup: untimed calls of each function per batch size first.
        repeats: timed samples per (model, batch size).
        calls: `{batch size: calls averaged in one sample}` (several at bs1, whose calls are short).

    Returns:
        `{(model, batch size): [ms per call of each repeat]}`; in each repeat
        the models run back to back (the order flips every repeat), so
        `samples[(a, bs)][i] / samples[(b, bs)][i]` is a paired ratio.
    """
    names = list(functions)
    for batch in batches.values():
        for name in names:
            for _ in range(warmup):
                functions[name](batch)
    samples = {(name, size): [] for name in names for size in batches}
    for repeat in range(repeats):
        order = names if repeat % 2 == 0 else names[::-1]
        for size, batch in batches.items():
            for name in order:
                start = time.perf_counter()
                for _ in range(calls[size]):
                    functions[name](batch)
                samples[(name, size)].append(1000.0 * (time.perf_counter() - start) / calls[size])
    return samples


def keras_logits(model, images: np.ndarray, chunk: int = 8) -> np.ndarray:
    """`model`'s outputs on `images`, computed in chunks."""
    return np.concatenate([np.asarray(model(images[i:i + chunk], training=False))
                           for i in range(0, len(images), chunk)])


def prediction_spread(logits: np.ndarray) -> dict:
    """How meaningful top-1 agreement is on `logits` (N, classes): distinct top-1 classes, top-1 vs top-2 margins."""
    top2 = np.sort(logits, axis=-1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    return {
        "distinct_top1": len(np.unique(np.argmax(logits, axis=-1))),
        "images": len(logits),
        "median_margin": float(np.median(margins)),
        "min_margin": float(np.min(margins)),
        "logit_range": float(np.max(logits) - np.min(logits)),
    }


def image_dependent_parity(reference: np.ndarray, exported: np.ndarray) -> dict:
    """Parity of the part of the logits that changes from image to image.

    Both `(N, classes)` arrays lose their mean over the images (per class),
    which is what a random-weight net's logits mostly are; what is left is
    the image-dependent signal that real weights would carry.

    Returns:
        `{"top1_agreement", "relative_max_diff", "correlation"}` of the centred logits.
    """
    reference = reference - reference.mean(axis=0)
    exported = exported - exported.mean(axis=0)
    return {
        "top1_agreement": float(np.mean(np.argmax(reference, -1) == np.argmax(exported, -1))),
        "relative_max_diff": float(np.abs(reference - exported).max() / max(np.abs(reference).max(), 1e-12)),
        "correlation": float(np.corrcoef(reference.ravel(), exported.ravel())[0, 1]),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", type=int, default=9, help="timed samples per model and batch size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per model and batch size")
    parser.add_argument("--bs1-calls", type=int, default=5, help="calls averaged per sample at batch size 1")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2, help="TensorFlow intra-op threads")
    parser.add_argument("--calibration-images", type=int, default=64, help="synthetic images calibrating int8")
    parser.add_argument("--parity-images", type=int, default=100, help="synthetic images of the parity gate")
    parser.add_argument("--int8-min-agreement", type=float, default=None,
                        help="the export's gate (default: export_model's, 0.99)")
    parser.add_argument("--skip-export", action="store_true", help="latency only")
    parser.add_argument("--work-dir", default=None, help="where files go (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file (atomically)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 64x64, batch sizes 1 and 2, 3 repeats, 1 warm-up, 8 images each")
    args = parser.parse_args(argv)
    if args.quick:
        args.input_size, args.batch_sizes, args.repeats, args.warmup, args.bs1_calls = 64, [1, 2], 3, 1, 1
        args.calibration_images, args.parity_images = 8, 8
    return args


def run(args, work_dir: Path) -> dict:
    """Converts, times and exports (see the module docstring); prints as it goes and returns the results."""
    import keras

    from keras_resnet.convert import from_torch
    from keras_resnet.export import export_model, load_exported_model
    from keras_resnet.models.resnet.analysis import count_macs

    size = args.input_size
    source = work_dir / "torchvision_resnet50.safetensors"
    count = write_state_dict(source)
    start = time.perf_counter()
    converted = from_torch(source, input_shape=(size, size, 3))
    convert_s = time.perf_counter() - start
    print(f"converted {source.name} ({count} tensors, {source.stat().st_size / 1e6:.1f} MB) in {convert_s:.1f} s: "
          f"{converted.name}, {converted.count_params():,} parameters", flush=True)
    reference = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3))
    models = {CONVERTED: converted, KERAS_APPLICATIONS: reference}
    macs = {name: count_macs(model) for name, model in models.items()}
    functions = {}
    for name, model in models.items():
        function = tf.function(lambda batch, model=model: model(batch, training=False))
        functions[name] = lambda batch, function=function: function(batch).numpy()
    rng = np.random.default_rng(0)
    batches = {bs: rng.uniform(0, 255, (bs, size, size, 3)).astype(np.float32) for bs in args.batch_sizes}
    calls = {bs: args.bs1_calls if bs == 1 else 1 for bs in args.batch_sizes}
    samples = timed_interleaved(functions, batches, args.warmup, args.repeats, calls)
    results = {
        "input_size": size, "threads": args.threads, "convert_s": convert_s, "repeats": args.repeats,
        "gmacs_per_image": {name: value / 1e9 for name, value in macs.items()},
        "latency": [], "ratios": {}, "samples_ms": {f"{name} bs{bs}": values for (name, bs), values in samples.items()},
    }
    print(f"\n{size}x{size}x3 float32, tf.function, {args.threads} threads, {args.warmup} warm-up calls, "
          f"{args.repeats} interleaved samples (bs1: {args.bs1_calls} calls each)\n")
    print("| model | GMACs/image | batch | median ms | min ms | max ms | images/s (median) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (name, bs), values in samples.items():
        median = statistics.median(values)
        row = {"model": name, "batch": bs, "median_ms": median, "min_ms": min(values), "max_ms": max(values),
               "images_per_s": 1000.0 * bs / median}
        results["latency"].append(row)
        print(f"| {name} | {macs[name] / 1e9:.2f} | {bs} | {median:.1f} | {row['min_ms']:.1f} | {row['max_ms']:.1f} "
              f"| {row['images_per_s']:.1f} |")
    print()
    for bs in args.batch_sizes:
        ours, theirs = samples[(CONVERTED, bs)], samples[(KERAS_APPLICATIONS, bs)]
        ratio = {
            "of_medians": statistics.median(ours) / statistics.median(theirs),
            "of_minima": min(ours) / min(theirs),
            "median_paired": statistics.median(a / b for a, b in zip(ours, theirs)),
        }
        results["ratios"][f"bs{bs}"] = ratio
        print(f"{CONVERTED} / {KERAS_APPLICATIONS}, bs{bs}: {ratio['of_medians']:.3f}x time (medians), "
              f"{ratio['median_paired']:.3f}x (median of paired ratios), {ratio['of_minima']:.3f}x (minima)")
    if args.skip_export:
        return results

    model_path = work_dir / "torchvision_resnet50.keras"
    converted.save(model_path)
    recipe = write_calibration_recipe(work_dir / "images", size, args.calibration_images, args.parity_images)
    val_images = np.stack([np.asarray(keras.utils.load_img(path), np.float32)
                           for path in sorted((work_dir / "images" / "val").rglob("*.png"))])
    reference_logits = keras_logits(converted, val_images)
    spread = prediction_spread(reference_logits)
    start = time.perf_counter()
    export = export_model(
        str(model_path), format="tflite", quantize="int8", calibration=str(recipe), output=work_dir / "export",
        parity_samples=args.parity_images, calibration_samples=args.calibration_images,
        int8_min_agreement=args.int8_min_agreement, name="torchvision_resnet50",
    )
    export_s = time.perf_counter() - start
    parity = export["parity"]
    size_mb = Path(export["path"]).stat().st_size / 1e6
    exported_logits = load_exported_model(export["path"], num_threads=args.threads).predict(val_images)
    centred = image_dependent_parity(reference_logits, exported_logits)
    results["int8"] = {**parity, "size_mb": size_mb, "export_s": export_s, "spread": spread, "centred": centred,
                       "keras_size_mb": model_path.stat().st_size / 1e6}
    print(f"\nint8 TFLite of the converted model ({export_s:.0f} s, {args.calibration_images} calibration / "
          f"{parity['samples']} parity images, synthetic, disjoint): {size_mb:.1f} MB "
          f"(the .keras: {results['int8']['keras_size_mb']:.1f} MB)")
    print(f"gate [{parity['criterion']}]: {'passed' if parity['passed'] else 'FAILED'}; top-1 agreement "
          f"{parity['top1_agreement']:.3f} ({parity['top1_disagreements']} of {parity['samples']} differ); "
          f"max abs logit diff {parity['max_abs_diff']:.3g}, relative {parity['relative_max_diff']:.3g}")
    print(f"Keras top-1 on the parity images: {spread['distinct_top1']} distinct classes of {spread['images']} "
          f"images; top-1 vs top-2 logit margin median {spread['median_margin']:.3g}, min {spread['min_margin']:.3g}; "
          f"logit range {spread['logit_range']:.3g}")
    print(f"image-dependent part (logits minus their mean over the images): top-1 agreement "
          f"{centred['top1_agreement']:.3f}, relative max diff {centred['relative_max_diff']:.3g}, "
          f"correlation {centred['correlation']:.4f}")
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from keras_resnet.atomic_files import write_json
    from keras_resnet_settings.errors import ExportParityError

    if not FIXTURE.exists():
        print(f"error: {FIXTURE} is missing; run from a checkout of the repository (it holds the state dict's "
              "layout).", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="keras_resnet_torch_bench_") as tmp:
        work_dir = Path(args.work_dir) if args.work_dir else Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        try:
            results = run(args, work_dir)
        except ExportParityError as error:
            print(f"int8 parity gate FAILED: {error}", file=sys.stderr)
            return 1
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
