"""One export, step by step: sample images, conversion, the check against Keras, the metadata JSON.

`ExportJob.run` is the sequence every task goes through; each task's job
(`keras_resnet.export.classification`, `.segmentation`, `.detection`)
fills in what differs: how the model is prepared, what it serves, how its
parity is measured and judged, and its metadata.
"""

from __future__ import annotations

import datetime
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path

import keras
import tensorflow as tf

from keras_resnet.atomic_files import atomic_output, temporary_sibling, write_json
from keras_resnet.data.images import BIT_DEPTH_KEY
from keras_resnet.export.keras_model import (
    ModelSource,
    dtype_policies,
    find_preprocessing,
)
from keras_resnet.export.loading import load_exported_model
from keras_resnet.export.onnx import convert_onnx
from keras_resnet.export.parity import enforce_parity_gate, parity_line
from keras_resnet.export.samples import SampleReader, calibration_images, parity_images
from keras_resnet.export.saved_model import check_saved_model_target, write_saved_model
from keras_resnet.export.signatures import (
    image_spec,
    integer_io_metadata,
    metadata_path,
    rejected_path,
)
from keras_resnet.export.tflite import (
    INPUT_ZERO_POINTS,
    boundary_ops,
    check_builtin_ops,
    io_quantization,
    tflite_bytes,
    tflite_ops,
)
from keras_resnet_settings.errors import ExportError, ExportParityError

# run.json entries copied into every export's metadata: "sampling" ("resize" or "crop"), "tile_overlap" and
# "bit_depth" (16-bit images: the depth predict reads them at).
RUN_SAMPLING_KEYS = ("sampling", "tile_overlap", BIT_DEPTH_KEY)
TOOL_PACKAGES = {"saved_model": [], "tflite": ["ai-edge-litert"], "onnx": ["tf2onnx", "onnx", "onnxruntime"]}


@dataclass(frozen=True)
class ExportRequest:
    """The checked arguments of `export_model` (see there); `batch_size` is None for a dynamic batch.

    `io` is the I/O of an int8 TFLite model: "float" (float32 input and
    outputs), "uint8" or "int8" (full-integer I/O).
    """

    format: str
    quantize: str
    calibration: object
    input_size: object
    batch_size: int | None
    output: object
    parity_samples: int
    calibration_samples: int
    calibration_method: str
    int8_min_agreement: float | None
    name: str | None
    detection_outputs: str
    decoder_args: dict | None
    io: str = "float"

    @property
    def label(self) -> str:
        return self.format if self.quantize == "none" else f"{self.format} {self.quantize}"


@contextmanager
def spinner(description: str):
    """A rich spinner on stderr while a conversion step runs."""
    from rich.console import Console

    with Console(stderr=True).status(description):
        yield


def tool_versions(format: str) -> dict:
    versions = {"keras_resnet": importlib_metadata.version("keras_resnet"), "tensorflow": tf.__version__}
    versions["keras"] = keras.__version__
    for package in TOOL_PACKAGES[format]:
        versions[package] = importlib_metadata.version(package)
    return versions


def remove_rejected(rejected: Path) -> None:
    """Deletes a rejected artefact and its metadata (once an export of the same artefact has passed)."""
    if rejected.is_dir():
        shutil.rmtree(rejected, ignore_errors=True)
    else:
        rejected.unlink(missing_ok=True)
    metadata_path(rejected).unlink(missing_ok=True)


def artefact_path(output_dir: Path, name: str, format: str, quantize: str, io: str = "float") -> Path:
    """`saved_model/`, `<name>.onnx`, `<name>_<fp32|float16|dynamic|int8>.tflite`.

    A full-integer int8 model is `<name>_int8_uint8io.tflite` /
    `<name>_int8_int8io.tflite`, beside the float-I/O `<name>_int8.tflite`.
    """
    if format == "saved_model":
        return output_dir / "saved_model"
    if format == "onnx":
        return output_dir / f"{name}.onnx"
    io_suffix = f"_{io}io" if io != "float" else ""
    return output_dir / f"{name}_{'fp32' if quantize == 'none' else quantize}{io_suffix}.tflite"


QAT_OPS_TEXT = (
    "full-integer builtin kernels with the ranges trained by the model's fake quantization (the converter's "
    "quantization-aware mode; no float32 tensor inside, checked)"
)


def quantize_aware(model) -> bool:
    """True when the model carries fake-quantization layers (`keras_resnet.quantization.is_quantize_aware`)."""
    from keras_resnet import quantization

    return bool(quantization.is_quantize_aware(model))


class ExportJob:
    """Exports one model of one task: `run` converts it, checks it against Keras and writes its metadata.

    Subclasses set the class attributes and implement `prepare`,
    `outputs_fn`, `saved_model_endpoints`, `parity`, `int8_rule`,
    `float_rule`, `summary`, `failure` and `metadata`.
    """

    task: str
    samples: SampleReader
    default_int8_min_agreement: float
    prepare_step = "preparing the Keras model"
    reference_step: str | None = None  # the spinner text of `keras_reference`, None: no reference up front
    count_key = "samples"  # the figure counting the images compared
    output_names: tuple
    int8_ops: str
    qat_ops = QAT_OPS_TEXT  # `int8_ops` of a quantization-aware model
    int8_io: str  # the I/O of an int8 model with float I/O
    integer_io: str  # ... with uint8 / int8 I/O ("{io}" and "{zero_point}" filled in)
    ops = None  # a TFLite artefact's operators
    calibration_method = None  # the int8 calibration used (mean_range falls back to minmax for dilated models)
    io_quantization = None  # a full-integer TFLite artefact's `io_quantization`
    boundary = None  # ... and its `boundary_ops`
    _quantization = None  # ... and its `io_quantization` by inputs and outputs

    def __init__(self, source: ModelSource, request: ExportRequest):
        self.source, self.request = source, request
        self.check_request()
        self.int8_min_agreement = request.int8_min_agreement
        if self.int8_min_agreement is None:
            self.int8_min_agreement = self.default_int8_min_agreement
        with spinner(self.prepare_step):
            self.policies = dtype_policies(source.model)
            self.model = self.prepare()
        self.qat = quantize_aware(self.model)
        if self.qat and request.quantize in ("float16", "dynamic"):
            raise ExportError(
                f"model {self.model.name} is quantization-aware (fake-quantization layers): quantize="
                f"{request.quantize!r} would give an int8 model; export it with quantize='int8' (its trained "
                "ranges) or 'none' (float32)"
            )
        self.input_shape = tuple(self.model.input_shape[1:])
        self.name = request.name or source.name
        self.output_dir = Path(request.output) if request.output is not None else Path("saved_models") / self.name
        self.path = self.artefact_path()
        self.written = self.path  # where the artefact is being written (a temporary name during `run`)

    # ------------------------------------------------------------------ the sequence

    def run(self) -> dict:
        """Converts, checks and describes the export; returns `export_model`'s dict (see there)."""
        request = self.request
        calibration, calibration_text = None, None
        if self.qat and request.quantize == "none":
            print(
                f"note: {self.model.name} is quantization-aware (fake-quantization layers); this is a float export "
                f"of it, the fake quantization computed in float32; --quantize int8 gives the integer model",
                flush=True,
            )
        if request.quantize == "int8" and not self.qat:
            with spinner("loading calibration images"):
                calibration, calibration_text = calibration_images(
                    self.samples, request.calibration, self.source, self.input_shape, request.calibration_samples
                )
        with spinner("loading parity images"):
            images, sample_source, info = parity_images(
                self.samples, request.calibration, self.source, self.input_shape, request.parity_samples
            )
        if self.reference_step is not None:
            with spinner(self.reference_step):
                self.keras_reference(images)

        self.output_dir.mkdir(parents=True, exist_ok=True)
        if request.format == "saved_model":
            check_saved_model_target(self.path)
        metadata_file = metadata_path(self.path)
        rejected = rejected_path(self.path)
        # Written and checked under a temporary name. An artefact that passes its gate replaces the old one
        # and its metadata (both written whole first, then renamed one after the other); one that fails is
        # kept under the rejected name and the old artefact stays as it was.
        with atomic_output(self.path) as self.written:
            written_metadata = metadata_path(self.written)
            try:
                with spinner(f"converting to {request.label}: {self.path}"):
                    self.convert(calibration)
                metadata = self.io_metadata(self.metadata())
                write_json(written_metadata, metadata)  # load_exported_model reads it (a raw detector's decoder)
                with spinner(f"checking {request.label} against Keras"):
                    figures = self.parity(load_exported_model(self.written), images, info)
                    figures["sample_source"] = sample_source
                    enforce_parity_gate(figures, request.quantize, self.float_rule, self.int8_rule)
            finally:
                written_metadata.unlink(missing_ok=True)
            metadata["parity"] = figures
            metadata.update(self.checked_metadata())
            if request.quantize == "int8":
                metadata["int8"] = {
                    "ops": self.int8_ops if not self.qat else self.qat_ops,
                    "io": self.int8_io_text(),
                    "quantization_source": "qat" if self.qat else "ptq",
                    "calibration": calibration_text if not self.qat else "none: the ranges trained with the model",
                    "calibration_method": self.calibration_method if not self.qat else None,
                    "calibration_samples": len(calibration) if calibration is not None else 0,
                    "min_agreement": self.int8_min_agreement,
                }
                if self.io_quantization is not None:
                    metadata["int8"]["io_quantization"] = self.io_quantization
                    metadata["int8"]["boundary_ops"] = self.boundary
            if figures["passed"]:
                new_metadata = Path(temporary_sibling(metadata_file))
                write_json(new_metadata, metadata)  # complete on disk before the artefact moves into place
            else:
                metadata["rejected"] = {"reason": self.failure(figures), "criterion": figures["criterion"],
                                        "intended_path": str(self.path)}
                with atomic_output(rejected) as rejected_temporary:
                    os.replace(self.written, rejected_temporary)  # nothing left to replace self.path with
                write_json(metadata_path(rejected), metadata)
        self.written = self.path
        summary = self.summary(figures)
        print(parity_line(request.format, request.quantize, figures, summary, figures[self.count_key],
                          sample_source), flush=True)
        if not figures["passed"]:
            kept = f"the earlier {self.path} is unchanged" if self.path.exists() else f"nothing written at {self.path}"
            advice = ""
            if request.quantize == "int8":  # the usual ways out of an int8 miss
                advice = ("; for int8: calibrate on more or other images (--calibration, --calibration-samples), "
                          "train longer or quantization-aware (keras-resnet qat RUN_DIR), or accept less with "
                          "--int8-min-agreement")
            raise ExportParityError(
                f"the export fails its parity check against Keras ({figures['criterion']}): {self.failure(figures)}; "
                f"kept for inspection as {rejected} ({kept}){advice}"
            )
        os.replace(new_metadata, metadata_file)
        remove_rejected(rejected)  # an earlier rejected export of this artefact is stale now
        return {
            "format": request.format,
            "quantize": request.quantize,
            "task": self.task,
            **self.result_entries(metadata),
            "path": str(self.path),
            "metadata_path": str(metadata_file),
            "input_shape": list(self.input_shape),
            "batch_size": metadata["batch_size"],
            "parity": figures,
        }

    # ------------------------------------------------------------------ steps with a default

    def check_request(self) -> None:
        """Raises an `ExportError` for arguments that do not apply to the task."""

    def artefact_path(self) -> Path:
        return artefact_path(self.output_dir, self.name, self.request.format, self.request.quantize, self.request.io)

    def keras_reference(self, images) -> None:
        """Computes the Keras outputs the export is compared with (when `reference_step` is set)."""

    def convert(self, calibration) -> None:
        """Writes the artefact at `self.written` (`calibration`: int8 calibration images, else None)."""
        request = self.request
        if request.format == "saved_model":
            write_saved_model(self.written, self.model, self.saved_model_endpoints())
        elif request.format == "tflite":
            with self.mean_range_calibrated(calibration) as calibration:
                self.written.write_bytes(self.tflite_model(calibration))
        else:
            convert_onnx(self.outputs_fn(), self.image_spec(), self.output_names, self.written, request.batch_size)

    @contextmanager
    def mean_range_calibrated(self, calibration):
        """Inside, `self.model` is the mean-range calibrated quantization-aware copy (int8 "mean_range" only).

        Yields the calibration images the converter still needs: None when
        the ranges come from the calibrated copy. The Keras reference
        stays the float model's (computed before), and so does everything
        after the conversion.
        """
        self.calibration_method = self.request.calibration_method if calibration is not None else None
        if calibration is None or self.request.calibration_method != "mean_range":
            yield calibration
            return
        from keras_resnet.quantization.calibration import calibrate_mean_ranges, has_dilated_convolutions

        if has_dilated_convolutions(self.model):
            self.calibration_method = "minmax"
            print(f"note: {self.model.name} has dilated convolutions, which TFLite's quantization-aware conversion "
                  "leaves in float32: calibrating with the converter's min/max instead of mean batch ranges",
                  flush=True)
            yield calibration
            return

        float_model = self.model
        with spinner(f"calibrating int8 ranges on {len(calibration)} images (mean of batch ranges)"):
            self.model, self.qat = calibrate_mean_ranges(float_model, calibration), True
        try:
            yield None
        finally:
            self.model, self.qat = float_model, False

    def tflite_model(self, calibration) -> bytes:
        """The TFLite flatbuffer (builtin ops only); a full-integer one's I/O quantization is kept."""
        model_bytes = tflite_bytes(
            self.outputs_fn(), [self.image_spec()], track=self.model, quantize=self.request.quantize,
            calibration_images=calibration, batch_size=self.request.batch_size, io=self.request.io, qat=self.qat,
        )
        self.ops = check_builtin_ops(tflite_ops(model_bytes))
        self.describe_io(model_bytes)
        return model_bytes

    def describe_io(self, model_bytes: bytes) -> None:
        """Keeps the I/O quantization and boundary operators of a full-integer model for its metadata."""
        if self.request.io != "float":
            quantization = io_quantization(model_bytes)
            self.io_quantization = {**quantization["inputs"], **quantization["outputs"]}
            self.boundary = boundary_ops(model_bytes)
            self._quantization = quantization

    def int8_io_text(self) -> str:
        """The metadata's description of an int8 model's I/O."""
        io = self.request.io
        if io == "float":
            return self.int8_io
        return self.integer_io.format(io=io, zero_point=INPUT_ZERO_POINTS[io])

    def io_metadata(self, metadata: dict) -> dict:
        """`metadata` with "io" after "quantization" (int8 TFLite) and the integer I/O marked (see `signatures`)."""
        if self.request.quantize != "int8":
            return metadata
        if self.request.io != "float":
            integer_io_metadata(metadata, self.request.io, self._quantization)
        entries = list(metadata.items())
        at = next((i + 1 for i, (key, _) in enumerate(entries) if key == "quantization"), len(entries))
        return dict(entries[:at] + [("io", self.request.io)] + entries[at:])

    def image_spec(self):
        """The float32 "images" signature at the model size and the requested batch size."""
        return image_spec(self.model, self.request.batch_size)

    def checked_metadata(self) -> dict:
        """Metadata entries known once the artefact is checked, after "parity": a TFLite model's operators."""
        return {"tflite_ops": self.ops} if self.ops is not None else {}

    def result_entries(self, metadata: dict) -> dict:
        """Task entries of the returned dict, after "task"."""
        return {}

    # ------------------------------------------------------------------ metadata pieces

    def metadata_head(self) -> dict:
        """The first entries of every export's metadata: the artefact and where it comes from."""
        return {
            "format": self.request.format,
            "quantization": self.request.quantize,
            "artefact": self.path.name,
            "source_model": str(Path(self.source.path).resolve()) if self.source.path else None,
            "model_name": self.model.name,
            "preset": self.source.run_info.get("preset"),
            "task": self.task,
            # how the run sampled its training images; `predict --tile auto` tiles crop-trained models
            **{key: self.source.run_info[key] for key in RUN_SAMPLING_KEYS if key in self.source.run_info},
        }

    def metadata_shape(self) -> dict:
        """The dtype policies of the source model, the input shape and the batch size."""
        batch_size = self.request.batch_size
        return {
            "source_dtype_policies": self.policies,
            "input_shape": list(self.input_shape),
            "batch_size": batch_size if batch_size is not None else "dynamic",
        }

    def preprocessing(self) -> dict | None:
        return find_preprocessing(self.model) or self.source.run_info.get("preprocessing")

    def metadata_tail(self) -> dict:
        """The tool versions and the time of the export."""
        return {
            "tool_versions": tool_versions(self.request.format),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }

    @property
    def batch_text(self):
        """The batch dimension in the metadata's output shapes: the fixed size, or "N"."""
        return self.request.batch_size if self.request.batch_size is not None else "N"
