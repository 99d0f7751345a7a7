"""Loading a recipe: YAML file or dict, dotted overrides, every problem reported at once.

:func:`load_config` reads a YAML recipe (or a dict), applies ``"dotted.key=value"``
overrides, checks every value against its declaration (`keras_resnet_settings.recipe`)
and the rules between settings, and returns a frozen :class:`Recipe`. A recipe
with several mistakes raises one :class:`ConfigError` listing all of them.
This module needs only PyYAML: the CLI checks a recipe before TensorFlow starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, Iterable, Mapping

import yaml

from keras_resnet_settings.errors import ConfigError
from keras_resnet_settings.fields import (
    check_value,
    default_of,
    hints,
    is_section,
    rule_of,
    show_allowed,
)
from keras_resnet_settings.fields import (
    plain as _plain,
)
from keras_resnet_settings.presets import unknown_preset_problem
from keras_resnet_settings.recipe import (
    CROP_SOURCES,
    CROP_TASKS,
    FILE_SOURCES,
    DataSettings,
    ExportSettings,
    Recipe,
)
from keras_resnet_settings.registry import (
    CLASSIFICATION,
    DETECTION,
    HEADS_BY_TASK,
    SEGMENTATION,
    SOURCES_BY_TASK,
)
from keras_resnet_settings.weights import (
    TASK_PRESETS,
    find_entry,
    is_weights_name,
    weights_names,
)

RUN_RECIPE_FILE = "recipe.yaml"  # the recipe of a run folder (re-exported by keras_resnet.runs)
QAT_DIR = "qat"  # `keras-resnet qat RUN_DIR` writes its run into RUN_DIR/qat (keras_resnet.training.qat)


class Problems:
    """The problems found in one recipe; raised together as one ConfigError."""

    def __init__(self, source: str):
        self.source = source
        self.found: list[str] = []

    def add(self, text: str) -> None:
        self.found.append(text)

    def raise_if_any(self) -> None:
        if len(self.found) == 1:
            raise ConfigError(f"{self.found[0]} (in {self.source})")
        if self.found:
            lines = "\n".join(f"  - {text}" for text in self.found)
            raise ConfigError(f"{len(self.found)} problems in {self.source}:\n{lines}")


def load_config(path_or_dict: str | os.PathLike | Mapping | Recipe | None = None,
                overrides: Iterable[str] = ()) -> Recipe:
    """Load a recipe, apply overrides and check it.

    Args:
        path_or_dict: path to a YAML recipe, an already-parsed dict, a Recipe,
            or None for the defaults alone.
        overrides: strings ``"dotted.key=value"``; the value is parsed with
            ``yaml.safe_load`` (``train.epochs=3``, ``model.input_shape=[20,20,1]``,
            ``model.weights=null``).

    Returns:
        A frozen :class:`Recipe` (``recipe.train.epochs``; ``recipe.to_dict()`` for YAML).

    Raises:
        ConfigError: every problem at once: missing or malformed file, unknown
            keys (with the closest known key), wrong types, values outside
            their allowed set or range, settings that do not fit together,
            overrides without ``=``.

    Example:
        >>> recipe = load_config("tasks/classification/fashion_mnist_resnet20.yaml", ["train.epochs=3"])
        >>> recipe.train.epochs
        3
    """
    if path_or_dict is None:
        source, given = "defaults", {}
    elif isinstance(path_or_dict, Recipe):
        source, given = "recipe", path_or_dict.to_dict()
    elif isinstance(path_or_dict, Mapping):
        source, given = "recipe dict", _plain(path_or_dict)
    else:
        source = os.fspath(path_or_dict)
        given = read_yaml(source)
    problems = Problems(source)
    values = _merged(Recipe, given, "", problems)
    for override in overrides:
        _apply_override(values, override, problems)
    recipe_values = _checked(Recipe, values, "", problems)
    _check_together(recipe_values, problems)
    problems.raise_if_any()
    return _build(Recipe, recipe_values)


def dump_config(recipe: Recipe | Mapping, path: str | os.PathLike) -> None:
    """Write a recipe as YAML (declaration order), creating parent folders.

    Args:
        recipe: a :class:`Recipe` (or its dict).
        path: destination ``.yaml`` file.
    """
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    plain = recipe.to_dict() if isinstance(recipe, Recipe) else _plain(recipe)
    with open(path, "w", encoding="utf-8") as stream:
        yaml.safe_dump(plain, stream, sort_keys=False, default_flow_style=None)


def settings_from(cls: type, values: Mapping, source: str) -> Any:
    """An instance of settings class `cls` from `values`, every problem in one ConfigError (CLI options)."""
    problems = Problems(source)
    merged = _merged(cls, _plain(values), "", problems)
    checked = _checked(cls, merged, "", problems)
    problems.raise_if_any()
    return _build(cls, checked)


# ----------------------------------------------------------------------------
# Reading YAML
# ----------------------------------------------------------------------------
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


def read_yaml(path: str) -> dict:
    """The mapping in YAML file `path` (a ConfigError for a missing, malformed or non-mapping file)."""
    if os.path.isdir(path):
        run_recipe = os.path.join(path, RUN_RECIPE_FILE)
        if os.path.isfile(run_recipe):
            raise ConfigError(f"{path!r} is a run folder, not a recipe file; pass its recipe, {run_recipe}")
        raise ConfigError(f"{path!r} is a folder, not a recipe file; pass a YAML recipe")
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
        raise ConfigError(f"{path} must contain a YAML mapping at the top level, got {type(recipe).__name__}")
    return recipe


# ----------------------------------------------------------------------------
# Merging, overrides, checks
# ----------------------------------------------------------------------------
def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    kinds = hints(cls)
    return {f.name: (f, kinds[f.name]) for f in dataclasses.fields(cls)}


def _unknown_key(key: str, prefix: str, cls: type, where: str = "") -> str:
    allowed = sorted(_fields(cls))
    suggestion = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f"; did you mean '{prefix}{suggestion[0]}'?" if suggestion else ""
    section = f"under '{prefix[:-1]}'" if prefix else "at the top level"
    return f"unknown key '{prefix}{key}'{where}; allowed keys {section}: {', '.join(allowed)}{hint}"


def _defaults(cls: type) -> dict:
    return {name: _defaults(kind) if is_section(kind) else default_of(f)
            for name, (f, kind) in _fields(cls).items()}


def _merged(cls: type, given: Mapping, prefix: str, problems: Problems) -> dict:
    """The defaults of `cls` with `given` over them; unknown keys and non-mapping sections are problems."""
    values = _defaults(cls)
    _merge_into(values, cls, given, prefix, problems)
    return values


def _merge_into(values: dict, cls: type, given: Mapping, prefix: str, problems: Problems, where: str = "") -> None:
    fields = _fields(cls)
    for key, value in given.items():
        if key not in fields:
            problems.add(_unknown_key(key, prefix, cls, where))
            continue
        kind = fields[key][1]
        if is_section(kind):
            if value is None:
                continue
            if not isinstance(value, Mapping):
                problems.add(f"'{prefix}{key}'{where} must be a mapping of {', '.join(sorted(_fields(kind)))}, "
                             f"got {value!r} ({type(value).__name__})")
                continue
            _merge_into(values[key], kind, value, f"{prefix}{key}.", problems, where)
        else:
            values[key] = value


def _apply_override(values: dict, override: Any, problems: Problems) -> None:
    if not isinstance(override, str) or "=" not in override:
        problems.add(f"override {override!r} must look like 'dotted.key=value', e.g. 'train.epochs=3'")
        return
    dotted_key, raw_value = override.split("=", 1)
    where = f" (override {override!r})"
    try:
        value = yaml.safe_load(raw_value)
    except yaml.YAMLError as error:
        problems.add(f"override {override!r}: the value is not valid YAML ({error})")
        return
    parts = dotted_key.strip().split(".")
    node, cls, prefix = values, Recipe, ""
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if cls is dict:  # inside a free-form mapping (backbone_args, head_args, decoder_args)
            if last:
                node[part] = value
            else:
                child = node.get(part)
                node = node[part] = child if isinstance(child, dict) else {}
            prefix += part + "."
            continue
        fields = _fields(cls)
        if part not in fields:
            problems.add(_unknown_key(part, prefix, cls, where))
            return
        kind = fields[part][1]
        if last:
            if is_section(kind):
                if not isinstance(value, Mapping):
                    problems.add(f"override {override!r}: '{prefix}{part}' is a section; set one of its keys "
                                 f"instead ({', '.join(sorted(_fields(kind)))})")
                    return
                _merge_into(node[part], kind, value, f"{prefix}{part}.", problems, where)
            else:
                node[part] = value
        elif is_section(kind):
            node, cls = node[part], kind
        elif kind is dict:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node, cls = node[part], dict
        else:
            problems.add(f"override {override!r}: '{prefix}{part}' is not a section")
            return
        prefix += part + "."


def _checked(cls: type, values: dict, prefix: str, problems: Problems) -> dict:
    """`values` with each leaf checked against its declaration (floats as float, tuples as lists)."""
    checked = {}
    for name, (f, kind) in _fields(cls).items():
        if is_section(kind):
            checked[name] = _checked(kind, values[name], f"{prefix}{name}.", problems)
            continue
        value, problem = check_value(f"{prefix}{name}", values[name], kind, rule_of(f), default_of(f))
        if problem:
            problems.add(problem)
        checked[name] = value
    return checked


def _build(cls: type, values: dict) -> Any:
    return cls(**{name: _build(kind, values[name]) if is_section(kind) else values[name]
                  for name, (_, kind) in _fields(cls).items()})


def _task_of_source(data_source: str) -> str:
    return " or ".join(task for task, sources in SOURCES_BY_TASK.items() if data_source in sources)


def _check_together(values: dict, problems: Problems) -> None:
    """The rules between settings: source fits the task, classes, head, mosaic and crop options.

    Skipped for a task or source that is itself wrong (already a problem).
    Fills in the task's default head when `model.head` is null.
    """
    task, model, data, train = values["task"], values["model"], values["data"], values["train"]
    if task not in SOURCES_BY_TASK:
        return
    num_classes = model["num_classes"]
    if isinstance(num_classes, int) and num_classes < 2 and task != DETECTION:
        needs = "background + at least one class" if task == SEGMENTATION else "at least two classes"
        problems.add(f"'model.num_classes'={num_classes}: task {task!r} needs {needs}, so >= 2 "
                     "(detection alone takes 1: one object class, no background class)")
    data_source = data["source"]
    fitting = SOURCES_BY_TASK[task]
    if data_source not in fitting and _task_of_source(data_source):  # an unknown source is already a problem
        problems.add(f"data.source={data_source!r} is a {_task_of_source(data_source)} source but task is "
                     f"{task!r}; use one of {show_allowed(fitting)} (or set task accordingly)")
    heads = HEADS_BY_TASK.get(task)
    if heads is not None:
        if model["head"] is None:
            model["head"] = heads[0]
        elif model["head"] not in heads:
            problems.add(f"'model.head'={model['head']!r} is not a {task} head; use one of {show_allowed(heads)}")
    if data["mosaic_fresh_each_epoch"] and not (task == SEGMENTATION and data_source == "mosaic"):
        problems.add(f"'data.mosaic_fresh_each_epoch' only applies to task 'segmentation' with data.source "
                     f"'mosaic' (here task {task!r}, source {data_source!r}); remove it or set it to false")
    _check_sampling(data, task, problems)
    if data_source in FILE_SOURCES:
        if data["val"] is None and data["val_split"] is None:
            problems.add(f"data.val is required with data.source={data_source!r}: set it to the validation data, or "
                         "set data.val_split (e.g. 0.2) to hold out part of data.train")
        elif data["val"] is not None and data["val_split"] is not None:
            problems.add(f"data.val ({data['val']}) and data.val_split ({data['val_split']}) both given: keep one")
        if data["train"] is None:
            problems.add(f"data.train is required with data.source={data_source!r}: set it to the training data")
    _check_backbone("model.backbone", model["backbone"], problems)
    fallback = train["time_budget_fallback"]
    if isinstance(fallback, Mapping) and "model.backbone" in fallback:
        _check_backbone("train.time_budget_fallback: model.backbone", fallback["model.backbone"], problems)
    _check_weights_name(model, problems)
    weights = train["class_weights"]
    if isinstance(weights, list) and isinstance(num_classes, int) and len(weights) != num_classes:
        problems.add(f"'train.class_weights' has {len(weights)} entries but model.num_classes is {num_classes}; "
                     "give one weight per class or null")


def _check_backbone(key: str, name: Any, problems: Problems) -> None:
    """A backbone preset must be in the preset table (read without TensorFlow; `keras_resnet_settings.presets`)."""
    if name in TASK_PRESETS:
        problems.add(f"'{key}'={name!r} is a task preset (a whole torchvision model with its head), not a backbone "
                     "preset; set a backbone such as 'resnet50' (`keras-resnet models` lists them)")
        return
    problem = unknown_preset_problem(key, name)
    if problem:
        problems.add(problem)


def _check_weights_name(model: dict, problems: Problems) -> None:
    """`model.weights` given by name ("imagenet", a tag) must be backbone weights the catalogue has for the preset."""
    name = model["weights"]
    if isinstance(name, str) and name and not is_weights_name(name) and "." not in os.path.basename(name):
        close = difflib.get_close_matches(name, weights_names(), n=1)
        problems.add(f"'model.weights'={name!r} is neither a weights name (imagenet, coco, or a tag such as "
                     "torchvision:IMAGENET1K_V1: `keras-resnet weights` lists them) nor a weight file (.keras, .h5, "
                     f".pth, .safetensors...){f'; did you mean {close[0]!r}?' if close else ''}")
        return
    if not is_weights_name(name) or not isinstance(model["backbone"], str):
        return
    try:
        entry = find_entry(model["backbone"], name)
    except ConfigError as error:
        problems.add(f"'model.weights'={name!r}: {error}")
        return
    if entry.task != CLASSIFICATION:
        problems.add(f"'model.weights'={name!r}: {entry.name} are {entry.task} weights of a whole model; a recipe "
                     "loads backbone (ImageNet) weights: use 'imagenet'")


def _check_sampling(data: dict, task: str, problems: Problems) -> None:
    """`data.sampling=crop` needs a segmentation / detection source of own-size images; its keys need crop."""
    if data["sampling"] == "crop":
        if task not in CROP_TASKS or data["source"] not in CROP_SOURCES:
            problems.add(f"'data.sampling'='crop' applies to task segmentation or detection with data.source "
                         f"{', '.join(CROP_SOURCES)} (here task {task!r}, source {data['source']!r}); "
                         "set data.sampling=resize")
        return
    fields = {f.name: f for f in dataclasses.fields(DataSettings)}
    for key in ("crops_per_image", "empty_crop_rate"):
        default = default_of(fields[key])
        if data[key] != default:
            problems.add(f"'data.{key}'={data[key]!r} only applies with data.sampling=crop (here "
                         f"{data['sampling']!r}); set data.sampling=crop or remove data.{key} (default {default})")


# ----------------------------------------------------------------------------
# One setting by its dotted name (CLI flags and library arguments that mirror a setting)
# ----------------------------------------------------------------------------
def _declaration(key: str):
    """(field, type, rule) of dotted recipe key `key`, or of `export.<option>` for the export options."""
    parts = key.split(".")
    cls: type = ExportSettings if parts[0] == "export" else Recipe
    for part in parts[1:-1] if parts[0] == "export" else parts[:-1]:
        cls = _fields(cls)[part][1]
    name = parts[-1]
    f, kind = _fields(cls)[name]
    return f, kind, rule_of(f)


def default(key: str) -> Any:
    """The declared default of setting `key` (``default("data.tile_overlap")`` -> 0.25)."""
    return default_of(_declaration(key)[0])


def allowed(key: str) -> tuple:
    """The declared allowed values of setting `key` (``allowed("export.quantize")``)."""
    return _declaration(key)[2].allowed


def range_of(key: str) -> str:
    """The declared range of setting `key` as text (``range_of("data.tile_overlap")`` -> "[0, 0.9]")."""
    return _declaration(key)[2].range_text()


def help_of(key: str) -> str:
    """The declared one-line help of setting `key`."""
    return _declaration(key)[2].help


def check_setting(key: str, value: Any, shown_as: str | None = None) -> Any:
    """`value` checked against the declaration of setting `key`; a ConfigError naming `shown_as` (default `key`).

    For flags and function arguments that set the same thing as a recipe key
    (``--tile-overlap`` is ``data.tile_overlap``), so its range lives in one place.
    """
    f, kind, rule = _declaration(key)
    checked, problem = check_value(shown_as or key, value, kind, rule, default_of(f))
    if problem:
        raise ConfigError(problem)
    return checked


def check_export_settings(settings: ExportSettings) -> None:
    """The rules between export options: quantization is TFLite's; integer io needs a full-integer model."""
    if settings.quantize != "none" and settings.format != "tflite":
        raise ConfigError(f"quantize={settings.quantize!r} applies only to format='tflite', not {settings.format!r}")
    if settings.io != "float" and settings.quantize != "int8":
        raise ConfigError(
            f"io={settings.io!r} (integer input and outputs) needs a full-integer model: add --quantize int8 "
            f"(quantize='int8'), or drop --io {settings.io}"
        )
