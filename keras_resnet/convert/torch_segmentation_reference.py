"""The torchvision DeepLabV3/FCN model of a state dict on an input: a script that `torch_segmentation` runs.

Like `torch_reference.py`, it runs in a child Python without TensorFlow
(torchvision imports triton, which crashes a process that loaded TensorFlow
first) and imports numpy, torch, safetensors and torchvision only, never
keras_resnet:

    python -c "<this file's text>" FOLDER ARCH NUM_CLASSES AUX

(run in FOLDER.) FOLDER holds `state.safetensors` and `input.npy` (NCHW
float32, normalised); ARCH is a `torchvision.models.segmentation` builder
(`deeplabv3_resnet50`, ...), built without downloading weights with
NUM_CLASSES classes and `aux_loss` AUX ("1" or "0"); the "out" logits (NCHW)
go to FOLDER/output.npy. Exit status 3: torch, safetensors or torchvision is
not installed, or torchvision has no ARCH (the reason on stdout).
"""

import sys

MISSING = 3


def main(folder, arch, num_classes, aux):
    try:
        import numpy as np
        import torch
        import torchvision
        from safetensors.torch import load_file
    except ImportError as error:
        print(f"{error.name} is not installed")
        return MISSING
    builder = getattr(torchvision.models.segmentation, arch, None)
    if builder is None:
        print(f"torchvision {torchvision.__version__} has no segmentation model {arch}")
        return MISSING
    module = builder(weights=None, weights_backbone=None, num_classes=int(num_classes), aux_loss=aux == "1")
    missing, unexpected = module.load_state_dict(load_file(f"{folder}/state.safetensors"), strict=False)
    missing = [key for key in missing if not key.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise SystemExit(f"torchvision {arch} does not load the state dict: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    module.eval()
    with torch.no_grad():
        result = module(torch.from_numpy(np.load(f"{folder}/input.npy")))["out"]
    np.save(f"{folder}/output.npy", result.numpy())
    print(f"torchvision {arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
