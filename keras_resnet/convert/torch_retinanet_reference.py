"""torchvision's RetinaNet of a state dict on one image: a script that `keras_resnet.convert.torch_retinanet` runs.

It runs in a child Python without TensorFlow (torchvision imports triton,
whose LLVM crashes a process that has loaded TensorFlow's) and imports
numpy, torch, safetensors and torchvision only, never keras_resnet.

    python -c "<this file's text>" FOLDER ARCH BN_EPS NUM_CLASSES MEAN STD

(run in FOLDER: from its own folder, keras_resnet/convert/torch.py would shadow torch)

FOLDER holds `state.safetensors` and `pixels.npy` (1, H, W, 3) float32 raw
pixels 0..255. ARCH is "retinanet_resnet50_fpn" or
"retinanet_resnet50_fpn_v2", built without downloading weights, with
`min_size`/`max_size` set to the image's sides so that torchvision does not
resize it; BN_EPS the backbone's BatchNorm eps (0.0 as torchvision runs its
COCO_V1 weights); MEAN and STD comma-separated. Writes FOLDER/output.npz:
`box_regression` (N, 4), `cls_logits` (N, NUM_CLASSES) and the detections
`boxes`, `scores`, `labels`. Exit status 3: torch or torchvision is not
installed (the reason on stdout).
"""

import sys

MISSING = 3


def main(folder, arch, bn_eps, num_classes, mean, std):
    try:
        import numpy as np
        import torch
        import torchvision
        from safetensors.torch import load_file
    except ImportError as error:
        print(f"{error.name} is not installed")
        return MISSING
    pixels = np.load(f"{folder}/pixels.npy")
    height, width = pixels.shape[1:3]
    builder = getattr(torchvision.models.detection, arch)
    model = builder(weights=None, weights_backbone=None, num_classes=int(num_classes), min_size=min(height, width),
                    max_size=max(height, width), image_mean=[float(v) for v in mean.split(",")],
                    image_std=[float(v) for v in std.split(",")])
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eps = float(bn_eps)
    model.load_state_dict(load_file(f"{folder}/state.safetensors"), strict=True)
    model.eval()
    captured = {}
    model.head.register_forward_hook(lambda module, inputs, output: captured.update(output))
    image = torch.from_numpy((pixels[0] / np.float32(255.0)).transpose(2, 0, 1).copy())
    with torch.no_grad():
        (detections,) = model([image])
    np.savez(f"{folder}/output.npz", box_regression=captured["bbox_regression"][0].numpy(),
             cls_logits=captured["cls_logits"][0].numpy(),
             **{key: value.numpy() for key, value in detections.items()})
    print(f"torchvision {arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
