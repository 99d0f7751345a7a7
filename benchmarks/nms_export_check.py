"""Does detection post-processing convert to TFLite (builtins only) and ONNX?

Compares keras-cv 0.9's `keras_cv.layers.NonMaxSuppression` (what
`keras_cv.models.RetinaNet` decodes with) and keras_resnet's
`DetectionDecoder`, each wrapped in a `tf.function` over a raw
`(B, N, 4 + C)` tensor, for a static batch of 1 and a dynamic batch:

* TFLite: `TFLiteConverter.from_concrete_functions` with
  `supported_ops=[TFLITE_BUILTINS]` (no Flex/Select TF ops). On success it
  lists the builtin ops and checks the TFLite outputs against TensorFlow.
* ONNX: `tf2onnx.convert.from_function` (opset 17), then onnxruntime
  parity.

The third case is a whole tiny RetinaNet inference model (images in,
detections out). Latency is the median of 30 calls (one thread each runtime default) on a
128x128 input's 3,069 anchors and 4 classes; the batch=None rows run a
batch of 2.

    python benchmarks/nms_export_check.py
"""

import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_resnet.export.tflite import tflite_ops  # noqa: E402
from keras_resnet.models.retinanet import AnchorGenerator, DetectionDecoder  # noqa: E402

IMAGE_SHAPE = (128, 128)
NUM_CLASSES = 4
MAX_DETECTIONS = 20


def raw_outputs(batch, seed=0):
    """Random raw outputs with a few confident, overlapping boxes of two classes."""
    rng = np.random.default_rng(seed)
    num_anchors = AnchorGenerator().num_anchors(IMAGE_SHAPE)
    raw = np.concatenate(
        [rng.normal(0, 0.5, (batch, num_anchors, 4)), rng.normal(-6, 1, (batch, num_anchors, NUM_CLASSES))], axis=-1
    ).astype(np.float32)
    hot = rng.choice(num_anchors, size=(batch, 40))
    for image in range(batch):
        raw[image, hot[image], 4 + rng.integers(0, NUM_CLASSES, 40)] = rng.normal(2, 1, 40)
    return raw


def keras_cv_fn():
    import keras_cv

    anchors = AnchorGenerator()(IMAGE_SHAPE)
    nms = keras_cv.layers.NonMaxSuppression(
        bounding_box_format="xyxy", from_logits=True, confidence_threshold=0.05, max_detections=MAX_DETECTIONS
    )

    def fn(raw):
        # keras-cv's RetinaNet decodes deltas first; plain anchor offsets suffice for the NMS question.
        boxes = anchors[None] + raw[..., :4]
        out = nms(boxes, raw[..., 4:])
        return {"boxes": out["boxes"], "scores": out["confidence"], "num_detections": out["num_detections"]}

    return fn


def ours_fn():
    decoder = DetectionDecoder(NUM_CLASSES, IMAGE_SHAPE, max_detections=MAX_DETECTIONS)

    def fn(raw):
        return decoder(raw)

    return fn


def detector_fn():
    """A whole (tiny, random) RetinaNet with the decoder: images in, detections out."""
    from keras_resnet import ImageNormalization, ResNetBackbone, RetinaNetDetector

    backbone = ResNetBackbone.from_preset(
        "resnet18", input_shape=(*IMAGE_SHAPE, 3), stackwise_num_filters=[16, 32, 64, 128]
    )
    detector = RetinaNetDetector(
        backbone, NUM_CLASSES, fpn_width=32, head_depth=1, preprocessing=ImageNormalization(mean=127.5, std=127.5)
    )
    model = detector.make_inference_model(max_detections=MAX_DETECTIONS, score_threshold=0.3)

    def fn(images):
        return model(images, training=False)

    fn.model = model  # the SavedModel must track the variables
    return fn


def images(batch, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (batch, *IMAGE_SHAPE, 3)).astype(np.float32)


def check_tflite(fn, batch, raw):
    spec = tf.TensorSpec([batch, *raw.shape[1:]], tf.float32, name="raw")
    try:
        with tempfile.TemporaryDirectory() as directory:
            if hasattr(fn, "model"):  # as keras_resnet.export does: variables frozen by the converter
                archive = keras.export.ExportArchive()
                archive.track(fn.model)
                archive.add_endpoint("serving_default", fn, input_signature=[spec])
                archive.write_out(directory, verbose=False)
            else:
                module = tf.Module()
                module.serve = tf.function(fn, input_signature=[spec])
                tf.saved_model.save(module, directory, signatures=module.serve.get_concrete_function())
            converter = tf.lite.TFLiteConverter.from_saved_model(directory)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
            model_bytes = converter.convert()
    except Exception as error:  # noqa: BLE001 - report any conversion failure
        lines = [line for line in str(error).splitlines() if "op" in line.lower() or "error" in line.lower()]
        return f"FAILS: {' | '.join(lines[:4])[:600]}"
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_bytes)
    runner = interpreter.get_signature_runner()
    input_name = next(iter(runner.get_input_details()))
    got = runner(**{input_name: raw})
    agree = _agrees(got, fn, raw)
    latency = _median_ms(lambda: runner(**{input_name: raw}))
    return (
        f"converts ({len(model_bytes) // 1024} KiB), {latency:.2f} ms/call, matches TF: {agree}, "
        f"ops {tflite_ops(model_bytes)}"
    )


def _agrees(got, fn, raw):
    want = {k: v.numpy() for k, v in fn(tf.constant(raw)).items()}
    return all(np.allclose(got[key], want[key], atol=1e-3) for key in ("boxes", "scores", "num_detections"))


def _median_ms(call, runs=30):
    call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def check_onnx(fn, batch, raw):
    import onnxruntime
    import tf2onnx

    spec = (tf.TensorSpec([batch, *raw.shape[1:]], tf.float32, name="raw"),)
    try:
        proto, _ = tf2onnx.convert.from_function(tf.function(fn), input_signature=spec, opset=17)
    except Exception as error:  # noqa: BLE001
        return f"FAILS: {str(error)[:300]}"
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    feed = {session.get_inputs()[0].name: raw}
    got = dict(zip(names, session.run(None, feed)))
    latency = _median_ms(lambda: session.run(None, feed))
    ops = sorted({node.op_type for node in proto.graph.node})
    return f"converts, {latency:.2f} ms/call, matches TF: {_agrees(got, fn, raw)}, top-level ops {ops}"


def main():
    cases = (
        ("keras-cv NonMaxSuppression", keras_cv_fn, raw_outputs),
        ("keras_resnet DetectionDecoder", ours_fn, raw_outputs),
        ("keras_resnet RetinaNetDetector.make_inference_model (tiny resnet18)", detector_fn, images),
    )
    for label, make, inputs in cases:
        for batch in (1, None):
            raw = inputs(batch or 2)
            print(f"{label}, batch={batch}:")
            print(f"  TFLite builtins: {check_tflite(make(), batch, raw)}")
            print(f"  ONNX: {check_onnx(make(), batch, raw)}")


if __name__ == "__main__":
    main()
