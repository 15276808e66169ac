"""Linear probing: the paper's evaluation protocol as one function.

Frozen features, standardised, then Ridge regression (alpha tuned over 10^-2..10^2 by
an inner cross-validation) for continuous targets, or logistic regression with
balanced class weights (C tuned likewise) for categorical ones, scored by k-fold
cross-validation: MAE and R² for regression; balanced accuracy and ROC-AUC for
classification. It is scikit-learn's nested CV, ``cross_validate(GridSearchCV(
make_pipeline(StandardScaler(), Ridge())))``; with ``groups`` the groups reach both the
outer and the inner splits (metadata routing), and every split follows ``seed``.

Example::

    from anatcl_infer import extract_features
    from anatcl_infer.downstream.probe import linear_probe
    print(linear_probe(extract_features(paths), ages))   # MAE 4.10 ± 0.31 ...
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, HeadError

__all__ = ["ProbeResult", "linear_probe"]

logger = logging.getLogger(__name__)

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
        groups: optional N group ids (e.g. subjects with several scans): a group never
            straddles an outer fold nor an inner (alpha-search) fold.
        seed: seed of the fold shuffling (outer and grouped inner splits).

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

    import sklearn
    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.model_selection import GridSearchCV, cross_validate

    from .heads.estimators import ALPHAS, _grid_param, _pipeline, _scoring, _splitter, single_threaded

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
        scoring = {"mae": "neg_mean_absolute_error", "r2": "r2"}
    else:
        classes, counts = np.unique(y_arr.astype(str), return_counts=True)
        if len(classes) < 2:
            raise HeadError(f"a single class {list(classes)}; classification needs at least two")
        if counts.min() < cv:
            raise HeadError(f"class {classes[np.argmin(counts)]!r} has {counts.min()} sample(s); {cv}-fold CV needs at least {cv} per class")
        scoring = {"balanced_accuracy": "balanced_accuracy", "roc_auc": "roc_auc" if len(classes) == 2 else "roc_auc_ovr"}
    outer = _splitter(task, cv, seed, g is not None)
    inner = min(cv, *(_inner_capacity(task, y_arr[train], None if g is None else g[train])
                      for train, _ in outer.split(Xm, y_arr, g)))
    param = _grid_param(task)
    if inner >= 2:  # the inner alpha/C search; with groups, sessions of one subject never straddle inner folds
        est = GridSearchCV(_pipeline(task), {param: list(ALPHAS)}, scoring=_scoring(task),
                           cv=inner if g is None else _splitter(task, inner, seed, True))
    else:  # too few samples per class for an inner search: the default strength
        logger.debug("too few usable samples per class for an inner search: %s=1", param)
        est = _pipeline(task, 1.0)
    with single_threaded(), sklearn.config_context(enable_metadata_routing=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # R² of a one-sample fold is NaN, as reported
        res = cross_validate(est, Xm, y_arr, cv=outer, params=None if g is None else {"groups": g}, scoring=scoring,
                             return_estimator=True, return_indices=True)
    preds = np.empty(n, dtype=np.float64 if task == "regression" else object)
    for fitted, test in zip(res["estimator"], res["indices"]["test"]):
        preds[test] = fitted.predict(Xm[test])
    params = [float(e.best_params_[param]) if inner >= 2 else 1.0 for e in res["estimator"]]
    metrics = {k: [float(-v if k == "mae" else v) for v in res[f"test_{k}"]] for k in scoring}
    result = ProbeResult(task=task, metrics=metrics, n=n, cv=cv, predictions=preds, params=params)
    logger.info("%s", result)
    return result


def _inner_capacity(task: str, y: np.ndarray, groups: np.ndarray | None) -> int:
    """How many inner folds one outer training set allows (samples, or groups, per class)."""
    if task == "regression":
        return len(y) // 2 if groups is None else len(np.unique(groups))
    if groups is None:
        return int(np.unique(y.astype(str), return_counts=True)[1].min())
    label_groups = set(zip(y.astype(str), groups))  # each (class, group) pair once
    return min(Counter(label for label, _ in label_groups).values())
