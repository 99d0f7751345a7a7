"""The `keras-resnet` command line.

    keras-resnet models                      presets with params and GMACs
    keras-resnet summary NAME                Keras summary of a preset
    keras-resnet train CONFIG [--set k=v]    train a task recipe
    keras-resnet evaluate CONFIG [--set k=v] evaluate a recipe's model
    keras-resnet export MODEL [--format F]   export to SavedModel, TFLite or ONNX
    keras-resnet predict MODEL IMAGE...      top-k classes, mask overlays of a segmenter, boxes of a detector

User errors (a bad config key, a missing file, an unknown preset...: any
`keras_resnet.errors.KerasResNetError`, and a path that is missing, unreadable
or unwritable) print one line and exit with status 2; set KERAS_RESNET_DEBUG=1
for their tracebacks. Anything else is an internal error (a bug in keras_resnet,
Keras or TensorFlow): its traceback is shown, with a request to report it, and
the exit status is 1.
"""

import argparse
import errno
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_resnet.errors import ConfigError, KerasResNetError  # noqa: E402  (imports nothing heavy)
from keras_resnet.runs import finite_json  # noqa: E402  (imports nothing heavy)

# OSErrors about the user's paths or machine, not bugs: one line, exit 2.
USER_PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
USER_OS_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG)


def _cmd_models(args):
    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    from keras_resnet import ResNetClassifier
    from keras_resnet.models.resnet.analysis import count_macs, count_trainable_params
    from keras_resnet.models.resnet.presets import PRESETS

    names = [n for n in PRESETS if not args.filter or args.filter in n]
    table = Table(title="keras_resnet presets")
    for column in ("preset", "input", "classes", "params (M)", "GMACs", "description"):
        table.add_column(column, justify="right" if column in ("params (M)", "GMACs", "classes") else "left")
    for name in track(names, description="building presets", transient=True, console=Console(stderr=True)):
        cifar = name.endswith("_cifar")
        size, classes = (32, 10) if cifar else (224, 1000)
        model = ResNetClassifier.from_preset(name, num_classes=classes, input_shape=(size, size, 3))
        table.add_row(
            name,
            f"{size}x{size}",
            str(classes),
            f"{count_trainable_params(model) / 1e6:.2f}",
            f"{count_macs(model) / 1e9:.3f}",
            PRESETS[name]["description"],
        )
    Console().print(table)


def _cmd_summary(args):
    from keras_resnet import ResNetClassifier

    size = args.input_size or (32 if args.name.endswith("_cifar") else 224)
    model = ResNetClassifier.from_preset(
        args.name, num_classes=args.num_classes, input_shape=(size, size, args.channels)
    )
    model.backbone.summary(expand_nested=False)
    model.summary()


def _cmd_train(args):
    from keras_resnet.training.runner import train_from_config

    train_from_config(args.config, args.set, restart=args.restart)


def _cmd_evaluate(args):
    from keras_resnet.training.runner import evaluate_from_config

    evaluate_from_config(args.config, args.set)


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


def _cmd_export(args):
    from keras_resnet.export import export_model

    export_model(
        args.model,
        format=args.format,
        quantize=args.quantize,
        calibration=args.calibration,
        input_size=args.input_size,
        batch_size=args.batch_size,
        output=args.output,
        parity_samples=args.parity_samples,
        int8_min_agreement=args.int8_min_agreement,
        detection_outputs=args.detection_outputs,
        decoder_args={
            "score_threshold": args.score_threshold,
            "iou_threshold": args.iou_threshold,
            "max_detections": args.max_detections,
        } if _decoder_overrides(args) else None,
    )


def _decoder_overrides(args):
    return any(value is not None for value in (args.score_threshold, args.iou_threshold, args.max_detections))


def _predictions_dir(model_path):
    """Default folder of prediction PNGs: `predictions/` in a run dir, else beside the model or export."""
    path = Path(model_path)
    if path.is_dir() and not (path / "saved_model.pb").is_file():
        return str(path / "predictions")
    return str(path.parent / "predictions")


def _cmd_predict(args):
    import json

    from rich.console import Console
    from rich.table import Table

    from keras_resnet.export.loading import model_task
    from keras_resnet.predict.classification import predict_files
    from keras_resnet.registry import DETECTION, SEGMENTATION

    task = model_task(args.model)
    if task == DETECTION:
        _predict_detections(args)
        return
    if args.score_threshold is not None or args.max_detections is not None:
        raise ConfigError("--score-threshold and --max-detections apply to detectors only")
    if task == SEGMENTATION:
        from keras_resnet.predict.segmentation import predict_masks

        results = predict_masks(args.model, args.images, args.output or _predictions_dir(args.model))
        if args.json:
            print(json.dumps(finite_json(results), indent=2, allow_nan=False))
        else:
            for result in results:
                print(f"{result['image']}: mask {result['mask']}, overlay {result['overlay']}")
        return
    results = predict_files(args.model, args.images, top_k=args.top_k)
    if args.json:
        print(json.dumps(finite_json(results), indent=2, allow_nan=False))
        return
    table = Table(title=f"predictions of {args.model}")
    table.add_column("image", overflow="fold")
    for column in ("rank", "class", "index", "score"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for result in results:
        for rank, entry in enumerate(result["top"], start=1):
            image = result["image"] if rank == 1 else ""
            table.add_row(image, str(rank), entry["class"], str(entry["index"]), f"{entry['score']:.4f}")
    Console().print(table)


def _predict_detections(args):
    import json

    from rich.console import Console
    from rich.table import Table

    from keras_resnet.predict.detection import predict_boxes

    results = predict_boxes(
        args.model, args.images, args.output or _predictions_dir(args.model),
        score_threshold=args.score_threshold, max_detections=args.max_detections,
    )
    if args.json:
        print(json.dumps(finite_json(results), indent=2, allow_nan=False))
        return
    table = Table(title=f"detections of {args.model}")
    table.add_column("image", overflow="fold")
    for column in ("class", "score", "box (x_min, y_min, x_max, y_max)"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for result in results:
        if not result["detections"]:
            table.add_row(result["image"], "-", "", "")
        for rank, detection in enumerate(result["detections"]):
            box = ", ".join(f"{v:.1f}" for v in detection["box"])
            table.add_row(result["image"] if rank == 0 else "", detection["class"], f"{detection['score']:.3f}", box)
    console = Console()
    console.print(table)
    console.print(f"boxes drawn in {Path(results[0]['output']).parent}" if results else "no images")


def build_parser():
    parser = argparse.ArgumentParser(prog="keras-resnet", description="Residual networks for Keras 3.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the backbone presets with params and GMACs")
    p.add_argument("--filter", default="", help="only presets whose name contains this")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("summary", help="print the Keras summary of a preset")
    p.add_argument("name", help="preset name (see `keras-resnet models`)")
    p.add_argument("--input-size", type=_positive_int_arg, default=None, help="square input size (224; 32 for *_cifar)")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3))
    p.add_argument("--num-classes", type=int, default=1000)
    p.set_defaults(func=_cmd_summary)

    for name, func, text in (
        ("train", _cmd_train, "train a task recipe (YAML)"),
        ("evaluate", _cmd_evaluate, "evaluate the trained model of a recipe"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", help="recipe YAML, e.g. tasks/classification/fashion_mnist_resnet20.yaml")
        p.add_argument(
            "--set", nargs="+", default=[], metavar="KEY=VALUE",
            help="override recipe keys; values parse as YAML (train.epochs=3 model.input_shape=[20,20,1])",
        )
        if name == "train":
            p.add_argument(
                "--restart", action="store_true",
                help="start the run over: move the output_dir's earlier run (backup, models, history) to previous/",
            )
        p.set_defaults(func=func)

    p = sub.add_parser("export", help="export a trained model to SavedModel, TFLite or ONNX, checking parity")
    p.add_argument("model", help="a .keras file or a training run output_dir (classifier, segmenter or detector)")
    p.add_argument("--format", default="saved_model", choices=("saved_model", "tflite", "onnx"))
    p.add_argument(
        "--quantize", default="none", choices=("none", "float16", "dynamic", "int8"),
        help="TFLite quantization (int8: full integer, needs calibration images)",
    )
    p.add_argument(
        "--calibration", default=None, metavar="RECIPE_OR_FOLDER",
        help="recipe YAML or image folder: int8 calibration and parity images (default: the run's recipe)",
    )
    p.add_argument("--input-size", type=_positive_int_arg, nargs=2, default=None, metavar=("H", "W"))
    p.add_argument("--batch-size", type=_batch_size_arg, default=1, metavar="N|dynamic")
    p.add_argument("--output", default=None, metavar="DIR", help="output folder (default saved_models/<name>/)")
    p.add_argument("--parity-samples", type=int, default=100, help="images compared with the Keras model")
    p.add_argument(
        "--int8-min-agreement", type=float, default=None,
        help="minimum int8 agreement with the Keras model: top-1 over images for classifiers (default 0.99), "
        "argmax over pixels for segmenters (default 0.98), Keras detections matched by class at IoU >= 0.5 "
        "for detectors (default 0.9)",
    )
    p.add_argument(
        "--detection-outputs", default="decoded", choices=("decoded", "raw"),
        help="detectors, TFLite/ONNX: 'decoded' (boxes, scores, classes, num_detections; NMS inside) or 'raw' "
        "(anchor deltas and logits; decode with the decoder in the metadata JSON)",
    )
    p.add_argument("--score-threshold", type=float, default=None, help="detectors: decoder score threshold "
                   "(default: the run's)")
    p.add_argument("--iou-threshold", type=float, default=None, help="detectors: NMS IoU threshold")
    p.add_argument("--max-detections", type=int, default=None, help="detectors: detections per image")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("predict", help="top-k classes, mask overlays (segmenters) or boxes (detectors) of images")
    p.add_argument("model", help="a .keras file, run dir, SavedModel dir, .tflite or .onnx")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--output", default=None, metavar="DIR",
                   help="segmentation and detection: folder for mask/overlay or <stem>_boxes.png PNGs "
                   "(default: predictions/ in the run dir, or beside the model file or export)")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="detectors: minimum score (default: the model's decoder setting)")
    p.add_argument("--max-detections", type=int, default=None, help="detectors: at most this many boxes per image")
    p.set_defaults(func=_cmd_predict)
    return parser


def is_user_error(error: BaseException) -> bool:
    """True for errors caused by the user's input or machine: printed as one line, exit status 2."""
    if isinstance(error, KerasResNetError):
        return True
    return isinstance(error, USER_PATH_ERRORS) or (isinstance(error, OSError) and error.errno in USER_OS_ERRNOS)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if not is_user_error(error):
            traceback.print_exc()
            print(
                f"keras-resnet {args.command}: internal error ({type(error).__name__}): this is a bug in "
                "keras_resnet, Keras or TensorFlow, not in your input; please report it to the keras_resnet "
                "maintainers with the traceback above and the command you ran",
                file=sys.stderr,
            )
            return 1
        if os.environ.get("KERAS_RESNET_DEBUG"):
            raise
        print(f"keras-resnet {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
