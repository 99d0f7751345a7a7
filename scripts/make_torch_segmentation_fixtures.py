"""Writes tests/fixtures/torch/segmentation/*.npz: real torchvision DeepLabV3 / FCN outputs on formula weights.

Run it with any Python that has torch, torchvision and numpy (no
keras_resnet, no TensorFlow, no downloads):

    python scripts/make_torch_segmentation_fixtures.py [--output tests/fixtures/torch/segmentation] [--only NAME ...]

The weights and the input come from `scripts/make_torch_fixtures.py`
(`tensor_for`, `input_pixels`, `normalise`: an integer hash of the key and
element index, so NumPy regenerates them bit for bit; BN running statistics
random, so a wrong epsilon, dilation or padding shows). For each model in
`MODELS` it builds the torchvision model with random init
(`weights=None, weights_backbone=None`, `aux_loss=True` and 21 classes, the
key layout of torchvision's COCO-with-VOC-labels checkpoints), overwrites
every parameter and buffer with `tensor_for`, runs `input_pixels(INPUT_SHAPE)`
(2 x 61 x 67 raw pixels, ImageNet-normalised) in eval mode and saves
`<name>.npz` holding:

- `keys`, `ndims`, `shapes`, `dtypes`: the state dict's layout (no weights;
  `make_torch_fixtures.state_dict_for` rebuilds them);
- `pixels` (2, 61, 67, 3) float32: the raw input;
- `logits` (2, 31, 34, 21) float32: the model's "out" logits (NHWC, already
  resized to 61 x 67 by torchvision) at every second row and column (rows and
  columns 0, 2, ..., the last ones included), which keeps the file small;
- `mask` (2, 61, 67) uint8: the argmax of the "out" logits, every pixel;
- `versions`: torch and torchvision versions.

At 61 x 67 the stride-8 feature map is 8 x 9, smaller than the ASPP rates
(12, 24, 36), so every atrous 3x3 conv sees its centre tap only. The
`deeplabv3_head` fixture checks the rates themselves: torchvision's
`DeepLabHead(64, 5)` (keys prefixed "classifier.", as in the full models) on
a formula feature map `head_features()` of 2 x 64 x 39 x 37 (larger than
36), saving its layout and `logits` (2, 39, 37, 5), NHWC.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_torch_fixtures import (  # noqa: E402
    fixture_layout,
    input_pixels,
    normalise,
    state_dict_for,
    tensor_for,
    uniform,
)

MODELS = ["deeplabv3_resnet50", "deeplabv3_resnet101", "fcn_resnet50", "fcn_resnet101"]
HEAD = "deeplabv3_head"
INPUT_SHAPE = (2, 61, 67, 3)  # N, H, W, C raw pixels
NUM_CLASSES = 21  # torchvision's COCO-with-VOC-labels weights
HEAD_FEATURES_SHAPE = (2, 39, 37, 64)  # N, H, W, C: larger than the largest ASPP rate (36)
HEAD_CLASSES = 5
GRID = 2  # `logits` keeps every GRID-th row and column
OUTPUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "torch" / "segmentation"

__all__ = ["GRID", "HEAD", "MODELS", "fixture_layout", "head_features", "input_pixels", "normalise",
           "state_dict_for", "tensor_for"]


def head_features(shape=HEAD_FEATURES_SHAPE):
    """The `deeplabv3_head` fixture's input: non-negative features in [0, 2), NHWC float32."""
    return (np.float32(2.0) * uniform("head_features", int(np.prod(shape)))).reshape(shape)


def _layout(module):
    return {key: (tuple(value.shape), str(value.dtype).replace("torch.", ""))
            for key, value in module.state_dict().items()}


def _load_formula(module, prefix=""):
    import torch

    layout = _layout(module)
    state = {key: torch.from_numpy(tensor_for(prefix + key, shape, dtype)) for key, (shape, dtype) in layout.items()}
    module.load_state_dict(state, strict=True)
    return {prefix + key: value for key, value in layout.items()}


def _record(layout):
    import torch
    import torchvision

    return {
        "keys": np.array(list(layout)),
        "ndims": np.array([len(shape) for shape, _ in layout.values()], "int64"),
        "shapes": np.array([s for shape, _ in layout.values() for s in shape], "int64"),
        "dtypes": np.array([dtype for _, dtype in layout.values()]),
        "versions": np.array([f"torch {torch.__version__}", f"torchvision {torchvision.__version__}"]),
    }


def make_fixture(name):
    import torch
    import torchvision

    model = getattr(torchvision.models.segmentation, name)(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=True
    ).eval()
    layout = _load_formula(model)
    pixels = input_pixels(INPUT_SHAPE)
    x = torch.from_numpy(normalise(pixels).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        logits = model(x)["out"].numpy().transpose(0, 2, 3, 1)
    return {
        **_record(layout),
        "pixels": pixels,
        "logits": np.ascontiguousarray(logits[:, ::GRID, ::GRID]).astype("float32"),
        "mask": logits.argmax(-1).astype("uint8"),
    }


def make_head_fixture():
    import torch
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead

    head = DeepLabHead(HEAD_FEATURES_SHAPE[-1], HEAD_CLASSES).eval()
    layout = _load_formula(head, prefix="classifier.")
    x = torch.from_numpy(head_features().transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        logits = head(x).numpy().transpose(0, 2, 3, 1)
    return {**_record(layout), "logits": logits.astype("float32")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help="folder of the .npz files")
    parser.add_argument("--only", nargs="+", default=None, help=f"names to (re)write: {', '.join([*MODELS, HEAD])}")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    for name in [*MODELS, HEAD]:
        if args.only and name not in args.only:
            continue
        fixture = make_head_fixture() if name == HEAD else make_fixture(name)
        path = args.output / f"{name}.npz"
        np.savez_compressed(path, **fixture)
        print(f"{path.name}: {path.stat().st_size / 1e3:.0f} kB, max |logit| {np.abs(fixture['logits']).max():.3g}"
              + (f", classes in the masks {np.unique(fixture['mask']).size}" if "mask" in fixture else ""))


if __name__ == "__main__":
    main()
