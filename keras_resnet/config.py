"""YAML task recipes: defaults, loading, dotted overrides and validation.

A recipe is a nested dict. Every leaf is described by a :class:`Field` in
``SCHEMA`` (expected type, default, allowed values, range check); ``DEFAULTS``
is derived from it. :func:`load_config` merges a YAML file over the defaults,
applies ``"dotted.key=value"`` overrides and validates the result, raising a
:class:`ConfigError` with one clear message on the first problem found.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import yaml

from keras_resnet.errors import ConfigError
from keras_resnet.registry import (
    CLASSIFICATION,
    DETECTION,
    DETECTION_HEADS,
    HEADS_BY_TASK,
    SEGMENTATION,
    SEGMENTATION_HEADS,
    SOURCES_BY_TASK,
    TASKS,
)

CLASSIFICATION_SOURCES = SOURCES_BY_TASK[CLASSIFICATION]
SEGMENTATION_SOURCES = SOURCES_BY_TASK[SEGMENTATION]
DETECTION_SOURCES = SOURCES_BY_TASK[DETECTION]
DATA_SOURCES = tuple(dict.fromkeys(CLASSIFICATION_SOURCES + SEGMENTATION_SOURCES + DETECTION_SOURCES))
SEGMENTATION_LOSSES = ("ce", "dice", "ce+dice")
BOX_LOSSES = ("smooth_l1", "giou")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "constant")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")
MIXED_PRECISION_MODES = (False, True, "auto", "mixed_float16", "mixed_bfloat16", "float32")
JIT_COMPILE_MODES = (False, True, "auto")
SAMPLING_MODES = ("resize", "crop")
# data.sampling=crop: the tasks and sources with images at their own size (not classification, not mosaics).
CROP_TASKS = (SEGMENTATION, DETECTION)
CROP_SOURCES = ("mask_folder", "voc", "coco")


@dataclass(frozen=True)
class Field:
    """Schema of one recipe leaf.

    Args:
        types: accepted type names, any of "int", "float", "bool", "str", "list", "dict".
            "float" also accepts ints; "int" and "float" never accept bools.
        default: default value.
        allowed: if set, the value must be one of these.
        nullable: whether ``None`` is accepted (always true when the default is None).
        check: optional ``value -> error text or None`` for ranges and shapes.
    """

    types: tuple[str, ...]
    default: Any
    allowed: tuple | None = None
    nullable: bool = False
    check: Callable[[Any], str | None] | None = None


def _at_least(minimum: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= minimum else f"must be >= {minimum}"


def _in_range(low: float, high: float, high_inclusive: bool) -> Callable[[Any], str | None]:
    def check(value):
        ok = low <= value <= high if high_inclusive else low <= value < high
        return None if ok else f"must be in [{low}, {high}{']' if high_inclusive else ')'}"

    return check


def _check_scale_range(value: list) -> str | None:
    ok = len(value) == 2 and all(_TYPE_CHECKS["float"](v) and v > 0 for v in value) and value[0] <= value[1]
    return None if ok else "must be [low, high] with 0 < low <= high"


def _check_class_weights(value: list) -> str | None:
    ok = bool(value) and all(_TYPE_CHECKS["float"](v) and v >= 0 for v in value)
    return None if ok else "must be a non-empty list of numbers >= 0 (one per class)"


def _check_input_shape(value: list) -> str | None:
    if len(value) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        return "must be a list of 3 positive ints [height, width, channels]"
    if value[2] not in (1, 3):
        return "must have 1 or 3 channels (last entry)"
    return None


SCHEMA: dict[str, Any] = {
    "task": Field(("str",), "classification", allowed=TASKS),
    "model": {
        "backbone": Field(("str",), "resnet20_cifar"),
        # Detection: >= 1 (sigmoid focal loss, no background class); classification and segmentation: >= 2.
        "num_classes": Field(("int",), 10, check=_at_least(1)),
        "input_shape": Field(("list",), [28, 28, 1], check=_check_input_shape),
        "weights": Field(("str",), None),
        "freeze_stages": Field(("int",), -1, check=_at_least(-1)),
        "dropout": Field(("float",), 0.0, check=_in_range(0, 1, high_inclusive=False)),
        "backbone_args": Field(("dict",), {}),
        # None: the task's default head (deeplabv3plus for segmentation, retinanet for detection).
        "head": Field(("str",), None, allowed=SEGMENTATION_HEADS + DETECTION_HEADS),
        "head_args": Field(("dict",), {}),
        # Detection only: post-processing of the detector's raw outputs (score_threshold,
        # iou_threshold, max_detections, pre_nms_top_k).
        "decoder_args": Field(("dict",), {}),
    },
    "data": {
        "source": Field(("str",), "fashion_mnist", allowed=DATA_SOURCES),
        "train": Field(("str",), None),
        "val": Field(("str",), None),
        "batch_size": Field(("int",), 128, check=_at_least(1)),
        "cache": Field(("bool",), True),
        "shuffle_buffer": Field(("int",), 10000, check=_at_least(1)),
        "limit_train": Field(("int",), None, check=_at_least(1)),
        "limit_val": Field(("int",), None, check=_at_least(1)),
        # Each training example this many times per epoch (a handful of images filling an epoch).
        "repeat": Field(("int",), 1, check=_at_least(1)),
        "skip_corrupt": Field(("bool",), False),
        # Segmentation / detection: resize (or letterbox) every image to the model input, or train on
        # random input-size windows at native resolution (crop; validation on a grid of such tiles).
        "sampling": Field(("str",), "resize", allowed=SAMPLING_MODES),
        # sampling=crop only: windows per training image per pass (times `repeat`).
        "crops_per_image": Field(("int",), 1, check=_at_least(1)),
        # sampling=crop only: probability of keeping a window without objects (else moved onto an object).
        "empty_crop_rate": Field(("float",), 0.1, check=_in_range(0, 1, high_inclusive=True)),
        # Overlap (fraction of the input size) of neighbouring tiles in tiled evaluation / prediction.
        "tile_overlap": Field(("float",), 0.25, check=_in_range(0, 0.9, high_inclusive=True)),
        "augment": {
            "random_crop_padding": Field(("int",), 4, check=_at_least(0)),
            "horizontal_flip": Field(("bool",), True),
            "random_erasing": Field(("float",), 0.0, check=_in_range(0, 1, high_inclusive=True)),
            "scale_range": Field(("list",), [0.75, 1.25], check=_check_scale_range),
        },
        "mosaic_train_size": Field(("int",), 4000, check=_at_least(1)),
        "mosaic_val_size": Field(("int",), 500, check=_at_least(1)),
        # Segmentation only: new training canvases every epoch (the validation mosaic stays fixed).
        "mosaic_fresh_each_epoch": Field(("bool",), False),
        # Detection only.
        "class_names": Field(("list",), None),
        "train_images": Field(("str",), None),  # COCO image folders; default: the JSON's folder
        "val_images": Field(("str",), None),
        "max_boxes": Field(("int",), 100, check=_at_least(1)),
        "clip_boxes": Field(("bool",), False),
    },
    "train": {
        "epochs": Field(("int",), 30, check=_at_least(1)),
        "optimizer": Field(("str",), "sgd", allowed=OPTIMIZERS),
        "learning_rate": Field(("float",), 0.1, check=lambda v: None if v > 0 else "must be > 0"),
        "momentum": Field(("float",), 0.9, check=_in_range(0, 1, high_inclusive=False)),
        "nesterov": Field(("bool",), True),
        "weight_decay": Field(("float",), 5.0e-4, check=_at_least(0)),
        "schedule": Field(("str",), "cosine", allowed=SCHEDULES),
        "warmup_epochs": Field(("float",), 1.0, check=_at_least(0)),
        "label_smoothing": Field(("float",), 0.0, check=_in_range(0, 1, high_inclusive=False)),
        # Exponential moving average of the weights (validated and saved); null = off, e.g. 0.999.
        "ema_momentum": Field(("float",), None, check=_in_range(0, 1, high_inclusive=False)),
        "strategy": Field(("str",), "auto", allowed=STRATEGIES),
        "mixed_precision": Field(("bool", "str"), False, allowed=MIXED_PRECISION_MODES),
        "jit_compile": Field(("bool", "str"), False, allowed=JIT_COMPILE_MODES),
        "seed": Field(("int",), 0),
        "head_epochs": Field(("int",), 0, check=_at_least(0)),
        "fine_tune_learning_rate": Field(
            ("float",), None, check=lambda v: None if v > 0 else "must be > 0"
        ),
        "steps_per_epoch": Field(("int",), None, check=_at_least(1)),
        # Classification: train the epochs (at most `epochs`) that fit in this many minutes, measured
        # on the machine before training; the schedule is laid out over them (training/budget.py).
        "time_budget_minutes": Field(
            ("float",), None, check=lambda v: None if v > 0 else "must be > 0 (minutes), or null for no budget"
        ),
        "loss": Field(("str",), "ce", allowed=SEGMENTATION_LOSSES),
        "class_weights": Field(("list",), None, check=_check_class_weights),
        "box_loss": Field(("str",), "smooth_l1", allowed=BOX_LOSSES),
    },
    # Quantization-aware fine-tuning (`keras-resnet qat RUN_DIR` sets these): the finished float run whose
    # best model is fine-tuned with fake quantization, and the moving-average momentum of the ranges.
    "qat": {
        "source_run": Field(("str",), None),
        "momentum": Field(("float",), 0.99, check=_in_range(0, 1, high_inclusive=False)),
    },
    "output_dir": Field(("str",), "runs/fashion_mnist_resnet20"),
}

_TYPE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "list": lambda v: isinstance(v, (list, tuple)),
    "dict": lambda v: isinstance(v, dict),
}
_ARTICLES = {"int": "an int", "float": "a float", "bool": "a bool", "str": "a str", "list": "a list", "dict": "a dict"}


def _defaults_from(schema: Mapping[str, Any]) -> dict:
    return {
        key: _defaults_from(spec) if isinstance(spec, Mapping) else copy.deepcopy(spec.default)
        for key, spec in schema.items()
    }


DEFAULTS: dict = _defaults_from(SCHEMA)


def load_config(path_or_dict: str | os.PathLike | Mapping | None = None, overrides: Iterable[str] = ()) -> dict:
    """Load a recipe, merge it over DEFAULTS, apply overrides and validate it.

    Args:
        path_or_dict: path to a YAML recipe, an already-parsed dict, or None for
            the defaults alone.
        overrides: strings ``"dotted.key=value"``; the value is parsed with
            ``yaml.safe_load`` (``train.epochs=3``, ``model.input_shape=[20,20,1]``,
            ``model.weights=null``).

    Returns:
        A new plain nested dict (DEFAULTS is never mutated).

    Raises:
        ConfigError: missing or malformed file, unknown key, wrong type, value
            outside its allowed set or range, or an override without ``=``.
    """
    if path_or_dict is None:
        source, recipe = "defaults", {}
    elif isinstance(path_or_dict, Mapping):
        source, recipe = "recipe dict", copy.deepcopy(dict(path_or_dict))
    else:
        source = str(path_or_dict)
        recipe = _read_yaml(source)
    config = copy.deepcopy(DEFAULTS)
    _merge_into(config, recipe, SCHEMA, source, prefix="")
    for override in overrides:
        _apply_override(config, override)
    _validate(config, SCHEMA, source, prefix="")
    _check_task_fits(config, source)
    return config


def _check_task_fits(config: dict, source: str) -> None:
    """The data source must serve the task; per-class lists must match model.num_classes."""
    task, data_source = config["task"], config["data"]["source"]
    num_classes = config["model"]["num_classes"]
    if num_classes < 2 and task != "detection":
        needs = "background + at least one class" if task == "segmentation" else "at least two classes"
        raise ConfigError(
            f"'model.num_classes'={num_classes} in {source}: task {task!r} needs {needs}, so >= 2 "
            "(detection alone takes 1: one object class, no background class)"
        )
    fitting = SOURCES_BY_TASK[task]
    if data_source not in fitting:
        raise ConfigError(
            f"data.source={data_source!r} in {source} is a {_task_of_source(data_source)} source but task is "
            f"{task!r}; use one of {', '.join(map(repr, fitting))} (or set task accordingly)"
        )
    heads = HEADS_BY_TASK.get(task)
    head = config["model"]["head"]
    if heads is not None:
        if head is None:
            config["model"]["head"] = heads[0]
        elif head not in heads:
            raise ConfigError(
                f"'model.head'={head!r} in {source} is not a {task} head; use one of {', '.join(map(repr, heads))}"
            )
    if config["data"]["mosaic_fresh_each_epoch"] and not (task == "segmentation" and data_source == "mosaic"):
        raise ConfigError(
            f"'data.mosaic_fresh_each_epoch' in {source} only applies to task 'segmentation' with data.source "
            f"'mosaic' (here task {task!r}, source {data_source!r}); remove it or set it to false"
        )
    _check_sampling(config["data"], task, source)
    weights = config["train"]["class_weights"]
    if weights is not None and len(weights) != config["model"]["num_classes"]:
        raise ConfigError(
            f"'train.class_weights' in {source} has {len(weights)} entries but model.num_classes is "
            f"{config['model']['num_classes']}; give one weight per class or null"
        )


def _check_sampling(data: dict, task: str, source: str) -> None:
    """`data.sampling=crop` needs a segmentation / detection source of own-size images; its keys need crop."""
    data_source = data["source"]
    if data["sampling"] == "crop":
        if task not in CROP_TASKS or data_source not in CROP_SOURCES:
            raise ConfigError(
                f"'data.sampling'='crop' in {source} applies to task segmentation or detection with data.source "
                f"{', '.join(CROP_SOURCES)} (here task {task!r}, source {data_source!r}); set data.sampling=resize"
            )
        return
    for key in ("crops_per_image", "empty_crop_rate"):
        default = SCHEMA["data"][key].default
        if data[key] != default:
            raise ConfigError(
                f"'data.{key}'={data[key]!r} in {source} only applies with data.sampling=crop (here "
                f"{data['sampling']!r}); set data.sampling=crop or remove data.{key} (default {default})"
            )


def _task_of_source(data_source: str) -> str:
    return " or ".join(task for task, sources in SOURCES_BY_TASK.items() if data_source in sources)


def dump_config(cfg: Mapping, path: str | os.PathLike) -> None:
    """Write a recipe dict as YAML (key order preserved), creating parent folders.

    Args:
        cfg: recipe dict, typically from :func:`load_config`.
        path: destination ``.yaml`` file.
    """
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as stream:
        yaml.safe_dump(_plain(cfg), stream, sort_keys=False, default_flow_style=None)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:  # before `<<` merges, which may be overridden
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                mark = key_node.start_mark
                raise ConfigError(
                    f"duplicate key {key!r} in {mark.name} at line {mark.line + 1}, column {mark.column + 1}; "
                    "keep one of them"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"recipe file not found: {path!r}; pass an existing YAML file")
    try:
        with open(path, encoding="utf-8") as stream:
            recipe = yaml.load(stream, Loader=_UniqueKeyLoader)  # noqa: S506  (a SafeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"malformed YAML in {path}{where}: {problem}") from None
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise ConfigError(
            f"{path} must contain a YAML mapping at the top level, got {type(recipe).__name__}"
        )
    return recipe


def _unknown_key_error(key: str, prefix: str, schema: Mapping, source: str) -> ConfigError:
    allowed = sorted(schema)
    suggestion = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f"; did you mean '{prefix}{suggestion[0]}'?" if suggestion else ""
    section = f"under '{prefix[:-1]}'" if prefix else "at the top level"
    return ConfigError(
        f"unknown key '{prefix}{key}' in {source}; allowed keys {section}: {', '.join(allowed)}{hint}"
    )


def _merge_into(config: dict, recipe: Mapping, schema: Mapping, source: str, prefix: str) -> None:
    for key, value in recipe.items():
        if key not in schema:
            raise _unknown_key_error(key, prefix, schema, source)
        spec = schema[key]
        if isinstance(spec, Mapping):
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"'{prefix}{key}' in {source} must be a mapping of "
                    f"{', '.join(sorted(spec))}, got {value!r} ({type(value).__name__})"
                )
            _merge_into(config[key], value, spec, source, prefix=f"{prefix}{key}.")
        else:
            config[key] = copy.deepcopy(value)


def _apply_override(config: dict, override: str) -> None:
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(
            f"override {override!r} must look like 'dotted.key=value', e.g. 'train.epochs=3'"
        )
    dotted_key, raw_value = override.split("=", 1)
    dotted_key = dotted_key.strip()
    try:
        value = yaml.safe_load(raw_value)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({error})") from None
    parts = dotted_key.split(".")
    node, schema, prefix = config, SCHEMA, ""
    for depth, part in enumerate(parts):
        is_last = depth == len(parts) - 1
        if isinstance(schema, Field):  # descending into a free-form dict (backbone_args)
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: '{prefix[:-1]}' is not a mapping")
            if is_last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
            prefix += part + "."
            continue
        if part not in schema:
            raise _unknown_key_error(part, prefix, schema, f"override {override!r}")
        spec = schema[part]
        if is_last:
            if isinstance(spec, Mapping):
                if not isinstance(value, Mapping):
                    raise ConfigError(
                        f"override {override!r}: '{prefix}{part}' is a section; "
                        f"set one of its keys instead ({', '.join(sorted(spec))})"
                    )
                _merge_into(node[part], value, spec, f"override {override!r}", prefix=f"{prefix}{part}.")
            else:
                node[part] = value
        elif isinstance(spec, Field) and "dict" not in spec.types:
            raise ConfigError(f"override {override!r}: '{prefix}{part}' is not a section")
        else:
            if isinstance(spec, Field) and not isinstance(node.get(part), dict):
                node[part] = {}
            node, schema = node[part], spec
        prefix += part + "."


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _validate(config: dict, schema: Mapping, source: str, prefix: str) -> None:
    for key, spec in schema.items():
        name = f"{prefix}{key}"
        value = config[key]
        if isinstance(spec, Mapping):
            _validate(value, spec, source, prefix=f"{name}.")
            continue
        if value is None:
            if spec.nullable or spec.default is None:
                continue
            raise ConfigError(f"'{name}' must not be null (default {spec.default!r})")
        if not any(_TYPE_CHECKS[t](value) for t in spec.types):
            expected = " or ".join(_ARTICLES[t] for t in spec.types)
            if spec.default is None:
                expected += " or null"
            hint = ""
            if "float" in spec.types and isinstance(value, str) and _looks_like_float(value):
                # YAML 1.1 (PyYAML) reads 1e-3 as text: a float needs a dot (1.0e-3) or plain digits (0.001).
                hint = f"; YAML reads {value} as text: write {float(value)!r} or put a dot in the mantissa (1.0e-3)"
            raise ConfigError(f"'{name}' must be {expected}, got {_describe(value)}{hint}")
        if spec.allowed is not None and not any(
            value == option and type(value) is type(option) for option in spec.allowed
        ):
            options = ", ".join(repr(o) if isinstance(o, str) else str(o).lower() for o in spec.allowed)
            raise ConfigError(f"'{name}' must be one of {options}, got {_describe(value)}")
        if isinstance(value, tuple):
            value = config[key] = list(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"'{name}' must be a finite number, got {_describe(value)}")
        if spec.check is not None:
            problem = spec.check(value)
            if problem:
                raise ConfigError(f"'{name}' {problem}, got {_describe(value)}")
        if "float" in spec.types:
            config[key] = float(value)
