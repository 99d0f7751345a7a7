"""RetinaNet on any `ResNetBackbone`.

- `boxes`: box formats, IoU, anchor-relative encoding (xyxy pixels).
- `anchors`: `AnchorGenerator`, the anchor grid of an input size.
- `encoder`: `RetinaNetLabelEncoder`, boxes to per-anchor targets.
- `losses`: `RetinaNetLoss` (focal + smooth-L1 or GIoU).
- `detector`: `RetinaNetDetector`, backbone + FPN + shared heads.
- `decoder`: `DetectionDecoder`, raw outputs to boxes with class-wise NMS.
- `evaluation`: COCO mAP with pycocotools, boxes mapped back to image pixels.
"""

from keras_resnet.models.retinanet.anchors import AnchorGenerator
from keras_resnet.models.retinanet.boxes import (
    BOX_FORMATS,
    BOX_VARIANCE,
    box_area,
    clip_boxes,
    convert_format,
    decode_boxes,
    encode_boxes,
    generalized_iou,
    pairwise_iou,
)
from keras_resnet.models.retinanet.decoder import DetectionDecoder
from keras_resnet.models.retinanet.detector import RetinaNetDetector
from keras_resnet.models.retinanet.encoder import RetinaNetLabelEncoder
from keras_resnet.models.retinanet.losses import (
    RetinaNetLoss,
    sigmoid_focal_loss,
    smooth_l1_loss,
)

__all__ = [
    "AnchorGenerator",
    "DetectionDecoder",
    "RetinaNetDetector",
    "RetinaNetLabelEncoder",
    "RetinaNetLoss",
    "sigmoid_focal_loss",
    "smooth_l1_loss",
    # boxes.py: formats, IoU, encoding
    "BOX_FORMATS",
    "BOX_VARIANCE",
    "box_area",
    "clip_boxes",
    "convert_format",
    "decode_boxes",
    "encode_boxes",
    "generalized_iou",
    "pairwise_iou",
]
