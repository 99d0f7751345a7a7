"""Pretrained weights for `from_preset(..., weights=...)`, whatever file format they come in.

The models know no foreign file format: the readers live in
`keras_resnet.convert` (torchvision/timm state dicts: `TorchWeights`;
keras.applications `.h5` files and models: `KerasApplicationsWeights`) and
register here with `register_weights_reader` when `keras_resnet` is
imported. `read_pretrained` hands a source to the first reader that
`accepts` it. A reader has `preset`, `arch`, `num_classes`, `source_name`,
`describe()`, `preprocessing(name)` (the source's input normalisation as an
`ImageNormalization`), `load_backbone(backbone)` and `load_head(dense)`.

`load_pretrained` checks that a built backbone has the architecture of the
weights' preset (a preset name or overrides that change the graph are refused,
naming both) and loads it, and the head when its number of classes matches.
"""

import inspect

from keras_resnet.models.resnet.presets import get_preset_config
from keras_resnet_settings.errors import ConversionError
from keras_resnet_settings.weights import is_weights_name

# Backbone arguments that change the graph or its numbers; the others (input_shape, output_stride, drop_path_rate,
# frozen_stages, bn_momentum, zero_init_last_bn, name) leave the weights meaningful.
ARCHITECTURE_ARGS = (
    "stackwise_num_blocks", "stackwise_num_filters", "block_type", "version", "stackwise_strides", "stem_type",
    "stem_width", "shortcut_type", "cardinality", "base_width", "width_multiplier", "se_ratio", "use_conv_bias",
    "bn_epsilon",
)
# Arguments whose default (None) is resolved from the others.
_RESOLVED_ARGS = ("stackwise_num_filters", "stackwise_strides", "stem_width")
WEIGHTS_READERS = []  # filled by keras_resnet.convert, most specific first


def register_weights_reader(reader) -> None:
    """Adds a reader class: `reader.accepts(source) -> bool`, `reader.read(source, arch, preset)`, `reader.KINDS`
    (what it reads, for the error listing them)."""
    if reader not in WEIGHTS_READERS:
        WEIGHTS_READERS.append(reader)


def read_pretrained(source, arch=None, preset=None):
    """Reads `source` (a weight file, a dict of arrays, a torch module, a keras.applications model) once.

    Args:
        source: see the module docstring; a reader returned earlier is passed through. With `preset`, a
            catalogue name ("imagenet", "torchvision:IMAGENET1K_V2", "timm:a1_in1k", "keras_applications";
            `keras_resnet_settings.weights`) is downloaded once and read from the cache.
        arch: the source model's name, inferred when None.
        preset: the preset to prefer when several fit a state dict.
    """
    if isinstance(source, tuple(WEIGHTS_READERS)):
        return source
    if preset is not None and is_weights_name(source):
        from keras_resnet.weights.catalogue import resolve_weights

        source, catalogue_arch = resolve_weights(source, preset)
        arch = arch or catalogue_arch
    for reader in WEIGHTS_READERS:
        if reader.accepts(source):
            return reader.read(source, arch, preset)
    kinds = " or ".join(reader.KINDS for reader in WEIGHTS_READERS) or "(no weight readers: import keras_resnet)"
    raise ConversionError(f"weights {source}: expected {kinds}.")


def check_fits(backbone, weights, preset=None):
    """A ConversionError when `backbone` does not have the architecture of `weights.preset`."""
    expected = get_preset_config(weights.preset)
    defaults = {
        name: parameter.default for name, parameter in inspect.signature(type(backbone).__init__).parameters.items()
    }
    wrong = []
    for key in ARCHITECTURE_ARGS:
        if key not in expected and key in _RESOLVED_ARGS:
            continue
        want, have = expected.get(key, defaults.get(key)), getattr(backbone, key)
        if have != want:
            wrong.append(f"{key}={have!r} (the weights need {want!r})")
    if wrong:
        asked = f"preset {preset!r}" if preset else f"backbone {backbone.name!r}"
        raise ConversionError(
            f"{weights.source_name} holds {weights.describe()}; {asked} does not match: {', '.join(wrong)}. "
            f"Use from_preset({weights.preset!r}, weights=...)."
        )


def load_pretrained(weights, backbone, head=None, preset=None):
    """Loads `weights` (a reader) into `backbone`, and into `head` (a Dense) when the classes match.

    Returns:
        True when the head was loaded.
    """
    check_fits(backbone, weights, preset)
    weights.load_backbone(backbone)
    if head is not None and weights.num_classes == head.units:
        weights.load_head(head)
        return True
    return False


__all__ = ["ARCHITECTURE_ARGS", "WEIGHTS_READERS", "check_fits", "load_pretrained", "read_pretrained",
           "register_weights_reader"]
