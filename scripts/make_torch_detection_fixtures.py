"""Writes tests/fixtures/torch/detection/*.npz: what real torchvision RetinaNets detect on formula weights.

Run it with any Python that has torch, torchvision and numpy (no keras_resnet,
no TensorFlow, no downloads):

    python scripts/make_torch_detection_fixtures.py [--output tests/fixtures/torch/detection] [--only NAME ...]

For each model in `MODELS` it builds torchvision's detector with random init
(`weights=None, weights_backbone=None`), overwrites every parameter and buffer
with `detection_tensor_for(key, shape, dtype)` (the formula of
`scripts/make_torch_fixtures.py`, with the class logits pushed down and the
box deltas scaled so that tens of detections, not thousands, pass the 0.05
score threshold, and the deltas look like a trained model's), runs the image
`detection_pixels()` (raw pixels 0..255, `IMAGE_SIZE`, fed as pixels / 255)
in eval mode and saves `torchvision_<name>.npz` holding:

- `keys`, `shapes`, `ndims`, `dtypes`: the state dict's layout, without the
  weights (tests rebuild them with `detection_tensor_for`);
- `pixels_sum`, `pixels_corner` (the first 8 values of row 0): to check that
  `detection_pixels()` reproduces the input;
- `anchors` (N, 4): torchvision's anchors for the image;
- `box_regression` (N, 4): the head's raw box deltas; `cls_logits_max`,
  `cls_logits_argmax` (N,): the best class logit of each anchor and its class;
  `cls_logits_subset` (N, len(SUBSET_CLASSES)): the logits of a few classes;
- `boxes` (K, 4), `scores` (K,), `labels` (K,): torchvision's post-processed
  detections (its `postprocess_detections`: score > 0.05, top 1000 per level,
  class-wise NMS 0.5, at most 300);
- `image_size`, `versions`.

The raw outputs of all 91 classes would be 2 MB; the max, argmax and a subset
keep a fixture under 300 kB.

`min_size` and `max_size` are set to the image's sides, so torchvision's
`GeneralizedRCNNTransform` neither resizes (scale 1.0) nor pads (sides are
multiples of 32) the image: the network sees exactly the pixels the Keras
model gets. For retinanet_resnet50_fpn, every BatchNorm gets eps 0.0, as
`retinanet_resnet50_fpn(weights=COCO_V1)` runs its weights
(`overwrite_eps(model, 0.0)` on its FrozenBatchNorm2d); v2 keeps 1e-5.
"""

import argparse
import importlib.util
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _load_formula():
    spec = importlib.util.spec_from_file_location("make_torch_fixtures", HERE / "make_torch_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


formula = _load_formula()
tensor_for = formula.tensor_for
uniform = formula.uniform
fixture_layout = formula.fixture_layout

# torchvision detection model name -> the BatchNorm eps it runs its COCO weights with, and the rescaling of its
# last convs: class logits' weights x cls_scale and bias + cls_shift (about 1e-4 of the (anchor, class) pairs score
# over 0.05, up to ~0.4), box deltas' weights x box_scale (deltas of std ~0.4). Without it the formula gives
# logits of std 6 (v1; v2's GroupNorm heads: 0.44) and deltas of std 4.7 (v2: 0.35).
MODELS = {
    "retinanet_resnet50_fpn": {"bn_eps": 0.0, "cls_scale": 1.0, "cls_shift": -26.5, "box_scale": 0.08},
    "retinanet_resnet50_fpn_v2": {"bn_eps": 1e-5, "cls_scale": 4.0, "cls_shift": -9.3, "box_scale": 1.0},
}
IMAGE_SIZE = (160, 192)  # H, W: multiples of 32, so torchvision does not pad
SUBSET_CLASSES = (0, 1, 90)
OUTPUT = HERE.parent / "tests" / "fixtures" / "torch" / "detection"


def detection_tensor_for(name, key, shape, dtype="float32"):
    """`tensor_for`, with model `name`'s class-logit and box-delta convs rescaled (float32 maths, as in NumPy)."""
    value = tensor_for(key, shape, dtype)
    settings = MODELS[name]
    if key.endswith("cls_logits.weight"):
        value = value * np.float32(settings["cls_scale"])
    elif key.endswith("cls_logits.bias"):
        value = value + np.float32(settings["cls_shift"])
    elif key.endswith("bbox_reg.weight"):
        value = value * np.float32(settings["box_scale"])
    return value.astype(dtype)


def detection_pixels(size=IMAGE_SIZE):
    """Raw RGB pixels 0..255 (integers, as a decoded image), (1, H, W, 3) float32."""
    count = int(np.prod(size)) * 3
    return np.floor(np.float32(256.0) * uniform("detection_pixels", count)).reshape(1, *size, 3).astype("float32")


def state_dict_for(name, fixture):
    """The state dict (NumPy arrays) the fixture's torch model `name` held."""
    return {key: detection_tensor_for(name, key, shape, dtype) for key, shape, dtype in fixture_layout(fixture)}


def build(name, size=IMAGE_SIZE, bn_eps=None):
    """torchvision's `name` detector, random init, that sees a `size` image unscaled and unpadded."""
    import torch
    import torchvision

    model = getattr(torchvision.models.detection, name)(
        weights=None, weights_backbone=None, min_size=min(size), max_size=max(size)
    )
    if bn_eps is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eps = bn_eps
    return model.eval()


def make_fixture(name):
    import torch
    import torchvision

    model = build(name, bn_eps=MODELS[name]["bn_eps"])
    layout = {key: (tuple(value.shape), str(value.dtype).replace("torch.", ""))
              for key, value in model.state_dict().items()}
    state = {key: torch.from_numpy(detection_tensor_for(name, key, shape, dtype))
             for key, (shape, dtype) in layout.items()}
    model.load_state_dict(state, strict=True)
    pixels = detection_pixels()
    image = torch.from_numpy((pixels[0] / np.float32(255.0)).transpose(2, 0, 1).copy())
    captured = {}
    hooks = [
        model.head.register_forward_hook(lambda module, inputs, output: captured.update(head=output)),
        model.anchor_generator.register_forward_hook(
            lambda module, inputs, output: captured.update(anchors=output, batch=inputs[0])
        ),
    ]
    with torch.no_grad():
        (detections,) = model([image])
    for hook in hooks:
        hook.remove()
    batch = captured["batch"]
    if tuple(batch.tensors.shape[-2:]) != IMAGE_SIZE or tuple(batch.image_sizes[0]) != IMAGE_SIZE:
        raise SystemExit(f"torchvision resized or padded the image: {tuple(batch.tensors.shape)}, {batch.image_sizes}")
    logits = captured["head"]["cls_logits"][0].numpy()
    return {
        "keys": np.array(list(layout)),
        "ndims": np.array([len(shape) for shape, _ in layout.values()], "int64"),
        "shapes": np.array([s for shape, _ in layout.values() for s in shape], "int64"),
        "dtypes": np.array([dtype for _, dtype in layout.values()]),
        "pixels_sum": np.array(pixels.sum(dtype="float64")),
        "pixels_corner": pixels[0, 0, :8, 0].copy(),
        "image_size": np.array(IMAGE_SIZE, "int64"),
        "anchors": captured["anchors"][0].numpy().astype("float32"),
        "box_regression": captured["head"]["bbox_regression"][0].numpy().astype("float32"),
        "cls_logits_max": logits.max(axis=1).astype("float32"),
        "cls_logits_argmax": logits.argmax(axis=1).astype("int16"),
        "cls_logits_subset": logits[:, list(SUBSET_CLASSES)].astype("float32"),
        "subset_classes": np.array(SUBSET_CLASSES, "int64"),
        "boxes": detections["boxes"].numpy().astype("float32"),
        "scores": detections["scores"].numpy().astype("float32"),
        "labels": detections["labels"].numpy().astype("int64"),
        "versions": np.array([f"torch {torch.__version__}", f"torchvision {torchvision.__version__}"]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help="folder of the .npz files")
    parser.add_argument("--only", nargs="+", default=None, help="model names to (re)write")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    for name in MODELS:
        if args.only and name not in args.only:
            continue
        fixture = make_fixture(name)
        path = args.output / f"torchvision_{name}.npz"
        np.savez_compressed(path, **fixture)
        scores = 1.0 / (1.0 + np.exp(-fixture["cls_logits_max"]))
        deltas = fixture["box_regression"]
        print(f"{path.name}: {path.stat().st_size / 1e3:.0f} kB, {len(deltas)} anchors, "
              f"{int((scores > 0.05).sum())} anchors with a score > 0.05, {len(fixture['scores'])} detections "
              f"(scores {fixture['scores'].min():.3f}..{fixture['scores'].max():.3f}, "
              f"{len(set(fixture['labels'].tolist()))} classes), |deltas| mean {np.abs(deltas).mean():.3f} "
              f"max {np.abs(deltas).max():.3f}")


if __name__ == "__main__":
    main()
