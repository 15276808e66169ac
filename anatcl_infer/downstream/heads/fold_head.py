"""The linear model of one fold (:class:`FoldHead`): standardise, project, and for classifiers calibrate.

Probabilities are calibrated the way ``CalibratedClassifierCV(method="sigmoid")`` does it: one
sigmoid per decision column (fitted on out-of-fold decision values at fit time, stored as
``calib_a``/``calib_b``), normalised to sum to one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class FoldHead:
    """The linear model of one fold: ``standardise(x) @ coef.T + intercept``.

    Attributes:
        fold: the model fold these weights apply to (``None`` for fold-less models).
        coef: (1, D) for regression and binary classification, (C, D) for multiclass.
        intercept: (1,) or (C,).
        scaler_mean, scaler_scale: (D,) standardisation fitted on the training features.
        info: this fold's ``head.json`` entry (model sha256, n, alpha, CV metrics, bias, conformal).
        calib_a, calib_b: sigmoid calibration ``p = 1/(1+exp(a*z+b))`` per decision column (classifiers).
    """

    fold: int | None
    coef: np.ndarray
    intercept: np.ndarray
    scaler_mean: np.ndarray
    scaler_scale: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    calib_a: np.ndarray | None = None
    calib_b: np.ndarray | None = None

    @property
    def key(self) -> str:
        """Tensor-name prefix in ``head.safetensors``."""
        return "fold_none" if self.fold is None else f"fold{self.fold}"

    def tensors(self) -> dict[str, np.ndarray]:
        """This fold's arrays under their ``head.safetensors`` names."""
        names = ["coef", "intercept", "scaler_mean", "scaler_scale"] + (["calib_a", "calib_b"] if self.calib_a is not None else [])
        return {f"{self.key}.{n}": np.ascontiguousarray(getattr(self, n), dtype=np.float64) for n in names}

    def decision(self, X: np.ndarray) -> np.ndarray:
        """Raw linear output, (N, K)."""
        Z = (np.asarray(X, dtype=np.float64) - self.scaler_mean) / self.scaler_scale
        return Z @ self.coef.T.astype(np.float64) + self.intercept.astype(np.float64)

    def proba(self, z: np.ndarray, *, calibrated: bool = True) -> np.ndarray:
        """Class probabilities (N, C) from decision values: the logistic's own, or sigmoid-calibrated.

        The calibration is ``CalibratedClassifierCV(method="sigmoid")``'s: one sigmoid per
        decision column fitted on out-of-fold decision values, normalised to sum to one.
        """
        from scipy.special import expit, softmax

        if not calibrated or self.calib_a is None:
            if z.shape[1] == 1:
                p1 = expit(z[:, 0])
                return np.stack([1.0 - p1, p1], axis=1)
            return softmax(z, axis=1)
        assert self.calib_b is not None
        p = expit(-(z * self.calib_a + self.calib_b))  # as sklearn's _SigmoidCalibration.predict
        if p.shape[1] == 1:
            return np.concatenate([1.0 - p, p], axis=1)
        total = p.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, p / total, 1.0 / p.shape[1])
