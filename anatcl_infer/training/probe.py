"""Validation linear probe: how well frozen features predict age and site.

REFERENCE §8's protocol on the validation subjects, computed by the package's
:func:`anatcl_infer.downstream.probe.linear_probe` (standardised features, Ridge with α chosen
from 10^[−2..2] nested in each fold → age MAE; balanced logistic regression,
stratified k-fold → site balanced accuracy), with the number of folds reduced to what
a small validation set allows. Only the validation set is embedded, so the probe
stays cheap enough to run every epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError

__all__ = ["linear_probe"]

logger = logging.getLogger(__name__)

def linear_probe(
    features: np.ndarray,
    ages: np.ndarray,
    sites: Sequence[int] | np.ndarray | None = None,
    *,
    folds: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """Cross-validated age MAE (Ridge) and site balanced accuracy (logistic regression).

    Args:
        features: (N, D) frozen features.
        ages: (N,) ages.
        sites: (N,) integer site labels (-1 = unknown, ignored); the site probe runs
            when at least two sites have ``>= 2`` subjects each.
        folds: number of CV folds (reduced to what the data allow).
        seed: shuffling seed of the folds.

    Returns:
        ``{"val_age_mae": ..., "val_site_bacc": ...}`` (the second only when computable).

    Example:
        >>> x = np.random.rand(20, 8); y = x[:, 0] * 50 + 20
        >>> sorted(linear_probe(x, y))
        ['val_age_mae']
    """
    from ..downstream.probe import linear_probe as probe

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(ages, dtype=np.float64)
    if len(x) < 4:
        raise ConfigError(f"the linear probe needs at least 4 validation subjects, got {len(x)}")
    k = max(2, min(folds, len(x) // 2))
    out = {"val_age_mae": probe(x, y, task="regression", cv=k, seed=seed).mean("mae")}
    if sites is not None:
        s = np.asarray(sites)
        known = s >= 0
        labels, counts = np.unique(s[known], return_counts=True)
        keep = np.isin(s, labels[counts >= 2]) & known
        labels, counts = np.unique(s[keep], return_counts=True)
        if len(labels) >= 2:
            ks = max(2, min(folds, int(counts.min())))
            result = probe(x[keep], s[keep], task="classification", cv=ks, seed=seed)
            out["val_site_bacc"] = result.mean("balanced_accuracy")
    return out
