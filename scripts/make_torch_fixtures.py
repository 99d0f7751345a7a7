"""Writes tests/fixtures/torch/*.npz: outputs of real torchvision/timm ResNets on formula weights.

Run it with any Python that has torch, torchvision, timm and numpy (no
keras_resnet, no downloads):

    python scripts/make_torch_fixtures.py [--output tests/fixtures/torch] [--only NAME ...]

For each model in `MODELS` it builds the torchvision/timm model (random
init), overwrites every parameter and buffer of its state dict (BN running
statistics included) with `tensor_for(key, shape, dtype)`, runs the input
`input_pixels()` (raw pixels 0..255, normalised with ImageNet's mean/std) in
eval mode and saves `<library>_<name>.npz` holding:

- `keys`, `shapes` (flattened; `ndims` splits them), `dtypes`: the state
  dict's layout, without the weights (tests rebuild them with `tensor_for`);
- `pixels` (N, H, W, 3) float32: the raw input (tests check `input_pixels()`
  reproduces it);
- `logits` (N, 1000) and `C2`..`C5` (the outputs of layer1..layer4, NHWC, of
  the first image): float32;
- `versions`: torch, torchvision and timm versions.

The weights formula is integer arithmetic (splitmix64 of the key's CRC32
and the element index) and IEEE float32 steps, so NumPy regenerates it bit
for bit anywhere. It is
scaled fan-in-wise (He uniform) so activations stay O(1) through 150 layers,
and BN statistics are random (variances in [0.1, 1.0]) so a wrong epsilon,
transposition or padding shows in the outputs. The input is small and odd
(29x33): strided convs and the ResNet-D average pool meet odd sizes.
"""

import argparse
import zlib
from pathlib import Path

import numpy as np

# (library, model name): every architecture keras_resnet imports from torch, as the tests check it.
MODELS = [
    ("torchvision", "resnet18"),
    ("torchvision", "resnet34"),
    ("torchvision", "resnet50"),
    ("torchvision", "resnet101"),
    ("torchvision", "resnet152"),
    ("torchvision", "resnext50_32x4d"),
    ("torchvision", "resnext101_32x8d"),
    ("torchvision", "resnext101_64x4d"),
    ("torchvision", "wide_resnet50_2"),
    ("torchvision", "wide_resnet101_2"),
    ("timm", "resnet18d"),
    ("timm", "resnet50d"),
    ("timm", "seresnet50"),
    ("timm", "resnext50_32x4d"),
]
INPUT_SHAPE = (2, 29, 33, 3)  # N, H, W, C raw pixels
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OUTPUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "torch"
_MASK = 0xFFFFFFFFFFFFFFFF


def uniform(name, count):
    """`count` deterministic float32 values in [0, 1) for `name`: splitmix64 of (crc32(name) << 32) + index."""
    x = np.arange(count, dtype=np.uint64)
    x += np.uint64(((zlib.crc32(name.encode()) << 32) + 0x9E3779B97F4A7C15) & _MASK)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    x >>= np.uint64(40)  # the top 24 bits: exact in float32
    return x.astype(np.float32) * np.float32(2.0**-24)


def tensor_for(key, shape, dtype="float32"):
    """The fixture value of state-dict entry `key` (torch layout `shape`), as a NumPy array (float32 maths)."""
    shape = tuple(int(s) for s in shape)
    if key.endswith("num_batches_tracked"):
        return np.full(shape, 100, dtype=dtype)
    u = uniform(key, int(np.prod(shape, dtype=np.int64))).reshape(shape)
    f = np.float32
    if key.endswith("running_var"):
        value = f(0.1) + f(0.9) * u
    elif key.endswith("running_mean"):
        value = f(0.4) * (u - f(0.5))
    elif len(shape) == 1 and key.endswith(".weight"):  # BN gamma
        value = f(0.2) + f(0.4) * u
    elif len(shape) == 1:  # BN beta, conv and linear biases
        value = f(0.4) * (u - f(0.5))
    else:  # conv (O, I/groups, kh, kw) and linear (out, in): He uniform over the fan-in
        fan_in = int(np.prod(shape[1:]))
        value = (f(2.0) * u - f(1.0)) * f(np.sqrt(6.0 / fan_in))
    return value.astype(dtype)


def input_pixels(shape=INPUT_SHAPE):
    """Raw RGB pixels 0..255, NHWC float32."""
    return (np.float32(255.0) * uniform("input_pixels", int(np.prod(shape)))).reshape(shape)


def normalise(pixels):
    """torchvision/timm preprocessing of raw pixels: ImageNet mean/std on 0..1, float32."""
    mean, std = np.array(IMAGENET_MEAN, "float32"), np.array(IMAGENET_STD, "float32")
    return ((pixels / np.float32(255.0) - mean) / std).astype("float32")


def build(library, name):
    if library == "torchvision":
        import torchvision

        return getattr(torchvision.models, name)(weights=None)
    import timm

    return timm.create_model(name, pretrained=False)


def make_fixture(library, name):
    import torch

    model = build(library, name).eval()
    layout = {key: (tuple(value.shape), str(value.dtype).replace("torch.", ""))
              for key, value in model.state_dict().items()}
    state = {key: torch.from_numpy(tensor_for(key, shape, dtype)) for key, (shape, dtype) in layout.items()}
    model.load_state_dict(state, strict=True)
    pixels = input_pixels()
    x = torch.from_numpy(normalise(pixels).transpose(0, 3, 1, 2).copy())
    stages = {}
    hooks = [
        getattr(model, f"layer{index}").register_forward_hook(
            lambda module, inputs, output, level=f"C{index + 1}": stages.__setitem__(level, output)
        )
        for index in range(1, 5)
    ]
    with torch.no_grad():
        logits = model(x).numpy()
    for hook in hooks:
        hook.remove()
    features = {level: value[:1].numpy().transpose(0, 2, 3, 1) for level, value in stages.items()}
    import timm
    import torchvision

    return {
        "keys": np.array(list(layout)),
        "ndims": np.array([len(shape) for shape, _ in layout.values()], "int64"),
        "shapes": np.array([s for shape, _ in layout.values() for s in shape], "int64"),
        "dtypes": np.array([dtype for _, dtype in layout.values()]),
        "pixels": pixels,
        "logits": logits.astype("float32"),
        **{level: value.astype("float32") for level, value in features.items()},
        "versions": np.array([f"torch {torch.__version__}", f"torchvision {torchvision.__version__}",
                              f"timm {timm.__version__}"]),
    }


def fixture_layout(fixture):
    """[(key, shape, dtype)] of the state dict a fixture describes."""
    shapes = np.split(fixture["shapes"], np.cumsum(fixture["ndims"])[:-1])
    return [(str(key), tuple(int(s) for s in shape), str(dtype))
            for key, shape, dtype in zip(fixture["keys"], shapes, fixture["dtypes"])]


def state_dict_for(fixture):
    """The state dict (NumPy arrays) the fixture's torch model held."""
    return {key: tensor_for(key, shape, dtype) for key, shape, dtype in fixture_layout(fixture)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help="folder of the .npz files")
    parser.add_argument("--only", nargs="+", default=None, help="model names to (re)write")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    for library, name in MODELS:
        if args.only and name not in args.only:
            continue
        fixture = make_fixture(library, name)
        path = args.output / f"{library}_{name}.npz"
        np.savez_compressed(path, **fixture)
        scales = ", ".join(f"{level} {np.abs(fixture[level]).max():.3g}" for level in ("C2", "C3", "C4", "C5"))
        print(f"{path.name}: {path.stat().st_size / 1e3:.0f} kB, max |logit| {np.abs(fixture['logits']).max():.3g}, "
              f"max |feature| {scales}")


if __name__ == "__main__":
    main()
