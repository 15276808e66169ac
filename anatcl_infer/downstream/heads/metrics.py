"""Cross-validation metrics of out-of-fold predictions: regression, classification, Brier score."""

from __future__ import annotations

import numpy as np


def _regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import mean_absolute_error, r2_score, root_mean_squared_error

    r = float(np.corrcoef(y, pred)[0, 1]) if np.std(pred) > 0 and np.std(y) > 0 else float("nan")
    return {"mae": float(mean_absolute_error(y, pred)), "rmse": float(root_mean_squared_error(y, pred)),
            "r2": float(r2_score(y, pred)), "pearson_r": r}


def _classification_metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Metrics of class indices ``y`` against probabilities (N, C)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    pred = np.argmax(proba, axis=1)
    out = {"balanced_accuracy": float(balanced_accuracy_score(y, pred)), "accuracy": float(accuracy_score(y, pred))}
    try:
        if proba.shape[1] == 2:
            out["roc_auc"] = float(roc_auc_score(y, proba[:, 1]))
        else:
            out["roc_auc_ovr"] = float(roc_auc_score(y, proba, multi_class="ovr", labels=np.arange(proba.shape[1])))
    except ValueError:
        pass
    return out


def _brier(y: np.ndarray, proba: np.ndarray) -> float:
    """Multi-class Brier score (mean squared error of the probability vectors).

    Not ``sklearn.metrics.brier_score_loss``: it takes multi-class input only from scikit-learn
    1.7 (we support 1.6) and halves the binary score, which would change the recorded values.
    """
    onehot = np.eye(proba.shape[1])[y]
    return float(np.mean(np.sum((proba - onehot) ** 2, axis=1)))
