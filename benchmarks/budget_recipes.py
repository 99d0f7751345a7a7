"""Which network and recipe give the best Fashion-MNIST top-1 in the main job's budget (issue 31)?

The main job trains for `train.time_budget_minutes` (20) on whatever machine it
gets; on the slow CPU kind (2 AVX2 cores, float32) the default recipe's step
takes ~0.87 s idle and the budget buys ~1070 of its steps. A cheaper network
gets more steps in the same time, so recipes are compared at **equal time on
that machine**, in two phases:

* `--phase cost`: each candidate (the default recipe with `--set`-style
  overrides) is built and compiled exactly as training does
  (`classification.build_classifier`, `classification._compile`) and its
  `fit` train step timed on a cached batch (`step_timer.timed_fit`), in
  interleaved rounds in one process, float32; printed: seconds per step and
  images, and the cost of a step relative to the default recipe's (median over
  rounds of the per-round ratio). Run it under `ONEDNN_MAX_CPU_ISA=AVX2` for
  the slow kind's kernels.
* `--phase train`: each candidate is trained by the CLI (`keras-resnet train`,
  then `keras-resnet evaluate` on the 10,000 test images) for
  `--reference-steps / cost` steps (the cost from `--cost name=ratio`
  arguments printed by the cost phase), laid out as the time budget lays them
  out (whole passes of shuffled data, the last epochs shortened evenly), in
  float32 with a fixed seed. Accuracy does not depend on the machine's load,
  so this phase can run beside other work.

    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/budget_recipes.py --phase cost
    python benchmarks/budget_recipes.py --phase train --cost default=1 quarter=0.4 --candidates default quarter
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # step_timer, utilisation (imported by the cost phase only)
RECIPE = ROOT / "tasks/classification/fashion_mnist_resnet18_narrow.yaml"
TRAIN_IMAGES = 60000

# name -> overrides of the default recipe (keras-resnet train --set ...)
CANDIDATES = {
    "default": [],
    "no_erasing": ["data.augment.random_erasing=0.0"],
    "batch64": ["data.batch_size=64", "train.learning_rate=0.05"],
    "width_3_8": ["model.backbone_args.stem_width=24", "model.backbone_args.stackwise_num_filters=[24,48,96,192]"],
    "quarter": ["model.backbone_args.stem_width=16", "model.backbone_args.stackwise_num_filters=[16,32,64,128]"],
    "resnet10": ["model.backbone_args.stackwise_num_blocks=[1,1,1,1]"],
    "resnet10_3_8": ["model.backbone_args.stackwise_num_blocks=[1,1,1,1]", "model.backbone_args.stem_width=24",
                     "model.backbone_args.stackwise_num_filters=[24,48,96,192]"],
    "quarter_b64": ["model.backbone_args.stem_width=16", "model.backbone_args.stackwise_num_filters=[16,32,64,128]",
                    "data.batch_size=64", "train.learning_rate=0.05"],
    "quarter_no_erasing": ["model.backbone_args.stem_width=16",
                           "model.backbone_args.stackwise_num_filters=[16,32,64,128]",
                           "data.augment.random_erasing=0.0"],
    "quarter_lr02": ["model.backbone_args.stem_width=16", "model.backbone_args.stackwise_num_filters=[16,32,64,128]",
                     "train.learning_rate=0.2"],
    "resnet10_quarter": ["model.backbone_args.stackwise_num_blocks=[1,1,1,1]", "model.backbone_args.stem_width=16",
                         "model.backbone_args.stackwise_num_filters=[16,32,64,128]"],
    "resnet10_quarter_no_erasing": ["model.backbone_args.stackwise_num_blocks=[1,1,1,1]",
                                    "model.backbone_args.stem_width=16",
                                    "model.backbone_args.stackwise_num_filters=[16,32,64,128]",
                                    "data.augment.random_erasing=0.0"],
    "resnet10_quarter_light": ["model.backbone_args.stackwise_num_blocks=[1,1,1,1]", "model.backbone_args.stem_width=16",
                               "model.backbone_args.stackwise_num_filters=[16,32,64,128]",
                               "data.augment.random_erasing=0.0", "train.label_smoothing=0.0",
                               "train.weight_decay=1.0e-4"],
    "width_5_16": ["model.backbone_args.stem_width=20", "model.backbone_args.stackwise_num_filters=[20,40,80,160]"],
    "default_xla": ["train.jit_compile=true"],
    "quarter_xla": ["model.backbone_args.stem_width=16", "model.backbone_args.stackwise_num_filters=[16,32,64,128]",
                    "train.jit_compile=true"],
}


def load(overrides):
    from keras_resnet_settings.loading import load_config

    return load_config(RECIPE, overrides)


def build(overrides, rng):
    """(model, cached synthetic data, batch) of a candidate: `utilisation.build_recipe` with its overrides, float32."""
    from utilisation import build_recipe

    batch = load(overrides).data.batch_size
    model, data = build_recipe(batch, rng, [*overrides, "train.mixed_precision=float32"])
    return model, data, batch


def phase_cost(args):
    import keras
    import numpy as np
    from step_timer import timed_fit

    from keras_resnet.models.resnet.analysis import count_macs

    keras.mixed_precision.set_global_policy("float32")
    rng = np.random.default_rng(0)
    names = args.candidates
    if "default" not in names:
        names = ["default", *names]
    benches = {}
    for name in names:
        model, data, batch = build(CANDIDATES[name], rng)
        timed_fit(model, data, 3, batch)  # trace and warm up
        benches[name] = {"model": model, "data": data, "batch": batch, "macs": count_macs(model), "times": []}
    print(f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}; load {os.getloadavg()[0]:.2f}",
          flush=True)
    for round_index in range(args.rounds):
        for name in names:
            bench = benches[name]
            rate, _ = timed_fit(bench["model"], bench["data"], args.steps, bench["batch"])
            bench["times"].append(bench["batch"] / rate)
        print(f"round {round_index + 1}: " + ", ".join(f"{n} {benches[n]['times'][-1]:.3f} s" for n in names),
              flush=True)
    base = benches["default"]
    print(f"load after {os.getloadavg()[0]:.2f}")
    print("| candidate | MMACs/image | batch | s/step (median) | ms/image | cost per image vs default | "
          "cost per step (equal-time steps = reference / this) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    costs = {}
    for name in names:
        bench = benches[name]
        per_image = statistics.median(t / bench["batch"] / (b / base["batch"])
                                      for t, b in zip(bench["times"], base["times"]))
        per_step = statistics.median(t / b for t, b in zip(bench["times"], base["times"]))
        costs[name] = round(per_step, 3)
        print(f"| {name} | {bench['macs'] / 1e6:.1f} | {bench['batch']} | {statistics.median(bench['times']):.3f} | "
              f"{statistics.median(bench['times']) / bench['batch'] * 1000:.2f} | {per_image:.3f} | {per_step:.3f} |")
    print("--cost " + " ".join(f"{n}={c}" for n, c in costs.items()))


def run_length(total_steps, full_steps):
    """`(epochs, steps per epoch)`: whole passes where they fit, the steps spread evenly over the epochs."""
    epochs = max(1, math.ceil(total_steps / full_steps))
    return epochs, max(1, round(total_steps / epochs))


def phase_train(args):
    costs = dict(item.split("=") for item in args.cost)
    results = []
    for name in args.candidates:
        overrides = CANDIDATES[name]
        cfg = load(overrides)
        full_steps = TRAIN_IMAGES // cfg.data.batch_size
        total = args.reference_steps / float(costs[name])
        epochs, steps = run_length(total, full_steps)
        out = Path(args.runs) / name
        settings = [*overrides, f"train.epochs={epochs}", f"train.steps_per_epoch={steps}",
                    f"train.warmup_epochs={round(cfg.train.warmup_epochs * epochs / cfg.train.epochs, 4)}",
                    "train.time_budget_minutes=null", "train.mixed_precision=float32", f"train.seed={args.seed}",
                    f"output_dir={out}"]
        start = time.time()
        cli = [str(Path(sys.executable).parent / "keras-resnet")]
        subprocess.run([*cli, "train", str(RECIPE), "--set", *settings], check=True,
                       stdout=subprocess.DEVNULL if not args.verbose else None)
        subprocess.run([*cli, "evaluate", str(RECIPE), "--set", *settings], check=True,
                       stdout=subprocess.DEVNULL)
        metrics = json.loads((out / "metrics.json").read_text())
        row = {"candidate": name, "cost": float(costs[name]), "epochs": epochs, "steps_per_epoch": steps,
               "images_seen": epochs * steps * cfg.data.batch_size, "top1": metrics["top1"],
               "minutes_here": round((time.time() - start) / 60, 1)}
        results.append(row)
        print(json.dumps(row), flush=True)
    print("| candidate | step cost | epochs x steps | images seen | test top-1 |")
    print("|---|---:|---|---:|---:|")
    for row in results:
        print(f"| {row['candidate']} | {row['cost']:.3f} | {row['epochs']} x {row['steps_per_epoch']} | "
              f"{row['images_seen']} | {row['top1']:.4f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phase", choices=["cost", "train"], required=True)
    parser.add_argument("--candidates", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cost", nargs="+", default=[], help="name=ratio from the cost phase")
    parser.add_argument("--reference-steps", type=float, default=1070,
                        help="steps of the default recipe the budget buys on the slow machine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default=os.path.join(tempfile.gettempdir(), "budget_recipes"))
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    phase_cost(args) if args.phase == "cost" else phase_train(args)


if __name__ == "__main__":
    main()
