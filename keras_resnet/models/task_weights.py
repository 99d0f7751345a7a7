"""Task models from published task weights: `RetinaNetDetector.from_preset("retinanet_resnet50_fpn_v2", weights="coco")`.

A task preset (`keras_resnet_settings.weights.TASK_PRESETS`: torchvision's
RetinaNet, DeepLabV3 and FCN) is a whole model whose architecture is the
source's. The models know no foreign file format, so the builders live in
`keras_resnet.convert` and register here (`register_task_weights_builder`)
when `keras_resnet` is imported, as the backbone weight readers do in
`keras_resnet.models.resnet.pretrained`.
"""

from keras_resnet_settings.errors import ConfigError, ConversionError
from keras_resnet_settings.weights import TASK_PRESETS, find_entry

TASK_WEIGHT_BUILDERS = {}  # task -> builder(path, arch, **kwargs) -> model; filled by keras_resnet.convert


def register_task_weights_builder(task: str, builder) -> None:
    """`builder(path, arch, **kwargs)` builds the task model of a task preset's weight file."""
    TASK_WEIGHT_BUILDERS[task] = builder


def is_task_preset(preset) -> bool:
    """True for a preset that names a whole task model with published weights (not a backbone)."""
    return preset in TASK_PRESETS


def task_model_from_catalogue(task: str, preset: str, weights, **kwargs):
    """The `task` model of task preset `preset` with its catalogue `weights` ("coco", "coco_voc" or a tag).

    Args:
        task: "detection" or "segmentation".
        preset: a task preset, e.g. "retinanet_resnet50_fpn_v2", "deeplabv3_resnet50".
        weights: the catalogue name; None is refused (the architecture is the weights').
        **kwargs: the builder's arguments (`num_classes`, `input_shape`, ...).

    Raises:
        ConfigError: no weights, or weights of another task.
        WeightsDownloadError: the file could not be fetched.
    """
    if weights is None:
        raise ConfigError(
            f"{preset!r} is a task preset: its architecture is that of its published weights; pass weights= "
            f"(`keras-resnet weights` lists them), or build on a backbone preset (e.g. 'resnet50')"
        )
    entry = find_entry(preset, weights)
    if entry.task != task:
        raise ConfigError(f"{entry.name} are {entry.task} weights, not {task} weights")
    builder = TASK_WEIGHT_BUILDERS.get(task)
    if builder is None:
        raise ConversionError(f"no {task} weight builder registered: import keras_resnet")
    from keras_resnet.weights.catalogue import weights_file

    return builder(weights_file(entry), entry.arch, **kwargs)


__all__ = ["TASK_WEIGHT_BUILDERS", "is_task_preset", "register_task_weights_builder", "task_model_from_catalogue"]
