"""The torchvision/timm model of a state dict on an input: a script that `keras_resnet.convert.torch` runs.

It runs in a child Python without TensorFlow: torchvision and timm import
triton, whose LLVM crashes a process that has loaded TensorFlow's (a
segmentation fault, not an exception). It imports numpy, torch,
safetensors and torchvision or timm only, never keras_resnet.

    python -c "<this file's text>" FOLDER ARCH LIBRARIES NUM_CLASSES OUTPUT

(run in FOLDER: from its own folder, keras_resnet/convert/torch.py would shadow torch)

FOLDER holds `state.safetensors` and `input.npy` (NCHW float32); LIBRARIES is
"torchvision,timm" (the first that imports builds ARCH, without downloading
weights); NUM_CLASSES 0 means no head; OUTPUT is "logits" or "features" (the
last feature map). The result goes to FOLDER/output.npy. Exit status 3: torch
or the libraries are not installed (the reason on stdout).
"""

import sys

MISSING = 3


def build(library, arch, num_classes):
    """The `library` model `arch` with random weights (no download)."""
    if library == "torchvision":
        import torchvision

        return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes or 1000)
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=num_classes)


def features(module, x):
    """The last feature map of a torchvision/timm ResNet (before pooling)."""
    if hasattr(module, "forward_features"):  # timm
        return module.forward_features(x)
    x = module.maxpool(module.relu(module.bn1(module.conv1(x))))
    for stage in (module.layer1, module.layer2, module.layer3, module.layer4):
        x = stage(x)
    return x


def main(folder, arch, libraries, num_classes, output):
    try:
        import numpy as np
        import torch
        from safetensors.torch import load_file
    except ImportError as error:
        print(f"{error.name} is not installed")
        return MISSING
    num_classes = int(num_classes)
    module = None
    for library in libraries.split(","):
        try:
            module = build(library, arch, num_classes)
            break
        except ImportError:
            continue
    if module is None:
        print(f"{' and '.join(libraries.split(','))} not installed")
        return MISSING
    missing, unexpected = module.load_state_dict(load_file(f"{folder}/state.safetensors"), strict=False)
    if unexpected or [key for key in missing if not key.startswith("fc.")]:
        raise SystemExit(f"{library} {arch} does not load the state dict: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    module.eval()
    x = torch.from_numpy(np.load(f"{folder}/input.npy"))
    with torch.no_grad():
        result = module(x) if output == "logits" else features(module, x)
    np.save(f"{folder}/output.npy", result.numpy())
    print(f"{library} {arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
