"""`Task`: what every task model shares (classifier, segmenter, detector).

A task model is a functional `keras.Model` made of optional in-model
preprocessing (raw pixels 0..255 in), a `ResNetBackbone` and a head. The base
class owns the parts every task has: serialising the backbone and the
preprocessing layer (`task_config` / `from_config`) and building on a named
backbone preset (`backbone_from_preset`). Each subclass builds its graph in
`__init__`, calls `super().__init__(inputs=..., outputs=...)`, and adds its
head arguments to `task_config()` in `get_config`.

Subclasses keep their own registered names (`keras_resnet>ResNetClassifier`,
...), so `.keras` files saved before this base class existed load unchanged.
"""

import keras

from keras_resnet.models.resnet.backbone import ResNetBackbone
from keras_resnet.models.resnet.pretrained import load_pretrained, read_pretrained


def serialize_optional(layer):
    """`keras.saving.serialize_keras_object`, with None kept as None."""
    return keras.saving.serialize_keras_object(layer) if layer is not None else None


class Task(keras.Model):
    """Base class of the task models: backbone + optional preprocessing + head.

    Subclasses set `TASK_ARGS`, the constructor arguments that `from_preset`
    routes to the task rather than to the backbone, and `self.backbone`,
    `self.num_classes` and `self.preprocessing` after building.
    """

    TASK_ARGS = ()

    def task_config(self) -> dict:
        """The config entries of every task model; `get_config` adds the head's."""
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "num_classes": self.num_classes,
            "preprocessing": serialize_optional(self.preprocessing),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        if config.get("preprocessing") is not None:
            config["preprocessing"] = keras.saving.deserialize_keras_object(config["preprocessing"])
        return cls(**config)

    @classmethod
    def backbone_from_preset(cls, preset, overrides: dict, weights=None):
        """Splits `overrides` into task arguments (`TASK_ARGS`) and backbone arguments; loads `weights`.

        Args:
            preset: a backbone preset.
            overrides: task and backbone arguments.
            weights: None, or pretrained weights of the preset (a catalogue
                name, a file...; see `ResNetBackbone.from_preset`): read
                once, loaded into the backbone, and their normalisation put
                in the task arguments as `preprocessing` (unless given).

        Returns:
            `(backbone, task_args, pretrained)`: the preset's `ResNetBackbone`
            built with the backbone arguments, the remaining task arguments,
            and the weights' reader (None without weights), e.g. for a head.
        """
        overrides = dict(overrides)
        task_args = {key: overrides.pop(key) for key in cls.TASK_ARGS if key in overrides}
        pretrained = read_pretrained(weights, preset=preset) if weights is not None else None
        if pretrained is not None:
            task_args.setdefault("preprocessing", pretrained.preprocessing(name="preprocessing"))
        backbone = ResNetBackbone.from_preset(preset, **overrides)
        if pretrained is not None:
            load_pretrained(pretrained, backbone, preset=preset)
        return backbone, task_args, pretrained


__all__ = ["Task", "serialize_optional"]
