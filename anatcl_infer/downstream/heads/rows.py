"""Rows of a features table: which model fold and which input each row is; a fold's model provenance.

A features table embedded with several model folds holds one row per input and fold; a head
keeps the folds apart (each has its own linear model) and merges an input's rows in its output.
Each volume of a 4D input file (``volume`` set) is an input of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import HeadError

if TYPE_CHECKING:
    import pandas as pd

#: Columns naming an input, copied (first row per input) into prediction tables (``volume`` only
#: when some row is a volume of a 4D file: see :func:`_id_columns`).
_ID_COLUMNS = ("path", "volume", "subject", "session", "run")


def _id_columns(df: pd.DataFrame) -> list[str]:
    """The :data:`_ID_COLUMNS` of ``df`` copied into predictions; ``volume`` only when not all null."""
    return [c for c in _ID_COLUMNS if c in df.columns and (c != "volume" or df[c].notna().any())]


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
    """One key per input (rows of several folds of the same input share it; each volume of a 4D file is one input)."""
    if "path" in df.columns and df["path"].notna().all():
        paths = df["path"].astype(str)
        if "volume" in df.columns and df["volume"].notna().any():
            volumes = df["volume"].astype("Int64").astype("string").fillna("")
            return (paths + "\0" + volumes).to_numpy(dtype=object)
        return paths.to_numpy()
    if "fold" in df.columns and df["fold"].nunique(dropna=False) > 1:
        raise HeadError("a features table with several folds needs a `path` column to match rows of the same input")
    return np.asarray([f"row{i}" for i in range(len(df))], dtype=object)


def _rows_per_input(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the position of its input (inputs in order of first appearance); per input, its first row."""
    import pandas as pd

    codes, _ = pd.factorize(keys)
    return codes, np.unique(codes, return_index=True)[1]
