"""The features table: column names, and reading the Parquet files ``anatcl embed`` writes.

A features file has one row per input (per input and fold with ``--fold all``):
``path``, ``subject``, ``session``, ``run``, ``model``, ``fold``, then
``feat_000`` ... ``feat_511`` (float32), then QC columns prefixed ``qc_``. Its
Parquet key-value metadata under ``anatcl_infer`` is a JSON block naming the model
(name, source, sha256, folds), the preprocessing and the package version, so every
number derived from it can be traced back.

Only numpy is imported at module import; pandas and pyarrow load on first use.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, InputError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "FEATURE_PREFIX",
    "METADATA_KEY",
    "feature_columns",
    "feature_matrix",
    "feature_names",
    "read_features",
    "read_labels",
    "write_parquet_atomic",
]

logger = logging.getLogger(__name__)

FEATURE_PREFIX = "feat_"
#: Parquet key-value metadata key holding the provenance JSON.
METADATA_KEY = b"anatcl_infer"

_FEATURE_RE = re.compile(r"^feat_(\d+)$")


def feature_names(dim: int = 512) -> list[str]:
    """Column names of a ``dim``-d feature vector: ``feat_000`` ... ``feat_{dim-1}``.

    Args:
        dim: number of features (512 for ResNet-18).

    Returns:
        The names, zero-padded to at least three digits so they sort in order.

    Example:
        >>> feature_names(3)
        ['feat_000', 'feat_001', 'feat_002']
    """
    if int(dim) < 1:
        raise ConfigError(f"dim must be a positive integer, got {dim!r}")
    width = max(3, len(str(int(dim) - 1)))
    return [f"{FEATURE_PREFIX}{i:0{width}d}" for i in range(int(dim))]


def feature_columns(df: pd.DataFrame) -> list[str]:
    """The ``feat_NNN`` columns of a features table, in numeric order.

    Raises:
        InputError: when the table has no feature columns, or they are not contiguous from 0.

    Example:
        >>> import pandas as pd
        >>> feature_columns(pd.DataFrame(columns=["path", "feat_001", "feat_000"]))
        ['feat_000', 'feat_001']
    """
    found = sorted(((int(m.group(1)), str(c)) for c in df.columns if (m := _FEATURE_RE.match(str(c)))), key=lambda t: t[0])
    if not found:
        raise InputError(
            "no feature columns (feat_000, feat_001, ...) in this table; create it with `anatcl embed` "
            "or name the columns with anatcl_infer.downstream.features.feature_names()",
            stage="read",
        )
    indices = [i for i, _ in found]
    if indices != list(range(len(indices))):
        missing = sorted(set(range(max(indices) + 1)) - set(indices))[:10]
        raise InputError(f"feature columns are not contiguous from feat_000; missing e.g. {missing}", stage="read")
    return [c for _, c in found]


def feature_matrix(df: pd.DataFrame) -> np.ndarray:
    """The (N, D) float32 matrix of a features table's ``feat_`` columns.

    Raises:
        InputError: when a feature value is missing or not finite.

    Example:
        >>> import pandas as pd
        >>> feature_matrix(pd.DataFrame({"feat_000": [1.0], "feat_001": [2.0]})).shape
        (1, 2)
    """
    cols = feature_columns(df)
    X = df[cols].to_numpy(dtype=np.float32, copy=True)
    if not np.isfinite(X).all():
        bad = int((~np.isfinite(X).all(axis=1)).sum())
        raise InputError(f"{bad} row(s) have missing or non-finite features; drop them or re-run `anatcl embed`", stage="read")
    return X


def read_features(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a features Parquet file and its provenance metadata.

    Args:
        path: a file written by ``anatcl embed`` (or any Parquet/CSV with ``feat_`` columns).

    Returns:
        ``(dataframe, metadata)``; metadata is ``{}`` when the file carries none.

    Raises:
        InputError: when the file does not exist, cannot be read, or has no feature columns.

    Example:
        >>> df, meta = read_features("feats.parquet")  # doctest: +SKIP
        >>> meta["model"]["source_sha256"]  # doctest: +SKIP
    """
    from .._optional import require

    require("sklearn", "pandas")

    import pandas as pd

    p = os.fspath(path)
    if not os.path.isfile(p):
        raise InputError(f"features file {p!r} not found; create it with `anatcl embed DIR --out {p}`", path=p, stage="read")
    meta: dict[str, Any] = {}
    if p.endswith((".csv", ".tsv")):
        df = pd.read_csv(p, sep="\t" if p.endswith(".tsv") else ",")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise InputError(f"cannot read {p!r} as Parquet ({exc}); is it a features file from `anatcl embed`?", path=p, stage="read") from None
        raw = (table.schema.metadata or {}).get(METADATA_KEY)
        if raw:
            try:
                meta = json.loads(raw)
            except json.JSONDecodeError:
                logger.warning("%s: ignoring unreadable %s metadata", p, METADATA_KEY.decode())
        df = table.to_pandas()
    feature_columns(df)
    return df, meta


def read_labels(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a labels table (CSV, TSV — e.g. BIDS ``participants.tsv`` — or Parquet).

    A BIDS ``participant_id`` column is also exposed as ``subject`` (without the
    ``sub-`` prefix) when no ``subject`` column exists.

    Example:
        >>> labels = read_labels("participants.tsv")  # doctest: +SKIP
    """
    import pandas as pd

    p = os.fspath(path)
    if not os.path.isfile(p):
        raise InputError(f"labels file {p!r} not found", path=p, stage="read")
    if p.endswith(".parquet"):
        df = pd.read_parquet(p)
    else:
        sep = "\t" if p.endswith((".tsv", ".tsv.gz")) else ","
        df = pd.read_csv(p, sep=sep, dtype={"subject": str, "path": str, "participant_id": str, "session": str})
    if "subject" not in df.columns and "participant_id" in df.columns:
        df["subject"] = df["participant_id"].astype(str).str.removeprefix("sub-")
    return df


def write_parquet_atomic(df: pd.DataFrame, path: str | os.PathLike[str], metadata: dict[str, Any] | None = None) -> str:
    """Write ``df`` to Parquet via a temporary file and a rename, with optional provenance metadata.

    Example:
        >>> write_parquet_atomic(df, "pred.parquet", {"head": {...}})  # doctest: +SKIP
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(p))
    os.makedirs(parent, exist_ok=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata is not None:
        kv = dict(table.schema.metadata or {})
        kv[METADATA_KEY] = json.dumps(metadata).encode()
        table = table.replace_schema_metadata(kv)
    tmp = os.path.join(parent, f".{os.path.basename(p)}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return p
