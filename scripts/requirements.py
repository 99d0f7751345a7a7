"""Print keras_resnet's requirements (with extras) for pip, one per line, with TensorFlow swapped.

`scripts/setup.sh` uses it on machines without an NVIDIA GPU: pyproject.toml
requires `tensorflow` (the GPU-capable wheel, 572 MB), and pip has no way to
say "or tensorflow-cpu" (274 MB, the same code without CUDA kernels). So
setup.sh installs the package itself with `--no-deps` and its requirements
from this list, where `tensorflow` reads `tensorflow-cpu` in the same
version range. Self-references such as `keras_resnet[onnx,tflite]` in an
extra are expanded.

Usage:
    python scripts/requirements.py dev --tensorflow tensorflow-cpu > requirements.txt
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(extras: list[str], tensorflow: str = "tensorflow", pyproject: Path = PYPROJECT) -> list[str]:
    """The requirement strings of the project with `extras`, `tensorflow` renamed to `tensorflow`.

    Args:
        extras: optional-dependency groups to add (e.g. ["dev"]); nested
            self-references are expanded.
        tensorflow: the distribution that replaces `tensorflow` (e.g.
            "tensorflow-cpu"); its extras (like `[and-cuda]`) are dropped with it.
        pyproject: the pyproject.toml to read.

    Raises:
        SystemExit: an extra that pyproject.toml does not define.
    """
    project = tomllib.loads(Path(pyproject).read_text())["project"]
    own = _normalise(project["name"])
    optional = project.get("optional-dependencies", {})
    lines, seen_extras = [], set()

    def add(requirement_list):
        for requirement in requirement_list:
            match = _NAME.match(requirement)
            name, extra_part, rest = match.group(1), match.group(2), match.group(3)
            if _normalise(name) == own:
                expand([extra.strip() for extra in extra_part.strip("[]").split(",") if extra.strip()])
            elif _normalise(name) == "tensorflow" and tensorflow != "tensorflow":
                lines.append(f"{tensorflow}{rest}")
            else:
                lines.append(requirement)

    def expand(names):
        for extra in names:
            if extra not in optional:
                raise SystemExit(f"pyproject.toml defines no extra {extra!r}; it has {', '.join(optional)}")
            if extra not in seen_extras:
                seen_extras.add(extra)
                add(optional[extra])

    add(project["dependencies"])
    expand(extras)
    return list(dict.fromkeys(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", nargs="*", help="optional-dependency groups, e.g. dev")
    parser.add_argument("--tensorflow", default="tensorflow",
                        help="distribution to install instead of tensorflow (e.g. tensorflow-cpu)")
    args = parser.parse_args(argv)
    print("\n".join(requirements(args.extras, args.tensorflow)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
