"""Test helpers shared by several test modules (fixtures live in conftest.py)."""

import gzip
import socket
import struct

import keras
import numpy as np

from keras_resnet import ImageNormalization, ResNetClassifier


def randomize_batch_norm(model, seed=0):
    """Random BN statistics, so parity tests exercise every BN weight."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 1.5, gamma.shape),
                rng.normal(0.0, 0.2, beta.shape),
                rng.normal(0.0, 0.2, mean.shape),
                rng.uniform(0.5, 2.0, var.shape),
            ])


def write_idx_gz(path, array):
    """Writes `array` as a gzipped IDX file (the Fashion-MNIST format)."""
    array = np.ascontiguousarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.tobytes())


def write_shape_fashion_mnist(directory, train_count=40, test_count=12):
    """A Fashion-MNIST stand-in in `directory`: bright rectangles whose width and brightness encode the class."""
    return write_shape_items(directory, classes=range(10), train_count=train_count, test_count=test_count)


# Segmentation tests: a tiny backbone, the default recipe, and fresh-mosaic settings.
TINY_BACKBONE = {"stackwise_num_blocks": [1, 1, 1, 1], "stackwise_num_filters": [8, 16, 16, 16], "stem_width": 8}
SEGMENTATION_RECIPE = "tasks/segmentation/mosaic_deeplabv3plus_resnet18.yaml"
# 24 training canvases of 32x32 (3 batches), no random geometry, new canvases each epoch (the flag last)
FRESH_MOSAIC_OVERRIDES = ("data.mosaic_train_size=24", "data.mosaic_val_size=8", "data.batch_size=8",
                          "model.input_shape=[32,32,1]", "data.augment.horizontal_flip=false",
                          "data.augment.scale_range=[1.0,1.0]", "data.mosaic_fresh_each_epoch=true")




def mask_epochs(dataset, count):
    """The masks of `count` passes over a segmentation dataset, one array per epoch."""
    return [np.concatenate([masks for _, masks in dataset.as_numpy_iterator()]) for _ in range(count)]


def tiny_classifier(channels=3, num_classes=3, preset="resnet20_cifar", size=32, **overrides):
    """A one-block-per-stage classifier with in-model normalisation, `size`x`size` inputs."""
    overrides.setdefault("stackwise_num_blocks", [1, 1, 1])
    return ResNetClassifier.from_preset(
        preset,
        num_classes=num_classes,
        input_shape=(size, size, channels),
        preprocessing=ImageNormalization(mean=[0.5] * channels, std=[0.25] * channels, scale=1 / 255),
        **overrides,
    )


# Detection tests: the default mosaic recipe shrunk to a few seconds (add the epochs and output_dir).
DETECTION_RECIPE = "tasks/detection/mosaic_retinanet_resnet18.yaml"
TINY_DETECTOR = [
    "model.backbone_args={stackwise_num_filters: [8, 16, 32, 64]}",
    "model.head_args={fpn_width: 16, head_depth: 1, min_level: 3, max_level: 5, anchor_sizes: [8, 16, 32]}",
    "model.input_shape=[64,64,1]",
    "data.mosaic_train_size=32", "data.mosaic_val_size=8", "data.batch_size=8",
    "train.mixed_precision=false",
]


def write_shape_items(directory, classes, train_count=40, test_count=12):
    """Rectangles whose width and brightness encode the class, for the Fashion-MNIST class ids in `classes` (cycled).

    With few, well-separated classes (e.g. (0, 9): wide and dim vs narrow and bright) a tiny
    detector or segmenter learns them in a few dozen steps, so tests can assert real metric floors.
    """
    from keras_resnet.data.fashion_mnist import FASHION_MNIST_FILES

    directory.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train_count), ("test", test_count)):
        labels = np.asarray(list(classes), np.uint8)[np.arange(count) % len(classes)]
        items = np.zeros((count, 28, 28), np.uint8)
        for item, label in zip(items, labels):
            item[4:24, 6 + label // 2: 22 - label // 2] = 60 + 19 * label
        write_idx_gz(directory / FASHION_MNIST_FILES[f"{split}_images"], items)
        write_idx_gz(directory / FASHION_MNIST_FILES[f"{split}_labels"], labels)
    return directory


# Native-resolution crop tests (tests/data/test_crops.py): images whose pixels say where they came from.
def coordinate_image(height, width, marker=200):
    """uint8 RGB `(height, width, 3)`: R = x, G = y, B = `marker` (padding reads B = 0); at most 256 x 256."""
    assert height <= 256 and width <= 256, "R and G hold the coordinates in 8 bits"
    rows, cols = np.mgrid[:height, :width]
    return np.stack([cols, rows, np.full_like(rows, marker)], axis=-1).astype(np.uint8)


def write_mask_pair(folder, stem, image, mask):
    """`image` (PNG) and its index `mask` (mode L PNG) as `folder/images/<stem>.png` and `folder/masks/<stem>.png`."""
    from PIL import Image

    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / "images" / f"{stem}.png")
    Image.fromarray(np.asarray(mask, np.uint8), mode="L").save(folder / "masks" / f"{stem}.png")
    return folder


def write_voc_image(folder, stem, image, boxes, name="cat"):
    """`image` (PNG) and a VOC XML of `boxes` (0-based continuous int xyxy, written 1-based) in a flat VOC folder."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f"{stem}.png")
    height, width = image.shape[:2]
    objects = "".join(
        f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>" for x0, y0, x1, y1 in boxes
    )
    (folder / f"{stem}.xml").write_text(
        f"<annotation><filename>{stem}.png</filename><size><width>{width}</width><height>{height}</height>"
        f"<depth>3</depth></size>{objects}</annotation>"
    )
    return folder


def free_ports(count):
    """`count` TCP ports free on localhost now (for a local TF_CONFIG cluster)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports
