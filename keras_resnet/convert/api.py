"""One conversion, as the `keras-resnet convert` command runs it: the model and what to report."""

import os

import numpy as np

from keras_resnet.convert import torch_retinanet
from keras_resnet.convert.keras_applications import (
    KerasApplicationsWeights,
    from_keras_applications,
)
from keras_resnet.convert.torch import from_torch, read_torch_weights, source_parity
from keras_resnet.convert.torch_segmentation import (
    TorchSegmentationWeights,
    report_lines,
    segmenter_from_torch,
)
from keras_resnet.models.resnet.classifier import ResNetClassifier
from keras_resnet.models.retinanet.detector import RetinaNetDetector
from keras_resnet.models.segmentation.segmenter import ResNetSegmenter
from keras_resnet_settings.errors import ConversionError


def convert_source(source, arch=None, include_top=None, num_classes=None, mean=None, std=None):
    """Converts a weight file (torchvision/timm state dict or keras.applications `.h5`) to our model.

    torchvision DeepLabV3/FCN state dicts give a `ResNetSegmenter` (`torch_segmentation.segmenter_from_torch`),
    RetinaNet state dicts a `RetinaNetDetector` (`torch_retinanet.detector_from_torch`).

    Returns:
        `(model, report)`: report lines saying what was inferred, the
        parameter count and, when torch and torchvision/timm import, the
        parity measured against the source model on random images.
    """
    path = os.fspath(source)
    if path.lower().endswith(".h5"):
        if num_classes is not None or include_top is not None or mean is not None or std is not None:
            raise ConversionError(
                "--num-classes, --include-top/--no-top, --mean and --std apply to torchvision/timm files only."
            )
        weights = KerasApplicationsWeights(path, arch)
        model = from_keras_applications(weights, include_preprocessing=True, classifier_activation=None)
        report = [f"source: {weights.describe()}", "parity: not measured for keras.applications files"]
    elif isinstance(weights := read_torch_weights(path, arch), TorchSegmentationWeights):  # torchvision DeepLabV3/FCN
        model = segmenter_from_torch(weights, include_top=include_top, num_classes=num_classes, mean=mean, std=std)
        report = report_lines(model, weights)
    elif isinstance(weights, torch_retinanet.TorchRetinaNetWeights):  # torchvision RetinaNet
        if include_top is not None:
            raise ConversionError("--include-top/--no-top apply to classifiers and segmenters, not to a RetinaNet file.")
        model = torch_retinanet.detector_from_torch(weights, num_classes=num_classes, mean=mean, std=std)
        report = torch_retinanet.report_lines(model, weights)
    else:
        model = from_torch(weights, include_top=include_top, num_classes=num_classes, mean=mean, std=std)
        report = [f"source: {weights.describe()}"]
        if isinstance(model, ResNetClassifier) and model.num_classes != weights.num_classes:
            report.append(f"head: a fresh {model.num_classes}-class head (the source's fc is not used)")
        report.append(_parity_line(model, weights))
    report.insert(1, _model_line(model))
    trainable = sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)
    report.insert(2, f"parameters: {model.count_params():,} ({trainable:,} trainable)")
    return model, report


def _model_line(model):
    height, width, channels = model.input_shape[1:]
    if isinstance(model, ResNetSegmenter):
        norm = model.preprocessing
        return (
            f"model: ResNetSegmenter {model.name} (head {model.head!r}, output stride {model.backbone.output_stride}), "
            f"{model.num_classes} classes (logits), input {height}x{width}x{channels} raw pixels 0-255 "
            f"(mean {norm.mean}, std {norm.std} after x{norm.scale:.6g})"
        )
    if isinstance(model, RetinaNetDetector):
        norm, decoder = model.preprocessing, model.make_decoder()
        return (
            f"model: RetinaNetDetector {model.name}, {model.num_classes} classes, {model.num_anchors} anchors, input "
            f"{height}x{width}x{channels} raw pixels 0-255 (mean {norm.mean}, std {norm.std} after x{norm.scale:.6g});"
            f" decoder: score > {decoder.score_threshold}, top {decoder.pre_nms_top_k}"
            f"{' per level' if decoder.top_k_per_level else ''}, NMS {decoder.iou_threshold}, "
            f"{decoder.max_detections} detections"
        )
    if not isinstance(model, ResNetClassifier):
        return f"model: ResNetBackbone {model.name}, input {height}x{width}x{channels} normalised images"
    norm = model.preprocessing
    pixels = f"raw pixels 0-255 (mean {norm.mean}, std {norm.std} after x{norm.scale:.6g})" if norm else "normalised"
    activation = model.activation or "logits"
    size = f"{height}x{width}x{channels}"
    return f"model: ResNetClassifier, {model.num_classes} classes ({activation}), input {size} {pixels}"


def _parity_line(model, weights):
    if isinstance(model, ResNetClassifier) and model.num_classes != weights.num_classes:
        model = model.backbone  # a fresh head: compare the features
    result, name = source_parity(model, weights)
    if result is None:
        return f"parity: not measured ({name})"
    return (
        f"parity with {name}: max abs diff of the {result['output']} {result['max_abs_diff']:.3g} "
        f"(relative {result['max_rel_diff']:.3g}) on {result['images']}"
    )


__all__ = ["convert_source"]
