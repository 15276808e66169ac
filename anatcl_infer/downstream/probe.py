"""Linear probing: the paper's evaluation protocol as one function.

Frozen features, standardised, then Ridge regression (alpha tuned over 10^-2..10^2 by
an inner cross-validation) for continuous targets, or logistic regression with
balanced class weights (C tuned likewise) for categorical ones, scored by k-fold
cross-validation: MAE and R² for regression; balanced accuracy and ROC-AUC for
classification.

Example::

    from anatcl_infer import extract_features
    from anatcl_infer.downstream.probe import linear_probe
    print(linear_probe(extract_features(paths), ages))   # MAE 4.10 ± 0.31 ...
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, HeadError

__all__ = ["ProbeResult", "linear_probe"]

logger = logging.getLogger(__name__)

_GRID = tuple(float(a) for a in np.logspace(-2, 2, 5))


@dataclass(frozen=True)
class ProbeResult:
    """Cross-validated scores of a linear probe.

    Attributes:
        task: ``"regression"`` or ``"classification"``.
        metrics: metric name -> list of per-fold values.
        n: number of samples.
        cv: number of folds.
        predictions: out-of-fold predictions (values, or class labels), in input order.
        params: per-fold chosen regularisation strength (alpha or C).
    """

    task: str
    metrics: dict[str, list[float]]
    n: int
    cv: int
    predictions: np.ndarray = field(repr=False)
    params: list[float] = field(default_factory=list)

    def mean(self, metric: str) -> float:
        """Mean over folds of one metric (e.g. ``"mae"``)."""
        return float(np.nanmean(self.metrics[metric]))

    def std(self, metric: str) -> float:
        """Standard deviation over folds of one metric."""
        return float(np.nanstd(self.metrics[metric]))

    def summary(self) -> dict[str, tuple[float, float]]:
        """metric -> (mean, sd)."""
        return {k: (self.mean(k), self.std(k)) for k in self.metrics}

    def __str__(self) -> str:
        parts = [f"{k} {m:.3f} ± {s:.3f}" for k, (m, s) in self.summary().items()]
        return f"{self.task} probe, n={self.n}, {self.cv}-fold CV: " + ", ".join(parts)


def _as_matrix(X: Any) -> np.ndarray:
    if hasattr(X, "columns"):
        from .features import FEATURE_PREFIX, feature_matrix

        if "fold" in X.columns and X["fold"].nunique() > 1:
            raise ConfigError(
                f"the features hold folds {sorted(X['fold'].dropna().unique().tolist())}; folds live in different "
                "embedding spaces: probe one fold at a time (df[df.fold == 0])"
            )
        if any(str(c).startswith(FEATURE_PREFIX) for c in X.columns):
            return feature_matrix(X).astype(np.float64)
        return np.asarray(X, dtype=np.float64)  # a plain numeric DataFrame
    arr = np.asarray(X, dtype=np.float64)
    if arr.ndim != 2:
        raise ConfigError(f"X must be 2-D (n_samples, n_features), got shape {arr.shape}")
    return arr


def _infer_task(y: np.ndarray) -> str:
    if y.dtype.kind in "fiu" and len(np.unique(y)) > 2 and not (y.dtype.kind in "iu" and len(np.unique(y)) <= 10):
        return "regression"
    return "classification"


def linear_probe(
    X: Any,
    y: Any,
    *,
    task: str = "auto",
    cv: int = 5,
    groups: Any = None,
    seed: int = 0,
) -> ProbeResult:
    """Score frozen features by cross-validated linear probing.

    Args:
        X: (N, D) features: an array, or a features DataFrame (its ``feat_`` columns
            are used). Use one fold's features at a time: folds live in different spaces.
        y: N targets (numbers for regression, labels for classification).
        task: ``"auto"`` (floats or many distinct integers -> regression), ``"regression"``
            or ``"classification"``.
        cv: number of outer folds (shuffled, stratified for classification).
        groups: optional N group ids (e.g. subjects with several scans) kept in one fold.
        seed: seed of the fold shuffling.

    Returns:
        :class:`ProbeResult` with per-fold metrics (``mae``, ``r2`` or
        ``balanced_accuracy``, ``roc_auc``), mean ± sd and out-of-fold predictions.

    Raises:
        HeadError: too few samples for ``cv`` folds, or a single class.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(60, 8)); y = X[:, 0] * 10 + 50
        >>> linear_probe(X, y).mean("r2") > 0.9
        True
    """
    from .._optional import require

    require("sklearn", "sklearn")

    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import (
        balanced_accuracy_score,
        mean_absolute_error,
        r2_score,
        roc_auc_score,
    )
    from sklearn.model_selection import (
        GridSearchCV,
        GroupKFold,
        KFold,
        StratifiedGroupKFold,
        StratifiedKFold,
    )
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from .heads import single_threaded

    Xm = _as_matrix(X)
    y_arr = np.asarray(y.to_numpy() if hasattr(y, "to_numpy") else y)
    if len(y_arr) != len(Xm):
        raise ConfigError(f"X has {len(Xm)} rows but y has {len(y_arr)} values")
    if task == "auto":
        task = _infer_task(y_arr)
    if task not in ("regression", "classification"):
        raise ConfigError(f"task must be 'auto', 'regression' or 'classification', got {task!r}")
    if cv < 2:
        raise ConfigError(f"cv must be >= 2, got {cv!r}")
    g = None if groups is None else np.asarray(groups)
    n = len(y_arr)
    if task == "regression":
        y_arr = y_arr.astype(np.float64)
        if n < 2 * cv:
            raise HeadError(f"{n} samples are too few for {cv}-fold CV with an inner alpha search; need at least {2 * cv}")
        outer = (GroupKFold(cv) if g is not None else KFold(cv, shuffle=True, random_state=seed))
        est, param = Ridge(), "ridge__alpha"
    else:
        classes, counts = np.unique(y_arr.astype(str), return_counts=True)
        if len(classes) < 2:
            raise HeadError(f"a single class {list(classes)}; classification needs at least two")
        if counts.min() < cv:
            raise HeadError(f"class {classes[np.argmin(counts)]!r} has {counts.min()} sample(s); {cv}-fold CV needs at least {cv} per class")
        outer = (StratifiedGroupKFold(cv, shuffle=True, random_state=seed) if g is not None
                 else StratifiedKFold(cv, shuffle=True, random_state=seed))
        est, param = LogisticRegression(class_weight="balanced", max_iter=5000), "logisticregression__C"
    pipe = make_pipeline(StandardScaler(), est)
    metrics: dict[str, list[float]] = {}
    params: list[float] = []
    preds = np.empty(n, dtype=np.float64 if task == "regression" else object)

    def add(name: str, value: float) -> None:
        metrics.setdefault(name, []).append(float(value))

    with single_threaded():
        for train, test in outer.split(Xm, y_arr if task == "classification" else None, g):
            if task == "classification":
                available = int(np.unique(y_arr[train].astype(str), return_counts=True)[1].min())
            else:
                available = len(train) // 2
            inner_splits = min(cv, available)
            if inner_splits >= 2:
                grid = GridSearchCV(pipe, {param: list(_GRID)}, cv=inner_splits,
                                    scoring="neg_mean_absolute_error" if task == "regression" else "balanced_accuracy")
                grid.fit(Xm[train], y_arr[train])
                params.append(float(grid.best_params_[param]))
            else:  # too few samples for an inner search: the default strength
                logger.debug("fold with %d usable samples per class: no inner search, %s=1", available, param)
                grid = clone(pipe).set_params(**{param: 1.0}).fit(Xm[train], y_arr[train])
                params.append(1.0)
            if task == "regression":
                p = grid.predict(Xm[test])
                preds[test] = p
                add("mae", mean_absolute_error(y_arr[test], p))
                add("r2", r2_score(y_arr[test], p) if len(test) > 1 else np.nan)
            else:
                p = grid.predict(Xm[test])
                preds[test] = p
                add("balanced_accuracy", balanced_accuracy_score(y_arr[test], p))
                proba = grid.predict_proba(Xm[test])
                model_classes = list(grid.classes_)
                try:
                    if len(model_classes) == 2:
                        add("roc_auc", roc_auc_score((y_arr[test] == model_classes[1]).astype(int), proba[:, 1]))
                    else:
                        add("roc_auc", roc_auc_score(y_arr[test], proba, multi_class="ovr", labels=model_classes))
                except ValueError:
                    add("roc_auc", np.nan)
    result = ProbeResult(task=task, metrics=metrics, n=n, cv=cv, predictions=preds, params=params)
    logger.info("%s", result)
    return result
