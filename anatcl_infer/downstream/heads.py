"""Linear heads on frozen AnatCL features: fitting, brain-age bias correction, saving, predicting.

The protocol is the paper's (OpenBHB-challenge style): features standardised, then
Ridge regression with alpha chosen by cross-validation over 10^[-2..2] for numeric
targets, or logistic regression (C chosen the same way, balanced class weights) for
categorical ones.

A features table embedded with several folds gives one head per fold. Folds live in
different embedding spaces, so each fold's head sees only that fold's features;
the fold ensemble is the mean of the fold *predictions* (probabilities for
classification), never of the embeddings.

Brain age: the linear age-bias correction is fitted on the cross-validated
out-of-fold predictions of the training set (in-sample predictions understate the
bias): ``pred = a * age + b`` by least squares, then ``pred_corrected = (pred - b) / a``
and ``brain_age_gap_corrected = pred_corrected - age``. ``a`` and ``b`` are stored in
``head.json`` per fold and for the ensemble. So that the stored line describes the
stored predictor, a regression head is the average of its cross-validation models
(the ones that made the out-of-fold predictions), not a refit on all the data,
which shrinks less and would be over-corrected.

A head directory holds ``head.safetensors`` (per fold: ``fold{k}.coef``,
``fold{k}.intercept``, ``fold{k}.scaler_mean``, ``fold{k}.scaler_scale``; no pickle)
and ``head.json`` (target, kind, units, classes, n, CV metrics, bias correction and
the model name/source/sha256/fold each head was fitted on).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._version import __version__
from ..errors import ConfigError, HeadError
from .features import feature_columns, feature_matrix

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
_AGE_NAMES = {"age", "age_years", "chronological_age", "age_at_scan"}


# --------------------------------------------------------------------------- joining


def _norm_subject(values: pd.Series) -> pd.Series:
    """Subject ids as strings without a BIDS ``sub-`` prefix."""
    out = values.astype("string").str.strip().str.removeprefix("sub-")
    return out


def _norm_path(values: pd.Series) -> pd.Series:
    """Paths made absolute (relative ones against the working directory), missing kept missing."""
    return values.astype("string").map(os.path.abspath, na_action="ignore").astype("string")


def join_labels(features: pd.DataFrame, labels: pd.DataFrame, *, columns: list[str] | None = None) -> tuple[pd.DataFrame, str]:
    """Attach label columns to feature rows, matching on ``path`` or else ``subject``.

    ``path`` is used when both tables have it (relative paths are taken from the
    working directory) and at least one matches, else ``subject`` (BIDS ``sub-``
    prefixes are ignored). Feature rows without a label get missing values.

    Args:
        features: a features table (one row per input, or per input and fold).
        labels: the labels table.
        columns: label columns to attach (default: all but the key).

    Returns:
        ``(frame aligned with features' rows holding the label columns, key used)``.

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
        left = _norm_subject(features["subject"])
        right = _norm_subject(labels["subject"])
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
        raise HeadError(
            f"`{key}` is not unique in the labels (e.g. {list(dup.unique()[:5])}); keep one row per {key} "
            + ("or join on `path` instead" if key == "subject" else "")
        )
    cols = [c for c in (columns if columns is not None else labels.columns) if c != key]
    missing = [c for c in cols if c not in labels.columns]
    if missing:
        raise HeadError(f"column(s) {missing} not in the labels; available: {list(labels.columns)}")
    table = labels[cols].copy()
    table.index = pd.Index(right.to_numpy(), name=key)
    joined = table.reindex(left.to_numpy())
    joined.index = features.index
    if len(features) and joined[cols].isna().all(axis=1).all() and cols:
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


def _regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import mean_absolute_error, r2_score

    y = np.asarray(y, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    r = float(np.corrcoef(y, pred)[0, 1]) if np.std(pred) > 0 and np.std(y) > 0 else float("nan")
    return {
        "mae": float(mean_absolute_error(y, pred)),
        "rmse": float(np.sqrt(np.mean((y - pred) ** 2))),
        "r2": float(r2_score(y, pred)),
        "pearson_r": r,
    }


def _classification_metrics(y: np.ndarray, proba: np.ndarray, classes: list[Any]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    pred = np.asarray(classes, dtype=object)[np.argmax(proba, axis=1)]
    y = np.asarray(y, dtype=object)
    out = {
        "balanced_accuracy": float(balanced_accuracy_score(y.astype(str), pred.astype(str))),
        "accuracy": float(accuracy_score(y.astype(str), pred.astype(str))),
    }
    try:
        if len(classes) == 2:
            out["roc_auc"] = float(roc_auc_score((y == classes[1]).astype(int), proba[:, 1]))
        else:
            onehot = np.stack([(y == c).astype(int) for c in classes], axis=1)
            out["roc_auc_ovr"] = float(roc_auc_score(onehot, proba, average="macro"))
    except ValueError:
        pass
    return out


def _splitter(kind: str, n_splits: int, seed: int, grouped: bool) -> Any:
    from sklearn.model_selection import (
        GroupKFold,
        KFold,
        StratifiedGroupKFold,
        StratifiedKFold,
    )

    if kind == "regression":
        if not grouped:
            return KFold(n_splits, shuffle=True, random_state=seed)
        try:
            return GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        except TypeError:  # scikit-learn < 1.6: no shuffling of groups
            return GroupKFold(n_splits=n_splits)
    if grouped:
        return StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return StratifiedKFold(n_splits, shuffle=True, random_state=seed)


def single_threaded() -> Any:
    """Context limiting BLAS/OpenMP to one thread: small linear fits are faster without threads.

    On a busy machine, multi-threaded BLAS on (n, 512) problems spends most of its time
    waiting for cores (measured here: 5-10x slower than one thread).
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


def _pipeline(kind: str, strength: float) -> Any:
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "regression":
        est = Ridge(alpha=strength)
    else:
        est = LogisticRegression(C=strength, class_weight="balanced", max_iter=5000)
    return Pipeline([("scaler", StandardScaler()), ("model", est)])


# --------------------------------------------------------------------------- head objects


@dataclass
class FoldHead:
    """The linear model of one fold: ``standardise(x) @ coef.T + intercept``.

    Attributes:
        fold: the model fold these weights apply to (``None`` for fold-less models).
        coef: (1, D) for regression and binary classification, (C, D) for multiclass.
        intercept: (1,) or (C,).
        scaler_mean, scaler_scale: (D,) standardisation fitted on the training features.
        info: this fold's ``head.json`` entry (model sha256, n, alpha, CV metrics, bias).
    """

    fold: int | None
    coef: np.ndarray
    intercept: np.ndarray
    scaler_mean: np.ndarray
    scaler_scale: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Tensor-name prefix in ``head.safetensors``."""
        return "fold_none" if self.fold is None else f"fold{self.fold}"

    def decision(self, X: np.ndarray) -> np.ndarray:
        """Raw linear output, (N, K)."""
        Z = (np.asarray(X, dtype=np.float64) - self.scaler_mean) / self.scaler_scale
        return Z @ self.coef.T.astype(np.float64) + self.intercept.astype(np.float64)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


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


class Head:
    """A fitted linear head: one :class:`FoldHead` per model fold plus its ``head.json``.

    Load with :meth:`Head.load`, fit with :func:`fit_head`, apply with
    :meth:`predict` (one row per input) or :meth:`predict_frame` (aligned with the
    rows of a features table, for adding columns in place).

    Example:
        >>> head = Head.load("brain-age-head")  # doctest: +SKIP
        >>> df, meta = anatcl_infer.downstream.features.read_features("feats.parquet")  # doctest: +SKIP
        >>> head.predict(df, metadata=meta)[["path", "age_pred"]]  # doctest: +SKIP
    """

    def __init__(self, config: dict[str, Any], folds: list[FoldHead]) -> None:
        self.config = config
        self.folds = {f.fold: f for f in folds}

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
        """Write ``head.safetensors`` + ``head.json`` into ``directory`` (atomically).

        Example:
            >>> head.save("brain-age-head")  # doctest: +SKIP
        """
        from safetensors.numpy import save_file

        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            tensors: dict[str, np.ndarray] = {}
            for fh in self.folds.values():
                tensors[f"{fh.key}.coef"] = np.ascontiguousarray(fh.coef, dtype=np.float64)
                tensors[f"{fh.key}.intercept"] = np.ascontiguousarray(fh.intercept, dtype=np.float64)
                tensors[f"{fh.key}.scaler_mean"] = np.ascontiguousarray(fh.scaler_mean, dtype=np.float64)
                tensors[f"{fh.key}.scaler_scale"] = np.ascontiguousarray(fh.scaler_scale, dtype=np.float64)
            save_file(tensors, str(tmp / HEAD_WEIGHTS_NAME), metadata={"format": HEAD_FORMAT})
            (tmp / HEAD_CONFIG_NAME).write_text(json.dumps(self.config, indent=2, default=_to_native) + "\n")
            target.mkdir(exist_ok=True)
            for name in (HEAD_WEIGHTS_NAME, HEAD_CONFIG_NAME):
                os.replace(tmp / name, target / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
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
            fold = entry["fold"]
            key = "fold_none" if fold is None else f"fold{fold}"
            try:
                fh = FoldHead(
                    fold=fold,
                    coef=tensors[f"{key}.coef"],
                    intercept=tensors[f"{key}.intercept"],
                    scaler_mean=tensors[f"{key}.scaler_mean"],
                    scaler_scale=tensors[f"{key}.scaler_scale"],
                    info=entry,
                )
            except KeyError as exc:
                raise HeadError(f"{w_path} lacks tensor {exc.args[0]!r} named in {HEAD_CONFIG_NAME}; the head is corrupt") from None
            if fh.coef.shape[-1] != dim or fh.scaler_mean.shape != (dim,):
                raise HeadError(f"{w_path}: {key} weights are not {dim}-d as {HEAD_CONFIG_NAME} says")
            folds.append(fh)
        written = config.get("package_version", "0")
        from ..config import _version_tuple

        if _version_tuple(written) > _version_tuple(__version__):
            logger.warning("head %s was written by anatcl-infer %s, newer than the installed %s", d, written, __version__)
        return cls(config, folds)

    # -- checks
    def check_features(self, df: pd.DataFrame, metadata: dict[str, Any] | None = None) -> None:
        """Raise :class:`HeadError` unless ``df`` holds features of the model and folds this head was fitted on.

        Checks the feature dimension, every fold present in ``df`` has a head, the
        ``model`` column and, when ``metadata`` (from :func:`read_features`) is given,
        the model name and per-fold SHA-256.

        Example:
            >>> head.check_features(df, meta)  # doctest: +SKIP
        """
        dim = len(feature_columns(df))
        if dim != int(self.config["feature_dim"]):
            raise HeadError(f"the head expects {self.config['feature_dim']}-d features, these have {dim}")
        expected_names = {v for fh in self.folds.values() for v in (fh.info.get("model_name"), fh.info.get("model_source")) if v}
        if "model" in df.columns and expected_names:
            seen = set(df["model"].dropna().astype(str).unique())
            other = seen - expected_names
            if other:
                raise HeadError(
                    f"these features come from model {sorted(other)} but the head was fitted on features of "
                    f"{sorted(expected_names)}; embed the inputs with that model, or fit a head on these features"
                )
        for fold in _fold_values(df):
            if fold not in self.folds and ("fold" in df.columns or len(self.folds) != 1):
                raise HeadError(
                    f"the features include fold {fold} but the head has heads for folds {list(self.folds)} only; "
                    f"embed with one of those folds (`anatcl embed --fold ...`) or fit a head on these features"
                )
            if metadata:
                mm = _meta_for_fold(metadata, fold)
                info = self._fold_head_for(df, fold).info
                if mm["model_name"] and info.get("model_name") and mm["model_name"] != info["model_name"]:
                    raise HeadError(
                        f"these features come from model {mm['model_name']!r} but the head was fitted on "
                        f"{info['model_name']!r}; embed with that model or fit a new head"
                    )
                if mm["model_sha256"] and info.get("model_sha256") and mm["model_sha256"] != info["model_sha256"]:
                    raise HeadError(
                        f"fold {fold}: these features come from weights with sha256 {mm['model_sha256'][:12]}... but the "
                        f"head was fitted on {info['model_sha256'][:12]}... ({info.get('model_source') or info.get('model_name')}); "
                        "embed with those weights or fit a new head"
                    )
        if not metadata and any(fh.info.get("model_sha256") for fh in self.folds.values()):
            logger.warning("no features metadata given: the model sha256 cannot be checked against the head (only the model name)")

    # -- prediction
    def _fold_head_for(self, df: pd.DataFrame, fold: int | None) -> FoldHead:
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

    def predict(
        self,
        features: pd.DataFrame,
        labels: pd.DataFrame | None = None,
        *,
        metadata: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Predictions with one row per input (the rows of all folds of one input merged).

        Columns: ``path``, ``subject`` (when present), ``<target>_pred_fold{k}`` per fold
        (several folds only), ``<target>_pred`` (the fold ensemble: mean of fold
        predictions). Classification adds ``<target>_proba_<class>``. Brain-age heads add
        ``<target>_pred_corrected``, and when chronological age is known (labels or an
        ``age`` column) ``<target>``, ``brain_age_gap`` and ``brain_age_gap_corrected``.

        Example:
            >>> pred = head.predict(df, labels_df, metadata=meta)  # doctest: +SKIP
        """
        import pandas as pd

        self.check_features(features, metadata)
        X = feature_matrix(features)
        keys = _input_keys(features)
        order = list(dict.fromkeys(keys))
        pos = {k: i for i, k in enumerate(order)}
        row_pos = np.array([pos[k] for k in keys])
        n = len(order)
        folds = _fold_values(features)
        multi = len(folds) > 1
        out: dict[str, Any] = {}
        first = np.full(n, -1)
        for i in range(len(keys) - 1, -1, -1):
            first[row_pos[i]] = i
        for col in ("path", "subject", "session", "run"):
            if col in features.columns:
                out[col] = features[col].to_numpy()[first]
        per_fold: list[np.ndarray] = []
        for fold in folds:
            mask = _fold_mask(features, fold)
            fh = self._fold_head_for(features, fold)
            z = fh.decision(X[mask])
            value = np.full((n, z.shape[1] if self.kind == "regression" else max(2, len(self.classes))), np.nan)
            if self.kind == "regression":
                value[row_pos[mask]] = z
            else:
                value[row_pos[mask]] = self._proba(z)
            per_fold.append(value)
            if multi:
                name = "none" if fold is None else str(fold)
                if self.kind == "regression":
                    out[f"{self.pred_column}_fold{name}"] = value[:, 0]
                else:
                    out[f"{self.pred_column}_fold{name}"] = self._labels_of(value)
        stacked = np.stack(per_fold)  # (F, n, K)
        with np.errstate(invalid="ignore"):
            ens = np.nanmean(stacked, axis=0) if multi else stacked[0]
        if self.kind == "regression":
            pred = ens[:, 0]
            out[self.pred_column] = pred
            if self.is_brain_age:
                bias = self._ensemble_bias(folds)
                corrected = _apply_bias(pred, bias) if bias else np.full(n, np.nan)
                out[f"{self.pred_column}_corrected"] = corrected
                age_rows = self._age_from(features, labels)
                if age_rows is not None:
                    age = np.full(n, np.nan)
                    age[row_pos] = age_rows.to_numpy(dtype=np.float64)
                    out[self.target if self.target not in out else f"{self.target}_true"] = age
                    out["brain_age_gap"] = pred - age
                    out["brain_age_gap_corrected"] = corrected - age
        else:
            for j, c in enumerate(self.classes):
                out[f"{self.target}_proba_{c}"] = ens[:, j]
            out[self.pred_column] = self._labels_of(ens)
        return pd.DataFrame(out)

    def predict_frame(
        self,
        features: pd.DataFrame,
        labels: pd.DataFrame | None = None,
        *,
        metadata: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """The prediction columns of :meth:`predict`, aligned with ``features``' rows (same index).

        With several folds, each row of an input carries that input's per-fold and
        ensemble columns, so ``pd.concat([features, head.predict_frame(features)], axis=1)``
        adds the predictions in place.

        Example:
            >>> df = pd.concat([df, head.predict_frame(df)], axis=1)  # doctest: +SKIP
        """
        pred = self.predict(features, labels, metadata=metadata)
        keys = _input_keys(features)
        order = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        idx = np.array([order[k] for k in keys], dtype=np.int64)
        cols = [c for c in pred.columns if c not in ("path", "subject", "session", "run") and c not in features.columns]
        aligned = pred[cols].iloc[idx].reset_index(drop=True)
        aligned.index = features.index
        return aligned

    def _proba(self, z: np.ndarray) -> np.ndarray:
        if z.shape[1] == 1:
            p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))
            return np.stack([1.0 - p1, p1], axis=1)
        return _softmax(z)

    def _labels_of(self, proba: np.ndarray) -> np.ndarray:
        classes = np.asarray(self.classes, dtype=object)
        out = np.full(len(proba), None, dtype=object)
        ok = ~np.isnan(proba).any(axis=1)
        out[ok] = classes[np.argmax(proba[ok], axis=1)]
        return out

    def _ensemble_bias(self, folds: list[int | None]) -> dict[str, float] | None:
        if len(folds) > 1:
            ens = self.config.get("ensemble") or {}
            if set(folds) == {e["fold"] for e in self.config["folds"]} and ens.get("bias_correction"):
                return ens["bias_correction"]
            logger.warning("features hold folds %s, not all the head's folds: no ensemble bias correction", folds)
            return None
        return self._fold_head_for(None, folds[0]).info.get("bias_correction")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- fitting


def _infer_kind(y: pd.Series) -> str:
    import pandas as pd

    if pd.api.types.is_bool_dtype(y) or not pd.api.types.is_numeric_dtype(y):
        return "classification"
    return "regression" if y.dropna().nunique() > 2 else "classification"


def _cv_committee(
    X: np.ndarray, y: np.ndarray, alpha: float, splitter: Any, groups: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fit one Ridge per CV split; return out-of-fold predictions and their average as one linear model.

    The stored regression head is the mean of these k models, not a refit on all
    the data: a refit on more subjects shrinks predictions less than the CV models
    did, so a bias correction fitted on their out-of-fold predictions would
    over-correct it (gap correlated *positively* with age on new subjects). The
    average of the CV models is exactly the predictor whose bias was measured.

    Returns:
        ``(oof, scaler_mean, scaler_scale, coef (1, D), intercept (1,))`` with the
        averaged model expressed on the whole training set's standardisation.
    """
    from sklearn.preprocessing import StandardScaler

    oof = np.zeros(len(y), dtype=np.float64)
    weights, biases = [], []
    for train, test in splitter.split(X, y, groups):
        pipe = _pipeline("regression", alpha).fit(X[train], y[train])
        oof[test] = pipe.predict(X[test])
        sc, est = pipe.named_steps["scaler"], pipe.named_steps["model"]
        w = np.asarray(est.coef_, dtype=np.float64).ravel() / sc.scale_
        weights.append(w)
        biases.append(float(est.intercept_) - float(w @ sc.mean_))
    w_avg, b_avg = np.mean(weights, axis=0), float(np.mean(biases))
    full = StandardScaler().fit(X)
    mean, scale = full.mean_.astype(np.float64), full.scale_.astype(np.float64)
    coef = (w_avg * scale)[None, :]
    intercept = np.array([b_avg + float(w_avg @ mean)])
    return oof, mean, scale, coef, intercept


def _fit_fold(
    df: pd.DataFrame,
    y_all: pd.Series,
    fold: int | None,
    *,
    kind: str,
    classes: list[Any] | None,
    cv: int,
    seed: int,
    alphas: tuple[float, ...],
    meta: dict[str, Any],
    brain_age: bool,
    keys: np.ndarray,
) -> tuple[FoldHead, tuple[np.ndarray, np.ndarray, np.ndarray], bool]:
    """Fit one fold's head: alpha/C search, out-of-fold predictions, metrics, bias, final refit."""
    import pandas as pd
    from sklearn.model_selection import GridSearchCV, cross_val_predict

    mask = _fold_mask(df, fold)
    X = feature_matrix(df.loc[mask])
    y = y_all[mask].to_numpy()
    n = len(y)
    groups = None
    if "subject" in df.columns and df.loc[mask, "subject"].notna().all() and df.loc[mask, "subject"].duplicated().any():
        groups = _norm_subject(df.loc[mask, "subject"]).to_numpy()
    n_units = len(np.unique(groups)) if groups is not None else n
    if kind == "regression":
        if n_units < 2 * cv:
            raise HeadError(f"fold {fold}: {n_units} labelled subjects are too few for {cv}-fold CV; need at least {2 * cv}")
    else:
        counts = pd.Series(y).astype(str).value_counts()
        if counts.min() < cv:
            raise HeadError(
                f"fold {fold}: class {counts.idxmin()!r} has {counts.min()} sample(s); {cv}-fold CV needs at least "
                f"{cv} per class (lower --cv or add data)"
            )
        y = np.asarray([_to_native(v) for v in y], dtype=object)
        y = np.asarray([classes.index(v) for v in y])  # type: ignore[union-attr]
    splitter = _splitter(kind, cv, seed, groups is not None)
    scoring = "neg_mean_absolute_error" if kind == "regression" else "balanced_accuracy"
    param = "model__alpha" if kind == "regression" else "model__C"
    grid = GridSearchCV(_pipeline(kind, 1.0), {param: list(alphas)}, cv=splitter, scoring=scoring)
    grid.fit(X, y, groups=groups)
    strength = float(grid.best_params_[param])
    if kind == "regression":
        oof, scaler_mean, scaler_scale, coef, intercept = _cv_committee(X, y, strength, splitter, groups)
        metrics = _regression_metrics(y, oof)
        oof_values = oof[:, None]
    else:
        pipe = _pipeline(kind, strength)
        oof_values = cross_val_predict(pipe, X, y, cv=splitter, groups=groups, method="predict_proba")
        metrics = _classification_metrics(np.asarray(classes, dtype=object)[y], oof_values, classes)  # type: ignore[arg-type]
        pipe.fit(X, y)
        scaler, est = pipe.named_steps["scaler"], pipe.named_steps["model"]
        scaler_mean, scaler_scale = scaler.mean_.astype(np.float64), scaler.scale_.astype(np.float64)
        coef = np.atleast_2d(np.asarray(est.coef_, dtype=np.float64))
        intercept = np.atleast_1d(np.asarray(est.intercept_, dtype=np.float64))
    info: dict[str, Any] = {
        "fold": fold,
        **_meta_for_fold(meta, fold),
        "n_train": int(n),
        "n_subjects": int(n_units),
        "alpha" if kind == "regression" else "C": strength,
        "cv_metrics": metrics,
    }
    if not info["model_name"] and "model" in df.columns and df.loc[mask, "model"].notna().any():
        info["model_name"] = str(df.loc[mask, "model"].dropna().iloc[0])
    if kind == "regression":
        bias = fit_bias_correction(y, oof)
        info["bias_correction"] = bias
        if brain_age:
            info["cv_metrics_corrected"] = _regression_metrics(y, _apply_bias(oof, bias))
    head = FoldHead(fold, coef, intercept, scaler_mean, scaler_scale, info)
    logger.info("fold %s: n=%d, %s=%g, CV %s", fold, n, param.split("__")[1], strength,
                ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    return head, (keys[mask], y, oof_values), groups is not None


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
    others get standardisation + balanced logistic regression (C chosen likewise).
    The alpha search uses the whole training set; the reported metrics and the
    brain-age bias correction use out-of-fold predictions with the chosen alpha.
    A regression head is the average of the ``cv`` cross-validation models (the
    ones whose out-of-fold predictions fitted the bias correction), so the stored
    correction matches the stored predictor; a classifier is refitted on all data.
    Repeated subjects (several sessions) are kept in the same CV fold.

    Args:
        features: a features table (see :mod:`anatcl_infer.features`).
        labels: labels with ``path`` or ``subject`` and the ``target`` column.
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
        >>> head.save("age-head")  # doctest: +SKIP
    """
    from .._optional import require

    require("sklearn", "pandas", "sklearn")

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
    dropped = int((~keep).sum())
    if dropped:
        logger.info("%d feature row(s) have no %r label and are left out", dropped, target)

    meta = metadata or {}
    folds = _fold_values(df)
    keys = _input_keys(df)
    classes: list[Any] | None = None
    if kind == "classification":
        classes = sorted({_to_native(v) for v in y_all}, key=lambda v: (str(type(v)), v))
        if len(classes) < 2:
            raise HeadError(f"target {target!r} has a single class {classes}; a classifier needs at least two")
    grouped_any = False
    fold_heads: list[FoldHead] = []
    oof_by_fold: dict[int | None, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    with single_threaded():
        for fold in folds:
            fit = _fit_fold(df, y_all, fold, kind=kind, classes=classes, cv=cv, seed=seed, alphas=alphas,
                            meta=meta, brain_age=brain_age, keys=keys)
            grouped_any = grouped_any or fit[2]
            fold_heads.append(fit[0])
            oof_by_fold[fold] = fit[1]

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
            if kind == "regression" else "logistic regression refitted on all training data"
        ),
        "bias_correction_method": (
            "pred = slope*age + intercept fitted on out-of-fold predictions; "
            "pred_corrected = (pred - intercept)/slope; gap_corrected = pred_corrected - age"
        ) if kind == "regression" else None,
        "model": {k: (meta.get("model") or {}).get(k) for k in ("name", "source", "architecture", "variant", "folds")},
        "preprocess": meta.get("preprocess"),
        "folds": [fh.info for fh in fold_heads],
    }
    if len(folds) > 1:
        config["ensemble"] = _ensemble_summary(kind, oof_by_fold, classes)
    return Head(config, fold_heads)


def _ensemble_summary(kind: str, oof_by_fold: dict[Any, tuple[np.ndarray, np.ndarray, np.ndarray]], classes: list[Any] | None) -> dict[str, Any]:
    """CV metrics (and bias correction) of the mean of the folds' out-of-fold predictions."""
    common = set.intersection(*(set(k) for k, _, _ in oof_by_fold.values()))
    order = sorted(common)
    stacks, y_ref = [], None
    for keys, y, oof in oof_by_fold.values():
        pos = {k: i for i, k in enumerate(keys)}
        idx = np.array([pos[k] for k in order], dtype=np.int64)
        stacks.append(oof[idx])
        y_ref = y[idx]
    mean = np.mean(np.stack(stacks), axis=0)
    out: dict[str, Any] = {"n": len(order), "method": "mean of the folds' predictions"}
    if kind == "regression":
        out["cv_metrics"] = _regression_metrics(y_ref, mean[:, 0])  # type: ignore[arg-type]
        out["bias_correction"] = fit_bias_correction(y_ref, mean[:, 0])  # type: ignore[arg-type]
    else:
        out["cv_metrics"] = _classification_metrics(np.asarray(classes, dtype=object)[y_ref], mean, classes)  # type: ignore[arg-type,index]
    return out
