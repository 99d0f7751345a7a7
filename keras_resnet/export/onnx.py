"""ONNX artefacts: tf2onnx conversion of a frozen function, and running one with onnxruntime.

tf2onnx 1.17 (`from_graph_def`) on the frozen `tf.function`, opset 17,
float32 NHWC input "images". tf2onnx works with protobuf 7, but
`from_function`/`from_keras` fail on ResNeXt: Keras 3 wraps grouped
convolutions in a nested XLA-only function that tf2onnx cannot convert
("StatefulPartitionedCall is not supported"). We freeze the function
ourselves, drop the `_XlaMustCompile`/`_noinline` marks so grappler inlines
the plain `Conv2D`, then convert. A resize to a static size becomes an ONNX
Resize with float32 `scales`, one pixel short when the ratio is fractional
(segmenter heads at sizes the strides do not divide): those nodes get exact
`sizes` instead (`exact_resize_sizes`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from keras_resnet.export.signatures import INPUT_NAME, Runtime
from keras_resnet_settings.errors import ModelError

ONNX_OPSET = 17


def allow_inlining(graph_def) -> None:
    """Lets grappler inline functions Keras marks for XLA (grouped convs on CPU).

    Keras 3 runs grouped convolutions (ResNeXt) through a nested
    `tf.function(jit_compile=True)`, which a frozen graph keeps as a
    `StatefulPartitionedCall` marked `_XlaMustCompile` / `_noinline`; tf2onnx
    cannot convert that op. Dropping the two marks lets tf2onnx's grappler
    pass inline the plain `Conv2D` inside.
    """
    marks = ("_XlaMustCompile", "_noinline")
    nodes = list(graph_def.node) + [node for function in graph_def.library.function for node in function.node_def]
    for attributes in [node.attr for node in nodes] + [function.attr for function in graph_def.library.function]:
        for mark in marks:
            if mark in attributes:
                del attributes[mark]


def _rename_onnx_tensor(graph, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in list(graph.input) + list(graph.output):
        if value.name == old:
            value.name = new


def exact_resize_sizes(model_proto) -> int:
    """Gives Resize nodes with fractional constant `scales` their exact output `sizes` instead.

    tf2onnx turns a TF resize to a static size into an ONNX Resize with
    float32 `scales = out / in`. When the ratio is not an integer (the FPN
    top-down path or the segmenter heads at an input size that strides do
    not divide, e.g. 3 -> 5), `floor(in * scale)` comes out one short and
    onnxruntime rejects the graph ("Incompatible dimensions"). The fixed
    node takes `sizes` (`Shape(x)[:1]` joined to the static C, H, W for a
    dynamic batch), from which runtimes derive the same scale.

    Returns:
        The number of Resize nodes changed.
    """
    from onnx import helper, numpy_helper, shape_inference

    graph = model_proto.graph
    fixed, replaced = 0, set()
    while any(node.op_type == "Resize" and len(node.input) == 3 for node in graph.node):
        constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        try:
            inferred = shape_inference.infer_shapes(model_proto, data_prop=True)
        except Exception:  # onnx raises its own error types; keep tf2onnx's graph as is
            break
        shapes = {
            value.name: [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
            for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
        }
        for index, node in enumerate(graph.node):
            if node.op_type != "Resize" or len(node.input) != 3 or node.input[2] not in constants:
                continue
            scales = constants[node.input[2]].astype(np.float64)
            shape = shapes.get(node.input[0])
            if np.all(scales == np.round(scales)) or not shape or len(shape) != len(scales):
                continue
            if any(dim is None for dim in shape[1:]):
                continue
            static = np.round(np.asarray(shape[1:], np.float64) * scales[1:]).astype(np.int64)
            prefix = f"{node.name or 'Resize'}_exact_sizes_{fixed}"
            new_nodes = []
            if shape[0] is not None:
                graph.initializer.append(numpy_helper.from_array(np.concatenate([[shape[0]], static]), prefix))
            else:
                graph.initializer.extend([
                    numpy_helper.from_array(static, f"{prefix}_static"),
                    numpy_helper.from_array(np.array([0], np.int64), f"{prefix}_zero"),
                    numpy_helper.from_array(np.array([1], np.int64), f"{prefix}_one"),
                ])
                new_nodes = [
                    helper.make_node("Shape", [node.input[0]], [f"{prefix}_shape"], name=f"{prefix}_shape"),
                    helper.make_node(
                        "Slice", [f"{prefix}_shape", f"{prefix}_zero", f"{prefix}_one"], [f"{prefix}_batch"],
                        name=f"{prefix}_batch",
                    ),
                    helper.make_node(
                        "Concat", [f"{prefix}_batch", f"{prefix}_static"], [prefix], name=prefix, axis=0
                    ),
                ]
            replaced.add(node.input[2])
            node.input[:] = [node.input[0], node.input[1], "", prefix]
            nodes = list(graph.node)
            nodes[index:index] = new_nodes
            del graph.node[:]
            graph.node.extend(nodes)
            fixed += 1
            break
        else:
            break
    used = {name for node in graph.node for name in node.input}
    for initializer in [i for i in graph.initializer if i.name in replaced and i.name not in used]:
        graph.initializer.remove(initializer)
    return fixed


def convert_onnx(fn, input_spec: tf.TensorSpec, output_names, path: Path, batch_size: int | None) -> None:
    """Freezes `fn`, converts it with tf2onnx and names its tensors.

    The ONNX graph has one input "images" and the outputs `output_names`
    (the keys of the dict `fn` returns, in the order given); a dynamic batch
    dimension is named "batch".
    """
    import onnx
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    function = tf.function(fn, autograph=False)
    concrete = function.get_concrete_function(input_spec)
    frozen = convert_variables_to_constants_v2(concrete, lower_control_flow=False, aggressive_inlining=True)
    graph_def = frozen.graph.as_graph_def(add_shapes=True)
    allow_inlining(graph_def)
    # The frozen outputs follow tf.nest order of the output dict: sorted keys.
    tensor_names = dict(zip(sorted(output_names), (tensor.name for tensor in frozen.outputs)))
    input_name = frozen.inputs[0].name
    model_proto, _ = tf2onnx.convert.from_graph_def(
        graph_def,
        input_names=[input_name],
        output_names=[tensor_names[name] for name in output_names],
        opset=ONNX_OPSET,
    )
    exact_resize_sizes(model_proto)
    _rename_onnx_tensor(model_proto.graph, input_name, INPUT_NAME)
    for name, tensor_name in tensor_names.items():
        _rename_onnx_tensor(model_proto.graph, tensor_name, name)
    if batch_size is None:
        for value in [*model_proto.graph.input, *model_proto.graph.output]:
            value.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.checker.check_model(model_proto)
    onnx.save(model_proto, str(path))


def open_onnx(path, num_threads: int) -> Runtime:
    """A `Runtime` on an onnxruntime CPU session; its outputs are named as in the graph."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types
        raise ModelError(f"cannot load ONNX model {path}: {error}") from None
    model_input = session.get_inputs()[0]
    batch_dim = model_input.shape[0]
    outputs = session.get_outputs()

    def fetch(batch, handles):
        return dict(zip(handles, session.run(list(handles.values()), {model_input.name: batch})))

    return Runtime(
        kind="onnx",
        input_shape=tuple(model_input.shape[1:]),
        batch_size=batch_dim if isinstance(batch_dim, int) else None,
        outputs={output.name: output.name for output in outputs},
        shapes={output.name: output.shape for output in outputs},
        first=outputs[0].name,
        fetch=fetch,
    )
