"""Prediction intervals (split-conformal) from the out-of-fold absolute residuals.

At fit time :func:`_conformal` stores the residuals' quantiles at :data:`CONFORMAL_LEVELS`
in ``head.json`` (``conformal``, and ``conformal_corrected`` for brain-age heads); at
prediction :func:`_halfwidth` reads the half-width for a coverage off them, and
:meth:`Head.predict` adds ``<target>_pred_lo``/``_hi`` = prediction -/+ that half-width.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: Levels at which the out-of-fold absolute residuals' quantiles are stored.
CONFORMAL_LEVELS: tuple[float, ...] = tuple(float(v) for v in np.round(np.r_[np.arange(0.5, 0.99, 0.005), 0.99, 0.995, 0.999, 1.0], 4))
#: How the intervals are made, as recorded in ``head.json`` (regression heads).
INTERVAL_METHOD = "split-conformal: pred +/- the ceil((n+1)*coverage)/n quantile of the out-of-fold absolute residuals"


def _conformal(residuals: np.ndarray) -> dict[str, Any]:
    """Quantiles of the absolute out-of-fold residuals at :data:`CONFORMAL_LEVELS` (split-conformal)."""
    r = np.abs(np.asarray(residuals, dtype=np.float64))
    q = np.quantile(r, CONFORMAL_LEVELS, method="higher")
    return {"n": int(r.size), "levels": list(CONFORMAL_LEVELS), "abs_residual_quantiles": [float(v) for v in q]}


def _halfwidth(conformal: dict[str, Any], coverage: float) -> float:
    """Interval half-width at ``coverage``: the ceil((n+1)c)/n empirical quantile of the residuals."""
    n = int(conformal["n"])
    level = min(1.0, float(np.ceil((n + 1) * coverage)) / n)
    if (n + 1) * coverage > n:
        logger.warning("%d out-of-fold residuals are too few for a %.1f%% interval; using their maximum", n, 100 * coverage)
    return float(np.interp(level, conformal["levels"], conformal["abs_residual_quantiles"]))
