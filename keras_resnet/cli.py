"""The commands of `keras-resnet` that need Keras and TensorFlow: summary, convert, train, evaluate, export, predict.

The command line itself (flags, `--help`, `models`, exit statuses) is the
`keras_resnet_cli` package, which starts without TensorFlow and imports this
module only for these commands. `main(argv)` runs the whole command line from
Python (as `python -m keras_resnet.cli` does).
"""

import sys
from pathlib import Path

from keras_resnet.atomic_files import finite_json
from keras_resnet_cli.dispatch import run
from keras_resnet_settings.errors import ConfigError


def _cmd_summary(args):
    from keras_resnet import ResNetClassifier

    size = args.input_size or (32 if args.name.endswith("_cifar") else 224)
    model = ResNetClassifier.from_preset(
        args.name, num_classes=args.num_classes, input_shape=(size, size, args.channels)
    )
    model.backbone.summary(expand_nested=False)
    model.summary()


def _cmd_train(args):
    from keras_resnet.training.devices import rejoin_cluster
    from keras_resnet.training.runner import train_from_config
    from keras_resnet_settings.errors import WorkerLostError

    try:
        train_from_config(args.config, args.set, restart=args.restart)
    except WorkerLostError as error:  # a multi-worker peer was lost: rejoin the cluster, resume from the backup
        rejoin_cluster(error, getattr(error, "restarts", 0))


def _cmd_qat(args):
    from keras_resnet.training.qat import qat_config
    from keras_resnet.training.runner import train_from_config

    if args.learning_rate is not None and args.learning_rate <= 0:
        raise ConfigError(f"--learning-rate must be > 0, got {args.learning_rate}.")
    cfg = qat_config(args.run_dir, epochs=args.epochs, learning_rate=args.learning_rate, overrides=args.set)
    train_from_config(cfg, restart=args.restart)
    print(f"export the int8 model (trained ranges, no calibration): keras-resnet export {cfg.output_dir} "
          "--format tflite --quantize int8")


def _cmd_evaluate(args):
    from keras_resnet.training.runner import evaluate_from_config

    evaluate_from_config(args.config, args.set)


def _cmd_export(args):
    from keras_resnet.export import export_model

    return export_model(
        args.model,
        format=args.format,
        quantize=args.quantize,
        calibration=args.calibration,
        input_size=args.input_size,
        batch_size=args.batch_size,
        output=args.output,
        parity_samples=args.parity_samples,
        calibration_samples=args.calibration_samples,
        calibration_method=args.calibration_method,
        int8_min_agreement=args.int8_min_agreement,
        detection_outputs=args.detection_outputs,
        io=args.io,
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


def _tile(args):
    """`--tile` of `predict`: "auto" when not given."""
    return "auto" if args.tile is None else args.tile


def _cmd_predict(args):
    import json

    from rich.console import Console
    from rich.table import Table

    from keras_resnet.export.loading import model_task
    from keras_resnet.predict.classification import predict_files
    from keras_resnet_settings.registry import DETECTION, SEGMENTATION

    task = model_task(args.model)
    tiling = args.tile is not None or args.tile_overlap is not None
    if task is not None and task not in (DETECTION, SEGMENTATION) and tiling:
        raise ConfigError(f"--tile is for segmenters and detectors; {args.model} is a {task} model")
    if task == DETECTION:
        _predict_detections(args)
        return
    if args.score_threshold is not None or args.max_detections is not None:
        raise ConfigError("--score-threshold and --max-detections apply to detectors only")
    if task == SEGMENTATION:
        from keras_resnet.predict.segmentation import predict_masks

        results = predict_masks(args.model, args.images, args.output or _predictions_dir(args.model),
                                tile=_tile(args), overlap=args.tile_overlap)
        if args.json:
            print(json.dumps(finite_json(results), indent=2, allow_nan=False))
        else:
            for result in results:
                tiled = " (tiled)" if result["tiled"] else ""
                print(f"{result['image']}: mask {result['mask']}, overlay {result['overlay']}{tiled}")
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
        tile=_tile(args), overlap=args.tile_overlap,
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


def _cmd_convert(args):
    from keras_resnet.atomic_files import atomic_output
    from keras_resnet.convert import convert_source

    if not args.output.endswith(".keras"):
        raise ConfigError(f"--output {args.output} must end in .keras")
    model, report = convert_source(args.source, arch=args.arch, include_top=args.include_top,
                                   num_classes=args.num_classes, mean=args.mean, std=args.std)
    with atomic_output(args.output) as temporary:
        model.save(temporary)
    for line in report:
        print(line)
    print(f"wrote {args.output}")


def _cmd_weights(args):
    """`keras-resnet weights --download PRESET [--weights NAME]`: the file fetched, verified and cached."""
    from keras_resnet.weights import weights_file
    from keras_resnet_settings.weights import IMAGENET, TASK_PRESETS, find_entry

    name = args.weights or ("coco" if args.download in TASK_PRESETS else IMAGENET)
    entry = find_entry(args.download, name)
    path = weights_file(entry)
    print(f"{entry.name}: {path}")


COMMANDS = {
    "summary": _cmd_summary,
    "weights": _cmd_weights,
    "convert": _cmd_convert,
    "train": _cmd_train,
    "evaluate": _cmd_evaluate,
    "qat": _cmd_qat,
    "export": _cmd_export,
    "predict": _cmd_predict,
}


def main(argv=None):
    """Run `keras-resnet` with `argv` (default: the command line); returns the exit status."""
    return run(argv, lambda: COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
