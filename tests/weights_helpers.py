"""Weight files for tests of the catalogue: the real layouts (committed fixtures), deterministic values, no torch.

`write_weights_mirror(folder)` makes a `KERAS_RESNET_WEIGHTS_MIRROR` folder
that serves timm's `resnet18d.ra2_in1k` as the Hugging Face Hub does
(`timm__resnet18d.ra2_in1k/model.safetensors`): the keys and shapes of the
real timm model (tests/fixtures/torch/timm_resnet18d.npz), the values of
`scripts/make_torch_fixtures.py`'s formula.
"""

from pathlib import Path

import numpy as np

MIRROR_REPO = "timm__resnet18d.ra2_in1k"  # the Hub repo timm/resnet18d.ra2_in1k, as one mirror folder


def timm_resnet18d_state() -> dict:
    """timm resnet18d's state dict: real keys and shapes, the fixture formula's values."""
    from tests.test_convert_torch import fixture, formula

    return formula.state_dict_for(fixture("timm_resnet18d"))


def write_weights_mirror(folder) -> Path:
    """A mirror folder holding timm's resnet18d ImageNet weights in their Hub layout; returns the folder."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    target = folder / MIRROR_REPO
    target.mkdir(parents=True, exist_ok=True)
    save_file({key: np.ascontiguousarray(value) for key, value in timm_resnet18d_state().items()},
              str(target / "model.safetensors"))
    return folder
