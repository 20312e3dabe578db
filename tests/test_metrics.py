import numpy as np
import pytest

from train.metrics import classification_metrics, roc_auc


def _probabilities(parasitized_scores):
    p = np.asarray(parasitized_scores, dtype=np.float32)
    return np.stack([p, 1 - p], axis=1)


def test_known_confusion_by_hand():
    # true: 4 Parasitized (0), 6 Uninfected (1); predicted: 3 TP, 1 FN, 2 FP, 4 TN.
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    scores = [0.9, 0.8, 0.7, 0.2, 0.6, 0.55, 0.1, 0.3, 0.4, 0.05]
    patients = ["P1"] * 5 + ["C2"] * 5
    m = classification_metrics(labels, _probabilities(scores), patients)
    assert m["counts"] == {"tp": 3, "fn": 1, "fp": 2, "tn": 4}
    assert m["confusion"]["rows_true_cols_predicted"] == [[3, 1], [2, 4]]
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    # pairs (pos, neg) ranked correctly: 0.9,0.8,0.7 beat all 6 negatives (18); 0.2 beats 0.1, 0.05 (2)
    assert m["roc_auc"] == pytest.approx(20 / 24)
    assert m["per_patient_accuracy"]["P1"] == {"accuracy": 3 / 5, "images": 5}
    assert m["per_patient_accuracy"]["C2"] == {"accuracy": 4 / 5, "images": 5}


def test_auc_ties_count_half_and_single_class_is_undefined():
    assert roc_auc(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert roc_auc(np.array([1, 1]), np.array([0.2, 0.7])) is None
