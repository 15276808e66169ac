"""The features table: column names, and reading the Parquet files ``anatcl embed`` writes.

A features file has one row per input (per input and fold with ``--fold all``; per
volume of a 4D input file): ``path``, ``volume`` (null but for the volumes of a 4D file,
0..N-1), ``subject``, ``session``, ``run``, ``model``, ``fold``, then ``feat_000`` ...
``feat_511`` (float32), then QC columns prefixed ``qc_``. Its
Parquet key-value metadata under ``anatcl_infer`` is a JSON block naming the model
(name, source, sha256, folds), the preprocessing and the package version, so every
number derived from it can be traced back.

A folder of parts (``anatcl embed ... --out feats/ --shard I/N``) reads as one table:
every part records its shard ``I/N`` in that metadata, so a missing or overlapping
shard is an error at read time rather than a silently short cohort.

BIDS entities (``subject``, ``session``, ``run``) are strings everywhere: ``01`` stays
``01`` through CSV.

Only numpy is imported at module import; pandas and pyarrow load on first use.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
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
    "part_name",
    "read_features",
    "read_labels",
    "write_parquet_atomic",
]

logger = logging.getLogger(__name__)

FEATURE_PREFIX = "feat_"
#: Parquet key-value metadata key holding the provenance JSON.
METADATA_KEY = b"anatcl_infer"

_FEATURE_RE = re.compile(r"^feat_(\d+)$")
_PART_RE = re.compile(r"^part-(\d+)-of-(\d+)\.")
#: Columns read as strings from CSV (a BIDS subject ``01`` must not become the number 1).
STRING_COLUMNS = ("path", "subject", "session", "run", "model", "participant_id", "input_sha256")


def part_name(index: int, count: int, fmt: str = "parquet") -> str:
    """File name of part ``index`` of ``count`` in a folder output.

    Example:
        >>> part_name(3, 32)
        'part-00003-of-00032.parquet'
    """
    return f"part-{index:05d}-of-{count:05d}.{'csv' if fmt == 'csv' else 'parquet'}"


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


def read_features(
    path: str | os.PathLike[str], *, allow_missing_shards: bool = False,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a features table (Parquet or CSV file, or a folder of parts) and its provenance metadata.

    Args:
        path: a file written by ``anatcl embed`` (or any Parquet/CSV with ``feat_`` columns),
            or a folder of parts (``--out feats/ --shard I/N``), read as one table.
        allow_missing_shards: read a folder whose parts are not all there yet (a warning names
            the missing ones) instead of raising.

    Returns:
        ``(dataframe, metadata)``; metadata is ``{}`` when the file carries none. A ``volume``
        column is pandas' nullable ``Int64`` (``<NA>`` for a 3D input).

    Raises:
        InputError: when the file does not exist, cannot be read, or has no feature columns;
            for a folder, when shards are missing, overlap (an input in two parts), or come
            from different models or input lists.

    Example:
        >>> df, meta = read_features("feats.parquet")  # doctest: +SKIP
        >>> meta["model"]["source_sha256"]  # doctest: +SKIP
        >>> df, meta = read_features("feats/")  # every part of a sharded run  # doctest: +SKIP
    """
    from .._optional import require

    require("sklearn", "pandas")

    p = os.fspath(path)
    if os.path.isdir(p):
        df, meta = _read_parts(p, allow_missing_shards)
    elif not os.path.isfile(p):
        raise InputError(f"features file {p!r} not found; create it with `anatcl embed DIR --out {p}`", path=p, stage="read")
    else:
        df, meta = _read_one(p)
    feature_columns(df)
    if "volume" in df.columns:  # nullable integers: NaN-filled floats would turn volume 1 into 1.0
        df["volume"] = df["volume"].astype("Int64")
    return df, meta


def _read_one(p: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    import pandas as pd

    meta: dict[str, Any] = {}
    if p.endswith((".csv", ".tsv", ".csv.gz", ".tsv.gz")):
        df = pd.read_csv(p, sep="\t" if p.endswith((".tsv", ".tsv.gz")) else ",", dtype={c: str for c in STRING_COLUMNS})
        sidecar = p + ".meta.json"
        if os.path.isfile(sidecar):
            try:
                meta = json.loads(open(sidecar, encoding="utf-8").read())
            except (OSError, json.JSONDecodeError):
                logger.warning("%s: ignoring unreadable metadata sidecar %s", p, sidecar)
        return df, meta
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
    return table.to_pandas(), meta


def _model_identity(meta: dict[str, Any]) -> Any:
    model = meta.get("model") or {}
    key = model.get("weights_sha256") or model.get("source_sha256") or model.get("source")
    return (model.get("name"), json.dumps(key), json.dumps(model.get("folds")), json.dumps(meta.get("preprocess"), sort_keys=True))


def _read_parts(folder: str, allow_missing: bool) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read every part of a folder output as one table, checking the shards are complete and disjoint."""
    import pandas as pd

    names = sorted(n for n in os.listdir(folder) if not n.startswith((".", "_")))
    files = [n for n in names if n.endswith((".parquet", ".pq"))] or [n for n in names if n.endswith((".csv", ".tsv"))]
    if not files:
        raise InputError(
            f"folder {folder!r} holds no Parquet or CSV parts; create them with `anatcl embed DIR --out {folder}/ --shard I/N`",
            path=folder, stage="read",
        )
    frames: list[pd.DataFrame] = []
    metas: list[dict[str, Any]] = []
    shards: dict[int, str] = {}
    counts: dict[int, str] = {}
    totals: dict[int, str] = {}
    dup_index: tuple[str | None, str] | None = None
    for name in files:
        df, meta = _read_one(os.path.join(folder, name))
        frames.append(df)
        metas.append(meta)
        info = meta.get("shard") or {}
        m = _PART_RE.match(name)
        index = info.get("index", int(m.group(1)) if m else None)
        count = info.get("count", int(m.group(2)) if m else None)
        if count is not None:
            counts.setdefault(int(count), name)
            if index is not None:
                if int(index) in shards and dup_index is None:
                    dup_index = (shards[int(index)], name)
                shards.setdefault(int(index), name)
        if "n_inputs" in info:
            totals.setdefault(int(info["n_inputs"]), name)
    if len(counts) > 1:
        desc = ", ".join(f"{n} ({c} shards)" for c, n in sorted(counts.items()))
        raise InputError(
            f"the parts in {folder!r} come from runs with different shard counts: {desc}; "
            "remove the parts of the older run (or embed again into a new folder)", path=folder, stage="read",
        )
    if dup_index is not None:
        raise InputError(f"parts {dup_index[0]} and {dup_index[1]} in {folder!r} are the same shard; remove one", path=folder, stage="read")
    if len(totals) > 1:
        desc = ", ".join(f"{n} ({t} inputs)" for t, n in sorted(totals.items()))
        raise InputError(
            f"the parts in {folder!r} were made from different input lists ({desc}), so shards may overlap or leave "
            "inputs out; run every shard on the same inputs", path=folder, stage="read",
        )
    identities = {_model_identity(m) for m in metas if m}
    if len(identities) > 1:
        raise InputError(f"the parts in {folder!r} come from different models or preprocessing; keep the parts of one model", path=folder, stage="read")
    if counts:
        count = next(iter(counts))
        missing = sorted(set(range(count)) - set(shards))
        if missing:
            shown = ", ".join(f"{i}/{count}" for i in missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            msg = (f"{len(missing)} of {count} shards are missing from {folder!r}: {shown}; run `anatcl embed ... --out {folder} "
                   f"--shard I/{count} --resume` for each (unfinished work is in {folder.rstrip('/')}.partial/)")
            failed = _failed_shards(folder, set(missing))
            if failed:  # a shard whose every input failed writes no part, only its errors file
                msg += ("; " + ", ".join(f"shard {i}/{count}" for i in sorted(failed)) + " ran but embedded no input (every input "
                        f"failed): see {', '.join(str(failed[i]) for i in sorted(failed)[:3])}")
            if not allow_missing:
                raise InputError(msg + ", or read the parts present with read_features(..., allow_missing_shards=True)", path=folder, stage="read")
            logger.warning("%s", msg)
    df = pd.concat([f for f in frames if len(f.columns)], ignore_index=True, sort=False) if len(frames) > 1 else frames[0]
    if "path" in df.columns:
        keys = df[[c for c in ("path", "volume", "fold") if c in df.columns]]
        dup = keys.duplicated(keep=False)
        if dup.any():
            where = df.loc[dup, "path"].iloc[0]
            raise InputError(
                f"shards overlap in {folder!r}: {int(dup.sum())} rows share an input (e.g. {where}) across parts; "
                "remove the parts of the older run, or embed again into a new folder", path=folder, stage="read",
            )
    meta = dict(next((m for m in metas if m), {}))
    if "shard" in meta:
        meta["shard"] = {"count": next(iter(counts)) if counts else None, "parts": len(files)}
    return df, meta


def _failed_shards(folder: str, missing: set[int]) -> dict[int, Path]:
    """The errors files (``<folder>.errors/part-I-of-N.errors.csv``) of missing shards that ran and failed every input."""
    errors_dir = Path(folder.rstrip("/") + ".errors")
    found: dict[int, Path] = {}
    if errors_dir.is_dir():
        for p in sorted(errors_dir.iterdir()):
            m = _PART_RE.match(p.name)
            if m and p.name.endswith(".errors.csv") and int(m.group(1)) in missing:
                found[int(m.group(1))] = p
    return found


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
        df = pd.read_csv(p, sep=sep, dtype={c: str for c in STRING_COLUMNS})
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

    from .._files import atomic_path

    p = os.fspath(path)
    table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata is not None:
        kv = dict(table.schema.metadata or {})
        kv[METADATA_KEY] = json.dumps(metadata).encode()
        table = table.replace_schema_metadata(kv)
    with atomic_path(p) as tmp:
        pq.write_table(table, tmp)
    return p
