"""Brain-age bias correction: the line it fits, how it is applied, and the gap columns it gives.

Predicted age regresses to the cohort mean (old brains look younger, young ones older). The head
fits that bias as a line ``pred = slope*age + intercept`` on the training subjects' *out-of-fold*
predictions (in-sample predictions understate it) and corrects new predictions with
``pred_corrected = (pred - intercept)/slope``. Where each step happens:

* fitting the line: :func:`fit_bias_correction`, called per fold and for the fold ensemble by
  :func:`~anatcl_infer.downstream.heads.oof._regression_summary`, stored in ``head.json`` under
  ``bias_correction`` (with its own ``cv_metrics_corrected``/``conformal_corrected``);
* the stored Ridge head is the mean of the CV models that made those out-of-fold predictions
  (:func:`~anatcl_infer.downstream.heads.fitting._mean_of_models`), so the line describes the
  predictor that is applied;
* applying it: :func:`_apply_bias`, and :func:`_add_brain_age_columns` for the ``_corrected``,
  ``brain_age_gap`` and ``brain_age_gap_corrected`` columns of :meth:`Head.predict`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ...errors import HeadError

logger = logging.getLogger(__name__)

#: Target names that make a regression head a brain-age head by default.
_AGE_NAMES = {"age", "age_years", "chronological_age", "age_at_scan"}
#: How the correction is made, as recorded in ``head.json`` (regression heads).
BIAS_CORRECTION_METHOD = (
    "pred = slope*age + intercept fitted on out-of-fold predictions; "
    "pred_corrected = (pred - intercept)/slope; gap_corrected = pred_corrected - age"
)


def fit_bias_correction(age: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Fit the linear age bias ``pred = slope * age + intercept`` (use out-of-fold predictions).

    Example:
        >>> fit_bias_correction(np.array([20., 40, 60]), np.array([30., 40, 50]))
        {'slope': 0.5, 'intercept': 20.0}
    """
    age = np.asarray(age, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if age.size < 3 or np.ptp(age) == 0:
        raise HeadError("the age bias correction needs at least 3 training subjects of different ages")
    slope, intercept = np.polyfit(age, pred, 1)
    if slope <= 0.05:
        logger.warning(
            "predicted age barely follows true age (bias slope %.3f); the corrected gap will be noisy. "
            "Check the features and labels", slope,
        )
    return {"slope": float(slope), "intercept": float(intercept)}


def _apply_bias(pred: np.ndarray, bias: dict[str, float]) -> np.ndarray:
    """Bias-corrected predictions ``(pred - intercept)/slope``."""
    return (np.asarray(pred, dtype=np.float64) - bias["intercept"]) / bias["slope"]


def _add_brain_age_columns(out: dict[str, Any], *, target: str, pred_column: str, pred: np.ndarray,
                           bias: dict[str, float] | None, half: float | None, age: np.ndarray | None) -> None:
    """Add ``<pred_column>_corrected`` (``_lo``/``_hi`` with a half-width), the true age and the gaps to ``out``."""
    corrected = _apply_bias(pred, bias) if bias else np.full(len(pred), np.nan)
    out[f"{pred_column}_corrected"] = corrected
    if half is not None:
        out[f"{pred_column}_corrected_lo"], out[f"{pred_column}_corrected_hi"] = corrected - half, corrected + half
    if age is not None:
        out[target if target not in out else f"{target}_true"] = age
        out["brain_age_gap"] = pred - age
        out["brain_age_gap_corrected"] = corrected - age
