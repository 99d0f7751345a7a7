"""Quantization-aware training (QAT) for Keras 3: fake quantization, BatchNorm folding, int8 export ranges.

- `quantize_aware(model)`: a trainable copy of a task model (classifier,
  segmenter, detector) with BatchNorm folded into the convolutions and
  fake quantization where TFLite's int8 kernels quantize (weights per
  output channel, symmetric; activations per tensor, asymmetric, ranges
  tracked by moving average). It serialises to `.keras` and exports to an
  int8 TFLite model with the trained ranges, without calibration data.
- `is_quantize_aware(model)`: whether a model carries fake quantization.
"""

from keras_resnet.quantization.layers import (
    QUANTIZATION_LAYERS,
    FakeQuant,
    QuantizedConv2D,
    QuantizedDense,
    QuantizedFPN,
    QuantizedNormalization,
    is_quantize_aware,
)
from keras_resnet.quantization.transform import (
    QuantizeAwareResNetClassifier,
    QuantizeAwareResNetSegmenter,
    QuantizeAwareRetinaNetDetector,
    quantize_aware,
)

__all__ = [
    "QUANTIZATION_LAYERS",
    "FakeQuant",
    "QuantizeAwareResNetClassifier",
    "QuantizeAwareResNetSegmenter",
    "QuantizeAwareRetinaNetDetector",
    "QuantizedConv2D",
    "QuantizedDense",
    "QuantizedFPN",
    "QuantizedNormalization",
    "is_quantize_aware",
    "quantize_aware",
]
