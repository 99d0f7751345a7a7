"""One object class (trees, people, defects, cells): detection end to end with model.num_classes=1.

A VOC folder of dark 64x64 images with one bright square each ("tree"):
train, evaluate (pycocotools mAP, above what an untrained detector gets),
export to TFLite and ONNX with NMS inside (parity gates), predict.
"""

import json

import numpy as np
import pytest
from PIL import Image

from keras_resnet.cli import main
from keras_resnet.export import export_model
from keras_resnet.predict.detection import predict_boxes
from tests.helpers import DETECTION_RECIPE, TINY_DETECTOR


def write_one_class_voc(root, count, seed):
    """`count` 64x64 grayscale images, each with one bright square of side 14-22 px; returns the boxes."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    boxes = {}
    for index in range(count):
        image = np.full((64, 64), 25, np.uint8)
        side = int(rng.integers(14, 23))
        x0, y0 = (int(v) for v in rng.integers(0, 64 - side, 2))
        image[y0:y0 + side, x0:x0 + side] = 220
        Image.fromarray(image).save(root / f"tree{index}.png")
        (root / f"tree{index}.xml").write_text(
            "<annotation><size><width>64</width><height>64</height><depth>1</depth></size><object><name>tree"
            f"</name><bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x0 + side}</xmax>"
            f"<ymax>{y0 + side}</ymax></bndbox></object></annotation>"
        )
        boxes[f"tree{index}"] = (x0, y0, x0 + side, y0 + side)
    return boxes


@pytest.fixture(scope="module")
def one_class_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_class")
    write_one_class_voc(root / "train", 32, seed=0)
    val_boxes = write_one_class_voc(root / "val", 8, seed=1)
    overrides = [
        *TINY_DETECTOR, "train.epochs=6", "train.learning_rate=0.003", "data.source=voc",
        f"data.train={root / 'train'}", f"data.val={root / 'val'}", "data.class_names=[tree]",
        "model.num_classes=1", "data.augment.scale_range=[1.0,1.0]", f"output_dir={root / 'run'}",
    ]
    assert main(["train", DETECTION_RECIPE, "--set", *overrides]) == 0
    return root, overrides, val_boxes


def test_one_class_detector_trains_and_evaluates(one_class_run, capsys):
    root, overrides, _ = one_class_run
    run = root / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert json.loads((run / "run.json").read_text())["class_names"] == ["tree"]
    assert list(metrics["per_class"]) == ["tree"]
    # Six tiny epochs reach AP50 ~0.25 here; an untrained detector scores 0.0 on these images.
    assert metrics["AP50"] >= 0.08, metrics
    assert main(["evaluate", DETECTION_RECIPE, "--set", *overrides]) == 0
    assert json.loads((run / "metrics.json").read_text())["AP50"] == pytest.approx(metrics["AP50"])


@pytest.mark.parametrize("format", ["tflite", "onnx"])
def test_one_class_detector_exports_with_nms_inside(one_class_run, tmp_path, format):
    root, _, _ = one_class_run
    result = export_model(root / "run", format=format, output=tmp_path, parity_samples=8)
    assert result["parity"]["passed"], result["parity"]
    metadata = json.loads(open(result["metadata_path"]).read())
    assert metadata["class_names"] == ["tree"] and metadata["num_classes"] == 1


def test_one_class_detector_predicts_the_square(one_class_run, tmp_path):
    root, _, val_boxes = one_class_run
    (result,) = predict_boxes(root / "run", [root / "val" / "tree0.png"], tmp_path, max_detections=1)
    (detection,) = result["detections"]
    assert detection["class"] == "tree"
    x0, y0, x1, y1 = val_boxes["tree0"]
    px0, py0, px1, py1 = detection["box"]
    # The top box overlaps the square (IoU > 0.3): the model found the object, not noise.
    inter = max(0, min(x1, px1) - max(x0, px0)) * max(0, min(y1, py1) - max(y0, py0))
    union = (x1 - x0) * (y1 - y0) + (px1 - px0) * (py1 - py0) - inter
    assert inter / union > 0.3, (detection, val_boxes["tree0"])
