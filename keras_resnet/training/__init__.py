"""Training: one train/evaluate runner for every task.

- `runner`: `train_from_config` / `evaluate_from_config`, dispatching to a task by the registry.
- `engine`: strategy, precision, optimizer, fit with resume, history and plots.
- `schedules`: `WarmupSchedule` (warm-up + cosine / one-cycle / constant).
- `classification`, `segmentation`, `detection`: one module per task.
"""
