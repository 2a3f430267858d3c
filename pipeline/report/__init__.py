"""What the pipeline shows people about a model: metrics, figures and drawn detections.

- ``coco_eval``: COCO-format ground truth and detections, and COCO box mAP through the reference tools
  (the ``evaluate`` stage).
- ``plots``: PNG figures: precision-recall curves, a grid of detections, a gradient-norm heatmap
  (``evaluate`` and the training run's gradient statistics).
- ``scoring``: a model over every image of a split (or one rank's slice of it) and the VOC and COCO
  scores of its detections: the ``evaluate`` stage and validation during training use this one code.
- ``drawing``: detections drawn onto an image with PIL (the ``predict`` stage).

Import each name from the module that defines it; this package re-exports nothing.
"""
