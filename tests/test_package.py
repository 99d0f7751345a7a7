"""The package's shape: import graph, layering, public names, module sizes, registration.

These read the source with `ast` (imports inside functions count too) and
run fresh interpreters, so they hold whatever the test session imported.
Both packages count: keras_resnet and keras_resnet_cli, the CLI's front door,
which must start without Keras or TensorFlow (`import keras_resnet` imports them).
"""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "keras_resnet"
CLI_ROOT = PACKAGE_ROOT.with_name("keras_resnet_cli")
SETTINGS_ROOT = PACKAGE_ROOT.with_name("keras_resnet_settings")
PACKAGES = ("keras_resnet", "keras_resnet_cli", "keras_resnet_settings")
TESTS_ROOT = Path(__file__).resolve().parent
MAX_MODULE_LINES = 700

# Which top-level parts of keras_resnet each part may import (besides itself).
ALLOWED_IMPORTS = {
    "config": set(),
    "atomic_files": set(),
    "runs": {"atomic_files"},
    "visualize": set(),
    "layers": set(),
    "tiling": set(),
    "weights": set(),  # the catalogue's files: download, verify, cache (the table is in keras_resnet_settings)
    "models": {"layers", "tiling", "weights"},
    "data": {"config", "tiling"},
    "convert": {"models", "layers"},
    "quantization": {"models", "layers"},
    "training": {"atomic_files", "models", "layers", "data", "config", "runs", "visualize", "convert", "quantization", "tiling"},
    "export": {"atomic_files", "models", "layers", "data", "config", "runs", "quantization"},
    "predict": {"atomic_files", "export", "models", "layers", "data", "config", "runs", "visualize", "quantization", "tiling"},
    "cli": {"atomic_files", "models", "layers", "data", "config", "runs", "convert", "training", "export", "predict", "quantization",
            "visualize", "weights", "__init__", "keras_resnet_cli"},
    "__init__": {"convert", "layers", "models", "quantization", "training"},
    # The front door: keras_resnet.cli only, and only inside functions (test_the_cli_front_door_...).
    "keras_resnet_cli": {"cli", "keras_resnet_settings"},
    # Settings, errors, task names: below everything, no keras_resnet (and so no TensorFlow).
    "keras_resnet_settings": set(),
}
# Every part may import the settings package (it imports none of them).
for _allowed in ALLOWED_IMPORTS.values():
    _allowed.add("keras_resnet_settings")
# Inside these packages only the dispatching module imports the per-task modules.
TASK_MODULES = ("classification", "segmentation", "detection")
DISPATCHERS = {"training": "keras_resnet.training.runner", "export": "keras_resnet.export.api"}


def module_name(path: Path) -> str:
    root = next(r for r in (CLI_ROOT, SETTINGS_ROOT, PACKAGE_ROOT) if path.is_relative_to(r))
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


MODULES = {module_name(path): path for root in (PACKAGE_ROOT, CLI_ROOT, SETTINGS_ROOT)
           for path in sorted(root.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def part_of(name: str) -> str:
    parts = name.split(".")
    if parts[0] in ("keras_resnet_cli", "keras_resnet_settings"):
        return parts[0]
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(name: str):
    """(imported keras_resnet(_cli) module, names taken from it, line) for every import in a module."""
    path = MODULES[name]
    package = name if is_package(name) else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] not in PACKAGES:
                continue
            names = [alias.name for alias in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            plain = [n for n in names if f"{target}.{n}" not in MODULES]
            for submodule in submodules:
                yield submodule, [], node.lineno
            if plain or not submodules:
                yield target, plain, node.lineno


def import_graph():
    return {name: {target for target, _, _ in imports_of(name) if target != name} for name in MODULES}


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_import_graph_checker_finds_cycles_and_known_modules():
    # The checker itself: a planted cycle is found, and it sees imports inside functions.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert "keras_resnet.training.runner" in MODULES and "keras_resnet.export.api" in MODULES
    targets = {target for target, _, _ in imports_of("keras_resnet.cli")}
    assert "keras_resnet.training.runner" in targets  # imported inside a function
    assert "keras_resnet_cli.dispatch" in targets and "keras_resnet_cli.parser" in MODULES
    assert {target for target, _, _ in imports_of("keras_resnet_cli")} == {"keras_resnet_cli.dispatch",
                                                                            "keras_resnet.cli"}


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_each_part_imports_only_what_is_below_it():
    wrong = []
    for name in MODULES:
        source = part_of(name)
        for target, _, line in imports_of(name):
            destination = part_of(target)
            if destination != source and destination not in ALLOWED_IMPORTS[source]:
                wrong.append(f"{name}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("package", sorted(DISPATCHERS))
def test_only_the_dispatcher_imports_the_task_modules(package):
    task_modules = {f"keras_resnet.{package}.{task}" for task in TASK_MODULES}
    wrong = [
        f"{name}:{line} imports {target}"
        for name in MODULES
        if name != DISPATCHERS[package] and name not in task_modules
        for target, _, line in imports_of(name)
        if target in task_modules
    ]
    assert not wrong, "\n".join(wrong)


def module_level_imports(path: Path):
    """(top-level package, line) of each import run when the module is imported: not those in functions."""
    found, pending = [], list(ast.parse(path.read_text(), str(path)).body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append(((node.module or "").split(".")[0] if not node.level else "keras_resnet_cli", node.lineno))
        pending.extend(ast.iter_child_nodes(node))
    return found


def test_module_level_import_checker_skips_functions(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("import os\nif True:\n    import keras\ndef f():\n    import tensorflow\n")
    assert sorted(module_level_imports(planted)) == [("keras", 3), ("os", 1)]


def test_the_cli_front_door_imports_only_the_standard_library_at_module_level():
    # `keras-resnet --help` and `models` stay fast: keras_resnet (and so Keras, TensorFlow), rich
    # and absl are imported inside functions, only by the commands that need them.
    wrong = [
        f"{name}:{line} imports {package} at module level"
        for name, path in MODULES.items()
        if part_of(name) == "keras_resnet_cli"
        for package, line in module_level_imports(path)
        if package != "keras_resnet_cli" and package not in sys.stdlib_module_names
    ]
    assert not wrong, "\n".join(wrong)


def private_uses(path: Path, own_module: str | None):
    """`from keras_resnet.x import _y` and `module._y` on an imported keras_resnet module."""
    tree = ast.parse(path.read_text(), str(path))
    module_aliases = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("keras_resnet"):
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES:
                    module_aliases.add(alias.asname or alias.name)
                elif alias.name.startswith("_") and node.module != own_module:
                    found.append(f"{path.name}:{node.lineno} imports {node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("keras_resnet") and alias.asname:
                    module_aliases.add(alias.asname)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in module_aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_no_private_names_cross_modules():
    found = [use for name, path in MODULES.items() for use in private_uses(path, name)]
    assert not found, "\n".join(found)


def test_tests_use_public_names_only():
    found = [use for path in sorted(TESTS_ROOT.rglob("test_*.py")) for use in private_uses(path, None)]
    assert not found, "\n".join(found)


def test_private_use_checker_sees_both_forms(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("from keras_resnet.runs import _x\nfrom keras_resnet.export import api\napi._y()\n")
    assert len(private_uses(planted, None)) == 2


def test_no_module_is_over_the_size_limit():
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    too_long = {name: lines for name, lines in sizes.items() if lines > MAX_MODULE_LINES}
    assert not too_long, too_long


def run_fresh(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_import_keras_resnet_registers_every_serialisable_class():
    out = run_fresh("""
        import importlib, pkgutil
        import keras, keras_resnet
        def ours():
            return {k for k in keras.saving.get_custom_objects() if k.startswith("keras_resnet>")}
        after_top_level = ours()
        for module in pkgutil.walk_packages(keras_resnet.__path__, "keras_resnet."):
            importlib.import_module(module.name)
        missing = sorted(ours() - after_top_level)
        print("REGISTERED", len(after_top_level))
        print("MISSING", missing)
    """)
    registered = int(out.split("REGISTERED ")[1].split()[0])
    assert registered >= 15, out  # layers, models, losses, metrics, schedule
    assert "MISSING []" in out, out


def test_public_api_paths_are_unchanged():
    # The names users import; the classes keep their registered names (package "keras_resnet").
    out = run_fresh("""
        import importlib
        import keras
        paths = [
            "keras_resnet.ResNetBackbone", "keras_resnet.ResNetClassifier", "keras_resnet.RetinaNetDetector",
            "keras_resnet.ResNetSegmenter", "keras_resnet.FPN", "keras_resnet.list_presets", "keras_resnet.PRESETS",
            "keras_resnet.ImageNormalization", "keras_resnet.convert.from_keras_applications",
            "keras_resnet.export.export_model", "keras_resnet.export.load_exported_model",
            "keras_resnet.training.train_from_config", "keras_resnet.training.evaluate_from_config",
            "keras_resnet.predict.predict_files", "keras_resnet.config.load_config", "keras_resnet.cli.main",
            "keras_resnet_cli.main",
        ]
        for path in paths:
            module, _, name = path.rpartition(".")
            assert getattr(importlib.import_module(module), name) is not None, path
        import keras_resnet
        for cls in (keras_resnet.ResNetBackbone, keras_resnet.ResNetClassifier, keras_resnet.RetinaNetDetector,
                    keras_resnet.ResNetSegmenter, keras_resnet.WarmupSchedule):
            assert keras.saving.get_registered_name(cls) == f"keras_resnet>{cls.__name__}", cls
        print("OK")
    """)
    assert "OK" in out


# ----------------------------------------------------------------------------
# Settings travel as attributes: no recipe string keys below the loader
# ----------------------------------------------------------------------------
RECIPE_VARIABLES = ("cfg", "recipe", "load_config")  # names (and suffixes: data_cfg) holding a recipe or section


def section_keys():
    """{section name: its declared keys}, e.g. {"data": {"source", "sampling", ...}, "augment": {...}}."""
    import dataclasses

    from keras_resnet_settings import Recipe
    from keras_resnet_settings.fields import hints, is_section

    found = {}

    def walk(cls):
        for field in dataclasses.fields(cls):
            kind = hints(cls)[field.name]
            if is_section(kind):
                found[field.name] = {f.name for f in dataclasses.fields(kind)}
                walk(kind)

    walk(Recipe)
    return found


SECTION_KEYS = section_keys()


def recipe_key_reads(path: Path, root: Path = PACKAGE_ROOT.parent):
    """`cfg["train"]`, `data_cfg.get("sampling")`, `load_config(p)["task"]`, `data["source"]`: string-key reads of a
    recipe or of a section (a name of a section read with one of that section's keys)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            target, key = node.value, node.slice.value
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and node.args and isinstance(node.args[0], ast.Constant)):
            target, key = node.func.value, node.args[0].value
        else:
            continue
        if isinstance(target, ast.Call):  # load_config(path)["task"]
            target = target.func
        name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", "")
        if isinstance(key, str) and (name.endswith(RECIPE_VARIABLES) or key in SECTION_KEYS.get(name, ())):
            found.append(f"{path.relative_to(root)}:{node.lineno} {name}[{key!r}]")
    return found


def test_recipe_key_checker_finds_both_forms(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("a = cfg['train']['epochs']\nb = data_cfg.get('sampling', 'resize')\nc = info['num_train']\n"
                       "d = load_config(path)['task']\ne = data['source']\nf = qat['path']\n")
    found = sorted(line.split(" ", 1)[1] for line in recipe_key_reads(planted, tmp_path))
    assert found == ["cfg['train']", "data['source']", "data_cfg['sampling']", "load_config['task']"]


def test_no_module_below_the_settings_loader_reads_the_recipe_by_string_keys():
    # keras_resnet_settings.load_config returns a frozen Recipe: code reads recipe.train.epochs, never
    # cfg["train"]["epochs"] (a key's type, default and range live in one declaration).
    found = [read for name, path in MODULES.items() if part_of(name) != "keras_resnet_settings"
             for read in recipe_key_reads(path)]
    found += [read for path in sorted((PACKAGE_ROOT.parent / "benchmarks").glob("*.py"))
              for read in recipe_key_reads(path)]
    assert not found, "\n".join(found)
