"""Metrics for yes/no tasks: accuracy, precision, recall, F1 and MCC (scikit-learn), plus ROC AUC."""

from __future__ import annotations

import numpy as np


def binary_metrics(y_true, y_pred, y_score=None) -> dict[str, float]:
    # imported here: scikit-learn costs 2 s of start-up that `budget` (which imports training) never needs
    from sklearn.metrics import (accuracy_score, f1_score, matthews_corrcoef, precision_score, recall_score,
                                 roc_auc_score)

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


def bootstrap_aurocs(y_true, scores: list, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """AUROC of each score vector on the same `n_boot` bootstrap resamples of the test records: [n_boot, k].

    Resampling is stratified (positives and negatives each drawn with replacement from their own class,
    so every resample has both classes) and shared by all score vectors, so differences between models
    are paired. A resample is a vector of record counts; the AUROC of counts is the Mann-Whitney
    statistic with those weights (ties count one half), the same as roc_auc_score on the repeated records.
    """
    y = np.asarray(y_true).astype(int)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("a bootstrap AUROC needs both classes in the test set")
    rng = np.random.default_rng(seed)
    w = np.zeros((n_boot, len(y)))
    w[:, pos] = rng.multinomial(len(pos), np.full(len(pos), 1.0 / len(pos)), size=n_boot)
    w[:, neg] = rng.multinomial(len(neg), np.full(len(neg), 1.0 / len(neg)), size=n_boot)
    return np.stack([_weighted_auroc(y, np.asarray(s, dtype=np.float64), w) for s in scores], axis=1)


def _weighted_auroc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    order = np.argsort(s, kind="stable")
    s, y, w = s[order], y[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first record of each distinct score
    value_of = np.cumsum(np.r_[True, s[1:] != s[:-1]]) - 1  # each record's distinct-score index
    neg_at = np.add.reduceat(w * (y == 0), starts, axis=1)  # negative weight at each distinct score
    neg_below = np.cumsum(neg_at, axis=1) - neg_at
    wins = neg_below[:, value_of] + 0.5 * neg_at[:, value_of]
    pos_w = w * (y == 1)
    return (pos_w * wins).sum(axis=1) / (pos_w.sum(axis=1) * neg_at.sum(axis=1))


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap samples."""
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def verdict(difference: tuple[float, float]) -> str:
    """From the 95% interval of (model A's AUROC - model B's) on the same test records."""
    lo, hi = difference
    if lo > 0:
        return "beats"
    if hi < 0:
        return "worse"
    return "no clear difference"
