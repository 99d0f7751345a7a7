"""Interleaved latency check: our resnet50_v1 TFLite (dynamic range) with and without the in-graph
normalisation vs keras.applications ResNet50, bs1, 2 threads. Calls alternate between the three models
so machine drift hits all alike (benchmarks/inference.py times forms one after another).

    python benchmarks/interleaved_tflite_check.py
"""
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

from keras_resnet import ImageNormalization, ResNetClassifier
from keras_resnet.export import export_model, load_exported_model

out = Path(tempfile.mkdtemp())
models = {
  "ours_with_norm": ResNetClassifier.from_preset("resnet50_v1", num_classes=1000, input_shape=(224,224,3), preprocessing=ImageNormalization.from_mode("caffe")),
  "ours_no_norm": ResNetClassifier.from_preset("resnet50_v1", num_classes=1000, input_shape=(224,224,3)),
  "keras_applications": keras.applications.ResNet50(weights=None),
}
x = np.random.default_rng(0).uniform(0,255,(1,224,224,3)).astype("float32")
paths = {}
for name, m in models.items():
    paths[name] = export_model(m, format="tflite", quantize="dynamic", output=out/name, name=name, parity_samples=2)["path"]
runners = {n: load_exported_model(p, num_threads=2) for n, p in paths.items()}
for n, r in runners.items():
    for _ in range(3): r.predict_batch(x)
times = {n: [] for n in runners}
for rep in range(15):
    for n, r in runners.items():  # interleaved, so drift hits all alike
        t = time.perf_counter(); r.predict_batch(x); times[n].append((time.perf_counter()-t)*1000)
for n, ts in times.items():
    print(f"{n}: median {np.median(ts):.2f} ms")
base = np.median(times["keras_applications"])
for n, ts in times.items(): print(f"{n}/keras_applications: {np.median(ts)/base:.3f}x")
