"""Box utilities: format conversion, IoU, anchor-relative encoding, clipping.

Convention everywhere in `keras_resnet.models.retinanet`: boxes are float32,
absolute pixels in model-input coordinates, and "xyxy" means
`[x_min, y_min, x_max, y_max]`. Other formats (names as in keras-cv):

- "yxyx": `[y_min, x_min, y_max, x_max]` (TF image ops),
- "xywh": `[x_min, y_min, width, height]` (COCO annotations),
- "center_xywh": `[x_center, y_center, width, height]`.

Box encoding follows the R-CNN / RetinaNet parameterisation in centre form,
`[dx, dy, dw, dh] = [(x - xa) / wa, (y - ya) / ha, log(w / wa), log(h / ha)]
/ variance`, with keras-cv's RetinaNet variance `(0.1, 0.1, 0.2, 0.2)`.
keras-cv orders the deltas `[dy, dx, dh, dw]` (it encodes in
"center_yxhw"); here they follow the x-first order of the box format, as
torchvision and Detectron do. Decoding clips `dw, dh` (after the variance)
at `log(1000 / 16)` as Detectron does, so untrained heads cannot overflow.

Every function takes any leading batch dimensions, uses `keras.ops` (tf
tensors on the TensorFlow backend) and runs in `tf.data` graphs.
"""

import math

from keras import ops

from keras_resnet_settings.errors import ConfigError

BOX_FORMATS = ("xyxy", "yxyx", "xywh", "center_xywh")
BOX_VARIANCE = (0.1, 0.1, 0.2, 0.2)
# Detectron's bbox_xform_clip: the largest log-scale a decoded box may take.
MAX_LOG_SCALE = math.log(1000.0 / 16.0)
EPSILON = 1e-8


def _check_format(name, value):
    if value not in BOX_FORMATS:
        raise ConfigError(f"{name}={value!r} is not a box format; allowed: {', '.join(map(repr, BOX_FORMATS))}.")


def _to_xyxy(boxes, source):
    a, b, c, d = ops.unstack(boxes, 4, axis=-1)
    if source == "xyxy":
        return boxes
    if source == "yxyx":
        return ops.stack([b, a, d, c], axis=-1)
    if source == "xywh":
        return ops.stack([a, b, a + c, b + d], axis=-1)
    return ops.stack([a - c / 2.0, b - d / 2.0, a + c / 2.0, b + d / 2.0], axis=-1)


def _from_xyxy(boxes, target):
    x1, y1, x2, y2 = ops.unstack(boxes, 4, axis=-1)
    if target == "xyxy":
        return boxes
    if target == "yxyx":
        return ops.stack([y1, x1, y2, x2], axis=-1)
    if target == "xywh":
        return ops.stack([x1, y1, x2 - x1, y2 - y1], axis=-1)
    return ops.stack([(x1 + x2) / 2.0, (y1 + y2) / 2.0, x2 - x1, y2 - y1], axis=-1)


def convert_format(boxes, source, target):
    """Converts boxes `(..., 4)` between "xyxy", "yxyx", "xywh" and "center_xywh".

    Example:
    >>> np.asarray(convert_format(np.array([[10.0, 20.0, 30.0, 60.0]]), "xyxy", "center_xywh"))
    array([[20., 40., 20., 40.]], dtype=float32)
    """
    _check_format("source", source)
    _check_format("target", target)
    boxes = ops.cast(boxes, "float32")
    if source == target:
        return boxes
    return _from_xyxy(_to_xyxy(boxes, source), target)


def box_area(boxes):
    """Areas of xyxy boxes `(..., 4)`; degenerate boxes have area 0."""
    x1, y1, x2, y2 = ops.unstack(ops.cast(boxes, "float32"), 4, axis=-1)
    return ops.maximum(x2 - x1, 0.0) * ops.maximum(y2 - y1, 0.0)


def pairwise_iou(boxes1, boxes2):
    """IoU of every pair: xyxy `(..., N, 4)` and `(..., M, 4)` -> `(..., N, M)`.

    Pairs with an empty union (two degenerate boxes) get IoU 0.
    """
    boxes1 = ops.cast(boxes1, "float32")
    boxes2 = ops.cast(boxes2, "float32")
    a = ops.expand_dims(boxes1, -2)  # (..., N, 1, 4)
    b = ops.expand_dims(boxes2, -3)  # (..., 1, M, 4)
    top_left = ops.maximum(a[..., :2], b[..., :2])
    bottom_right = ops.minimum(a[..., 2:], b[..., 2:])
    size = ops.maximum(bottom_right - top_left, 0.0)
    intersection = size[..., 0] * size[..., 1]
    union = ops.expand_dims(box_area(boxes1), -1) + ops.expand_dims(box_area(boxes2), -2) - intersection
    return ops.where(union > 0.0, intersection / ops.maximum(union, EPSILON), 0.0)


def generalized_iou(boxes1, boxes2):
    """Element-wise generalised IoU (Rezatofighi et al., 2019) of xyxy boxes `(..., 4)`.

    `GIoU = IoU - (|C| - |A u B|) / |C|` with C the smallest enclosing box;
    in [-1, 1], 1 for identical boxes.
    """
    boxes1 = ops.cast(boxes1, "float32")
    boxes2 = ops.cast(boxes2, "float32")
    top_left = ops.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = ops.minimum(boxes1[..., 2:], boxes2[..., 2:])
    size = ops.maximum(bottom_right - top_left, 0.0)
    intersection = size[..., 0] * size[..., 1]
    union = box_area(boxes1) + box_area(boxes2) - intersection
    iou = intersection / ops.maximum(union, EPSILON)
    enclosing_size = ops.maximum(
        ops.maximum(boxes1[..., 2:], boxes2[..., 2:]) - ops.minimum(boxes1[..., :2], boxes2[..., :2]), 0.0
    )
    enclosing = enclosing_size[..., 0] * enclosing_size[..., 1]
    return iou - (enclosing - union) / ops.maximum(enclosing, EPSILON)


def encode_boxes(boxes, anchors, variance=BOX_VARIANCE):
    """Encodes xyxy `boxes` against xyxy `anchors` as `[dx, dy, dw, dh] / variance`.

    `anchors` is `(N, 4)` (or broadcastable to `boxes`); `boxes` is
    `(..., N, 4)`. Widths and heights are floored at a tiny epsilon so
    degenerate boxes give finite (if large) deltas.
    """
    boxes = convert_format(boxes, "xyxy", "center_xywh")
    anchors = convert_format(anchors, "xyxy", "center_xywh")
    anchor_size = ops.maximum(anchors[..., 2:], EPSILON)
    box_size = ops.maximum(boxes[..., 2:], EPSILON)
    deltas = ops.concatenate(
        [(boxes[..., :2] - anchors[..., :2]) / anchor_size, ops.log(box_size / anchor_size)], axis=-1
    )
    return deltas / ops.convert_to_tensor(variance, "float32")


def decode_boxes(deltas, anchors, variance=BOX_VARIANCE):
    """Inverse of `encode_boxes`: deltas `(..., N, 4)` and anchors `(N, 4)` -> xyxy boxes."""
    deltas = ops.cast(deltas, "float32") * ops.convert_to_tensor(variance, "float32")
    anchors = convert_format(anchors, "xyxy", "center_xywh")
    centers = deltas[..., :2] * anchors[..., 2:] + anchors[..., :2]
    sizes = ops.exp(ops.minimum(deltas[..., 2:], MAX_LOG_SCALE)) * anchors[..., 2:]
    return convert_format(ops.concatenate([centers, sizes], axis=-1), "center_xywh", "xyxy")


def clip_boxes(boxes, image_shape):
    """Clips xyxy boxes to an image of `image_shape = (height, width)`."""
    height, width = ops.cast(image_shape[0], "float32"), ops.cast(image_shape[1], "float32")
    x1, y1, x2, y2 = ops.unstack(ops.cast(boxes, "float32"), 4, axis=-1)
    return ops.stack(
        [ops.clip(x1, 0.0, width), ops.clip(y1, 0.0, height), ops.clip(x2, 0.0, width), ops.clip(y2, 0.0, height)],
        axis=-1,
    )
