"""PNG plots of training curves and confusion matrices (matplotlib, Agg)."""

import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from keras_resnet.atomic_files import atomic_output  # noqa: E402


def read_history_csv(path):
    """Reads a Keras CSVLogger file into {column: [floats]}, one row per epoch.

    Rows of an epoch that was run twice (a run killed and resumed) keep the
    last occurrence, so the history has each epoch once.
    """
    rows = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("epoch") in (None, "", "epoch"):
                continue
            rows[int(row["epoch"])] = row
    history = {}
    for epoch in sorted(rows):
        for key, value in rows[epoch].items():
            try:
                history.setdefault(key, []).append(float(value))
            except (TypeError, ValueError):
                continue
    return history


def save_figure(fig, path):
    """Writes a matplotlib figure as PNG, whole or not at all (`atomic_output`), and closes it."""
    try:
        with atomic_output(path) as temporary:
            fig.savefig(temporary, dpi=100, format="png")
    finally:
        plt.close(fig)


CLASSIFICATION_PANELS = (("loss", "loss"), ("top1", "top-1 accuracy"), ("learning_rate", "learning rate"))
SEGMENTATION_PANELS = (
    ("loss", "loss"), ("miou", "mean IoU"), ("pixel_accuracy", "pixel accuracy"), ("learning_rate", "learning rate"),
)
DETECTION_PANELS = (
    ("loss", "loss"), ("mAP", "COCO mAP@[.5:.95]"), ("AP50", "COCO AP50"), ("learning_rate", "learning rate"),
)


def plot_history(history, path, title="training", panels=CLASSIFICATION_PANELS, best_key="top1"):
    """Per-epoch curves, train vs validation, one panel per history key.

    Args:
        history: `{column: [values]}` as read by `read_history_csv`.
        path: PNG to write.
        title: figure title.
        panels: `(history key, panel title)` pairs; keys absent from the
            history (as `key` and as `val_<key>`) are skipped.
        best_key: annotate the best `val_<best_key>` epoch, or None.
    """
    epochs = [int(e) + 1 for e in history.get("epoch", [])]
    panels = [(k, t) for k, t in panels if k in history or f"val_{k}" in history]
    if not epochs or not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        if key in history:
            ax.plot(epochs, history[key], marker="o", label=f"train {key}")
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], marker="o", label=f"val {key}")
            if key == best_key:
                best = int(np.argmax(history[f"val_{key}"]))
                ax.annotate(
                    f"best {history[f'val_{key}'][best]:.4f}",
                    (epochs[best], history[f"val_{key}"][best]),
                    textcoords="offset points", xytext=(-40, -20),
                )
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def plot_confusion_matrix(matrix, class_names, path, title="confusion matrix (validation)"):
    """Row-normalised confusion matrix with counts, true classes on rows."""
    matrix = np.asarray(matrix)
    normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(5, 0.6 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(class_names) <= 30:
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if normalised[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
    return path
