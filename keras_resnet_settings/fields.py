"""How one recipe setting is declared, and how a value is checked against its declaration.

A setting is a dataclass field made with :func:`setting`: its type is the
field's annotation (``int``, ``float``, ``bool``, ``str``, ``list[int]``,
``dict``, unions such as ``bool | str`` and ``| None`` for nullable), its
default, allowed values, range and one-line help live in the same call. Every
check of a recipe value runs here (:func:`check_value`), so no allowed-values
list, default or range of a setting is written in a second place.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping

_MISSING = object()


@dataclass(frozen=True)
class Rule:
    """The declaration of one setting besides its name and type.

    Args:
        help: one line: what the setting does.
        allowed: the values it may take (compared with their type: ``True`` is not ``1``).
        minimum, maximum: inclusive bounds of a number.
        above, below: exclusive bounds of a number.
        check: ``value -> problem text or None`` for shapes a range cannot say.
        check_text: how ``check`` reads in the reference (``explain``).
    """

    help: str
    allowed: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    below: float | None = None
    check: Callable[[Any], str | None] | None = None
    check_text: str = ""

    def range_text(self) -> str:
        """The range in interval notation, e.g. ``[0, 0.9]``, ``> 0``, or ``""``."""
        low = f"[{_number(self.minimum)}" if self.minimum is not None else (
            f"({_number(self.above)}" if self.above is not None else None)
        high = f"{_number(self.maximum)}]" if self.maximum is not None else (
            f"{_number(self.below)})" if self.below is not None else None)
        if low and high:
            return f"{low}, {high}"
        if low:
            return f">= {low[1:]}" if low[0] == "[" else f"> {low[1:]}"
        if high:
            return f"<= {high[:-1]}" if high[-1] == "]" else f"< {high[:-1]}"
        return self.check_text

    def in_range(self, value: float) -> bool:
        return not (
            (self.minimum is not None and value < self.minimum)
            or (self.maximum is not None and value > self.maximum)
            or (self.above is not None and value <= self.above)
            or (self.below is not None and value >= self.below)
        )


class Settings:
    """Base of the settings dataclasses: `to_dict()` (plain nested dict, as YAML holds it) and `replace()`."""

    def to_dict(self) -> dict:
        return {
            f.name: getattr(self, f.name).to_dict() if is_section(type(getattr(self, f.name)))
            else plain(getattr(self, f.name))
            for f in dataclasses.fields(self)
        }

    def replace(self, **changes: Any) -> Any:
        """A copy with `changes` (``recipe.train.replace(epochs=3)``); the object itself is frozen."""
        return dataclasses.replace(self, **changes)


def plain(value: Any) -> Any:
    """`value` as YAML and JSON hold it: dicts with str keys, lists for tuples."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _number(value: float) -> str:
    return f"{value:g}"


def setting(default: Any, help: str, **rule: Any) -> Any:
    """A recipe setting: a dataclass field with its default and :class:`Rule` (help, allowed, range...).

    Example:
        >>> @dataclass(frozen=True)
        ... class TrainSettings:
        ...     epochs: int = setting(30, "passes over the training set", minimum=1)
    """
    metadata = {"rule": Rule(help=help, **rule)}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def rule_of(field: dataclasses.Field) -> Rule:
    return field.metadata["rule"]


def default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


def is_section(kind: Any) -> bool:
    return dataclasses.is_dataclass(kind)


def hints(cls: type) -> dict[str, Any]:
    """The evaluated annotations of a settings class."""
    return typing.get_type_hints(cls)


# ----------------------------------------------------------------------------
# Types
# ----------------------------------------------------------------------------
def type_options(kind: Any) -> tuple[list[Any], bool]:
    """(the non-None types of an annotation, whether None is accepted)."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        members = list(typing.get_args(kind))
    else:
        members = [kind]
    nullable = type(None) in members
    return [member for member in members if member is not type(None)], nullable


def _matches(value: Any, kind: Any) -> bool:
    origin = typing.get_origin(kind) or kind
    if origin is bool:
        return isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is float:  # an int is a float too; a bool is neither
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(kind) or (Any,)
        return isinstance(value, (list, tuple)) and (item is Any or all(_matches(v, item) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    raise TypeError(f"unsupported setting type {kind!r}")


def type_name(kind: Any) -> str:
    """How a type reads in messages and the reference: ``int``, ``list of float``, ``bool or str or null``."""
    options, nullable = type_options(kind)
    names = []
    for option in options:
        origin = typing.get_origin(option) or option
        if origin is list and typing.get_args(option):
            names.append(f"list of {typing.get_args(option)[0].__name__}")
        else:
            names.append(origin.__name__)
    return " or ".join(names + (["null"] if nullable else []))


_ARTICLE = {"int": "an int", "float": "a float", "bool": "a bool", "str": "a str", "dict": "a mapping"}


def _expected(kind: Any) -> str:
    options, nullable = type_options(kind)
    words = []
    for option in options:
        origin = typing.get_origin(option) or option
        if origin is list:
            args = typing.get_args(option)
            words.append(f"a list of {args[0].__name__}s" if args else "a list")
        else:
            words.append(_ARTICLE[origin.__name__])
    return " or ".join(words + (["null"] if nullable else []))


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def show_allowed(options: tuple) -> str:
    return ", ".join(repr(o) if isinstance(o, str) else str(o).lower() for o in options)


def check_value(name: str, value: Any, kind: Any, rule: Rule, default: Any) -> tuple[Any, str | None]:
    """(the value as stored, the problem or None) of recipe key ``name`` against its declaration.

    Numbers of a float setting are stored as float and tuples as lists, so a
    recipe reads back the same whether written ``1`` or ``1.0``.
    """
    options, nullable = type_options(kind)
    if value is None:
        return None, None if nullable else f"'{name}' must not be null (default {default!r})"
    if not any(_matches(value, option) for option in options):
        hint = ""
        if float in options and isinstance(value, str) and _looks_like_float(value):
            # PyYAML reads YAML 1.1: 1e-3 and 1.0e9 are text; 1.0e-3 and 1.0e+9 are floats.
            hint = (f"; YAML reads {value} as text: write {float(value)!r} (a float needs a dot in the mantissa "
                    "and a signed exponent, e.g. 1.0e-3 or 1.0e+9)")
        return value, f"'{name}' must be {_expected(kind)}, got {_describe(value)}{hint}"
    if rule.allowed is not None and not any(
        value == option and type(value) is type(option) for option in rule.allowed
    ):
        return value, f"'{name}' must be one of {show_allowed(rule.allowed)}, got {_describe(value)}"
    if isinstance(value, tuple):
        value = list(value)
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if numeric and isinstance(value, float) and not math.isfinite(value):
        return value, f"'{name}' must be a finite number, got {_describe(value)}"
    if numeric and not rule.in_range(value):
        return value, f"'{name}' must be {_range_words(rule)}, got {_describe(value)}"
    if rule.check is not None:
        problem = rule.check(value)
        if problem:
            return value, f"'{name}' {problem}, got {_describe(value)}"
    if numeric and float in options and int not in options:
        value = float(value)
    if isinstance(value, list) and any(typing.get_origin(o) is list and typing.get_args(o) == (float,)
                                       for o in options):
        value = [float(v) for v in value]
    return value, None


def _range_words(rule: Rule) -> str:
    text = rule.range_text()
    return f"in {text}" if text.startswith(("[", "(")) else text
