"""The features table's rows: its schema, building rows from a batch, sorting, head columns.

Columns, in order: the identifying ones (``path``, ``subject``, ``session``, ``run``,
``model``, ``fold``), ``feat_000``..., the ``qc_*`` ones, then the fingerprint ones
(``input_sha256``, ``input_size``, ``input_mtime_ns``) that ``--resume`` checks. Reading
and writing these tables is in :mod:`.outputs`; deciding which rows are stale in :mod:`.resume`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ...downstream.features import feature_names

if TYPE_CHECKING:
    import pyarrow as pa

    from ...inputs.discovery import InputRecord

#: Arrow types of the identifying columns, in table order (BIDS entities stay strings: "01" is not 1).
_ID_TYPES = {"path": "string", "subject": "string", "session": "string", "run": "string", "model": "string", "fold": "int64"}
#: Columns recording which file content each row came from (checked by ``--resume``), last in the table.
_FINGERPRINT_TYPES = {"input_sha256": "string", "input_size": "int64", "input_mtime_ns": "int64"}
_FINGERPRINT_COLUMNS = tuple(_FINGERPRINT_TYPES)

# qc columns every row has, typed, so that parts (even empty ones) share one schema
_FIXED_QC_TYPES = {
    "qc_method": "string",
    "qc_kind": "string",
    "qc_kind_confidence": "float64",
    "qc_n_warnings": "int64",
    "qc_warnings": "string",
}


def _build_table(
    records: Sequence[InputRecord], fold_ids: Sequence[int | None], model_name: str,
    indices: Sequence[int], features: np.ndarray, infos: Sequence[dict[str, Any]],
    dim: int | None = None, fingerprints: Sequence[tuple[str | None, int | None, int | None]] | None = None,
) -> pa.Table:
    """The rows of one batch (one per input and fold) as a table, columns in the order above."""
    import pyarrow as pa

    n_folds = len(fold_ids)
    if dim is None:
        dim = features.shape[1] // n_folds
    cols: dict[str, list[Any]] = {k: [] for k in (*_ID_TYPES, *_FINGERPRINT_TYPES)}
    feat_rows: list[np.ndarray] = []
    extra: dict[str, list[Any]] = {k: [] for k in _FIXED_QC_TYPES}
    for row, idx in enumerate(indices):
        rec = records[idx]
        info = infos[row]
        qc = {
            "qc_method": info.get("method"),
            "qc_kind": info.get("kind"),
            "qc_kind_confidence": info.get("kind_confidence"),
            "qc_n_warnings": len(info.get("warnings", [])),
            "qc_warnings": "; ".join(info.get("warnings", [])),
        }
        qc.update({k2: v for k2, v in info.items() if k2.startswith("qc_")})
        fingerprint = fingerprints[row] if fingerprints is not None else (None, None, None)
        for k, fold in enumerate(fold_ids):
            # the identifying columns, then the fingerprint ones (the order of ``cols``)
            for name, value in zip(cols, (rec.path, rec.subject, rec.session, rec.run, model_name, fold, *fingerprint)):
                cols[name].append(value)
            feat_rows.append(features[row, k * dim:(k + 1) * dim])
            for key, value in qc.items():
                extra.setdefault(key, []).append(value)
    arrays: dict[str, pa.Array] = {k: pa.array(cols[k], pa.type_for_alias(t)) for k, t in _ID_TYPES.items()}
    mat = np.stack(feat_rows).astype(np.float32) if feat_rows else np.zeros((0, dim), np.float32)
    for j, name in enumerate(feature_names(mat.shape[1])):
        arrays[name] = pa.array(mat[:, j], pa.float32())
    for key, values in extra.items():
        typ = _FIXED_QC_TYPES.get(key)
        arrays[key] = pa.array(values, type=pa.type_for_alias(typ) if typ else None)
    arrays.update({k: pa.array(cols[k], pa.type_for_alias(t)) for k, t in _FINGERPRINT_TYPES.items()})
    return pa.table(arrays)


def _sort_table(table: pa.Table) -> pa.Table:
    """Rows by path, then fold: the order of every table a run writes."""
    return table.sort_by([("path", "ascending"), ("fold", "ascending")])


def _dedupe(table: pa.Table) -> pa.Table:
    """Keep the first row of each (path, fold) (a resumed run never writes one twice, but be safe)."""
    first: dict[tuple[Any, Any], int] = {}
    for i, key in enumerate(zip(table.column("path").to_pylist(), table.column("fold").to_pylist())):
        first.setdefault(key, i)
    if len(first) == table.num_rows:
        return table
    return table.take(list(first.values()))


def _add_head_columns(table: pa.Table, head_dir: str | os.PathLike[str], meta: dict[str, Any], coverage: float | None = 0.9) -> pa.Table:
    """``table`` with the prediction columns of the head in ``head_dir`` appended."""
    import pyarrow as pa

    from ...downstream.heads import Head

    head = Head.load(head_dir)
    df = table.to_pandas()
    preds = head.predict_frame(df, metadata=meta, coverage=coverage)  # checks model sha256 (else name) and folds
    for name in preds.columns:
        if name in table.column_names:
            continue
        table = table.append_column(name, pa.array(preds[name].to_numpy()))
    return table
