"""Crop-trained vs resize-trained models on real field data (issue 19), 2 CPU cores.

Two small real datasets that packages on the Python package index ship
inside their wheels (fetched with `pip download --no-deps`, never at test
time):

- **Trees (detection, one class).** DeepForest's sample NEON airborne RGB
  tiles (10 cm/pixel, tree crowns ~15-60 px) with VOC XML boxes, from the
  `deepforest` wheel (MIT licence; NEON data are public domain):
  train = `2019_YELL_2_528000_4978000_image_crop2` (2472 x 2299, 574 trees)
  + `OSBS_029` (400 x 400, 61 trees; SOAP_061 is left out: it labels Alive/Dead),
  val = `2019_YELL_2_541000_4977000_image_crop` (1035 x 1249, 279 trees).
- **Tree patches (classification, tree / ground).** 64 x 64 px patches of
  the same tiles: centred on a labelled crown, or touching no labelled box
  (up to 300 per class from the train tiles, 100 from the val tile).
- **Nuclei (segmentation, background + nucleus).** StarDist's 2D test image,
  a 512 x 512 16-bit fluorescence crop of the 2018 Data Science Bowl
  (BBBC038, CC0) with its instance mask, from the `stardist` wheel (BSD-3):
  the instance ids become one "nucleus" class; the image stays a 16-bit PNG
  (values 0..235 of 65535: read at the training set's bit depth, 8 bits
  here, see `keras_resnet.data.images.dataset_bit_depth`, where /257 would
  make it black); train = columns 0..319, val = columns 320..511.

`prepare` writes them as a VOC flat folder and a mask folder under
`data/field/`; `run` trains each task twice on the same data, steps and
batch size -- `data.sampling: resize` (today's default) and `crop` -- and
prints one markdown row per run: the metric on the full validation images at
native resolution (detection: pycocotools mAP in original pixels;
segmentation: mIoU of the mask predicted at the image's own size, resize
runs resized in and out, crop runs tiled) and the minutes.

    python benchmarks/field_data.py prepare
    python benchmarks/field_data.py run --task detection --epochs 12
    python benchmarks/field_data.py run --task segmentation --epochs 30
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "field"
WHEELS = {"deepforest": "deepforest==2.1.0", "stardist": "stardist==0.9.2"}
TREES_TRAIN = ("2019_YELL_2_528000_4978000_image_crop2", "OSBS_029")  # SOAP_061 labels Alive/Dead
TREES_VAL = ("2019_YELL_2_541000_4977000_image_crop",)
NUCLEI_SPLIT_COLUMN = 320


def fetch_wheel(requirement: str, cache: Path) -> Path:
    """`pip download --no-deps` one wheel into `cache` (reused when there) and return its path."""
    name = requirement.split("=")[0]
    found = sorted(cache.glob(f"{name}-*.whl"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        print(f"pip download --no-deps {requirement} -> {cache}")
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", requirement,
                        "-d", str(cache)], check=True)
        found = sorted(cache.glob(f"{name}-*.whl"))
    return found[-1]


def _extract(wheel: Path, member: str, target: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(target, "wb") as out:
        shutil.copyfileobj(source, out)
    return target


def prepare_trees(wheel: Path, root: Path) -> None:
    """VOC flat folders `root/trees/{train,val}`: PNG + XML of the same stem (XML <filename> fixed to the PNG)."""
    for split, stems in (("train", TREES_TRAIN), ("val", TREES_VAL)):
        folder = root / "trees" / split
        folder.mkdir(parents=True, exist_ok=True)
        for stem in stems:
            _extract(wheel, f"deepforest/data/{stem}.png", folder / f"{stem}.png")
            xml = folder / f"{stem}.xml"
            _extract(wheel, f"deepforest/data/{stem}.xml", xml)
            text = xml.read_text()
            start, end = text.find("<filename>"), text.find("</filename>")
            if start >= 0:
                text = text[: start + len("<filename>")] + f"{stem}.png" + text[end:]
            xml.write_text(text)


def prepare_nuclei(wheel: Path, root: Path) -> None:
    """Mask folders `root/nuclei/{train,val}/{images,masks}` and classes.txt (background, nucleus)."""
    with tempfile.TemporaryDirectory() as scratch:
        image = np.asarray(Image.open(_extract(wheel, "stardist/data/images/img2d.tif", Path(scratch) / "i.tif")))
        labels = np.asarray(Image.open(_extract(wheel, "stardist/data/images/mask2d.tif", Path(scratch) / "m.tif")))
    mask = (labels > 0).astype(np.uint8)
    for split, columns in (("train", slice(0, NUCLEI_SPLIT_COLUMN)), ("val", slice(NUCLEI_SPLIT_COLUMN, None))):
        folder = root / "nuclei" / split
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(image[:, columns]).astype(np.uint16)).save(folder / "images" / "dsb2018_crop.png")
        Image.fromarray(mask[:, columns]).save(folder / "masks" / "dsb2018_crop.png")
        (folder / "classes.txt").write_text("background\nnucleus\n")


PATCH = 64  # tree_patches: side of a patch (px, 10 cm/px: 6.4 m)
PATCHES_PER_CLASS = {"train": 300, "val": 100}


def _boxes(xml: Path) -> np.ndarray:
    import xml.etree.ElementTree as ElementTree

    found = []
    for box in ElementTree.parse(xml).getroot().iter("bndbox"):
        found.append([float(box.find(key).text) for key in ("xmin", "ymin", "xmax", "ymax")])
    return np.asarray(found, np.float32).reshape(-1, 4)


def prepare_tree_patches(root: Path, seed: int = 0) -> None:
    """Class folders `root/tree_patches/{train,val}/{tree,ground}`: 64 px patches of the tree tiles.

    `tree`: centred on a labelled crown; `ground`: random patches that touch no labelled box. Real field
    imagery labelled by the DeepForest boxes, split as the detection data (train tiles / the val tile).
    """
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        trees, ground = [], []
        for xml in sorted((root / "trees" / split).glob("*.xml")):
            image = np.asarray(Image.open(xml.with_suffix(".png")).convert("RGB"))
            height, width = image.shape[:2]
            boxes = _boxes(xml)
            for x0, y0, x1, y1 in boxes:
                cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
                left, top = min(max(cx - PATCH // 2, 0), width - PATCH), min(max(cy - PATCH // 2, 0), height - PATCH)
                trees.append(image[top:top + PATCH, left:left + PATCH])
            for _ in range(200 * len(boxes)):
                if len(ground) >= 4 * PATCHES_PER_CLASS[split]:
                    break
                left, top = int(rng.integers(0, width - PATCH)), int(rng.integers(0, height - PATCH))
                touches = ((boxes[:, 0] < left + PATCH) & (boxes[:, 2] > left) & (boxes[:, 1] < top + PATCH)
                           & (boxes[:, 3] > top))
                if not touches.any():
                    ground.append(image[top:top + PATCH, left:left + PATCH])
        for name, patches in (("tree", trees), ("ground", ground)):
            folder = root / "tree_patches" / split / name
            folder.mkdir(parents=True, exist_ok=True)
            chosen = rng.permutation(len(patches))[:PATCHES_PER_CLASS[split]]
            for index in chosen:
                Image.fromarray(np.ascontiguousarray(patches[index])).save(folder / f"{name}_{index:04d}.png")


def prepare(root: Path, cache: Path) -> None:
    prepare_trees(fetch_wheel(WHEELS["deepforest"], cache), root)
    prepare_nuclei(fetch_wheel(WHEELS["stardist"], cache), root)
    prepare_tree_patches(root)
    print(f"wrote {root}/trees (VOC, 1 class), {root}/nuclei (mask folder, 2 classes) and {root}/tree_patches "
          "(class folders tree / ground)")


DETECTION_RECIPE = "tasks/detection/voc_retinanet_resnet50.yaml"
SEGMENTATION_RECIPE = "tasks/segmentation/mask_folder_fpn_resnet50.yaml"


def detection_overrides(root: Path, sampling: str, epochs: int, windows: int) -> list[str]:
    """ResNet-18 RetinaNet at 256 px on the trees; `windows` examples per image per epoch in both modes."""
    per_image = [f"data.crops_per_image={windows}"] if sampling == "crop" else [f"data.repeat={windows}"]
    return [
        "model.backbone=resnet18", "model.num_classes=1", "data.class_names=[Tree]", "model.input_shape=[256,256,3]",
        f"data.train={root / 'trees' / 'train'}", f"data.val={root / 'trees' / 'val'}", "data.batch_size=4",
        "data.max_boxes=600", "data.cache=true", f"data.sampling={sampling}", *per_image,
        f"train.epochs={epochs}", "train.learning_rate=0.004", "train.warmup_epochs=2",
        "model.decoder_args.max_detections=300", "train.mixed_precision=float32",
    ]


def segmentation_overrides(root: Path, sampling: str, epochs: int, windows: int) -> list[str]:
    """ResNet-18 semantic FPN at 128 px on the nuclei; `windows` examples per epoch in both modes."""
    per_image = [f"data.crops_per_image={windows}"] if sampling == "crop" else [f"data.repeat={windows}"]
    return [
        "model.backbone=resnet18", "model.num_classes=2", "model.input_shape=[128,128,3]",
        f"data.train={root / 'nuclei' / 'train'}", f"data.val={root / 'nuclei' / 'val'}", "data.batch_size=4",
        "data.cache=true", f"data.sampling={sampling}", *per_image, f"train.epochs={epochs}",
        "train.mixed_precision=float32",
    ]


def native_miou(run_dir: Path, root: Path, tile: str) -> float:
    """mIoU of `keras-resnet predict`'s mask (at the image's own size) against the true val mask."""
    from keras_resnet.predict.segmentation import predict_masks

    image = root / "nuclei" / "val" / "images" / "dsb2018_crop.png"
    truth = np.asarray(Image.open(root / "nuclei" / "val" / "masks" / "dsb2018_crop.png"), np.int64)
    with tempfile.TemporaryDirectory() as out:
        result = predict_masks(run_dir, image, out, tile=tile)[0]
        predicted = np.asarray(Image.open(result["mask"]), np.int64)
    assert predicted.shape == truth.shape, (predicted.shape, truth.shape)
    ious = [np.sum((predicted == c) & (truth == c)) / max(np.sum((predicted == c) | (truth == c)), 1) for c in (0, 1)]
    return float(np.mean(ious))


def run(task: str, root: Path, epochs: int, windows: int, runs: Path) -> list[dict]:
    import time

    from keras_resnet.training.runner import train_from_config

    rows = []
    for sampling in ("resize", "crop"):
        output_dir = runs / f"field_{task}_{sampling}"
        shutil.rmtree(output_dir, ignore_errors=True)
        if task == "detection":
            recipe, overrides = DETECTION_RECIPE, detection_overrides(root, sampling, epochs, windows)
        else:
            recipe, overrides = SEGMENTATION_RECIPE, segmentation_overrides(root, sampling, epochs, windows)
        start = time.time()
        metrics = train_from_config(recipe, [*overrides, f"output_dir={output_dir}"])
        minutes = (time.time() - start) / 60
        row = {"task": task, "sampling": sampling, "epochs": epochs, "windows_per_image": windows,
               "minutes": round(minutes, 1)}
        if task == "detection":
            row.update({key: round(metrics[key], 4) for key in ("mAP", "AP50", "AP75")})
        else:
            row["mIoU_run"] = round(metrics["mIoU"], 4)
            row["mIoU_native"] = round(native_miou(output_dir, root, "off" if sampling == "resize" else "auto"), 4)
        rows.append(row)
        print(row, flush=True)
    print()
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[key]) for key in keys) + " |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="fetch the two wheels and write data/field/")
    p.add_argument("--root", type=Path, default=DATA)
    p.add_argument("--wheels", type=Path, default=Path.home() / ".cache" / "keras_resnet" / "wheels")
    r = sub.add_parser("run", help="train resize vs crop on one task and print markdown rows")
    r.add_argument("--task", choices=("detection", "segmentation"), required=True)
    r.add_argument("--root", type=Path, default=DATA)
    r.add_argument("--epochs", type=int, default=10)
    r.add_argument("--windows", type=int, default=16, help="examples per training image per epoch (both modes)")
    r.add_argument("--runs", type=Path, default=ROOT / "runs")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.root, args.wheels)
    else:
        run(args.task, args.root, args.epochs, args.windows, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
