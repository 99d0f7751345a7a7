"""The weights catalogue: every published checkpoint keras_resnet loads by name, in one table.

Each `WeightsEntry` is one set of weights for one preset: where the source
publishes the file (URLs; for timm, the Hugging Face repo that hosts it as
`model.safetensors`), how to check it (the sha256 prefix torchvision and
timm put in their file names, which `torch.hub` checks too; md5 for
keras.applications, as `keras.utils.get_file` checks it), its size, licence,
the accuracy the source publishes, and the evaluation it expects (resize,
crop, interpolation, normalisation). Where each figure comes from is in the
comment above its block.

Names a user types (`weights=` of `from_preset`, `model.weights` in a
recipe, `--weights` on the command line):

- `"imagenet"`: the preset's default ImageNet weights (`DEFAULT_IMAGENET`):
  torchvision's own default (`weights="DEFAULT"`) for the torchvision-layout
  presets, timm's RA2 weights for the -D and SE presets, keras.applications
  for the `_v1` / `_v2` presets.
- an explicit tag: `"torchvision:IMAGENET1K_V1"`, `"torchvision:IMAGENET1K_V2"`,
  `"timm:a1_in1k"`, `"keras_applications"`...
- `"coco"` / `"coco_voc"` for the task presets (`retinanet_resnet50_fpn_v2`,
  `deeplabv3_resnet50`...).

This module imports nothing beyond the standard library: `keras-resnet
weights` lists it without starting TensorFlow. Downloading is
`keras_resnet.weights`.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path

from keras_resnet_settings.errors import ConfigError

CACHE_VARIABLE = "KERAS_RESNET_CACHE"
HF_FILENAME = "model.safetensors"  # the weights file of a timm repository on the Hugging Face Hub
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # of 0..1 RGB pixels (torchvision, timm)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET = "imagenet"
TASK_WEIGHTS = ("coco", "coco_voc")
TORCHVISION_HOST = "https://download.pytorch.org/models/"
TIMM_RELEASES = "https://github.com/huggingface/pytorch-image-models/releases/download/"
TIMM_RELEASES_OLD = "https://github.com/rwightman/pytorch-image-models/releases/download/"
KERAS_HOST = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
TORCHVISION_LICENSE = "BSD-3-Clause (torchvision); trained on ImageNet-1k, whose terms of access apply"
TIMM_LICENSE = "Apache-2.0 (timm); trained on ImageNet-1k, whose terms of access apply"
KERAS_LICENSE = "MIT (keras-applications; v1 ported from Kaiming He's release)"
COCO_LICENSE = "BSD-3-Clause (torchvision); trained on COCO train2017 (CC BY 4.0 annotations)"


@dataclass(frozen=True)
class WeightsEntry:
    """One published checkpoint for one preset (see the module docstring).

    Attributes:
        preset: the keras_resnet preset (backbone) or task preset it loads into.
        tag: `"<source>:<name>"` as the source names it, or `"keras_applications"`.
        task: "classification", "detection" or "segmentation".
        dataset: what it was trained on.
        filename: the file name in the cache (the source's own).
        urls: where the source publishes the file, tried in order.
        hash_prefix: the first hex digits of the file's sha256 (the source's file name carries them).
        md5: the file's md5 (keras.applications publishes md5 hashes).
        hf_repo: a Hugging Face repo with the same weights as `model.safetensors` (timm's hosting).
        size_mb: the file's size as the source states it (MB).
        license: the licence of the weights.
        metrics: the accuracy the source publishes (top1/top5 in %, box_map, miou, pixel_acc).
        evaluation: the input the figures were measured with: resize, crop, interpolation, mean, std.
        arch: the source's architecture name (what the converter is told).
    """

    preset: str
    tag: str
    task: str
    dataset: str
    filename: str
    urls: tuple
    size_mb: float | None
    license: str
    metrics: dict
    evaluation: dict
    arch: str
    hash_prefix: str | None = None
    md5: str | None = None
    hf_repo: str | None = None
    notes: str = ""
    aliases: tuple = field(default=())

    @property
    def name(self) -> str:
        """`"<preset> <tag>"`, how listings and messages name it."""
        return f"{self.preset} {self.tag}"

    @property
    def source(self) -> str:
        return self.tag.split(":", 1)[0]

    def metric_text(self) -> str:
        parts = []
        for key, label in (("top1", "top-1"), ("top5", "top-5"), ("box_map", "box mAP"), ("miou", "mIoU"),
                           ("pixel_acc", "pixel acc.")):
            if self.metrics.get(key) is not None:
                parts.append(f"{label} {self.metrics[key]:g}")
        if self.metrics.get("at") is not None:
            parts.append(f"at {self.metrics['at']}")
        return ", ".join(parts) or "not published here"

    def evaluation_text(self) -> str:
        e = self.evaluation
        resize = f"resize {e['resize']}, " if e.get("resize") else ""
        return f"{resize}crop {e['crop']}, {e.get('interpolation', 'bilinear')}"


def _torchvision(preset, version, digest, size_mb, top1, top5, resize=256):
    filename = f"{preset}-{digest}.pth"
    return WeightsEntry(
        preset=preset, tag=f"torchvision:IMAGENET1K_{version}", task="classification", dataset="ImageNet-1k",
        filename=filename, urls=(TORCHVISION_HOST + filename,), hash_prefix=digest, size_mb=size_mb,
        license=TORCHVISION_LICENSE, metrics={"top1": top1, "top5": top5, "at": "224"},
        evaluation={"resize": resize, "crop": 224, "interpolation": "bilinear", "mean": IMAGENET_MEAN,
                    "std": IMAGENET_STD},
        arch=preset,
    )


def _timm(preset, tag, url, top1=None, top5=None, at=None, input_size=224, crop_pct=0.875, arch=None):
    filename = url.rsplit("/", 1)[-1]
    digest = filename.rsplit("-", 1)[-1].split(".")[0]
    model = arch or preset
    return WeightsEntry(
        preset=preset, tag=f"timm:{tag}", task="classification", dataset="ImageNet-1k",
        filename=filename, urls=(url,), hash_prefix=digest, hf_repo=f"timm/{model}.{tag}", size_mb=None,
        license=TIMM_LICENSE, metrics={"top1": top1, "top5": top5, "at": at},
        evaluation={"resize": round(input_size / crop_pct), "crop": input_size, "interpolation": "bicubic",
                    "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        arch=model,
    )


def _keras(preset, keras_name, md5, size_mb, top1, top5, mode):
    filename = f"{keras_name}_weights_tf_dim_ordering_tf_kernels.h5"
    caffe = mode == "caffe"
    return WeightsEntry(
        preset=preset, tag="keras_applications", task="classification", dataset="ImageNet-1k",
        filename=filename, urls=(KERAS_HOST + filename,), md5=md5, size_mb=size_mb,
        license=KERAS_LICENSE if preset.endswith("_v1") else "Apache-2.0 (Keras)",
        metrics={"top1": top1, "top5": top5, "at": "224"},
        evaluation={"resize": 256, "crop": 224, "interpolation": "bilinear",
                    "mean": "BGR, minus (103.939, 116.779, 123.68)" if caffe else "pixels / 127.5 - 1",
                    "std": None},
        arch=keras_name,
    )


def _torchvision_task(preset, digest, task, dataset, size_mb, metrics, evaluation):
    filename = f"{preset}_coco-{digest}.pth"
    return WeightsEntry(
        preset=preset, tag="torchvision:COCO_V1" if task == "detection" else "torchvision:COCO_WITH_VOC_LABELS_V1",
        task=task, dataset=dataset, filename=filename, urls=(TORCHVISION_HOST + filename,), hash_prefix=digest,
        size_mb=size_mb, license=COCO_LICENSE, metrics=metrics, evaluation=evaluation, arch=preset,
        aliases=("coco",) if task == "detection" else ("coco_voc", "coco"),
    )


_DETECTION_EVALUATION = {"resize": "shorter side 800 (longer at most 1333)", "crop": None,
                         "interpolation": "bilinear", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
_SEGMENTATION_EVALUATION = {"resize": "shorter side 520", "crop": None, "interpolation": "bilinear",
                            "mean": IMAGENET_MEAN, "std": IMAGENET_STD}

CATALOGUE = (
    # torchvision: URLs, sizes (MB, `_file_size`) and ImageNet-1k acc@1/acc@5 at 224 from the `*_Weights`
    # enums of torchvision/models/resnet.py (torchvision 0.13+); V1 resize 256, V2 resize 232 (transforms).
    _torchvision("resnet18", "V1", "f37072fd", 44.661, 69.758, 89.078),
    _torchvision("resnet34", "V1", "b627a593", 83.275, 73.314, 91.420),
    _torchvision("resnet50", "V1", "0676ba61", 97.781, 76.130, 92.862),
    _torchvision("resnet50", "V2", "11ad3fa6", 97.79, 80.858, 95.434, resize=232),
    _torchvision("resnet101", "V1", "63fe2227", 170.511, 77.374, 93.546),
    _torchvision("resnet101", "V2", "cd907fc2", 170.53, 81.886, 95.780, resize=232),
    _torchvision("resnet152", "V1", "394f9c45", 230.434, 78.312, 94.046),
    _torchvision("resnet152", "V2", "f82ba261", 230.474, 82.284, 96.002, resize=232),
    _torchvision("resnext50_32x4d", "V1", "7cdf4587", 95.789, 77.618, 93.698),
    _torchvision("resnext50_32x4d", "V2", "1a0047aa", 95.833, 81.198, 95.340, resize=232),
    _torchvision("resnext101_32x8d", "V1", "8ba56ff5", 339.586, 79.312, 94.526),
    _torchvision("resnext101_32x8d", "V2", "110c445d", 339.673, 82.834, 96.228, resize=232),
    _torchvision("resnext101_64x4d", "V1", "173b62eb", 319.318, 83.246, 96.454, resize=232),
    _torchvision("wide_resnet50_2", "V1", "95faca4d", 131.82, 78.468, 94.086),
    _torchvision("wide_resnet50_2", "V2", "9ba9bcbe", 263.124, 81.602, 95.758, resize=232),
    _torchvision("wide_resnet101_2", "V1", "32ee1156", 242.896, 78.848, 94.284),
    _torchvision("wide_resnet101_2", "V2", "d733dc28", 484.747, 82.510, 96.020, resize=232),
    # timm: URLs and train/test sizes from `default_cfgs` of timm/models/resnet.py (hf_hub_id "timm/" = the
    # Hugging Face repo timm/<model>.<tag>, model.safetensors); top-1/top-5 and the test size from timm's
    # results/results-imagenet.csv (ImageNet-1k val at the test size). resnet34d's row was not in the copy read
    # offline, so its accuracy is left blank rather than guessed.
    _timm("resnet18d", "ra2_in1k", TIMM_RELEASES_OLD + "v0.1-weights/resnet18d_ra2-48a79e06.pth",
          73.794, 91.838, "288"),
    _timm("resnet34d", "ra2_in1k", TIMM_RELEASES_OLD + "v0.1-weights/resnet34d_ra2-f8dcfcaf.pth"),
    _timm("resnet50d", "ra2_in1k", TIMM_RELEASES_OLD + "v0.1-weights/resnet50d_ra2-464e36ba.pth",
          81.356, 95.738, "288"),
    _timm("resnet50d", "a1_in1k", TIMM_RELEASES + "v0.1-rsb-weights/resnet50d_a1_0-e20cff14.pth",
          81.450, 95.218, "288", crop_pct=0.95),
    _timm("resnet101d", "ra2_in1k", TIMM_RELEASES_OLD + "v0.1-weights/resnet101d_ra2-2803ffab.pth",
          83.016, 96.452, "320", input_size=256, crop_pct=0.95),
    _timm("resnet18", "a1_in1k", TIMM_RELEASES + "v0.1-rsb-weights/resnet18_a1_0-d63eafa0.pth",
          73.158, 91.026, "288", crop_pct=0.95),
    _timm("resnet34", "a1_in1k", TIMM_RELEASES + "v0.1-rsb-weights/resnet34_a1_0-46f8f793.pth",
          77.918, 93.766, "288", crop_pct=0.95),
    _timm("resnet50", "a1_in1k", TIMM_RELEASES_OLD + "v0.1-rsb-weights/resnet50_a1_0-14fe96d1.pth",
          81.214, 95.102, "288", crop_pct=0.95),
    _timm("resnet101", "a1h_in1k", TIMM_RELEASES_OLD + "v0.1-rsb-weights/resnet101_a1h-36d3f2aa.pth",
          82.778, 96.310, "288", crop_pct=0.95),
    _timm("resnet152", "a1h_in1k", TIMM_RELEASES_OLD + "v0.1-rsb-weights/resnet152_a1h-dc400468.pth",
          83.450, 96.538, "288", crop_pct=0.95),
    _timm("resnext50_32x4d", "a1h_in1k", TIMM_RELEASES_OLD + "v0.1-rsb-weights/resnext50_32x4d_a1h-0146ab0a.pth",
          82.014, 95.934, "288", crop_pct=0.95),
    _timm("resnext101_64x4d", "c1_in1k", TIMM_RELEASES_OLD + "v0.1-tpu-weights/resnext101_64x4d_c-0d0e0cc0.pth",
          83.156, 96.374, "288", crop_pct=0.95),
    _timm("wide_resnet50_2", "racm_in1k", TIMM_RELEASES_OLD + "v0.1-weights/wide_resnet50_racm-8234f177.pth",
          82.280, 96.064, "288"),
    # seresnet50.ra2_in1k: accuracy from timm's results-imagenet.csv; its .pth release URL was not in the copy of
    # default_cfgs read offline, so only the Hugging Face repo (timm's hosting) is listed.
    WeightsEntry(
        preset="seresnet50", tag="timm:ra2_in1k", task="classification", dataset="ImageNet-1k",
        filename="seresnet50.ra2_in1k.safetensors", urls=(), hf_repo="timm/seresnet50.ra2_in1k", size_mb=None,
        license=TIMM_LICENSE, metrics={"top1": 81.284, "top5": 95.652, "at": "288"},
        evaluation={"resize": 256, "crop": 224, "interpolation": "bicubic", "mean": IMAGENET_MEAN,
                    "std": IMAGENET_STD},
        arch="seresnet50",
    ),
    # keras.applications: file names and md5 hashes from WEIGHTS_HASHES of keras/src/applications/resnet.py and
    # resnet_v2.py (the include_top files); top-1/top-5 and sizes (MB) from the table on keras.io/api/applications.
    _keras("resnet50_v1", "resnet50", "2cb95161c43110f7111970584f804107", 98, 74.9, 92.1, "caffe"),
    _keras("resnet101_v1", "resnet101", "f1aeb4b969a6efcfb50fad2f0c20cfc5", 171, 76.4, 92.8, "caffe"),
    _keras("resnet152_v1", "resnet152", "100835be76be38e30d865e96f2aaae62", 232, 76.6, 93.1, "caffe"),
    _keras("resnet50_v2", "resnet50v2", "3ef43a0b657b3be2300d5770ece849e0", 98, 76.0, 93.0, "tf"),
    _keras("resnet101_v2", "resnet101v2", "6343647c601c52e1368623803854d971", 171, 77.2, 93.8, "tf"),
    _keras("resnet152_v2", "resnet152v2", "a49b44d1979771252814e80f8ec446f9", 232, 78.0, 94.2, "tf"),
    # torchvision task weights: URLs, sizes and COCO-val2017 box mAP / VOC-labels mIoU and pixel accuracy from
    # torchvision/models/detection/retinanet.py and torchvision/models/segmentation/{deeplabv3,fcn}.py.
    _torchvision_task("retinanet_resnet50_fpn", "eeacb38b", "detection", "COCO train2017 (91 ids, 80 classes)",
                      130.267, {"box_map": 36.4}, _DETECTION_EVALUATION),
    _torchvision_task("retinanet_resnet50_fpn_v2", "5905b1c5", "detection", "COCO train2017 (91 ids, 80 classes)",
                      146.037, {"box_map": 41.5}, _DETECTION_EVALUATION),
    _torchvision_task("deeplabv3_resnet50", "cd0a2569", "segmentation", "COCO train2017, the 20 VOC classes",
                      160.515, {"miou": 66.4, "pixel_acc": 92.4}, _SEGMENTATION_EVALUATION),
    _torchvision_task("deeplabv3_resnet101", "586e9e4e", "segmentation", "COCO train2017, the 20 VOC classes",
                      233.217, {"miou": 67.4, "pixel_acc": 92.4}, _SEGMENTATION_EVALUATION),
    _torchvision_task("fcn_resnet50", "1167a1af", "segmentation", "COCO train2017, the 20 VOC classes",
                      135.009, {"miou": 60.5, "pixel_acc": 91.4}, _SEGMENTATION_EVALUATION),
    _torchvision_task("fcn_resnet101", "7ecb50ca", "segmentation", "COCO train2017, the 20 VOC classes",
                      207.711, {"miou": 63.7, "pixel_acc": 91.9}, _SEGMENTATION_EVALUATION),
)

# `weights="imagenet"`: torchvision's default where it publishes weights (V2 where there is one), timm's RA2 for
# the -D and SE presets (torchvision has none), keras.applications for its own layouts.
DEFAULT_IMAGENET = {
    "resnet18": "torchvision:IMAGENET1K_V1",
    "resnet34": "torchvision:IMAGENET1K_V1",
    "resnet50": "torchvision:IMAGENET1K_V2",
    "resnet101": "torchvision:IMAGENET1K_V2",
    "resnet152": "torchvision:IMAGENET1K_V2",
    "resnext50_32x4d": "torchvision:IMAGENET1K_V2",
    "resnext101_32x8d": "torchvision:IMAGENET1K_V2",
    "resnext101_64x4d": "torchvision:IMAGENET1K_V1",
    "wide_resnet50_2": "torchvision:IMAGENET1K_V2",
    "wide_resnet101_2": "torchvision:IMAGENET1K_V2",
    "resnet18d": "timm:ra2_in1k",
    "resnet34d": "timm:ra2_in1k",
    "resnet50d": "timm:ra2_in1k",
    "resnet101d": "timm:ra2_in1k",
    "seresnet50": "timm:ra2_in1k",
    "resnet50_v1": "keras_applications",
    "resnet101_v1": "keras_applications",
    "resnet152_v1": "keras_applications",
    "resnet50_v2": "keras_applications",
    "resnet101_v2": "keras_applications",
    "resnet152_v2": "keras_applications",
}
TASK_PRESETS = tuple(entry.preset for entry in CATALOGUE if entry.task != "classification")


def cache_dir() -> Path:
    """The folder that holds downloaded weight files.

    Returns:
        `$KERAS_RESNET_CACHE` when set, else `$KERAS_HOME/keras_resnet/weights`
        (`KERAS_HOME` defaults to `~/.keras`). The folder may not exist yet.
    """
    explicit = os.environ.get(CACHE_VARIABLE)
    if explicit:
        return Path(explicit).expanduser()
    keras_home = os.environ.get("KERAS_HOME") or os.path.join("~", ".keras")
    return Path(keras_home).expanduser() / "keras_resnet" / "weights"


def hf_mirror_folder(repo_id: str) -> str:
    """A Hub repository id as one folder name (in a mirror and in the cache): `timm/x.y` -> `timm__x.y`."""
    return repo_id.replace("/", "__")


def cached_path(entry: WeightsEntry) -> Path | None:
    """Where the entry's file is in the weights cache (its own name, or the Hub mirror copy), or None."""
    candidates = [cache_dir() / entry.filename]
    if entry.hf_repo:
        candidates.append(cache_dir() / hf_mirror_folder(entry.hf_repo) / HF_FILENAME)
    return next((path for path in candidates if path.is_file()), None)


def entries_for(preset: str) -> list:
    """The catalogue entries of a preset, in table order."""
    return [entry for entry in CATALOGUE if entry.preset == preset]


def is_weights_name(value) -> bool:
    """True for a name the catalogue resolves (not a path): "imagenet", "coco", "coco_voc", "<source>:<tag>"."""
    if not isinstance(value, str) or "/" in value or "\\" in value or "." in value.split(":", 1)[0]:
        return False
    return value in (IMAGENET, *TASK_WEIGHTS, "keras_applications") or value.split(":", 1)[0] in ("torchvision",
                                                                                               "timm")


def weights_names() -> list:
    """Every name `is_weights_name` accepts that the catalogue has: imagenet, the aliases and the tags."""
    return sorted({IMAGENET, *(alias for e in CATALOGUE for alias in e.aliases), *(e.tag for e in CATALOGUE)})


def find_entry(preset: str, name: str) -> WeightsEntry:
    """The catalogue entry `name` of `preset` ("imagenet", a tag, "coco", "coco_voc").

    Raises:
        ConfigError: no such preset in the catalogue, or no such weights for it (naming those there are).
    """
    entries = entries_for(preset)
    if not entries:
        with_weights = sorted({entry.preset for entry in CATALOGUE})
        close = difflib.get_close_matches(str(preset), with_weights, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(
            f"no published weights for preset {preset!r}: {hint}presets with weights: {', '.join(with_weights)} "
            f"(`keras-resnet weights` lists them)"
        )
    wanted = DEFAULT_IMAGENET.get(preset) if name == IMAGENET else name
    for entry in entries:
        if wanted in (entry.tag, *entry.aliases) or (wanted and wanted.lower() == entry.tag.lower()):
            return entry
    tags = ", ".join(sorted({e.tag for e in entries} | {a for e in entries for a in e.aliases}
                            | ({IMAGENET} if preset in DEFAULT_IMAGENET else set())))
    raise ConfigError(f"preset {preset!r} has no weights {name!r}; it has: {tags}")


__all__ = ["CACHE_VARIABLE", "CATALOGUE", "DEFAULT_IMAGENET", "HF_FILENAME", "IMAGENET", "TASK_PRESETS",
           "WeightsEntry", "cache_dir", "cached_path", "entries_for", "find_entry", "hf_mirror_folder",
           "is_weights_name", "weights_names"]
