"""Labels joined to feature rows: on ``path`` (+ ``volume``), else ``subject`` (+ ``session``), BIDS prefixes ignored.

Also the short digests of a table's subjects (else paths) that a head stores, so that predicting on
its own training subjects can be spotted (:meth:`Head._warn_in_sample`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import TYPE_CHECKING

from ...errors import HeadError

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)


def _norm_id(values: pd.Series, prefix: str) -> pd.Series:
    """BIDS ids (subjects, sessions) as strings without their ``sub-``/``ses-`` prefix."""
    return values.astype("string").str.strip().str.removeprefix(prefix)


def _norm_path(values: pd.Series) -> pd.Series:
    """Paths made absolute (relative ones against the working directory), missing kept missing."""
    return values.astype("string").map(os.path.abspath, na_action="ignore").astype("string")


def _has(df: pd.DataFrame, col: str) -> bool:
    return col in df.columns and bool(df[col].notna().any())


def _norm_volume(values: pd.Series) -> pd.Series:
    """Volume indices as strings (``""`` for a 3D file), whether read as integers or NaN-filled floats."""
    return values.astype("Int64").astype("string").fillna("")


def join_labels(features: pd.DataFrame, labels: pd.DataFrame, *, columns: list[str] | None = None) -> tuple[pd.DataFrame, str]:
    """Attach label columns to feature rows, matching on ``path``, else ``subject`` (+ ``session``).

    ``path`` is used when both tables have it (relative paths are taken from the
    working directory) and at least one matches — with ``volume`` too when the labels give
    one (a 4D file whose volumes are different scans); else ``subject`` (BIDS ``sub-``
    prefixes ignored), together with ``session`` when both tables have sessions
    (longitudinal labels: one row per subject and session). Feature rows without a
    label get missing values.

    Args:
        features: a features table (one row per input, or per input and fold).
        labels: the labels table.
        columns: label columns to attach (default: all but the key).

    Returns:
        ``(frame aligned with features' rows holding the label columns, key used)``;
        the key is ``"path"``, ``"path+volume"``, ``"subject"`` or ``"subject+session"``.

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
        elif _has(labels, "volume"):
            key = "path+volume"
            vol = _norm_volume(features["volume"]) if "volume" in features.columns else ""
            left, right = left + "\x1f" + vol, right + "\x1f" + _norm_volume(labels["volume"])
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
                "subject+session": "or join on `path` instead", "path": "(or give a `volume` column for a 4D file's volumes)"}.get(key, "")
        raise HeadError(f"`{key}` is not unique in the labels (e.g. {[str(d).replace(chr(31), '/') for d in dup.unique()[:5]]}); "
                        f"keep one row per {key} {hint}")
    key_cols = {"path": ("path",), "path+volume": ("path", "volume"), "subject": ("subject",), "subject+session": ("subject", "session")}[key]
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


def _id_hashes(df: pd.DataFrame) -> tuple[str, set[str]]:
    """Short SHA-256 digests of the subjects (else the paths) of a table, to spot in-sample predictions."""
    if "subject" in df.columns and df["subject"].notna().all():
        key, values = "subject", _norm_id(df["subject"], "sub-")
    elif "path" in df.columns and df["path"].notna().all():
        key, values = "path", _norm_path(df["path"])
    else:
        return "none", set()
    return key, {hashlib.sha256(str(v).encode()).hexdigest()[:16] for v in values}
