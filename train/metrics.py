"""Classification metrics in plain numpy, so Keras and ONNX models are scored by the same code."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from cells.contract import CLASSES, PARASITIZED
from cells.stats import ratio


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula, ties counted half."""
    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, patients: list[str]) -> dict:
    """Accuracy, sensitivity/specificity/precision/F1 for Parasitized, ROC AUC, confusion, per patient.

    `labels` are class indices in CLASSES order; `probabilities` is [N, len(CLASSES)].
    """
    labels = np.asarray(labels)
    predicted = np.argmax(probabilities, axis=1)
    is_pos, said_pos = labels == PARASITIZED, predicted == PARASITIZED
    tp = int(np.sum(is_pos & said_pos))
    fn = int(np.sum(is_pos & ~said_pos))
    fp = int(np.sum(~is_pos & said_pos))
    tn = int(np.sum(~is_pos & ~said_pos))
    precision, sensitivity = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1 = (
        2 * precision * sensitivity / (precision + sensitivity)
        if precision is not None and sensitivity is not None and precision + sensitivity > 0
        else None
    )
    confusion = np.zeros((len(CLASSES), len(CLASSES)), dtype=int)
    np.add.at(confusion, (labels, predicted), 1)
    per_patient: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for patient, correct in zip(patients, labels == predicted):
        per_patient[patient][0] += int(correct)
        per_patient[patient][1] += 1
    return {
        "images": int(len(labels)),
        "accuracy": float(np.mean(labels == predicted)) if len(labels) else None,
        "sensitivity": sensitivity,
        "specificity": ratio(tn, tn + fp),
        "precision": precision,
        "f1": f1,
        "roc_auc": roc_auc(is_pos, probabilities[:, PARASITIZED]),
        "positive_class": CLASSES[PARASITIZED],
        "confusion": {"classes": list(CLASSES), "rows_true_cols_predicted": confusion.tolist()},
        "counts": {"tp": tp, "fn": fn, "fp": fp, "tn": tn},
        "per_patient_accuracy": {
            patient: {"accuracy": correct / total, "images": total}
            for patient, (correct, total) in sorted(per_patient.items())
        },
    }
