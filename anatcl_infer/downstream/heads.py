"""Linear heads on frozen AnatCL features: fitting, brain-age bias correction, intervals, saving, predicting.

The fitting is scikit-learn's: ``make_pipeline(StandardScaler(), Ridge | LogisticRegression)``,
the strength chosen by ``GridSearchCV`` over 10^[-2..2] (the OpenBHB protocol), the
out-of-fold predictions from ``cross_validate(return_estimator=True, return_indices=True)``,
classification probabilities calibrated by ``CalibratedClassifierCV(method="sigmoid")``.
Sessions of one subject always share a CV fold, and the splits follow ``seed``.

What this module adds on top:

* **Fold ensembles.** Features embedded with several model folds give one head per fold
  (folds live in different spaces); the ensemble is the mean of the fold *predictions*.
* **Brain-age bias correction** fitted on the out-of-fold predictions: ``pred = a*age + b``,
  ``pred_corrected = (pred - b)/a``. So that the stored line describes the stored predictor, a
  regression head is the average of its CV models (those that made the out-of-fold
  predictions), not a refit, which shrinks less and would be over-corrected.
* **Prediction intervals** (split-conformal): quantiles of the out-of-fold absolute
  residuals are stored, ``predict(coverage=0.9)`` adds ``<target>_pred_lo``/``_hi``.
* **A pickle-free format**: ``head.safetensors`` (per fold ``fold{k}.coef``, ``.intercept``,
  ``.scaler_mean``, ``.scaler_scale`` and, for classifiers, ``.calib_a``/``.calib_b``) and
  ``head.json`` (target, kind, metrics, bias, conformal quantiles, and the model
  name/source/SHA-256/fold each fold head was fitted on, checked before predicting).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._version import __version__
from ..errors import ConfigError, HeadError
from .features import feature_columns, feature_matrix, feature_names

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ALPHAS",
    "HEAD_CONFIG_NAME",
    "HEAD_WEIGHTS_NAME",
    "FoldHead",
    "Head",
    "fit_bias_correction",
    "fit_head",
    "join_labels",
]

logger = logging.getLogger(__name__)

HEAD_CONFIG_NAME = "head.json"
HEAD_WEIGHTS_NAME = "head.safetensors"
HEAD_FORMAT = "anatcl-head/1"
#: Ridge alphas (and logistic C values) searched by cross-validation: 10^-2 ... 10^2.
ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-2, 2, 5))
#: Levels at which the out-of-fold absolute residuals' quantiles are stored.
CONFORMAL_LEVELS: tuple[float, ...] = tuple(float(v) for v in np.round(np.r_[np.arange(0.5, 0.99, 0.005), 0.99, 0.995, 0.999, 1.0], 4))
_AGE_NAMES = {"age", "age_years", "chronological_age", "age_at_scan"}
_ID_COLUMNS = ("path", "subject", "session", "run")


# --------------------------------------------------------------------------- joining


def _norm_id(values: pd.Series, prefix: str) -> pd.Series:
    """BIDS ids (subjects, sessions) as strings without their ``sub-``/``ses-`` prefix."""
    return values.astype("string").str.strip().str.removeprefix(prefix)


def _norm_path(values: pd.Series) -> pd.Series:
    """Paths made absolute (relative ones against the working directory), missing kept missing."""
    return values.astype("string").map(os.path.abspath, na_action="ignore").astype("string")


def _has(df: pd.DataFrame, col: str) -> bool:
    return col in df.columns and bool(df[col].notna().any())


def join_labels(features: pd.DataFrame, labels: pd.DataFrame, *, columns: list[str] | None = None) -> tuple[pd.DataFrame, str]:
    """Attach label columns to feature rows, matching on ``path``, else ``subject`` (+ ``session``).

    ``path`` is used when both tables have it (relative paths are taken from the
    working directory) and at least one matches; else ``subject`` (BIDS ``sub-``
    prefixes ignored), together with ``session`` when both tables have sessions
    (longitudinal labels: one row per subject and session). Feature rows without a
    label get missing values.

    Args:
        features: a features table (one row per input, or per input and fold).
        labels: the labels table.
        columns: label columns to attach (default: all but the key).

    Returns:
        ``(frame aligned with features' rows holding the label columns, key used)``;
        the key is ``"path"``, ``"subject"`` or ``"subject+session"``.

    Raises:
        HeadError: when the tables share no key column, a key repeats in the labels,
            or no feature row has a label.

    Example:
        >>> lab, key = join_labels(features_df, labels_df, columns=["age"])  # doctest: +SKIP
    """
    import pandas as pd

    key = None
    both_subject = "subject" in features.columns and "subject" in labels.columns
    if "path" in features.columns and "path" in labels.columns:
        key = "path"
        left, right = _norm_path(features["path"]), _norm_path(labels["path"])
        if both_subject and not left.isin(set(right.dropna())).any():
            logger.warning("no `path` of the labels matches the features; joining on `subject` instead")
            key = None
    if key is None and both_subject:
        key = "subject"
        left, right = _norm_id(features["subject"], "sub-"), _norm_id(labels["subject"], "sub-")
        if _has(features, "session") and _has(labels, "session"):
            key = "subject+session"
            left = left + "\x1f" + _norm_id(features["session"], "ses-")
            right = right + "\x1f" + _norm_id(labels["session"], "ses-")
    if key is None:
        raise HeadError(
            "the features and labels share no join key: the labels file needs a `path` column (the input "
            "paths as in the features file) or a `subject` column (or BIDS `participant_id`); "
            f"labels columns are {list(labels.columns)[:20]}"
        )
    if right.isna().any():
        raise HeadError(f"the labels have {int(right.isna().sum())} row(s) with an empty `{key}`; fill or drop them")
    dup = right[right.duplicated()]
    if len(dup):
        hint = {"subject": "or give a `session` column (in both files) or join on `path` instead",
                "subject+session": "or join on `path` instead"}.get(key, "")
        raise HeadError(f"`{key}` is not unique in the labels (e.g. {[d.replace(chr(31), '/') for d in dup.unique()[:5]]}); "
                        f"keep one row per {key} {hint}")
    key_cols = {"path": ("path",), "subject": ("subject",), "subject+session": ("subject", "session")}[key]
    cols = [c for c in (columns if columns is not None else labels.columns) if c not in key_cols]
    missing = [c for c in cols if c not in labels.columns]
    if missing:
        raise HeadError(f"column(s) {missing} not in the labels; available: {list(labels.columns)}")
    table = labels[cols].copy()
    table.index = pd.Index(right.to_numpy(), name=key)
    joined = table.reindex(left.to_numpy())
    joined.index = features.index
    if len(features) and cols and joined[cols].isna().all(axis=1).all():
        raise HeadError(
            f"no feature row matches a labels row on `{key}` (features e.g. {list(left.dropna().unique()[:3])}, "
            f"labels e.g. {list(right.unique()[:3])}); check the ids"
        )
    return joined, key


# --------------------------------------------------------------------------- fitting helpers


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
    return (np.asarray(pred, dtype=np.float64) - bias["intercept"]) / bias["slope"]


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


def _id_hashes(df: pd.DataFrame) -> tuple[str, set[str]]:
    """Short SHA-256 digests of the subjects (else the paths) of a table, to spot in-sample predictions."""
    if "subject" in df.columns and df["subject"].notna().all():
        key, values = "subject", _norm_id(df["subject"], "sub-")
    elif "path" in df.columns and df["path"].notna().all():
        key, values = "path", _norm_path(df["path"])
    else:
        return "none", set()
    return key, {hashlib.sha256(str(v).encode()).hexdigest()[:16] for v in values}


# --------------------------------------------------------------------------- head objects


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


def _to_native(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


def _meta_for_fold(meta: dict[str, Any], fold: int | None) -> dict[str, Any]:
    """Model name/source/sha256 for one fold from a features file's metadata block."""
    model = dict(meta.get("model") or {})
    sha = model.get("source_sha256")
    folds = model.get("folds") or []
    if isinstance(sha, list):
        sha = sha[folds.index(fold)] if fold in folds and len(sha) == len(folds) else None
    elif isinstance(sha, dict):
        sha = sha.get(str(fold))
    return {
        "model_name": model.get("name"),
        "model_source": model.get("source"),
        "model_sha256": sha,
        "architecture": model.get("architecture"),
        "variant": model.get("variant"),
    }


def _fold_values(df: pd.DataFrame) -> list[int | None]:
    if "fold" not in df.columns:
        return [None]
    vals = df["fold"]
    out: list[int | None] = sorted({int(v) for v in vals.dropna()})
    if vals.isna().any():
        out.append(None)
    return out


def _fold_mask(df: pd.DataFrame, fold: int | None) -> np.ndarray:
    if "fold" not in df.columns:
        return np.ones(len(df), dtype=bool)
    col = df["fold"]
    if fold is None:
        return col.isna().to_numpy()
    return (col == fold).fillna(False).to_numpy(dtype=bool)


def _input_keys(df: pd.DataFrame) -> np.ndarray:
    """One key per input (rows of several folds of the same input share it)."""
    if "path" in df.columns and df["path"].notna().all():
        return df["path"].astype(str).to_numpy()
    if "fold" in df.columns and df["fold"].nunique(dropna=False) > 1:
        raise HeadError("a features table with several folds needs a `path` column to match rows of the same input")
    return np.asarray([f"row{i}" for i in range(len(df))], dtype=object)


def _rows_per_input(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the position of its input (inputs in order of first appearance); per input, its first row."""
    import pandas as pd

    codes, _ = pd.factorize(keys)
    return codes, np.unique(codes, return_index=True)[1]


class Head:
    """A fitted linear head: one :class:`FoldHead` per model fold plus its ``head.json``.

    Load with :meth:`Head.load`, fit with :func:`fit_head`, apply with
    :meth:`predict` (one row per input) or :meth:`predict_frame` (aligned with the
    rows of a features table, for adding columns in place). A freshly fitted head
    also holds its training subjects' out-of-fold predictions in :attr:`oof_`.

    Example:
        >>> head = Head.load("brain-age-head")  # doctest: +SKIP
        >>> df, meta = anatcl_infer.downstream.features.read_features("feats.parquet")  # doctest: +SKIP
        >>> head.predict(df, metadata=meta)[["path", "age_pred", "age_pred_lo", "age_pred_hi"]]  # doctest: +SKIP
    """

    def __init__(self, config: dict[str, Any], folds: list[FoldHead]) -> None:
        self.config = config
        self.folds = {f.fold: f for f in folds}
        #: Out-of-fold predictions of the training inputs (set by :func:`fit_head`, not saved).
        self.oof_: pd.DataFrame | None = None

    # -- properties
    @property
    def target(self) -> str:
        """Name of the label column the head predicts."""
        return str(self.config["target"])

    @property
    def kind(self) -> str:
        """``"regression"`` or ``"classification"``."""
        return str(self.config["kind"])

    @property
    def classes(self) -> list[Any]:
        """Class labels (classification), in the order of the probability columns."""
        return list(self.config.get("classes") or [])

    @property
    def is_brain_age(self) -> bool:
        """Whether predictions get brain-age gap columns."""
        return bool(self.config.get("brain_age"))

    @property
    def pred_column(self) -> str:
        """Name of the main prediction column, ``<target>_pred``."""
        return f"{self.target}_pred"

    def __repr__(self) -> str:
        return f"Head(target={self.target!r}, kind={self.kind!r}, folds={list(self.folds)})"

    # -- persistence
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``head.safetensors`` + ``head.json`` into ``directory`` (each atomically, umask modes).

        Example:
            >>> head.save("brain-age-head")  # doctest: +SKIP
        """
        from safetensors.numpy import save_file

        from .._files import atomic_path, makedirs

        target = makedirs(directory)
        tensors = {k: v for fh in self.folds.values() for k, v in fh.tensors().items()}
        with atomic_path(target / HEAD_WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata={"format": HEAD_FORMAT})
        with atomic_path(target / HEAD_CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps(self.config, indent=2, default=_to_native) + "\n")
        logger.info("saved head %r (%s, folds %s) to %s", self.target, self.kind, list(self.folds), target)
        return target

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Head:
        """Read a head directory written by :meth:`save` / ``anatcl fit-head``.

        Raises:
            HeadError: when a file is missing or does not match ``head.json``.

        Example:
            >>> head = Head.load("brain-age-head")  # doctest: +SKIP
        """
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        from ..config import _version_tuple

        d = Path(directory)
        cfg_path, w_path = d / HEAD_CONFIG_NAME, d / HEAD_WEIGHTS_NAME
        if not cfg_path.is_file() or not w_path.is_file():
            raise HeadError(f"{d} is not a head directory: it needs {HEAD_CONFIG_NAME} and {HEAD_WEIGHTS_NAME} (create one with `anatcl fit-head`)")
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise HeadError(f"{cfg_path} is not valid JSON ({exc}); re-create the head with `anatcl fit-head`") from None
        if config.get("format") != HEAD_FORMAT:
            raise HeadError(f"{cfg_path} has format {config.get('format')!r}, expected {HEAD_FORMAT!r}; re-create the head with `anatcl fit-head`")
        try:
            tensors = load_file(str(w_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise HeadError(f"{w_path} is not a readable safetensors file ({exc})") from None
        folds = []
        dim = int(config["feature_dim"])
        for entry in config["folds"]:
            key = "fold_none" if entry["fold"] is None else f"fold{entry['fold']}"
            try:
                arrays = {n: tensors[f"{key}.{n}"] for n in ("coef", "intercept", "scaler_mean", "scaler_scale")}
            except KeyError as exc:
                raise HeadError(f"{w_path} lacks tensor {exc.args[0]!r} named in {HEAD_CONFIG_NAME}; the head is corrupt") from None
            fh = FoldHead(fold=entry["fold"], info=entry, calib_a=tensors.get(f"{key}.calib_a"),
                          calib_b=tensors.get(f"{key}.calib_b"), **arrays)
            if fh.coef.shape[-1] != dim or fh.scaler_mean.shape != (dim,):
                raise HeadError(f"{w_path}: {key} weights are not {dim}-d as {HEAD_CONFIG_NAME} says")
            folds.append(fh)
        written = config.get("package_version", "0")
        if _version_tuple(written) > _version_tuple(__version__):
            logger.warning("head %s was written by anatcl-infer %s, newer than the installed %s", d, written, __version__)
        return cls(config, folds)

    # -- checks
    def check_model(self, metadata: dict[str, Any], *, feature_dim: int | None = None) -> None:
        """Raise :class:`HeadError` unless the model a features ``metadata`` block names is this head's.

        Compares per fold the SHA-256 of the weights; where either side does not know
        it, the model name (so features of ``fold0.pth`` pass a head fitted on the
        identical weights loaded by registry name, and a renamed copy of other weights
        does not). Called by :meth:`check_features` and, before any embedding, by
        ``anatcl embed --head``.

        Example:
            >>> head.check_model(meta)  # doctest: +SKIP
        """
        if feature_dim is not None and int(feature_dim) != int(self.config["feature_dim"]):
            raise HeadError(f"the head expects {self.config['feature_dim']}-d features, this model gives {feature_dim}-d features")
        folds = list((metadata.get("model") or {}).get("folds") or [])
        self._check_folds(folds or [None], has_fold_column=bool(folds))
        for fold in folds or [None]:
            mm, info = _meta_for_fold(metadata, fold), self._fold_head_for(fold).info
            if mm["model_sha256"] and info.get("model_sha256"):
                if mm["model_sha256"] != info["model_sha256"]:
                    raise HeadError(
                        f"fold {fold}: these features come from model {mm['model_name']!r} (weights sha256 "
                        f"{mm['model_sha256'][:12]}...) but the head was fitted on {info.get('model_name')!r} (sha256 "
                        f"{info['model_sha256'][:12]}..., {info.get('model_source')}); embed with those weights or fit a new head"
                    )
            elif mm["model_name"] and info.get("model_name") and mm["model_name"] != info["model_name"]:
                raise HeadError(
                    f"these features come from model {mm['model_name']!r} but the head was fitted on "
                    f"{info['model_name']!r}; embed with that model or fit a new head"
                )

    def _check_folds(self, folds: list[int | None], *, has_fold_column: bool) -> None:
        for fold in folds:
            if fold not in self.folds and (has_fold_column or len(self.folds) != 1):
                raise HeadError(
                    f"the features include fold {fold} but the head has heads for folds {list(self.folds)} only; "
                    f"embed with one of those folds (`anatcl embed --fold ...`) or fit a head on these features"
                )

    def check_features(self, df: pd.DataFrame, metadata: dict[str, Any] | None = None) -> None:
        """Raise :class:`HeadError` unless ``df`` holds features of the model and folds this head was fitted on.

        Checks the feature dimension and the folds; then, with ``metadata`` (from
        :func:`read_features`), the weights' SHA-256 per fold (names where a SHA-256 is
        unknown, see :meth:`check_model`); without it, the ``model`` column's names.

        Example:
            >>> head.check_features(df, meta)  # doctest: +SKIP
        """
        dim = len(feature_columns(df))
        if dim != int(self.config["feature_dim"]):
            raise HeadError(f"the head expects {self.config['feature_dim']}-d features, these have {dim}")
        self._check_folds(_fold_values(df), has_fold_column="fold" in df.columns)
        if metadata and (metadata.get("model") or {}):
            self.check_model(metadata)
            return
        expected = {v for fh in self.folds.values() for v in (fh.info.get("model_name"), fh.info.get("model_source")) if v}
        if "model" in df.columns and expected:
            other = set(df["model"].dropna().astype(str).unique()) - expected
            if other:
                raise HeadError(
                    f"these features come from model {sorted(other)} but the head was fitted on features of "
                    f"{sorted(expected)}; embed the inputs with that model, or fit a head on these features"
                )
        if any(fh.info.get("model_sha256") for fh in self.folds.values()):
            logger.warning("no features metadata given: the model sha256 cannot be checked against the head (only the model name)")

    def _warn_in_sample(self, df: pd.DataFrame) -> None:
        ids = self.config.get("training_ids") or {}
        if not ids.get("sha256_16"):
            return
        key, seen = _id_hashes(df) if ids.get("key") in df.columns else ("none", set())
        overlap = len(seen & set(ids["sha256_16"])) if key == ids.get("key") else 0
        if overlap:
            logger.warning(
                "%d of %d %ss here are ones this head was fitted on: their predictions are in-sample (optimistic, "
                "and for brain age biased); use `anatcl fit-head ... --oof-out oof.parquet` for out-of-fold predictions "
                "of the training subjects", overlap, len(seen), key,
            )

    # -- prediction
    def _fold_head_for(self, fold: int | None) -> FoldHead:
        if fold in self.folds:
            return self.folds[fold]
        return next(iter(self.folds.values()))  # fold-less table, single-fold head (checked)

    def _age_from(self, df: pd.DataFrame, labels: pd.DataFrame | None) -> pd.Series | None:
        """Chronological age per feature row, from the labels or a column of the features table."""
        if labels is not None:
            for col in (self.target, "age"):
                if col in labels.columns:
                    joined, _ = join_labels(df, labels, columns=[col])
                    return joined[col].astype("float64")
            raise HeadError(f"the labels have neither {self.target!r} nor 'age': cannot compute the brain-age gap")
        for col in (self.target, "age"):
            if col in df.columns:
                return df[col].astype("float64")
        return None

    def _as_frame(self, features: Any, fold: int | None) -> pd.DataFrame:
        """A features table from a plain (N, D) array (one fold's features)."""
        import pandas as pd

        X = np.asarray(features, dtype=np.float32)
        if X.ndim != 2:
            raise HeadError(f"features must be a features table or an (N, D) array, got shape {X.shape}")
        if fold is None:
            if len(self.folds) != 1:
                raise HeadError(f"this head has folds {list(self.folds)}: say which fold an array's features come from (fold=...)")
            fold = next(iter(self.folds))
        df = pd.DataFrame(X, columns=feature_names(X.shape[1]) if X.shape[1] else [])
        df.insert(0, "fold", pd.array([fold] * len(X), dtype="Int64"))
        return df

    def predict(
        self,
        features: pd.DataFrame | np.ndarray,
        labels: pd.DataFrame | None = None,
        *,
        metadata: dict[str, Any] | None = None,
        coverage: float | None = 0.9,
        fold: int | None = None,
    ) -> pd.DataFrame:
        """Predictions with one row per input (the rows of all folds of one input merged).

        Columns: ``path``/``subject``/``session``/``run`` (when present),
        ``<target>_pred_fold{k}`` per fold and ``<target>_pred_fold_sd`` (their spread;
        several folds only), ``<target>_pred`` (the fold ensemble: mean of fold
        predictions). Regression adds ``<target>_pred_lo``/``_hi``, a split-conformal
        interval at ``coverage`` from the out-of-fold residuals. Classification adds
        calibrated ``<target>_proba_<class>`` (the label stays the balanced classifier's).
        Brain-age heads add ``<target>_pred_corrected`` (and its ``_lo``/``_hi``), and when
        chronological age is known (labels or an ``age`` column) ``<target>``,
        ``brain_age_gap`` and ``brain_age_gap_corrected``.

        Args:
            features: a features table, or a plain (N, D) array of one fold's features.
            labels: labels holding the chronological age (brain-age gaps).
            metadata: the features file's provenance (checked against the head).
            coverage: interval coverage in (0.5, 1); ``None`` for no intervals.
            fold: for an array with a multi-fold head, the fold its features come from.

        Example:
            >>> pred = head.predict(df, labels_df, metadata=meta)  # doctest: +SKIP
            >>> head.predict(np.zeros((2, 512)))["age_pred"]  # doctest: +SKIP
        """
        if coverage is not None and not 0.5 <= coverage < 1:
            raise ConfigError(f"coverage must be in [0.5, 1), got {coverage!r}")
        if hasattr(features, "columns"):
            self.check_features(features, metadata)
            self._warn_in_sample(features)
        else:  # a bare array carries no provenance: only its width and fold are checked
            features = self._as_frame(features, fold)
            if features.shape[1] - 1 != int(self.config["feature_dim"]):
                raise HeadError(f"the head expects {self.config['feature_dim']}-d features, this array has {features.shape[1] - 1}")
        X = feature_matrix(features)
        keys = _input_keys(features)
        folds = _fold_values(features)
        z_by_fold = []
        for f in folds:
            mask = _fold_mask(features, f)
            z_by_fold.append((f, mask, self._fold_head_for(f).decision(X[mask])))
        age_rows = self._age_from(features, labels) if self.is_brain_age else None
        return self._outputs(features, keys, z_by_fold, age_rows, coverage)

    def _outputs(self, df: pd.DataFrame, keys: np.ndarray, z_by_fold: list[tuple[Any, np.ndarray, np.ndarray]],
                 age_rows: pd.Series | None, coverage: float | None) -> pd.DataFrame:
        """The prediction columns from per-fold decision values of the rows ``mask`` of ``df``."""
        import pandas as pd

        row_pos, first = _rows_per_input(keys)
        n, multi = len(first), len(z_by_fold) > 1
        out: dict[str, Any] = {c: df[c].to_numpy()[first] for c in _ID_COLUMNS if c in df.columns}
        width = 1 if self.kind == "regression" else max(2, len(self.classes))
        per_fold, raw = [], []
        for f, mask, z in z_by_fold:
            fh = self._fold_head_for(f)
            value, unc = np.full((n, width), np.nan), np.full((n, width), np.nan)
            value[row_pos[mask]] = z if self.kind == "regression" else fh.proba(z)
            unc[row_pos[mask]] = z if self.kind == "regression" else fh.proba(z, calibrated=False)
            per_fold.append(value)
            raw.append(unc)
            if multi:
                name = f"{self.pred_column}_fold{'none' if f is None else f}"
                out[name] = value[:, 0] if self.kind == "regression" else self._labels_of(unc)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # inputs missing from some folds
            ens = np.nanmean(np.stack(per_fold), axis=0) if multi else per_fold[0]
            ens_raw = np.nanmean(np.stack(raw), axis=0) if multi else raw[0]
            spread = np.nanstd(np.stack(per_fold)[..., 0], axis=0, ddof=1) if multi and self.kind == "regression" else None
        folds = [f for f, _, _ in z_by_fold]
        if self.kind == "classification":
            for j, c in enumerate(self.classes):
                out[f"{self.target}_proba_{c}"] = ens[:, j]
            out[self.pred_column] = self._labels_of(ens_raw)
            return pd.DataFrame(out)
        pred = ens[:, 0]
        out[self.pred_column] = pred
        if spread is not None:
            out[f"{self.pred_column}_fold_sd"] = spread
        summary = self._summary_for(folds)
        if coverage is not None:
            half = self._halfwidth(summary, folds, "conformal", coverage)
            out[f"{self.pred_column}_lo"], out[f"{self.pred_column}_hi"] = pred - half, pred + half
        if not self.is_brain_age:
            return pd.DataFrame(out)
        bias = summary.get("bias_correction") if summary else None
        corrected = _apply_bias(pred, bias) if bias else np.full(n, np.nan)
        out[f"{self.pred_column}_corrected"] = corrected
        if coverage is not None:
            half = self._halfwidth(summary, folds, "conformal_corrected", coverage)
            out[f"{self.pred_column}_corrected_lo"], out[f"{self.pred_column}_corrected_hi"] = corrected - half, corrected + half
        if age_rows is not None:
            age = np.full(n, np.nan)
            age[row_pos] = age_rows.to_numpy(dtype=np.float64)
            out[self.target if self.target not in out else f"{self.target}_true"] = age
            out["brain_age_gap"] = pred - age
            out["brain_age_gap_corrected"] = corrected - age
        return pd.DataFrame(out)

    def _summary_for(self, folds: list[int | None]) -> dict[str, Any] | None:
        """The ``head.json`` block (one fold's, or the ensemble's) describing the predictor of these folds."""
        if len(folds) == 1:
            return self._fold_head_for(folds[0]).info
        if set(folds) == {e["fold"] for e in self.config["folds"]} and self.config.get("ensemble"):
            return self.config["ensemble"]
        logger.warning("features hold folds %s, not all the head's folds: no ensemble bias correction; "
                       "intervals from the widest fold", folds)
        return None

    def _halfwidth(self, summary: dict[str, Any] | None, folds: list[int | None], name: str, coverage: float) -> float:
        if summary is not None:
            return _halfwidth(summary[name], coverage) if summary.get(name) else float("nan")
        widths = [_halfwidth(self._fold_head_for(f).info[name], coverage) for f in folds if self._fold_head_for(f).info.get(name)]
        return max(widths) if widths else float("nan")

    def predict_frame(
        self,
        features: pd.DataFrame,
        labels: pd.DataFrame | None = None,
        *,
        metadata: dict[str, Any] | None = None,
        coverage: float | None = 0.9,
    ) -> pd.DataFrame:
        """The prediction columns of :meth:`predict`, aligned with ``features``' rows (same index).

        With several folds, each row of an input carries that input's per-fold and
        ensemble columns, so ``pd.concat([features, head.predict_frame(features)], axis=1)``
        adds the predictions in place.

        Example:
            >>> df = pd.concat([df, head.predict_frame(df)], axis=1)  # doctest: +SKIP
        """
        pred = self.predict(features, labels, metadata=metadata, coverage=coverage)
        idx, _ = _rows_per_input(_input_keys(features))
        cols = [c for c in pred.columns if c not in _ID_COLUMNS and c not in features.columns]
        aligned = pred[cols].iloc[idx].reset_index(drop=True)
        aligned.index = features.index
        return aligned

    def _labels_of(self, proba: np.ndarray) -> np.ndarray:
        classes = np.asarray(self.classes, dtype=object)
        out = np.full(len(proba), None, dtype=object)
        ok = ~np.isnan(proba).any(axis=1)
        out[ok] = classes[np.argmax(proba[ok], axis=1)]
        return out


# --------------------------------------------------------------------------- fitting


def _infer_kind(y: pd.Series) -> str:
    import pandas as pd

    if pd.api.types.is_bool_dtype(y) or not pd.api.types.is_numeric_dtype(y):
        return "classification"
    return "regression" if y.dropna().nunique() > 2 else "classification"


def _oof(cv_result: dict[str, Any], X: np.ndarray, kind: str) -> np.ndarray:
    """Out-of-fold decision values (N, K) from ``cross_validate(return_estimator=True, return_indices=True)``."""
    parts = [(test, est.decision_function(X[test]) if kind != "regression" else est.predict(X[test]))
             for est, test in zip(cv_result["estimator"], cv_result["indices"]["test"])]
    width = 1 if parts[0][1].ndim == 1 else parts[0][1].shape[1]
    oof = np.zeros((len(X), width), dtype=np.float64)
    for test, values in parts:
        oof[test] = values.reshape(len(test), width)
    return oof


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


def _regression_summary(y: np.ndarray, oof: np.ndarray, brain_age: bool) -> dict[str, Any]:
    """CV metrics, bias correction and conformal residual quantiles of out-of-fold predictions."""
    bias = fit_bias_correction(y, oof)
    out: dict[str, Any] = {"cv_metrics": _regression_metrics(y, oof), "bias_correction": bias, "conformal": _conformal(y - oof)}
    if brain_age:
        out["cv_metrics_corrected"] = _regression_metrics(y, _apply_bias(oof, bias))
        out["conformal_corrected"] = _conformal(y - _apply_bias(oof, bias))
    return out


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
    from .._optional import require

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
                                    f"needs at least {cv} per class (lower --cv or add data)")
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
        "bias_correction_method": (
            "pred = slope*age + intercept fitted on out-of-fold predictions; "
            "pred_corrected = (pred - intercept)/slope; gap_corrected = pred_corrected - age"
        ) if kind == "regression" else None,
        "interval_method": (
            "split-conformal: pred +/- the ceil((n+1)*coverage)/n quantile of the out-of-fold absolute residuals"
        ) if kind == "regression" else None,
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


def _brier(y: np.ndarray, proba: np.ndarray) -> float:
    """Multi-class Brier score (mean squared error of the probability vectors).

    Not ``sklearn.metrics.brier_score_loss``: it takes multi-class input only from scikit-learn
    1.7 (we support 1.6) and halves the binary score, which would change the recorded values.
    """
    onehot = np.eye(proba.shape[1])[y]
    return float(np.mean(np.sum((proba - onehot) ** 2, axis=1)))


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
