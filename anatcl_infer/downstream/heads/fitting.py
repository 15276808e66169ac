"""Fitting a head: :func:`fit_head`, one linear model per model fold, tuned and assessed by cross-validation.

Per fold: the strength is chosen by ``GridSearchCV`` over :data:`ALPHAS` (the OpenBHB protocol),
the out-of-fold predictions come from ``cross_validate(return_estimator=True, return_indices=True)``
with that strength, and the stored model is, for regression, the mean of those CV models
(:func:`_mean_of_models`, so that the bias correction fitted on their out-of-fold predictions
describes it) and, for classification, a refit on all data with ``CalibratedClassifierCV(method=
"sigmoid")`` probabilities. Sessions of one subject always share a CV fold; the splits follow ``seed``.
What is derived from the out-of-fold predictions is in :mod:`.oof`.
"""

from __future__ import annotations

import datetime as _dt
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._version import __version__
from ...errors import ConfigError, HeadError
from ..features import feature_columns, feature_matrix
from .brain_age import _AGE_NAMES, BIAS_CORRECTION_METHOD
from .estimators import ALPHAS, _grid_param, _pipeline, _scoring, _splitter, single_threaded
from .fold_head import FoldHead
from .head import Head
from .intervals import INTERVAL_METHOD
from .labels import _id_hashes, _norm_id, join_labels
from .metrics import _brier, _classification_metrics
from .oof import _ensemble_summary, _oof, _oof_frame, _regression_summary
from .persistence import HEAD_FORMAT, _to_native
from .rows import _fold_mask, _fold_values, _input_keys, _meta_for_fold

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)


def _infer_kind(y: pd.Series) -> str:
    """``"regression"`` for a numeric target with more than two values, else ``"classification"``."""
    import pandas as pd

    if pd.api.types.is_bool_dtype(y) or not pd.api.types.is_numeric_dtype(y):
        return "classification"
    return "regression" if y.dropna().nunique() > 2 else "classification"



def _mean_of_models(estimators: list[Any], X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The average of CV pipelines as one linear model on the whole training set's standardisation.

    The stored regression head is the mean of the k CV models, not a refit on all the
    data: a refit on more subjects shrinks predictions less than the CV models did, so
    a bias correction fitted on their out-of-fold predictions would over-correct it.
    """
    from sklearn.preprocessing import StandardScaler

    w = np.mean([np.ravel(p[-1].coef_) / p[0].scale_ for p in estimators], axis=0)
    b = float(np.mean([float(p[-1].intercept_) - float(np.ravel(p[-1].coef_) / p[0].scale_ @ p[0].mean_) for p in estimators]))
    full = StandardScaler().fit(X)
    mean, scale = full.mean_.astype(np.float64), full.scale_.astype(np.float64)
    return mean, scale, (w * scale)[None, :], np.array([b + float(w @ mean)])


def _fit_fold(
    X: np.ndarray, y: np.ndarray, groups: np.ndarray | None, *, kind: str, cv: int, seed: int, alphas: tuple[float, ...],
) -> tuple[FoldHead, np.ndarray, dict[str, Any]]:
    """One fold's head: strength by ``GridSearchCV``, out-of-fold decisions by ``cross_validate``, final model.

    Returns ``(fold head without info, out-of-fold decision values (N, K), info)``.
    """
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.model_selection import GridSearchCV, cross_validate

    splits = list(_splitter(kind, cv, seed, groups is not None).split(X, y, groups))
    param = _grid_param(kind)
    # refit=False: only the chosen strength is used (the final models are fitted below)
    grid = GridSearchCV(_pipeline(kind), {param: list(alphas)}, cv=splits, scoring=_scoring(kind), refit=False).fit(X, y)
    strength = float(grid.best_params_[param])
    pipe = _pipeline(kind, strength)
    res = cross_validate(pipe, X, y, cv=splits, return_estimator=True, return_indices=True)
    oof = _oof(res, X, kind)
    info: dict[str, Any] = {"alpha" if kind == "regression" else "C": strength}
    if kind == "regression":
        mean, scale, coef, intercept = _mean_of_models(res["estimator"], X)
        return FoldHead(None, coef, intercept, mean, scale), oof, info
    calibrated = CalibratedClassifierCV(pipe, method="sigmoid", cv=splits, ensemble=False).fit(X, y)
    final = calibrated.calibrated_classifiers_[0]
    scaler, est = final.estimator[0], final.estimator[-1]
    fh = FoldHead(None, np.atleast_2d(est.coef_).astype(np.float64), np.atleast_1d(est.intercept_).astype(np.float64),
                  scaler.mean_.astype(np.float64), scaler.scale_.astype(np.float64),
                  calib_a=np.array([c.a_ for c in final.calibrators], dtype=np.float64),
                  calib_b=np.array([c.b_ for c in final.calibrators], dtype=np.float64))
    info["calibration"] = "sigmoid per class on out-of-fold decision values (CalibratedClassifierCV)"
    return fh, oof, info


def fit_head(
    features: pd.DataFrame,
    labels: pd.DataFrame,
    target: str,
    *,
    metadata: dict[str, Any] | None = None,
    kind: str = "auto",
    units: str | None = None,
    brain_age: bool | None = None,
    cv: int = 5,
    seed: int = 0,
    alphas: tuple[float, ...] = ALPHAS,
) -> Head:
    """Fit a linear head per fold on a features table and a labels table.

    Numeric targets (more than two distinct values) get standardisation + Ridge with
    alpha chosen by ``cv``-fold CV over ``alphas`` (10^-2..10^2, the OpenBHB protocol);
    others get standardisation + balanced logistic regression (C chosen likewise) with
    sigmoid-calibrated probabilities. The reported metrics, the brain-age bias
    correction and the interval quantiles use out-of-fold predictions with the chosen
    strength. A regression head is the average of the ``cv`` CV models (the ones whose
    out-of-fold predictions fitted the bias correction); a classifier is refitted on
    all data. Repeated subjects (several sessions) are kept in the same CV fold. The
    training inputs' out-of-fold predictions are in the returned head's ``oof_``.

    Args:
        features: a features table (see :mod:`anatcl_infer.downstream.features`).
        labels: labels with ``path`` or ``subject`` (and ``session``) and the ``target`` column.
        target: the label column to predict.
        metadata: the features file's provenance block (recorded in the head).
        kind: ``"auto"``, ``"regression"`` or ``"classification"``.
        units: units of the target, recorded (e.g. ``"years"``).
        brain_age: add brain-age gap columns at prediction (default: target named ``age``).
        cv: number of cross-validation folds.
        seed: shuffling seed of the CV splits.
        alphas: regularisation grid.

    Returns:
        The fitted :class:`Head` (save it with :meth:`Head.save`).

    Raises:
        HeadError: no join key, no overlap, missing target, too few samples, one class.

    Example:
        >>> df, meta = read_features("feats.parquet")  # doctest: +SKIP
        >>> head = fit_head(df, read_labels("participants.tsv"), "age", metadata=meta, units="years")  # doctest: +SKIP
        >>> head.save("age-head"); head.oof_.to_parquet("oof.parquet")  # doctest: +SKIP
    """
    from ..._optional import require

    require("sklearn", "pandas", "sklearn")
    import pandas as pd

    if kind not in ("auto", "regression", "classification"):
        raise ConfigError(f"kind must be 'auto', 'regression' or 'classification', got {kind!r}")
    if cv < 2:
        raise ConfigError(f"cv must be >= 2, got {cv!r}")
    if target not in labels.columns:
        raise HeadError(f"target column {target!r} is not in the labels; available: {list(labels.columns)}")
    feat_cols = feature_columns(features)
    joined, key = join_labels(features, labels, columns=[target])
    y_all = joined[target]
    keep = y_all.notna().to_numpy()
    if not keep.any():
        raise HeadError(f"no feature row has a value for {target!r} after joining on `{key}`")
    df = features.loc[keep].reset_index(drop=True)
    y_all = y_all[keep].reset_index(drop=True)
    if kind == "auto":
        kind = _infer_kind(y_all)
    if kind == "regression":
        try:
            y_all = y_all.astype("float64")
        except (TypeError, ValueError):
            raise HeadError(f"target {target!r} is not numeric; use kind='classification'") from None
    if brain_age is None:
        brain_age = kind == "regression" and target.lower() in _AGE_NAMES
    if brain_age and kind != "regression":
        raise HeadError("a brain-age head needs a numeric age target")
    if int((~keep).sum()):
        logger.info("%d feature row(s) have no %r label and are left out", int((~keep).sum()), target)

    meta = metadata or {}
    folds = _fold_values(df)
    keys = _input_keys(df)
    classes: list[Any] | None = None
    if kind == "classification":
        classes = sorted({_to_native(v) for v in y_all}, key=lambda v: (str(type(v)), v))
        if len(classes) < 2:
            raise HeadError(f"target {target!r} has a single class {classes}; a classifier needs at least two")
    fold_heads: list[FoldHead] = []
    oof_by_fold: dict[int | None, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    grouped_any = False
    with single_threaded():
        for fold in folds:
            mask = _fold_mask(df, fold)
            sub = df.loc[mask]
            X = feature_matrix(sub)
            y = y_all[mask].to_numpy()
            groups = None
            if "subject" in sub.columns and sub["subject"].notna().all() and sub["subject"].duplicated().any():
                groups = _norm_id(sub["subject"], "sub-").to_numpy()
            grouped_any = grouped_any or groups is not None
            n_units = len(np.unique(groups)) if groups is not None else len(y)
            if kind == "regression" and n_units < 2 * cv:
                raise HeadError(f"fold {fold}: {n_units} labelled subjects are too few for {cv}-fold CV; need at least {2 * cv}")
            if kind == "classification":
                counts = pd.Series(y).astype(str).value_counts()
                if counts.min() < cv:
                    raise HeadError(f"fold {fold}: class {counts.idxmin()!r} has {counts.min()} sample(s); {cv}-fold CV "
                                    f"needs at least {cv} per class (lower cv= or add data)")
                y = np.asarray([classes.index(_to_native(v)) for v in y])  # type: ignore[union-attr]
            fh, oof, strength = _fit_fold(X, y, groups, kind=kind, cv=cv, seed=seed, alphas=alphas)
            fh.fold = fold
            info: dict[str, Any] = {"fold": fold, **_meta_for_fold(meta, fold), "n_train": int(len(y)),
                                    "n_subjects": int(n_units), **strength}
            if not info["model_name"] and "model" in sub.columns and sub["model"].notna().any():
                info["model_name"] = str(sub["model"].dropna().iloc[0])
            if kind == "regression":
                info.update(_regression_summary(y, oof[:, 0], brain_age))
            else:
                info["cv_metrics"] = _classification_metrics(y, fh.proba(oof, calibrated=False))
                info["calibration"] = {"method": info.pop("calibration"),
                                       "oof_brier_uncalibrated": _brier(y, fh.proba(oof, calibrated=False)),
                                       "oof_brier_calibrated": _brier(y, fh.proba(oof))}
            fh.info = info
            fold_heads.append(fh)
            oof_by_fold[fold] = (keys[mask], y, oof)
            logger.info("fold %s: n=%d, %s, CV %s", fold, len(y), ", ".join(f"{k}={v:g}" for k, v in strength.items() if k in ("alpha", "C")),
                        ", ".join(f"{k}={v:.3f}" for k, v in info["cv_metrics"].items()))

    id_key, id_hashes = _id_hashes(df)
    config: dict[str, Any] = {
        "format": HEAD_FORMAT,
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "target": target,
        "kind": kind,
        "units": units,
        "classes": classes,
        "brain_age": bool(brain_age),
        "feature_dim": len(feat_cols),
        "join_key": key,
        "n_train": len(dict.fromkeys(keys)),
        "cv": {"n_splits": cv, "seed": seed, "grid": list(alphas), "grouped_by_subject": grouped_any},
        "predictor": (
            f"mean of the {cv} cross-validation Ridge models (those that made the out-of-fold predictions)"
            if kind == "regression" else "logistic regression refitted on all training data, sigmoid-calibrated probabilities"
        ),
        "bias_correction_method": BIAS_CORRECTION_METHOD if kind == "regression" else None,
        "interval_method": INTERVAL_METHOD if kind == "regression" else None,
        "model": {k: (meta.get("model") or {}).get(k) for k in ("name", "source", "architecture", "variant", "folds")},
        "preprocess": meta.get("preprocess"),
        "training_ids": {"key": id_key, "sha256_16": sorted(id_hashes)},
        "folds": [fh.info for fh in fold_heads],
    }
    head = Head(config, fold_heads)
    if len(folds) > 1:
        config["ensemble"] = _ensemble_summary(head, oof_by_fold, brain_age)
    head.oof_ = _oof_frame(head, df, y_all, keys, oof_by_fold)
    return head
