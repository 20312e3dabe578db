"""Scoring a model (Keras in memory, a .keras file or an exported .onnx) on labelled cells."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from cells.contract import CLASSES
from cells.errors import BadInput, MissingInput
from cells.repository import released_path
from cells.runtime import OnnxModel, predict_in_batches
from train.data import CellSet, list_samples, load_cells
from train.metrics import classification_metrics
from train.plots import plot_confusion

Predictor = Callable[[np.ndarray], np.ndarray]


def keras_predictor(model, batch_size: int = 64) -> Predictor:
    """Batched calls on the model itself: cheaper than model.predict for repeated small inputs."""

    return lambda images: predict_in_batches(lambda batch: model(batch, training=False), images, batch_size)


def load_predictor(path: Path) -> Predictor:
    """A predictor for a saved model file, by its suffix."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"model not found: {path}")
    if path.suffix == ".onnx":
        return OnnxModel(path)
    if path.suffix in (".keras", ".h5"):
        import keras

        return keras_predictor(keras.models.load_model(path, compile=False))
    raise BadInput(f"unsupported model file {path.name} (expected .keras or .onnx)")


def write_evaluation(predictor: Predictor, cells: CellSet, out: Path, extra: dict | None = None) -> dict:
    """metrics.json and confusion.png for `cells` in `out`; returns the metrics."""
    probabilities = predictor(cells.images)
    metrics = classification_metrics(cells.labels, probabilities, cells.patients)
    metrics["skipped_files"] = [{"path": p, "reason": r} for p, r in cells.skipped]
    metrics.update(extra or {})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_confusion(metrics["confusion"]["rows_true_cols_predicted"], list(CLASSES), out / "confusion.png")
    return metrics


def evaluate(model_path: Path, data_dir: Path, out: Path) -> dict:
    """Metrics of a saved model on every image of a labelled folder."""
    predictor = load_predictor(model_path)
    cells = load_cells(list_samples(data_dir))
    return write_evaluation(predictor, cells, out, extra={"model": released_path(model_path), "data": released_path(data_dir)})
