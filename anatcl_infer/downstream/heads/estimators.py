"""The scikit-learn pieces of a head's fit, shared with :mod:`~anatcl_infer.downstream.probe`.

``make_pipeline(StandardScaler(), Ridge | LogisticRegression)``, the strength grid 10^[-2..2]
(the OpenBHB protocol) and its parameter name, the scoring that picks the strength, and the
seeded CV splitters that keep the sessions of one subject in one fold.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Ridge alphas (and logistic C values) searched by cross-validation: 10^-2 ... 10^2.
ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-2, 2, 5))


def _splitter(kind: str, n_splits: int, seed: int, grouped: bool) -> Any:
    """The CV splitter: shuffled with ``seed``; groups (subjects) never split across folds."""
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    if kind == "regression":
        return GroupKFold(n_splits, shuffle=True, random_state=seed) if grouped else KFold(n_splits, shuffle=True, random_state=seed)
    if grouped:
        return StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)
    return StratifiedKFold(n_splits, shuffle=True, random_state=seed)


def single_threaded() -> Any:
    """Context limiting BLAS/OpenMP to one thread: small linear fits are faster without threads.

    On a busy machine, multi-threaded BLAS on (n, 512) problems spends most of its time
    waiting for cores (measured here: 5-10x slower than one thread).
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


def _pipeline(kind: str, strength: float = 1.0) -> Any:
    """``StandardScaler`` + ``Ridge(alpha)`` or balanced ``LogisticRegression(C)``; the grid parameter name."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "regression":
        est = Ridge(alpha=strength)
    else:
        est = LogisticRegression(C=strength, class_weight="balanced", max_iter=5000)
    return Pipeline([("scaler", StandardScaler()), ("model", est)])


def _grid_param(kind: str) -> str:
    return "model__alpha" if kind == "regression" else "model__C"


def _scoring(kind: str) -> str:
    return "neg_mean_absolute_error" if kind == "regression" else "balanced_accuracy"

