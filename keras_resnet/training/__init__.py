"""Training: one train/evaluate runner for every task.

- `runner`: `train_from_config` / `evaluate_from_config`, dispatching to a task by the registry.
- `engine`: strategy, precision, optimizer, fit with resume, history and plots, run files.
- `backbones`: the recipe's backbone and task model: preset, normalisation, pretrained weights, frozen stages.
- `schedules`: `WarmupSchedule` (warm-up + cosine / one-cycle / constant).
- `plots`: training curves and confusion matrices.
- `classification`, `segmentation`, `detection`: one module per task.
"""
