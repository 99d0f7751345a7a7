"""Same recipes, same results: compare two checkouts of keras_resnet through the command line alone.

Runs tiny versions of the task recipes (classification on Fashion-MNIST, the
segmentation and detection mosaics, a crop-sampled segmentation run on a
generated mask folder: validation tiles and tiled evaluation) with
`keras-resnet train`, exports each run to float32 TFLite, predicts (tiled for
the crop run), and saves every array that comes out: the trained weights,
the history and metrics, the export's outputs on fixed inputs, the predictions.
Run it once per checkout, then compare:

    PYTHONPATH=/path/to/old/checkout python benchmarks/restructure_parity.py write /tmp/old.npz
    python benchmarks/restructure_parity.py write /tmp/new.npz
    python benchmarks/restructure_parity.py compare /tmp/old.npz /tmp/new.npz

Only the CLI and `keras.saving.load_model` are used, so the two checkouts may
differ in every internal API. Op determinism is on, so equal code gives equal bits.
"""

import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "classification": ("tasks/classification/fashion_mnist_resnet20.yaml", [
        "data.limit_train=256", "data.limit_val=128", "data.batch_size=64", "train.epochs=2",
        "train.time_budget_minutes=null", "train.mixed_precision=false", "train.jit_compile=false"]),
    "segmentation": ("tasks/segmentation/mosaic_deeplabv3plus_resnet18.yaml", [
        "data.mosaic_train_size=64", "data.mosaic_val_size=16", "data.batch_size=16", "train.epochs=2",
        "train.mixed_precision=false"]),
    "detection": ("tasks/detection/mosaic_retinanet_resnet18.yaml", [
        "data.mosaic_train_size=32", "data.mosaic_val_size=8", "data.batch_size=8", "train.epochs=1",
        "train.mixed_precision=false", "model.input_shape=[128,128,1]"]),
}


def make_mask_folder(root: Path):
    """Six 96x80 RGB images with blob masks of 3 classes (0 background), for the crop-sampled run."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("images", "masks"):
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for index in range(4 if split == "train" else 2):
            mask = np.zeros((96, 80), np.uint8)
            for _ in range(3):
                y, x = rng.integers(0, 80), rng.integers(0, 64)
                mask[y : y + 16, x : x + 16] = rng.integers(1, 3)
            image = np.stack([mask * 70 + rng.integers(0, 40, mask.shape)] * 3, -1).astype(np.uint8)
            Image.fromarray(image).save(root / split / "images" / f"{index}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"{index}.png")


def cli(*argv):
    from keras_resnet_cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(list(argv))
    if status != 0:
        raise SystemExit(f"keras-resnet {' '.join(argv)} exited {status}:\n{out.getvalue()[-3000:]}")
    return out.getvalue()


def run_outputs(name, run_dir: Path, arrays: dict, export_input_shape, predict_images=(), tile=None):
    import keras

    import keras_resnet  # noqa: F401  (registers the custom objects)

    model = keras.saving.load_model(run_dir / "best_model.keras", compile=False)
    for index, weight in enumerate(model.get_weights()):
        arrays[f"{name}/weights/{index:03d}"] = weight
    arrays[f"{name}/history"] = np.genfromtxt(run_dir / "history.csv", delimiter=",", skip_header=1)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key, value in sorted(metrics.items()):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "seconds" not in key \
                and "per_second" not in key:
            arrays[f"{name}/metrics/{key}"] = np.asarray(value, np.float64)
    export_dir = run_dir / "export"
    cli("export", str(run_dir), "--format", "tflite", "--output", str(export_dir), "--parity-samples", "4")
    tflite = next(export_dir.glob("*.tflite"))
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tflite))
    interpreter.allocate_tensors()
    feed = np.random.default_rng(1).uniform(0, 255, (1, *export_input_shape)).astype(np.float32)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], feed)
    interpreter.invoke()
    for detail in sorted(interpreter.get_output_details(), key=lambda d: d["name"]):
        arrays[f"{name}/tflite/{detail['name']}"] = interpreter.get_tensor(detail["index"])
    if predict_images:
        flags = ["--tile", str(tile)] if tile else []
        found = json.loads(cli("predict", str(run_dir), *map(str, predict_images), "--json",
                               "--output", str(run_dir / "predictions"), *flags))
        for index, result in enumerate(found):
            for key in ("mask",):
                if key in result:
                    from PIL import Image

                    arrays[f"{name}/predict/{index}/mask"] = np.asarray(Image.open(result[key]))
            for key in ("top", "detections"):
                if key in result:
                    arrays[f"{name}/predict/{index}/{key}"] = np.asarray(
                        [[entry.get("score", 0.0), *entry.get("box", [])] for entry in result[key]], np.float64)


def write(out_path):
    import keras_resnet

    print(f"keras_resnet from {keras_resnet.__file__}", file=sys.stderr)
    arrays = {}
    with tempfile.TemporaryDirectory(prefix="restructure_parity_") as tmp:
        tmp = Path(tmp)
        for task, (recipe, overrides) in TINY.items():
            run_dir = tmp / task
            cli("train", str(ROOT / recipe), "--set", *overrides, f"output_dir={run_dir}")
            shape = {"classification": (28, 28, 1), "segmentation": (64, 64, 1), "detection": (128, 128, 1)}[task]
            run_outputs(task, run_dir, arrays, shape)
            print(f"{task}: done", file=sys.stderr)
        folder = tmp / "masks"
        make_mask_folder(folder)
        run_dir = tmp / "segmentation_crop"
        cli("train", str(ROOT / "tasks/segmentation/mask_folder_fpn_resnet50.yaml"), "--set",
            "model.backbone=resnet18", "model.num_classes=3", "model.input_shape=[32,32,3]", "model.weights=null",
            f"data.train={folder / 'train'}", f"data.val={folder / 'val'}", "data.sampling=crop",
            "data.crops_per_image=2", "data.tile_overlap=0.25", "data.batch_size=4", "train.epochs=2",
            "train.mixed_precision=false", "model.freeze_stages=-1", "train.head_epochs=0",
            f"output_dir={run_dir}")
        run_outputs("segmentation_crop", run_dir, arrays, (32, 32, 3),
                    predict_images=sorted((folder / "val" / "images").glob("*.png")), tile="auto")
        print("segmentation_crop: done", file=sys.stderr)
    np.savez(out_path, **arrays)
    print(f"wrote {len(arrays)} arrays to {out_path}")


def compare(old_path, new_path):
    old, new = np.load(old_path), np.load(new_path)
    only_old, only_new = sorted(set(old) - set(new)), sorted(set(new) - set(old))
    worst, differing = 0.0, []
    for key in sorted(set(old) & set(new)):
        a, b = old[key], new[key]
        if a.shape != b.shape:
            differing.append(f"{key}: shape {a.shape} vs {b.shape}")
            continue
        diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
        if np.isnan(diff) or diff > 0:
            differing.append(f"{key}: max abs diff {diff:g}")
        worst = max(worst, 0.0 if np.isnan(diff) else diff)
    print(f"{len(set(old) & set(new))} arrays compared; {len(differing)} differ; worst max abs diff {worst:g}")
    for line in differing[:40]:
        print("  " + line)
    for key in only_old:
        print(f"  only in {old_path}: {key}")
    for key in only_new:
        print(f"  only in {new_path}: {key}")
    return 1 if differing or only_old or only_new else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["write"]:
        write(sys.argv[2])
    elif sys.argv[1:2] == ["compare"]:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        print(__doc__)
        sys.exit(2)
