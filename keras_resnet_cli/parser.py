"""The `keras-resnet` flags: one parser, every argument with its help text.

Flags that set a declared setting (`--quantize` is `ExportSettings.quantize`,
`--tile-overlap` is `data.tile_overlap`) take their choices, defaults and help
from `keras_resnet_settings` (PyYAML only; imported inside functions).
"""

import argparse
import os
import sys

SET_FLAG = "--set"
RECIPE_SUFFIXES = (".yaml", ".yml")


def _positive_int_arg(text, alternative=""):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int{alternative}, got {text!r}")
    return value


def _batch_size_arg(text):
    return text if text == "dynamic" else _positive_int_arg(text, " or 'dynamic'")


def _tile_arg(text):
    return text if text in ("auto", "off") else _positive_int_arg(text, " tile side, 'auto' or 'off'")


def _overlap_arg(text):
    from keras_resnet_settings import check_setting, range_of
    from keras_resnet_settings.errors import ConfigError

    try:
        return check_setting("data.tile_overlap", float(text), shown_as="--tile-overlap")
    except (ValueError, ConfigError):
        raise argparse.ArgumentTypeError(
            f"expected a fraction in {range_of('data.tile_overlap')} (as data.tile_overlap), got {text!r}"
        ) from None


def _declared(parser, flag, key, **kwargs):
    """`parser.add_argument(flag)` for export option `key`: choices, default and help from its declaration."""
    from keras_resnet_settings import allowed, default, help_of

    name = f"export.{key}"
    value = default(name)
    parser.add_argument(flag, default=value, choices=allowed(name),
                        help=f"{help_of(name)} (default {value})".replace("%", "%%"), **kwargs)


def _is_override(text):
    """`--set` value `text` is a KEY=VALUE override, not the recipe or run folder that followed the flag."""
    if "=" not in text:
        return False
    return not (os.path.isdir(text) or (os.path.isfile(text) and text.endswith(RECIPE_SUFFIXES)))


def positionals_first(argv):
    """`argv` with the recipe (or run folder) given after `--set k=v ...` moved in front of the flag.

    `--set` takes one or more values, so `train --set train.epochs=1 RECIPE.yaml` would hand it the recipe
    too. The values after its last KEY=VALUE (an existing .yaml/.yml file or folder counts as a path, even
    with a '=' in its name) are the command's positional arguments: they move in front of the first --set
    (`train RECIPE.yaml --set train.epochs=1`).
    """
    argv = list(argv)
    moved, first, index = [], None, 0
    while index < len(argv):
        token = argv[index]
        if token == "--":
            break
        if token != SET_FLAG:
            index += 1
            continue
        first = index if first is None else first
        end = index + 1
        while end < len(argv) and not argv[end].startswith("-"):
            end += 1
        values = argv[index + 1:end]
        overrides = [position for position, value in enumerate(values) if _is_override(value)]
        if overrides and overrides[-1] < len(values) - 1:
            moved += values[overrides[-1] + 1:]
            del argv[index + 2 + overrides[-1]:end]
            end = index + 2 + overrides[-1]
        index = end
    return argv if first is None else argv[:first] + moved + argv[first:]


def parse_args(argv=None):
    """The `keras-resnet` command line parsed (`argv`, default the process's), positionals after --set too."""
    return build_parser().parse_args(positionals_first(sys.argv[1:] if argv is None else argv))


def build_parser():
    parser = argparse.ArgumentParser(prog="keras-resnet", description="Residual networks for Keras 3.")
    sub = parser.add_subparsers(
        dest="command", required=True, title="commands", help="`keras-resnet COMMAND --help` lists its flags",
    )

    def command(name, text):
        return sub.add_parser(name, help=text, description=f"{text[0].upper()}{text[1:]}.")

    p = command("models", "list the backbone presets with params and GMACs")
    p.add_argument("--filter", default="", help="only presets whose name contains this")
    p.add_argument("--wide", action="store_true", help="full descriptions (the table may exceed the terminal)")

    p = command("weights", "list the pretrained weights catalogue, or download weights into the cache")
    p.add_argument("filter", nargs="?", default="", help="only rows whose preset or tag contains this")
    p.add_argument("--wide", action="store_true", help="also what they were trained on and their licence")
    p.add_argument("--download", default=None, metavar="PRESET",
                   help="fetch and verify the weights of PRESET into the cache (for a machine without network)")
    p.add_argument("--weights", default=None, metavar="NAME",
                   help="with --download: imagenet (default), coco / coco_voc (task presets) or a tag such as "
                        "torchvision:IMAGENET1K_V1")

    p = command("summary", "print the Keras summary of a preset")
    p.add_argument("name", help="preset name (see `keras-resnet models`)")
    p.add_argument("--input-size", type=_positive_int_arg, default=None, help="square input size (224; 32 for *_cifar)")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3), help="input channels (default 3)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of the classifier head (default 1000)")

    p = command("convert", "convert torchvision/timm or keras.applications ResNet weights to a .keras model")
    p.add_argument(
        "source", help="a torchvision/timm state dict (.pth, .pt, .bin, .safetensors) or a keras.applications .h5",
    )
    p.add_argument("--output", required=True, metavar="FILE.keras", help="the .keras model to write (atomically)")
    p.add_argument(
        "--arch", default=None,
        help="source model name, e.g. resnet50 or resnet50d.ra2_in1k (default: inferred from keys and shapes)",
    )
    p.add_argument(
        "--num-classes", type=_positive_int_arg, default=None,
        help="classes of the classifier; another number than the source's keeps the backbone, fresh head",
    )
    p.add_argument(
        "--include-top", dest="include_top", action="store_const", const=True, default=None,
        help="write a classifier (default: when the source has a head)",
    )
    p.add_argument(
        "--no-top", dest="include_top", action="store_const", const=False,
        help="write the backbone only, without the source's head",
    )
    for flag, text in (("--mean", "mean"), ("--std", "standard deviation")):
        p.add_argument(
            flag, type=float, nargs=3, default=None, metavar=("R", "G", "B"),
            help=f"per-channel {text} of 0..1 pixels the source was trained with (default: ImageNet's, as "
            "torchvision and most timm weights; timm's *.ra4_e3600_* weights use 0.5)",
        )

    for name, text in (
        ("train", "train a task recipe (YAML), or a folder of your own images (--data)"),
        ("evaluate", "evaluate the trained model of a recipe"),
    ):
        p = command(name, text)
        if name == "train":
            p.add_argument("config", nargs="?", default=None,
                           help="recipe YAML, e.g. tasks/classification/fashion_mnist_resnet20.yaml (or use --data)")
            p.add_argument("--data", default=None, metavar="FOLDER",
                           help="train on this folder without a recipe: the task, classes, input size, validation "
                           "split and schedule are chosen from it (README: Your own data)")
            p.add_argument("--task", default=None, choices=("classification", "segmentation", "detection"),
                           help="with --data: the task the folder must be laid out for (default: detected)")
            p.add_argument("--model", default=None, metavar="PRESET",
                           help="with --data: the backbone preset (default: chosen by input size)")
            p.add_argument("--weights", default=None, metavar="NAME|PATH",
                           help="with --data: initial weights: a name, imagenet (the preset's default ImageNet "
                           "weights, downloaded once) or a catalogue tag such as torchvision:IMAGENET1K_V1 "
                           "(`keras-resnet weights` lists them), or a file: a .keras model, a torchvision/timm "
                           "state dict, a keras.applications .h5")
            p.add_argument("--epochs", type=_positive_int_arg, default=None,
                           help="with --data: training epochs (default: enough for the data size)")
            p.add_argument("--output", default=None, metavar="DIR",
                           help="with --data: the run folder (default runs/<folder name>_<task>)")
        else:
            p.add_argument("config", help="recipe YAML, e.g. tasks/classification/fashion_mnist_resnet20.yaml, or "
                           "a run folder of `keras-resnet train` (its recipe.yaml)")
        p.add_argument(
            SET_FLAG, nargs="+", action="extend", default=[], metavar="KEY=VALUE",
            help="override recipe keys; values parse as YAML (train.epochs=3 model.input_shape=[20,20,1]); "
            "before or after the recipe",
        )
        if name == "train":
            p.add_argument(
                "--restart", action="store_true",
                help="start the run over: move the output_dir's earlier run (backup, models, history) to previous/",
            )

    p = command("recipe", "check a recipe and print it resolved, or list every recipe key (--explain)")
    p.add_argument("config", nargs="?", default=None,
                   help="recipe YAML (or a run folder: its recipe.yaml) to check (every problem is listed at once)")
    p.add_argument(
        SET_FLAG, nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="override recipe keys, as for `train`",
    )
    p.add_argument(
        "--explain", nargs="?", const="", default=None, metavar="SECTION",
        help="list the keys (of SECTION: model, data, data.augment, train, qat; export: the export options) "
        "with type, default, allowed values and help",
    )

    p = command("qat", "fine-tune a finished run with quantization-aware training (int8) into RUN_DIR/qat")
    p.add_argument("run_dir", help="the output_dir of a finished `keras-resnet train` run")
    p.add_argument("--epochs", type=_positive_int_arg, default=None,
                   help="QAT epochs (default: 10%% of the recipe's, at least 1)")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="QAT learning rate (default: the recipe's x 0.1)")
    p.add_argument(
        SET_FLAG, nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="override keys of the run's recipe for the QAT run (data.batch_size=32 qat.momentum=0.999)",
    )
    p.add_argument("--restart", action="store_true", help="start the QAT run over instead of resuming it")

    p = command("export", "export a trained model to SavedModel, TFLite or ONNX, checking parity")
    p.add_argument("model", help="a .keras file or a training run output_dir (classifier, segmenter or detector)")
    _declared(p, "--format", "format")
    _declared(p, "--quantize", "quantize")
    _declared(p, "--io", "io")
    p.add_argument(
        "--calibration", default=None, metavar="RECIPE_OR_FOLDER",
        help="recipe YAML or image folder: int8 calibration and parity images (default: the run's recipe)",
    )
    p.add_argument(
        "--input-size", type=_positive_int_arg, nargs=2, default=None, metavar=("H", "W"),
        help="input height and width of the export (default: the model's)",
    )
    p.add_argument(
        "--batch-size", type=_batch_size_arg, default=1, metavar="N|dynamic",
        help="batch size of the export: a fixed N (default 1) or 'dynamic'",
    )
    p.add_argument("--output", default=None, metavar="DIR", help="output folder (default saved_models/<name>/)")
    _declared(p, "--parity-samples", "parity_samples", type=int)
    _declared(p, "--calibration-samples", "calibration_samples", type=int)
    _declared(p, "--calibration-method", "calibration_method")
    _declared(p, "--int8-min-agreement", "int8_min_agreement", type=float)
    _declared(p, "--detection-outputs", "detection_outputs")
    p.add_argument("--score-threshold", type=float, default=None, help="detectors: decoder score threshold "
                   "(default: the run's)")
    p.add_argument("--iou-threshold", type=float, default=None, help="detectors: NMS IoU threshold")
    p.add_argument("--max-detections", type=int, default=None, help="detectors: detections per image")

    p = command("predict", "top-k classes, mask overlays (segmenters) or boxes (detectors) of images")
    p.add_argument("model", help="a .keras file, run dir, SavedModel dir, .tflite or .onnx")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=5, help="classifiers: best classes listed per image (default 5)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--output", default=None, metavar="DIR",
                   help="segmentation and detection: folder for mask/overlay or <stem>_boxes.png PNGs "
                   "(default: predictions/ in the run dir, or beside the model file or export)")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="detectors: minimum score (default: the model's decoder setting)")
    p.add_argument("--max-detections", type=int, default=None, help="detectors: at most this many boxes per image")
    p.add_argument(
        "--tile", type=_tile_arg, default=None, metavar="auto|off|SIZE",
        help="segmenters and detectors: run large images at their own resolution in windows of the model input, "
        "blending masks and merging boxes (NMS): 'auto' (default: when the run trained on crops or the image is "
        "at least twice the model input on a side), 'off' (resize/letterbox whole images) or the window side "
        "(the model input size for fixed-size models)",
    )
    p.add_argument(
        "--tile-overlap", type=_overlap_arg, default=None, metavar="F",
        help="segmenters and detectors: fraction of a window shared with its neighbour, as data.tile_overlap "
        "(default: the run's data.tile_overlap)",
    )
    return parser
