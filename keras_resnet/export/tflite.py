"""TFLite artefacts: conversion to builtin ops, joining two models, listing ops, running one.

`tflite_bytes` converts with `tf.lite.TFLiteConverter.from_saved_model` on
a temporary ExportArchive SavedModel with one float32 signature, builtin
ops only (`TFLITE_BUILTINS`; int8: `TFLITE_BUILTINS_INT8`, never
SELECT_TF_OPS). int8 is full-integer quantization, calibrated on a
representative dataset (post-training, "ptq") or, for a model carrying
fake-quantization layers (quantization-aware training, "qat"), with the
ranges it trained (no calibration data).

The I/O of an int8 model (`io`): "float" (default) keeps float32 input and
outputs, with quantize/dequantize ops inside the model, so it is called as
every other TFLite variant. "uint8" / "int8" make the model integer end to
end, for integer-only accelerators: the served function starts with a
FakeQuant of range [0, 255] on the images, so the input is quantized with
scale 1 and zero point 0 (uint8: raw pixels fed as they are) or -128 (int8:
pixel - 128) whatever the calibration images span, and the outputs are
uint8 / int8 with their own scale and zero point (`io_quantization`; an
int32 output such as a mask stays int32). `open_tflite` quantizes float32
pixels for such an input (`q = round(x / scale + zero_point)`) and
dequantizes its outputs (`(q - zero_point) * scale`), so every caller keeps
feeding float32 raw pixels and reading float outputs. Artefacts run with
`ai_edge_litert.interpreter.Interpreter`.
"""

from __future__ import annotations

import tempfile

import numpy as np
import tensorflow as tf

from keras_resnet.export.options import check_options
from keras_resnet.export.saved_model import write_saved_model
from keras_resnet.export.signatures import Runtime, batches
from keras_resnet_settings.errors import ExportError, ModelError
from keras_resnet_settings.native_output import (
    TENSORFLOW_STARTUP_NOISE,
    TFLITE_NOISE,
    native_stderr_filtered,
)

INTEGER_IO = {"uint8": tf.uint8, "int8": tf.int8}
INPUT_RANGE = (0.0, 255.0)  # raw pixels: scale 1 over 8 bits
INPUT_ZERO_POINTS = {"uint8": 0, "int8": -128}  # the quantized input: pixel (uint8), pixel - 128 (int8)


def integer_input(fn):
    """`fn` whose images first go through a FakeQuant of range [0, 255] (8 bits, scale exactly 1).

    The converter takes a FakeQuant's range as the quantization of its
    tensor, so the model input is quantized with scale 1 whatever the
    calibration images span: raw pixels are fed as they are (uint8, zero
    point 0) or less 128 (int8, zero point -128). The float model's
    normalisation then runs on integers in the first layers.
    """

    def served(images):
        return fn(tf.quantization.fake_quant_with_min_max_args(
            images, min=INPUT_RANGE[0], max=INPUT_RANGE[1], num_bits=8
        ))

    return served


def tflite_bytes(fn, input_signature, track=None, quantize="none", calibration_images=None, batch_size=1,
                 io="float", quantized_outputs=True, qat=False) -> bytes:
    """Converts `fn` (via a temporary ExportArchive SavedModel) to TFLite builtins, optionally quantized.

    Args:
        fn: the function to serve (images -> outputs).
        input_signature: its `tf.TensorSpec` list.
        track: the Keras model (or layer) whose variables `fn` uses.
        quantize: "none", "float16", "dynamic" or "int8".
        calibration_images: float32 images for int8 calibration (post-training quantization).
        batch_size: calibration batch size (None = 1).
        io: int8 only: "float" (float32 input and outputs), "uint8" or
            "int8" (integer input of scale 1, zero point 0 / -128; see the
            module docstring).
        quantized_outputs: with an integer `io`, whether float outputs
            become uint8 / int8 too (False: they stay float32, dequantized
            inside, as the network of a detector whose float decoder follows).
        qat: the model carries fake-quantization layers (quantization-aware
            training): int8 uses their ranges and takes no calibration images.

    Raises:
        ExportError: an unknown `quantize` or `io`, an integer `io` without int8, or an int8 model that keeps
            float32 tensors inside (a QAT model with layers lacking trained ranges).
        ModelError: the converter did not give the integer input scale 1 and
            zero point 0 / -128.
    """
    check_options(quantize=quantize, io=io, format="tflite")
    if io != "float":
        fn = integer_input(fn)
    with tempfile.TemporaryDirectory(prefix="keras_resnet_tflite_") as tmp:
        write_saved_model(tmp, track, {"serving_default": (fn, input_signature)})
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantize in ("float16", "dynamic", "int8"):
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if quantize == "int8" and not qat:
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]

            def representative_dataset():
                for batch, _ in batches(calibration_images, batch_size or 1):
                    yield [batch]

            converter.representative_dataset = representative_dataset
        # qat: optimizations=[DEFAULT] on a graph with FakeQuant ops is the converter's quantization-aware
        # mode (ranges from the FakeQuants). TFLITE_BUILTINS_INT8 would demand a representative dataset
        # (TF 2.21 checks for one before looking at the graph), so it stays TFLITE_BUILTINS and
        # `check_integer_model` below makes sure no float kernel was kept.
        if io != "float":
            converter.inference_input_type = INTEGER_IO[io]
            if quantized_outputs:
                converter.inference_output_type = INTEGER_IO[io]
        with native_stderr_filtered(TFLITE_NOISE + TENSORFLOW_STARTUP_NOISE):
            model_bytes = converter.convert()
    if io != "float" or (quantize == "int8" and qat):
        model_bytes = fold_float_requantize(model_bytes)
    if quantize == "int8":
        check_integer_model(model_bytes, qat)
    if io != "float":
        check_integer_input(model_bytes, io)
    return model_bytes


def _schema():
    from tensorflow.lite.python import schema_py_generated as schema

    return schema


def read_tflite(model_bytes):
    """A TFLite flatbuffer as its object API tree (`ModelT`: subgraphs, tensors, buffers, operators)."""
    schema = _schema()
    return schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(model_bytes, 0))


def graft_tflite(first: bytes, second: bytes) -> bytes:
    """One TFLite model: `first`, then `second` fed by `first`'s outputs of the same signature names.

    Both models have one signature. `second`'s inputs must all be outputs of
    `first` (matched by signature name); the result takes `first`'s inputs
    and returns `second`'s outputs. Buffers, operator codes, tensors and
    operators of `second` are appended to `first` (its control-flow
    subgraphs too, with WHILE / IF subgraph indices moved).
    """
    schema = _schema()
    a, b = read_tflite(first), read_tflite(second)
    if len(a.signatureDefs or []) != 1 or len(b.signatureDefs or []) != 1:
        raise ValueError("graft_tflite needs models with exactly one signature each")
    main_a, main_b = a.subgraphs[0], b.subgraphs[0]
    signature_a, signature_b = a.signatureDefs[0], b.signatureDefs[0]
    a_outputs = {entry.name.decode(): entry.tensorIndex for entry in signature_a.outputs}
    b_inputs = {entry.name.decode(): entry.tensorIndex for entry in signature_b.inputs}
    missing = sorted(set(b_inputs) - set(a_outputs))
    if missing:
        raise ValueError(f"graft_tflite: inputs {missing} of the second model are not outputs of the first")

    buffer_offset = len(a.buffers)
    a.buffers.extend(b.buffers)

    def code_key(code):
        return code.builtinCode, code.deprecatedBuiltinCode, code.customCode, code.version

    codes = {code_key(code): index for index, code in enumerate(a.operatorCodes)}
    code_map = {}
    for index, code in enumerate(b.operatorCodes):
        code_map[index] = codes.setdefault(code_key(code), len(a.operatorCodes))
        if code_map[index] == len(a.operatorCodes):
            a.operatorCodes.append(code)
    subgraph_offset = len(a.subgraphs) - 1  # b's subgraph k >= 1 becomes a's subgraph k + offset

    def move_operator(operator, tensor_map):
        operator.opcodeIndex = code_map[operator.opcodeIndex]
        operator.inputs = [tensor_map[i] if i >= 0 else i for i in operator.inputs]
        operator.outputs = [tensor_map[i] for i in operator.outputs]
        if operator.intermediates is not None and len(operator.intermediates):
            operator.intermediates = [tensor_map[i] for i in operator.intermediates]
        options = operator.builtinOptions
        if isinstance(options, schema.WhileOptionsT):
            options.condSubgraphIndex += subgraph_offset
            options.bodySubgraphIndex += subgraph_offset
        elif isinstance(options, schema.IfOptionsT):
            options.thenSubgraphIndex += subgraph_offset
            options.elseSubgraphIndex += subgraph_offset
        elif isinstance(options, schema.CallOnceOptionsT):
            options.initSubgraphIndex += subgraph_offset
        elif options is not None and any("subgraph" in name.lower() for name in vars(options)):
            raise ValueError(f"graft_tflite: unsupported control-flow options {type(options).__name__}")

    def move_tensors(subgraph, tensors, tensor_map):
        for index, tensor in enumerate(tensors):
            if index in tensor_map:
                continue
            tensor.buffer = tensor.buffer + buffer_offset if tensor.buffer else 0
            tensor_map[index] = len(subgraph.tensors)
            subgraph.tensors.append(tensor)

    tensor_map = {b_inputs[name]: a_outputs[name] for name in b_inputs}
    move_tensors(main_a, main_b.tensors, tensor_map)
    for operator in main_b.operators:
        move_operator(operator, tensor_map)
        main_a.operators.append(operator)
    for subgraph in b.subgraphs[1:]:
        identity = {}
        tensors, subgraph.tensors = subgraph.tensors, []
        move_tensors(subgraph, tensors, identity)
        for operator in subgraph.operators:
            move_operator(operator, identity)
        a.subgraphs.append(subgraph)
    for entry in signature_b.outputs:
        entry.tensorIndex = tensor_map[entry.tensorIndex]
    signature_a.outputs = list(signature_b.outputs)
    main_a.outputs = [entry.tensorIndex for entry in signature_a.outputs]
    return _pack(a)


def _pack(model) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _drop_unused_tensors(model) -> None:
    """Removes the tensors no operator, subgraph boundary or signature uses (indices renumbered, in place)."""
    for index, subgraph in enumerate(model.subgraphs):
        used = set(subgraph.inputs) | set(subgraph.outputs)
        for operator in subgraph.operators:
            used |= {i for i in operator.inputs if i >= 0} | set(operator.outputs)
            if operator.intermediates is not None:
                used |= set(operator.intermediates)
        keep = sorted(used)
        renumber = {old: new for new, old in enumerate(keep)}
        subgraph.tensors = [subgraph.tensors[i] for i in keep]
        subgraph.inputs = [renumber[i] for i in subgraph.inputs]
        subgraph.outputs = [renumber[i] for i in subgraph.outputs]
        for operator in subgraph.operators:
            operator.inputs = [renumber[i] if i >= 0 else i for i in operator.inputs]
            operator.outputs = [renumber[i] for i in operator.outputs]
            if operator.intermediates is not None and len(operator.intermediates):
                operator.intermediates = [renumber[i] for i in operator.intermediates]
        for signature in model.signatureDefs or []:
            if signature.subgraphIndex == index:
                for entry in list(signature.inputs or []) + list(signature.outputs or []):
                    entry.tensorIndex = renumber[entry.tensorIndex]


def fold_float_requantize(model_bytes: bytes) -> bytes:
    """The model with each integer -> float -> integer detour made one integer QUANTIZE (a requantization).

    A FakeQuant range next to a calibrated one (the [0, 255] input of
    `integer_input` when the calibration images span less) leaves
    `DEQUANTIZE (int8 -> float32) -> QUANTIZE (float32 -> int8)`: float
    kernels an integer-only accelerator cannot run. TFLite's QUANTIZE also
    requantizes integers (uint8 / int8 to int8 with other parameters), so the
    QUANTIZE reads the integer tensor itself and the DEQUANTIZE goes; two
    QUANTIZEs in a row then become one. Other models are returned as they are.
    """
    schema = _schema()
    model = read_tflite(model_bytes)
    codes = {
        index: max(code.builtinCode, code.deprecatedBuiltinCode) for index, code in enumerate(model.operatorCodes)
    }
    integer_types = (schema.TensorType.INT8, schema.TensorType.UINT8)
    changed = False
    for subgraph in model.subgraphs:
        while True:
            consumers = {}
            for operator in subgraph.operators:
                for i in operator.inputs:
                    consumers.setdefault(i, []).append(operator)
            detour = None
            for operator in subgraph.operators:
                kind = codes[operator.opcodeIndex]
                if kind not in (schema.BuiltinOperator.DEQUANTIZE, schema.BuiltinOperator.QUANTIZE):
                    continue
                source, middle = operator.inputs[0], operator.outputs[0]
                readers = consumers.get(middle, [])
                if (
                    kind == schema.BuiltinOperator.DEQUANTIZE
                    and subgraph.tensors[source].type not in integer_types
                ) or (
                    kind == schema.BuiltinOperator.QUANTIZE
                    and (subgraph.tensors[source].type not in integer_types or len(readers) != 1)
                ):
                    continue
                if readers and middle not in subgraph.outputs and all(
                    codes[reader.opcodeIndex] == schema.BuiltinOperator.QUANTIZE for reader in readers
                ):
                    detour = operator, readers
                    break
            if detour is None:
                break
            operator, readers = detour
            for reader in readers:
                reader.inputs = [operator.inputs[0]]
            subgraph.operators.remove(operator)
            changed = True
    if not changed:
        return model_bytes
    _drop_unused_tensors(model)
    return _pack(model)


def tflite_ops(model_bytes: bytes) -> list[str]:
    """Sorted operator names of a TFLite model (builtins by name; "CUSTOM:<code>" for custom/Flex ops)."""
    schema = _schema()
    model = read_tflite(model_bytes)
    names = {value: key for key, value in vars(schema.BuiltinOperator).items() if not key.startswith("_")}
    ops = set()
    for subgraph in model.subgraphs:
        for operator in subgraph.operators:
            code = model.operatorCodes[operator.opcodeIndex]
            builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
            if builtin == schema.BuiltinOperator.CUSTOM:
                ops.add(f"CUSTOM:{(code.customCode or b'').decode()}")
            else:
                ops.add(names.get(builtin, str(builtin)))
    return sorted(ops)


def check_builtin_ops(ops: list[str], what: str = "the TFLite model") -> list[str]:
    """`ops` (a `tflite_ops` list) when all are builtins; an `ExportError` naming the custom / Flex ones."""
    custom = [op for op in ops if op.startswith(("CUSTOM", "FLEX"))]
    if custom:
        raise ExportError(f"{what} needs non-builtin ops {custom}; it would not run on stock TFLite")
    return ops


def _type_name(tensor_type: int) -> str:
    names = {value: key.lower() for key, value in vars(_schema().TensorType).items() if not key.startswith("_")}
    return names.get(tensor_type, str(tensor_type))


def _signature_tensors(model, which: str) -> dict:
    """`{signature name: tensor index}` of the model's inputs or outputs (tensor names without a signature)."""
    main = model.subgraphs[0]
    if model.signatureDefs:
        return {entry.name.decode(): entry.tensorIndex for entry in getattr(model.signatureDefs[0], which)}
    return {main.tensors[index].name.decode(): index for index in getattr(main, which)}


def _quantization(tensor) -> dict:
    entry = {"dtype": _type_name(tensor.type)}
    quantization = tensor.quantization
    if tensor.type in (_schema().TensorType.UINT8, _schema().TensorType.INT8) and quantization is not None \
            and quantization.scale is not None and len(quantization.scale):
        entry["scale"] = float(quantization.scale[0])
        entry["zero_point"] = int(quantization.zeroPoint[0])
    return entry


def io_quantization(model_bytes: bytes) -> dict:
    """`{"inputs": {name: entry}, "outputs": {name: entry}}` of a TFLite model, by signature name.

    An entry is `{"dtype"}`, plus `"scale"` and `"zero_point"` for a
    quantized (uint8 / int8) tensor: `real = (q - zero_point) * scale`.
    """
    model = read_tflite(model_bytes)
    main = model.subgraphs[0]
    return {
        which: {name: _quantization(main.tensors[index]) for name, index in _signature_tensors(model, which).items()}
        for which in ("inputs", "outputs")
    }


def boundary_ops(model_bytes: bytes) -> dict:
    """The operators at a model's boundary: `{"inputs": {name: [consumers]}, "outputs": {name: producer}}`.

    Each operator reads "NAME(input dtype -> output dtype)", e.g.
    "QUANTIZE(uint8 -> int8)" after a uint8 input, "SOFTMAX(int8 -> int8)".
    """
    schema = _schema()
    model = read_tflite(model_bytes)
    main = model.subgraphs[0]
    names = {value: key for key, value in vars(schema.BuiltinOperator).items() if not key.startswith("_")}

    def describe(operator):
        code = model.operatorCodes[operator.opcodeIndex]
        name = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")
        first = next((i for i in operator.inputs if i >= 0), None)
        source = _type_name(main.tensors[first].type) if first is not None else "-"
        return f"{name}({source} -> {_type_name(main.tensors[operator.outputs[0]].type)})"

    inputs = {
        name: [describe(op) for op in main.operators if index in list(op.inputs)]
        for name, index in _signature_tensors(model, "inputs").items()
    }
    outputs = {
        name: next((describe(op) for op in main.operators if index in list(op.outputs)), "-")
        for name, index in _signature_tensors(model, "outputs").items()
    }
    return {"inputs": inputs, "outputs": outputs}


def interior_float_tensors(model_bytes: bytes) -> list[str]:
    """Names of the float32 activations of a model that are not its (or a subgraph's) inputs or outputs.

    An int8 model computing in integers has none: float32 there means float kernels kept inside.
    """
    model = read_tflite(model_bytes)
    found = []
    for subgraph in model.subgraphs:
        boundary = set(subgraph.inputs) | set(subgraph.outputs)
        for index, tensor in enumerate(subgraph.tensors):
            buffer = model.buffers[tensor.buffer] if tensor.buffer else None
            constant = buffer is not None and (buffer.data is not None and len(buffer.data) or getattr(buffer, "size", 0))
            if tensor.type == _schema().TensorType.FLOAT32 and index not in boundary and not constant:
                found.append(tensor.name.decode())
    return found


def check_integer_model(model_bytes: bytes, qat: bool = False) -> None:
    """An `ExportError` when an int8 model keeps float32 activations inside (see `interior_float_tensors`)."""
    floats = interior_float_tensors(model_bytes)
    if floats:
        cause = (
            "layers of the quantization-aware model without trained ranges (fake-quantize them, or export with "
            "quantize='none')" if qat else "the converter kept float kernels"
        )
        raise ExportError(
            f"the int8 TFLite model keeps {len(floats)} float32 tensors inside (e.g. {floats[0]}): {cause}"
        )


def check_integer_input(model_bytes: bytes, io: str) -> dict:
    """The quantization of the integer input of a model converted with `io` "uint8" / "int8".

    Raises:
        ModelError: the input is not `io` with scale 1.0 and zero point 0 (uint8) / -128 (int8).
    """
    name, entry = next(iter(io_quantization(model_bytes)["inputs"].items()))
    expected = {"dtype": io, "scale": 1.0, "zero_point": INPUT_ZERO_POINTS[io]}
    if entry != expected:
        raise ModelError(
            f"input {name!r} of the {io}-input TFLite model is {entry}, not {expected}: the converter did not "
            "keep the [0, 255] range of the images; export with io='float'"
        )
    return entry


def _quantize_input(detail):
    """float32 raw pixels -> what the input tensor takes (`q = round(x / scale + zero_point)` for uint8 / int8)."""
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail["quantization"]
    if dtype == np.float32:
        return lambda batch: batch
    if np.issubdtype(dtype, np.integer) and scale:
        limits = np.iinfo(dtype)
        return lambda batch: np.clip(
            np.round(np.asarray(batch, np.float32) / np.float32(scale) + zero_point), limits.min, limits.max
        ).astype(dtype)
    return lambda batch: np.asarray(batch).astype(dtype)


def _dequantize(detail):
    """An output as float32 (`(q - zero_point) * scale`) when it is quantized, else as it is."""
    scale, zero_point = detail["quantization"]
    if np.issubdtype(np.dtype(detail["dtype"]), np.integer) and scale:
        return lambda value: ((value.astype(np.float32) - np.float32(zero_point)) * np.float32(scale))
    return lambda value: value


def _same(value):
    return value


def open_tflite(path, num_threads: int) -> Runtime:
    """A `Runtime` on `ai_edge_litert`'s interpreter; its outputs are named by the model's signature.

    Every model takes float32 raw pixels: a uint8 / int8 input is fed them
    quantized, and uint8 / int8 outputs come back dequantized to float32
    (see the module docstring).
    """
    from ai_edge_litert.interpreter import Interpreter

    try:
        with native_stderr_filtered(TFLITE_NOISE + TENSORFLOW_STARTUP_NOISE):
            interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
    except ValueError as error:
        raise ModelError(f"cannot load TFLite model {path}: {error}") from None
    input_detail = interpreter.get_input_details()[0]
    output_details = interpreter.get_output_details()
    outputs = {}
    signatures = interpreter.get_signature_list()
    if signatures:
        runner = interpreter.get_signature_runner(next(iter(signatures)))
        outputs = {name: detail["index"] for name, detail in runner.get_output_details().items()}
    signature = [int(v) for v in input_detail["shape_signature"]]
    dynamic_batch = signature[0] == -1
    allocated = {"batch": None}
    quantize = _quantize_input(input_detail)
    dequantize = {detail["index"]: _dequantize(detail) for detail in output_details}

    def fetch(batch, handles):
        if allocated["batch"] != len(batch):
            with native_stderr_filtered(TFLITE_NOISE + TENSORFLOW_STARTUP_NOISE):  # the XNNPACK delegate announces itself on the first invoke
                if dynamic_batch:
                    interpreter.resize_tensor_input(input_detail["index"], [len(batch), *signature[1:]])
                interpreter.allocate_tensors()
                interpreter.set_tensor(input_detail["index"], quantize(batch))
                interpreter.invoke()
            allocated["batch"] = len(batch)
        else:
            interpreter.set_tensor(input_detail["index"], quantize(batch))
            interpreter.invoke()
        return {
            name: dequantize.get(index, _same)(interpreter.get_tensor(index).copy()) for name, index in handles.items()
        }

    return Runtime(
        kind="tflite",
        input_shape=tuple(signature[1:]),
        batch_size=None if dynamic_batch else signature[0],
        outputs=outputs,
        shapes={detail["index"]: detail["shape"] for detail in output_details},
        first=output_details[0]["index"],
        fetch=fetch,
        input_dtype=np.dtype(input_detail["dtype"]).name,
    )
