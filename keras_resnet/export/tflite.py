"""TFLite artefacts: conversion to builtin ops, joining two models, listing ops, running one.

`tflite_bytes` converts with `tf.lite.TFLiteConverter.from_saved_model` on
a temporary ExportArchive SavedModel with one float32 signature, builtin
ops only (`TFLITE_BUILTINS`; int8: `TFLITE_BUILTINS_INT8`, never
SELECT_TF_OPS). int8 is full-integer quantization calibrated on a
representative dataset; its input and output stay float32
(quantize/dequantize ops inside the model), so every TFLite variant is
called the same way. Artefacts run with `ai_edge_litert.interpreter.Interpreter`.
"""

from __future__ import annotations

import tempfile

import tensorflow as tf

from keras_resnet.errors import ModelError
from keras_resnet.export.contract import Runtime, batches
from keras_resnet.export.saved_model import write_saved_model


def tflite_bytes(fn, input_signature, track=None, quantize="none", calibration_images=None, batch_size=1) -> bytes:
    """Converts `fn` (via a temporary ExportArchive SavedModel) to TFLite builtins, optionally quantized.

    Args:
        fn: the function to serve (images -> outputs).
        input_signature: its `tf.TensorSpec` list.
        track: the Keras model (or layer) whose variables `fn` uses.
        quantize: "none", "float16", "dynamic" or "int8" (float input/output).
        calibration_images: float32 images for int8 calibration.
        batch_size: calibration batch size (None = 1).
    """
    with tempfile.TemporaryDirectory(prefix="keras_resnet_tflite_") as tmp:
        write_saved_model(tmp, track, {"serving_default": (fn, input_signature)})
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantize in ("float16", "dynamic", "int8"):
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if quantize == "int8":
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]

            def representative_dataset():
                for batch, _ in batches(calibration_images, batch_size or 1):
                    yield [batch]

            converter.representative_dataset = representative_dataset
        return converter.convert()


def _schema():
    from tensorflow.lite.python import schema_py_generated as schema

    return schema


def _read_tflite(model_bytes):
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
    import flatbuffers

    schema = _schema()
    a, b = _read_tflite(first), _read_tflite(second)
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
    builder = flatbuffers.Builder(1024)
    builder.Finish(a.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def tflite_ops(model_bytes: bytes) -> list[str]:
    """Sorted operator names of a TFLite model (builtins by name; "CUSTOM:<code>" for custom/Flex ops)."""
    schema = _schema()
    model = _read_tflite(model_bytes)
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


def open_tflite(path, num_threads: int) -> Runtime:
    """A `Runtime` on `ai_edge_litert`'s interpreter; its outputs are named by the model's signature."""
    from ai_edge_litert.interpreter import Interpreter

    try:
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

    def fetch(batch, handles):
        if allocated["batch"] != len(batch):
            if dynamic_batch:
                interpreter.resize_tensor_input(input_detail["index"], [len(batch), *signature[1:]])
            interpreter.allocate_tensors()
            allocated["batch"] = len(batch)
        interpreter.set_tensor(input_detail["index"], batch)
        interpreter.invoke()
        return {name: interpreter.get_tensor(index).copy() for name, index in handles.items()}

    return Runtime(
        kind="tflite",
        input_shape=tuple(signature[1:]),
        batch_size=None if dynamic_batch else signature[0],
        outputs=outputs,
        shapes={detail["index"]: detail["shape"] for detail in output_details},
        first=output_details[0]["index"],
        fetch=fetch,
    )
