"""Out-of-fold predictions and what is fitted on them.

:func:`_oof` collects the CV models' predictions on their held-out rows; :func:`_regression_summary`
turns them into a fold's CV metrics, brain-age bias correction (:mod:`.brain_age`) and conformal
quantiles (:mod:`.intervals`); :func:`_ensemble_summary` does the same for the mean of the folds'
predictions; :func:`_oof_frame` lays them out as :meth:`Head.predict` would (``Head.oof_``,
``anatcl fit-head --oof-out``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .brain_age import _apply_bias, fit_bias_correction
from .intervals import _conformal
from .metrics import _classification_metrics, _regression_metrics
from .rows import _ID_COLUMNS, _fold_mask, _rows_per_input

if TYPE_CHECKING:
    import pandas as pd

    from .head import Head


def _oof(cv_result: dict[str, Any], X: np.ndarray, kind: str) -> np.ndarray:
    """Out-of-fold decision values (N, K) from ``cross_validate(return_estimator=True, return_indices=True)``."""
    parts = [(test, est.decision_function(X[test]) if kind != "regression" else est.predict(X[test]))
             for est, test in zip(cv_result["estimator"], cv_result["indices"]["test"])]
    width = 1 if parts[0][1].ndim == 1 else parts[0][1].shape[1]
    oof = np.zeros((len(X), width), dtype=np.float64)
    for test, values in parts:
        oof[test] = values.reshape(len(test), width)
    return oof



def _regression_summary(y: np.ndarray, oof: np.ndarray, brain_age: bool) -> dict[str, Any]:
    """CV metrics, bias correction and conformal residual quantiles of out-of-fold predictions."""
    bias = fit_bias_correction(y, oof)
    out: dict[str, Any] = {"cv_metrics": _regression_metrics(y, oof), "bias_correction": bias, "conformal": _conformal(y - oof)}
    if brain_age:
        out["cv_metrics_corrected"] = _regression_metrics(y, _apply_bias(oof, bias))
        out["conformal_corrected"] = _conformal(y - _apply_bias(oof, bias))
    return out


def _ensemble_summary(head: Head, oof_by_fold: dict[Any, tuple[np.ndarray, np.ndarray, np.ndarray]], brain_age: bool) -> dict[str, Any]:
    """CV metrics (bias correction, conformal quantiles) of the mean of the folds' out-of-fold predictions."""
    order = sorted(set.intersection(*(set(k) for k, _, _ in oof_by_fold.values())))
    stacks, y_ref = [], np.zeros(0)
    for fold, (keys, y, oof) in oof_by_fold.items():
        pos = {k: i for i, k in enumerate(keys)}
        idx = np.array([pos[k] for k in order], dtype=np.int64)
        stacks.append(oof[idx] if head.kind == "regression" else head.folds[fold].proba(oof[idx], calibrated=False))
        y_ref = y[idx]
    mean = np.mean(np.stack(stacks), axis=0)
    out: dict[str, Any] = {"n": len(order), "method": "mean of the folds' predictions"}
    if head.kind == "regression":
        out.update(_regression_summary(y_ref, mean[:, 0], brain_age))
    else:
        out["cv_metrics"] = _classification_metrics(y_ref, mean)
    return out


def _oof_frame(head: Head, df: pd.DataFrame, y_all: pd.Series, keys: np.ndarray,
               oof_by_fold: dict[Any, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """The training inputs' out-of-fold predictions, with the columns :meth:`Head.predict` gives."""
    z_by_fold = [(fold, _fold_mask(df, fold), oof) for fold, (_, _, oof) in oof_by_fold.items()]
    age = y_all.astype("float64") if head.is_brain_age else None
    out = head._outputs(df, keys, z_by_fold, age, 0.9)
    if not head.is_brain_age:
        _, first = _rows_per_input(keys)
        out.insert(len([c for c in _ID_COLUMNS if c in out.columns]), head.target, y_all.to_numpy()[first])
    return out
