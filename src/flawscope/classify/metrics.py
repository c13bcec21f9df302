"""Multi-class metrics of the classifier: macro F1 (the seed's score), accuracy, per label."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro F1 over the labels present in ``y_true`` or ``y_pred`` (scikit-learn's default),
    so a label absent from a validation fold and never predicted does not count as 0."""
    if len(y_true) == 0:
        return float("nan")
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]
) -> dict[str, Any]:
    """``macro_f1``, ``accuracy``, ``n``, ``per_label_f1`` / precision / recall / support
    (labels with support or predictions) and the confusion matrix over all ``labels``
    (rows: true, columns: predicted)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    present = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, labels=present, zero_division=0
    )
    cm = confusion_matrix(y_true, y_pred, labels=list(range(len(labels))))
    return {
        "macro_f1": macro_f1(y_true, y_pred),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
        "n": int(len(y_true)),
        "per_label_f1": {labels[i]: float(v) for i, v in zip(present, f)},
        "per_label_precision": {labels[i]: float(v) for i, v in zip(present, p)},
        "per_label_recall": {labels[i]: float(v) for i, v in zip(present, r)},
        "support": {labels[i]: int(v) for i, v in zip(present, s)},
        "labels": list(labels),
        "confusion_matrix": cm.tolist(),
    }
