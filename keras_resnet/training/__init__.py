"""Training: one train/evaluate runner for every task.

- `runner`: `train_from_config` / `evaluate_from_config`, dispatching to a task by the registry.
- `preflight`: recipe checks the tasks share, the run's announcement, epoch sizes.
- `devices`: strategy, precision, TF_CONFIG, `start_run`; `optimizers`: `make_optimizer`.
- `fit`: `fit_run` (checkpoints, history, TensorBoard, resume); `run_files`: recipe.yaml, run.json, summary.
- `run_lock`: the run folder's lock and resume rules; `divergence`: the NaN/inf stop;
  `time_budget`: the epochs that fit in `train.time_budget_minutes`.
- `backbones`: a recipe's backbone, pretrained weights, frozen stages.
- `schedules`: `WarmupSchedule` (warm-up + cosine / one-cycle / constant).
- `plots`: training curves and confusion matrices.
- `classification`, `segmentation`, `detection`: one module per task.

`keras_resnet.training.train_from_config` and `evaluate_from_config` (their
path before the restructuring) still work: they are loaded from `runner` on
first use, so `import keras_resnet` (which registers `WarmupSchedule` from
`schedules`) does not load the training code.
"""

RUNNER_NAMES = ("train_from_config", "evaluate_from_config")


def __getattr__(name):
    if name in RUNNER_NAMES:
        from keras_resnet.training import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'keras_resnet.training' has no attribute {name!r}")
