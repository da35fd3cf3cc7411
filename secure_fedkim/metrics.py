"""Metrics for yes/no tasks: accuracy, precision, recall, F1 and MCC (scikit-learn), plus ROC AUC."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, precision_score, recall_score, roc_auc_score


def binary_metrics(y_true, y_pred, y_score=None) -> dict[str, float]:
    y_true, y_pred = np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int)
    out = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(recall_score(y_true, y_pred, zero_division=0)),
        "f1": float(f1_score(y_true, y_pred, zero_division=0)),
        "mcc": float(matthews_corrcoef(y_true, y_pred)) if len(set(y_true)) > 1 else 0.0,
        "n": int(len(y_true)),
    }
    if y_score is not None and len(set(y_true)) > 1:
        out["auroc"] = float(roc_auc_score(y_true, np.asarray(y_score)))
    return out
