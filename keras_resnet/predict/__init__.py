"""Prediction from a `.keras` file, a run folder or an export, one module per task.

- `classification.predict_files`: top-k classes.
- `segmentation.predict_masks`: index masks and colour overlays at the image size.
- `detection.predict_boxes`: boxes drawn on the images, in image pixels.
- `tiling.predict_tiled`: a segmenter's or detector's output for one large
  image at its own resolution, by sliding windows of the model input
  (`predict_masks` / `predict_boxes` take `tile=` for the same).
"""

from keras_resnet.predict.classification import predict_files
from keras_resnet.predict.detection import predict_boxes
from keras_resnet.predict.segmentation import predict_masks
from keras_resnet.predict.tiling import predict_tiled

__all__ = ["predict_boxes", "predict_files", "predict_masks", "predict_tiled"]
