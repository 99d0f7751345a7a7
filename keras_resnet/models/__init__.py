"""Models, a folder per family: `resnet` (backbone, presets, classifier),
`retinanet` (detector, anchors, boxes, encoder, decoder, losses, COCO
evaluation) and `segmentation` (segmenter, losses, metrics).
"""
