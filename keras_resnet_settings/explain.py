"""The recipe reference, generated from the declarations: `keras-resnet recipe --explain [SECTION]`.

`docs/recipe_reference.md` is this text for the whole recipe; a test checks it is current.
"""

from __future__ import annotations

import dataclasses

from keras_resnet_settings.fields import (
    default_of,
    hints,
    is_section,
    rule_of,
    show_allowed,
    type_name,
)
from keras_resnet_settings.recipe import ExportSettings, Recipe


def _value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def rows(cls: type = Recipe, prefix: str = ""):
    """(dotted key, type, default, allowed values or range, help) of every setting under `cls`."""
    kinds = hints(cls)
    for f in dataclasses.fields(cls):
        kind = kinds[f.name]
        if is_section(kind):
            yield from rows(kind, f"{prefix}{f.name}.")
            continue
        rule = rule_of(f)
        limits = f"one of {show_allowed(rule.allowed)}" if rule.allowed is not None else rule.range_text()
        yield f"{prefix}{f.name}", type_name(kind), _value(default_of(f)), limits, rule.help


SECTION_NAMES = ("task", "model", "data", "data.augment", "train", "qat", "output_dir", "export")


def explain(section: str | None = None) -> str:
    """The reference of every recipe key (or of one section: model, data, train, qat; export: the export options),
    as a Markdown table."""
    if section == "export":
        table = list(rows(ExportSettings, "export."))
        title = "`keras-resnet export` options (flags: `--calibration-samples` for `calibration_samples`)"
    else:
        table = [row for row in rows() if section is None or row[0] == section or row[0].startswith(section + ".")]
        title = f"recipe keys under `{section}`" if section else "recipe keys"
    if not table:
        raise ValueError(f"no recipe section {section!r}; sections: {', '.join(SECTION_NAMES)}")
    lines = [f"{title}:", "", "| key | type | default | allowed | help |", "|---|---|---|---|---|"]
    for key, kind, default, limits, text in table:
        lines.append(f"| `{key}` | {kind} | `{default}` | {limits.replace('|', '/')} | {text} |")
    return "\n".join(lines)


REFERENCE_FILE = "docs/recipe_reference.md"


def reference_markdown() -> str:
    """The whole reference as docs/recipe_reference.md holds it (a test checks the file is current)."""
    parts = [
        "# Recipe reference",
        "",
        "Generated from the declarations in `keras_resnet_settings/recipe.py` by",
        "`python -m keras_resnet_settings.explain --write` (a test fails when this file is stale).",
        "`keras-resnet recipe --explain [SECTION]` prints the same tables; `keras-resnet recipe FILE`",
        "checks a recipe and prints it resolved, listing every problem at once.",
        "",
        "A recipe is YAML with these sections; `--set a.b=c` overrides a key (the value parses as YAML:",
        "`1.0e-3` and `1.0e+9` are floats, `1e-3` is text).",
    ]
    for section in ("task", "model", "data", "train", "qat", "output_dir", "export"):
        parts += ["", f"## `{section}`", "", explain(section)]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write"]:
        with open(REFERENCE_FILE, "w", encoding="utf-8") as handle:
            handle.write(reference_markdown())
        print(f"wrote {REFERENCE_FILE}")
    else:
        print(reference_markdown(), end="")
