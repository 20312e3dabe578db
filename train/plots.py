"""The tutorial's two figures: training curves and the confusion heat map."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_curves(history: dict[str, list[float]], path: Path) -> None:
    """Loss and accuracy per epoch, training against validation."""
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, metric in zip(axes, ("loss", "accuracy")):
        axis.plot(epochs, history.get(metric, []), "o-", label=f"train {metric}")
        axis.plot(epochs, history.get(f"val_{metric}", []), "o-", label=f"validation {metric}")
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path) -> None:
    """2x2 heat map, each cell annotated with its count and its share of the true class."""
    matrix = np.asarray(confusion)
    row_totals = np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    figure, axis = plt.subplots(figsize=(5, 4.5))
    image = axis.imshow(matrix, cmap="Blues")
    for (row, col), count in np.ndenumerate(matrix):
        share = 100 * count / row_totals[row, 0]
        colour = "white" if count > matrix.max() / 2 else "black"
        axis.text(col, row, f"{count}\n{share:.1f}%", ha="center", va="center", color=colour, fontsize=12)
    axis.set_xticks(range(len(classes)), classes)
    axis.set_yticks(range(len(classes)), classes)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title("confusion matrix")
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
