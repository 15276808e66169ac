"""The fitted head (:class:`Head`): its ``head.json`` facts, checks against features, and prediction.

:meth:`Head.predict` checks that the features come from the model and folds the head was fitted on,
applies each fold's :class:`~anatcl_infer.downstream.heads.fold_head.FoldHead`, merges the folds of
an input (the ensemble is the mean of the fold *predictions*), and adds intervals
(:mod:`.intervals`) and brain-age columns (:mod:`.brain_age`). Fitting is in :mod:`.fitting`,
the file format in :mod:`.persistence`.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import ConfigError, HeadError
from ..features import feature_columns, feature_matrix, feature_names
from .brain_age import _add_brain_age_columns
from .fold_head import FoldHead
from .intervals import _halfwidth
from .labels import _id_hashes, join_labels
from .persistence import load_head, save_head
from .rows import _ID_COLUMNS, _fold_mask, _fold_values, _id_columns, _input_keys, _meta_for_fold, _rows_per_input

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)


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
        return save_head(self, directory)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Head:
        """Read a head directory written by :meth:`save` / ``anatcl fit-head``.

        Raises:
            HeadError: when a file is missing or does not match ``head.json``.

        Example:
            >>> head = Head.load("brain-age-head")  # doctest: +SKIP
        """
        config, folds = load_head(directory)
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
                    "use features of one of those folds (from that fold's model) or fit a head on these features"
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

        Columns: ``path``/``volume``/``subject``/``session``/``run`` (when present; ``volume``
        when some input is a volume of a 4D file: each such volume is one input),
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
        out: dict[str, Any] = {c: df[c].to_numpy()[first] for c in _id_columns(df)}
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
        age = None
        if age_rows is not None:
            age = np.full(n, np.nan)
            age[row_pos] = age_rows.to_numpy(dtype=np.float64)
        _add_brain_age_columns(
            out, target=self.target, pred_column=self.pred_column, pred=pred,
            bias=summary.get("bias_correction") if summary else None,
            half=self._halfwidth(summary, folds, "conformal_corrected", coverage) if coverage is not None else None,
            age=age,
        )
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
        """Interval half-width from the ``name`` quantiles of ``summary``, else the widest of the folds'."""
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
