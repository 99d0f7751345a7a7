"""The code blocks of README.md and of every page in docs/ run as written.

Every fenced ```python and ```bash block of README.md and docs/**/*.md (`DOCS`)
is found here and either run, checked or skipped, by rule; a test id names
the file and the line of the block's opening fence (`FILE:LINE`, e.g. `docs/qat.md:10`):

* python blocks run as written, in file order (README.md, then docs/ by
  name), in one subprocess of the repository's `.venv` python (one TensorFlow
  start-up for all of them): each as a script of its own (fresh globals,
  `__name__ == "__main__"`), in the folder of its file and section.
* A bash line `keras-resnet ARGS` runs as the `keras-resnet` console script's
  entry point with ARGS, in this process, in the folder of its file and
  section, and must exit 0. Any other bash line must be in `SKIPPED`, keyed by
  file and line text, with the reason; `test_every_block_is_run_or_skipped`
  fails on one that is not, on a block in a language that may be code (```sh,
  ```console ...) and on a `SKIPPED` entry its file no longer has.
* Every relative link of these files names a file that exists (and a heading
  of it, for `#anchor`), and docs/README.md links every page of docs/.
* A section's folder (one per file and `## ` section) stands in for the
  repository root: `tasks/` links to the
  repository's recipes, `photos/` ("a folder of your own images") holds two
  images; Fashion-MNIST is a small stand-in (`KERAS_RESNET_FASHION_MNIST_DIR`,
  tests/helpers.py's `write_shape_fashion_mnist`); Keras' home and the mosaic
  cache are in the test's temporary folder, so Keras' defaults hold (float32).
* What a block takes from the main job (`MADE_BY_MAIN_JOB`: the run folder
  `bash scripts/main.sh` trains) is made first with the main job's own `train`
  line. Every `train` line gets the size-only overrides of `TINY` appended (a
  tiny backbone and data, an epoch or two steps): the one substitution made.
* The bash blocks of the segmentation and detection runs (`CHECKED_ONLY`) are
  checked, not run, unless KERAS_RESNET_README_FULL=1: their lines go through
  the real command-line parser, and each must name what the lines before it
  write (the recipe's `output_dir`, the export's file name) and files that
  exist. Running them costs ~5 minutes on 2 shared cores (a tiny detection run
  takes ~1.5 min to train, its three exports ~1.7 min); what they run is tested in
  tests/export/test_segmentation.py and tests/export/test_detection.py.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import (
    DETECTION_RECIPE,
    SEGMENTATION_RECIPE,
    TINY_BACKBONE,
    TINY_DETECTOR,
    write_shape_fashion_mnist,
)
from tests.training.test_own_data import mask_folder, stripes_folder, voc_folder
from tests.weights_helpers import write_weights_mirror

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS_INDEX = ROOT / "docs" / "README.md"
# The files whose blocks run here: README.md, then every page of docs/ (recipe_reference.md, generated, has none).
DOCS = [README, *sorted((ROOT / "docs").rglob("*.md"))]
PYTHON = ROOT / ".venv" / "bin" / "python"
CLASSIFICATION_RECIPE = "tasks/classification/fashion_mnist_resnet18_narrow.yaml"
FULL = bool(os.environ.get("KERAS_RESNET_README_FULL"))

# bash lines not run, by (file, line: comments stripped, spaces collapsed), and why.
SKIPPED = {
    ("README.md", "bash scripts/setup.sh"): "makes or updates .venv (pip installs ~2 GB); this test runs in that .venv",
    ("README.md", "bash scripts/main.sh"): "the main job: sets up .venv and trains for ~20 min; its train line runs "
    "here tiny (MADE_BY_MAIN_JOB) and its exports as the Export block",
    ("README.md", "bash .ci/run"): "deletes and rebuilds .venv, then runs the whole suite (this test included)",
    ("docs/testing.md", ".venv/bin/python -m pytest -q -ra -n 2 --dist loadscope"): "the whole suite, this test "
    "included",
}

# Size-only overrides appended to every `keras-resnet train RECIPE` line.
TINY = {
    CLASSIFICATION_RECIPE: [
        "model.backbone_args.stem_width=8",
        "model.backbone_args.stackwise_num_filters=[8,16,16,16]",
        "model.backbone_args.stackwise_num_blocks=[1,1,1,1]",
        "data.batch_size=20",
        "train.epochs=1",
        "train.time_budget_minutes=null",  # the recipe's 20-minute budget measures steps first (~10-20 s)
        "train.mixed_precision=false",
    ],
    SEGMENTATION_RECIPE: [
        *(f"model.backbone_args.{key}={value}" for key, value in TINY_BACKBONE.items()),
        "data.mosaic_train_size=16",
        "data.mosaic_val_size=8",
        "data.batch_size=8",
        "model.input_shape=[32,32,1]",
        "train.epochs=1",
        "train.mixed_precision=false",
    ],
    DETECTION_RECIPE: [*TINY_DETECTOR, "train.epochs=1", "train.steps_per_epoch=2"],
}

# Run folders the blocks take from the main job (`bash scripts/main.sh`), and its line that makes them.
MADE_BY_MAIN_JOB = {"runs/fashion_mnist_resnet18_narrow": f"keras-resnet train {CLASSIFICATION_RECIPE}"}

# Bash blocks naming these runs are checked, not run, unless KERAS_RESNET_README_FULL=1 (see the docstring).
CHECKED_ONLY = {"runs/mosaic_deeplabv3plus_resnet18", "runs/mosaic_retinanet_resnet18"}
# "Your own data": the folders README names, made in every section's folder (tests/training/test_own_data.py
# makes them too and trains each for real); `train --data` lines get `--epochs 1` appended.
OWN_DATA = {"my_photos": stripes_folder, "my_cells": mask_folder, "my_fields": voc_folder}
OWN_DATA_TINY = ["--epochs", "1"]

# Int8 exports of these runs get `--int8-min-agreement 0` appended: the gates (the same top-1 class on 99 % of the
# images, 98 % of the pixels) are what trained models reach. The tiny stand-ins are not trained: the classifier
# takes 2 steps, so its 10 scores are near ties and whether int8 keeps the top class of all 12 images is chance
# (it did with one augmentation stream, 11 of 12 with another); the one-epoch segmenter reaches ~91 %.
# tests/export/test_classification.py and test_segmentation.py test the gates on trained models; the export
# still has to run, write the model and measure its parity here. The detection run passes its gate as written.
INT8_GATE_OFF = {"fashion_mnist_resnet18_narrow", "mosaic_deeplabv3plus_resnet18", "qat"}
# The QAT block (`keras-resnet qat` + its int8 export) is checked, not run, unless KERAS_RESNET_README_FULL=1: it
# costs ~2.5 minutes here, and the tiny stand-in's QAT int8 agrees with Keras on ~83 % of 12 images (the gate is
# for trained models; tests/quantization/test_qat.py tests the QAT command and export).
CHECKED_ONLY_COMMANDS = ("keras-resnet qat ", "--data my_cells", "--data my_fields")


@dataclass(frozen=True)
class Block:
    language: str
    text: str
    line: int  # of the opening fence
    section: str  # the `## ` heading above it
    file: str = "README.md"  # relative to the repository root

    @property
    def id(self):
        return f"{self.file}:{self.line}"

    @property
    def name(self):
        return f"{self.id} {self.language} ({self.section})"

    @property
    def place(self):
        """The file and section whose folder the block runs in."""
        return self.file, self.section


def relative(path):
    return Path(path).relative_to(ROOT).as_posix()


def readme_blocks(text=None, file="README.md"):
    """The fenced blocks of `file` (a path relative to the repository root) or of `text`, in order."""
    lines = ((ROOT / file).read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks, section, index = [], "", 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("## "):
            section = line[3:].strip()
        fence = re.match(r"^(```+)\s*([\w+-]*)\s*$", line)
        if fence:
            end = index + 1
            while end < len(lines) and lines[end].strip() != fence.group(1):
                end += 1
            text_of_block = "\n".join(lines[index + 1 : end]) + "\n"
            blocks.append(Block(fence.group(2).lower(), text_of_block, index + 1, section, file))
            index = end
        index += 1
    return blocks


def bash_commands(block):
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    commands, pending = [], ""
    for line in block.text.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command, pending = pending + line, ""
        command = "" if command.lstrip().startswith("#") else re.sub(r"\s+#.*$", "", command).strip()
        if command:
            commands.append(" ".join(command.split()))
    return commands


def runnable(command):
    return command.startswith("keras-resnet ")


def runs_named(text):
    return set(re.findall(r"\bruns/\w+", text))


RUN_LANGUAGES = {"python", "bash"}
NOT_CODE = {"", "yaml", "text"}  # the CLI synopsis, the recipe keys, the package layout
BLOCKS = [block for path in DOCS for block in readme_blocks(file=relative(path))]
PYTHON_BLOCKS = [b for b in BLOCKS if b.language == "python"]
BASH_BLOCKS = [b for b in BLOCKS if b.language == "bash" and any(map(runnable, bash_commands(b)))]


def test_every_block_is_run_or_skipped():
    assert {"README.md", "docs/README.md"} <= {relative(path) for path in DOCS}
    unknown = [b.name for b in BLOCKS if b.language not in RUN_LANGUAGES | NOT_CODE]
    assert not unknown, f"blocks in a language this test neither runs nor ignores: {unknown}"
    commands = [(b, c) for b in BLOCKS if b.language == "bash" for c in bash_commands(b)]
    unlisted = [f"{b.name}: {c}" for b, c in commands if not runnable(c) and (b.file, c) not in SKIPPED]
    assert not unlisted, f"bash lines this test cannot run; make them runnable or add to SKIPPED: {unlisted}"
    stale = set(SKIPPED) - {(b.file, c) for b, c in commands}
    assert not stale, f"SKIPPED lists (file, line) pairs the file no longer has: {sorted(stale)}"
    # the parser still finds the blocks: README's own, and the ones moved to docs/
    assert len(PYTHON_BLOCKS) >= 6 and len(BASH_BLOCKS) >= 6
    assert any(b.file == "README.md" for b in PYTHON_BLOCKS) and any(b.file != "README.md" for b in PYTHON_BLOCKS)
    assert any(b.file == "README.md" for b in BASH_BLOCKS) and any(b.file != "README.md" for b in BASH_BLOCKS)
    # python blocks run before the bash blocks (one subprocess): none may come after a bash block of its section
    late = [p.name for p in PYTHON_BLOCKS if any(b.place == p.place and b.line < p.line for b in BASH_BLOCKS)]
    assert not late, f"python blocks after a keras-resnet block of their section (not supported here): {late}"


def test_the_block_parser_sees_fences_continuations_and_comments():
    text = (
        "## A\n```bash\nkeras-resnet a \\\n    --b 1   # note\n# only a comment\n\nbash x.sh\n```\n"
        "## B\n```python\nprint(1)\n```\n```\nkeras-resnet models\n```\n"
    )
    bash, python, plain = readme_blocks(text, file="docs/x.md")
    assert (bash.language, bash.section, bash.line, bash.id) == ("bash", "A", 2, "docs/x.md:2")
    assert bash_commands(bash) == ["keras-resnet a --b 1", "bash x.sh"]
    assert (python.language, python.section, python.text) == ("python", "B", "print(1)\n")
    assert plain.language == ""


def test_export_file_names_in_readme_are_those_export_writes():
    from keras_resnet.export.steps import artefact_path

    text = README.read_text(encoding="utf-8")
    name = Path(next(iter(MADE_BY_MAIN_JOB))).name
    folder = Path("saved_models") / name
    assert f"`{folder.as_posix()}/`" in text and f"`runs/{name}/`" in text
    for format, quantize in (("saved_model", "none"), ("onnx", "none"), ("tflite", "none"), ("tflite", "int8")):
        path = artefact_path(folder, name, format, quantize)
        assert f"`{path.name}`" in text or f"`{path.name}/`" in text, path


def test_readme_states_the_commands_ci_runs():
    """.ci/run runs "README's test command": README states it, and the main job, verbatim."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    (test_command,) = [line.strip() for line in ci.splitlines() if line.startswith(".venv/bin/python -m pytest")]
    text = README.read_text(encoding="utf-8")
    assert f"`{test_command}`" in text
    commands = {c for b in BLOCKS if b.file == "README.md" and b.language == "bash" for c in bash_commands(b)}
    assert {"bash scripts/main.sh", "bash .ci/run", "bash scripts/setup.sh"} <= commands


# ----------------------------------------------------------------------------- links

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def without_fences(text):
    return re.sub(r"^(```+)[^\n]*\n.*?^\1\s*$", "", text, flags=re.S | re.M)


def prose(text):
    """`text` without its fenced blocks and inline code (whose brackets are not links)."""
    return re.sub(r"(`+).*?\1", "", without_fences(text), flags=re.S)


def heading_anchors(text):
    """GitHub's anchors of a markdown text's headings: lower case, punctuation dropped, spaces to -, -1 on repeats."""
    anchors, seen = set(), {}
    for line in without_fences(text).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def relative_links(path):
    """(target path, anchor or None, link text) of every relative link in the markdown file `path`."""
    for target in LINK.findall(prose(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        yield (path.parent / file).resolve() if file else path, anchor or None, target


@pytest.mark.parametrize("path", DOCS, ids=relative)
def test_relative_links_point_to_files_and_headings(path):
    broken = []
    for target, anchor, link in relative_links(path):
        if not target.exists():
            broken.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in heading_anchors(target.read_text(encoding="utf-8")):
            broken.append(f"{link}: {relative(target)} has no heading with that anchor")
    assert not broken, f"{relative(path)}: broken links: {broken}"


def test_docs_index_links_every_page():
    linked = {target for target, _, _ in relative_links(DOCS_INDEX)}
    pages = {path.resolve() for path in DOCS if path not in (README, DOCS_INDEX)}
    assert not pages - linked, f"docs/README.md does not link {sorted(relative(p) for p in pages - linked)}"
    assert DOCS_INDEX.resolve() in {target for target, _, _ in relative_links(README)}


def test_the_link_checker_sees_links_anchors_and_code():
    text = "# Recipes (`tasks/`)\n## A, b & c\n## A, b & c\n[x](a.md#y) `[no](link.md)`\n```\n[no](b.md)\n```\n"
    assert heading_anchors(text) == {"recipes-tasks", "a-b--c", "a-b--c-1"}
    assert LINK.findall(prose(text)) == ["a.md#y"]


# ----------------------------------------------------------------------------- running the blocks


@pytest.fixture(scope="module")
def checkouts(tmp_path_factory):
    """`checkout(block)`: the folder of its file and section; the environment every block sees is set meanwhile."""
    root = tmp_path_factory.mktemp("readme")
    variables = {
        "KERAS_RESNET_FASHION_MNIST_DIR": str(write_shape_fashion_mnist(root / "fashion-mnist")),
        "KERAS_RESNET_MOSAIC_CACHE": str(root / "mosaic-cache"),
        "KERAS_HOME": str(root / "keras-home"),
        # "Pretrained weights": no network; timm's resnet18d weights (real layout, formula values) in a mirror
        # folder as the Hub serves them, an empty weights cache, the Hub offline.
        "KERAS_RESNET_WEIGHTS_MIRROR": str(write_weights_mirror(root / "weights-mirror")),
        "KERAS_RESNET_CACHE": str(root / "weights-cache"),
        "HF_HUB_CACHE": str(root / "hf-cache"),
        "HF_HUB_OFFLINE": "1",
    }

    def checkout(block):
        folder = root / re.sub(r"\W+", "_", f"{block.file} {block.section}")
        if not folder.exists():
            folder.mkdir()
            (folder / "tasks").symlink_to(ROOT / "tasks")
            photos = folder / "photos"
            photos.mkdir()
            pixels = np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(photos / "wide.png")
            Image.fromarray(np.full((20, 18), 90, np.uint8)).save(photos / "small.jpg")
            for name, make in OWN_DATA.items():
                make(folder / name)
        return folder

    with pytest.MonkeyPatch.context() as patch:
        for key, value in variables.items():
            patch.setenv(key, value)
        yield checkout
    shutil.rmtree(root, ignore_errors=True)  # ~0.3 GB: the API block's models, the runs and their exports


RUNNER = """
import json, os, sys, time, traceback
results = {}
for key, folder, script in json.loads(sys.argv[1]):
    os.chdir(folder)
    start = time.perf_counter()
    try:
        with open(script, encoding="utf-8") as stream:
            exec(compile(stream.read(), script, "exec"), {"__name__": "__main__", "__file__": script})
        error = None
    except BaseException:
        error = traceback.format_exc()
    results[key] = {"error": error, "seconds": time.perf_counter() - start}
    with open(sys.argv[2], "w", encoding="utf-8") as stream:
        json.dump(results, stream)
"""


@pytest.fixture(scope="module")
def python_results(checkouts, tmp_path_factory):
    """{block id: {"error": traceback or None, "seconds": ...}} of every python block, run once."""
    work = tmp_path_factory.mktemp("readme_python")
    jobs = []
    for block in PYTHON_BLOCKS:
        script = work / (re.sub(r"\W+", "_", block.file) + f"_line_{block.line}.py")
        script.write_text(block.text, encoding="utf-8")
        jobs.append((block.id, str(checkouts(block)), str(script)))
    out = work / "results.json"
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "KERAS_BACKEND": "tensorflow",
        "PATH": f"{PYTHON.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    python = PYTHON if PYTHON.exists() else Path(sys.executable)
    command = [str(python), "-c", RUNNER, json.dumps(jobs), str(out)]
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=900)
    results = json.loads(out.read_text()) if out.exists() else {}
    return results, result


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: b.id)
def test_python_block_runs(block, python_results):
    results, process = python_results
    assert block.id in results, f"{block.name} did not run:\n{process.stderr[-4000:]}"
    print(f"{results[block.id]['seconds']:.1f} s  {block.name}")
    assert results[block.id]["error"] is None, f"{block.name} failed:\n{results[block.id]['error']}"


def keras_resnet_main():
    """The function the `keras-resnet` console script calls."""
    (entry,) = entry_points(group="console_scripts", name="keras-resnet")
    return entry.load()


def call_cli(argv, command, where):
    """`keras-resnet ARGV`'s exit status; a command line its parser rejects fails the test."""
    try:
        return keras_resnet_main()(argv)
    except SystemExit as error:  # argparse: unknown flag or choice (the message is in the captured stderr)
        pytest.fail(f"{where}: `{command}` is not a valid keras-resnet command line (exit {error.code})")


def run_cli(command, where):
    argv = shlex.split(command)[1:]
    if argv[0] == "train" and "--data" in argv:
        argv += OWN_DATA_TINY
    elif argv[0] == "train":
        argv += ["--set", *TINY[argv[1]]]
    if argv[0] == "export" and "int8" in argv and Path(argv[1]).name in INT8_GATE_OFF:
        argv += ["--int8-min-agreement", "0"]
    start = time.perf_counter()
    status = call_cli(argv, command, where)
    print(f"{time.perf_counter() - start:5.1f} s  {command}")
    assert status == 0, f"{where}: `{command}` exited {status} (run as keras-resnet {shlex.join(argv)})"


class Checker:
    """Stands in for the commands: checks that each line names what the lines before it write, and files."""

    def __init__(self, made):
        self.made = {Path(path) for path in made}
        self.problems = []

    def need(self, path, what):
        path = Path(path)
        if path not in self.made and not path.exists():
            self.problems.append(f"{what} {path}: no line before it writes it, and it does not exist")

    def train(self, args):
        from keras_resnet.config import load_config

        self.made.add(Path(load_config(args.config, args.set).output_dir))  # a --data recipe is args.config here

    def evaluate(self, args):
        from keras_resnet.config import load_config

        self.need(load_config(args.config, args.set).output_dir, "evaluate's run folder")

    def export(self, args):
        from keras_resnet.export.steps import artefact_path

        self.need(args.model, "export's model")
        if args.calibration is not None:
            self.need(args.calibration, "export's --calibration")
        source = Path(args.model)
        name = source.stem if source.suffix == ".keras" else source.name
        output = Path(args.output) if args.output else Path("saved_models") / name
        self.made.add(artefact_path(output, name, args.format, args.quantize))

    def qat(self, args):
        self.need(args.run_dir, "qat's run folder")
        self.made.add(Path(args.run_dir) / "qat")

    def predict(self, args):
        self.need(args.model, "predict's model")
        for image in args.images:
            self.need(image, "predict's image")


def check_cli(command, where, checker, monkeypatch):
    import keras_resnet.cli

    for name in ("train", "evaluate", "qat", "export", "predict"):
        monkeypatch.setitem(keras_resnet.cli.COMMANDS, name, getattr(checker, name))
    status = call_cli(shlex.split(command)[1:], command, where)
    assert not checker.problems and status == 0, f"{where}: `{command}`: {checker.problems or f'exit {status}'}"


@pytest.mark.parametrize("block", BASH_BLOCKS, ids=lambda b: b.id)
def test_bash_block_runs(block, checkouts, python_results, monkeypatch):
    checked_only = not FULL and (runs_named(block.text) & CHECKED_ONLY
                                 or any(command in block.text for command in CHECKED_ONLY_COMMANDS))
    monkeypatch.chdir(checkouts(block))  # after the section's python blocks (python_results)
    checker = Checker(MADE_BY_MAIN_JOB)
    for command in filter(runnable, bash_commands(block)):
        if checked_only:
            with monkeypatch.context() as patch:
                check_cli(command, block.name, checker, patch)
            continue
        for run in sorted(runs_named(command) & set(MADE_BY_MAIN_JOB)):
            if not Path(run).exists():
                run_cli(MADE_BY_MAIN_JOB[run], f"the main job's {run} for {block.name}")
        run_cli(command, block.name)
