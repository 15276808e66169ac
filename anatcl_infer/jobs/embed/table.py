"""The features table's rows: its schema, building rows from a batch, sorting, head columns.

Columns, in order: the identifying ones (``path``, ``volume``, ``subject``, ``session``,
``run``, ``model``, ``fold``), ``feat_000``..., the ``qc_*`` ones, then the fingerprint ones
(``input_sha256``, ``input_size``, ``input_mtime_ns``) that ``--resume`` checks. ``volume``
is null for a 3D file and 0..N-1 for the volumes of a 4D file of N volumes (one row each);
a row is identified by (path, volume, fold). Reading and writing these tables is in
:mod:`.outputs`; deciding which rows are stale in :mod:`.resume`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ...downstream.features import feature_names

if TYPE_CHECKING:
    import pyarrow as pa

    from ...inputs.discovery import InputRecord

#: Arrow types of the identifying columns, in table order (BIDS entities stay strings: "01" is not 1;
#: ``volume`` is null for a 3D file, the volume's index for one of a 4D file).
_ID_TYPES = {"path": "string", "volume": "int64", "subject": "string", "session": "string", "run": "string", "model": "string", "fold": "int64"}
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


@dataclass(frozen=True)
class _Unit:
    """What one row (per fold) is made from: an input file, or one volume of a 4D input file."""

    record: InputRecord
    volume: int | None = None
    count: int = 1  # volumes in the file

    @property
    def path(self) -> str:
        return self.record.path

    @property
    def key(self) -> tuple[str, int | None]:
        """(path, volume): with the fold, what identifies a row."""
        return self.record.path, self.volume

    def item(self) -> Any:
        """What the encoder is given: the path, or a :class:`~anatcl_infer.inputs.io.NiftiVolume`."""
        from ...inputs.io import NiftiVolume

        return self.record.path if self.volume is None else NiftiVolume(self.record.path, self.volume, self.count)

    def __str__(self) -> str:
        return self.record.path if self.volume is None else f"{self.record.path}[volume {self.volume}]"


def _units(records: Sequence[InputRecord], one_volume: Any = None) -> list[_Unit]:
    """One unit per input file, one per volume of a 4D file (read from its header by
    :func:`~anatcl_infer.inputs.preprocess.split_volumes`), in input order.

    ``one_volume(record)`` true: the record is taken as one 3D file without reading its header
    (rows of a 3D file already written, on ``--resume``). A file whose header cannot be read is
    one unit; it fails, with its reason, when it is read.
    """
    from ...inputs.io import NiftiVolume
    from ...inputs.preprocess import split_volumes

    out: list[_Unit] = []
    for rec in records:
        if one_volume is not None and one_volume(rec):
            out.append(_Unit(rec))
            continue
        parts = split_volumes(rec.path)
        out.extend(_Unit(rec, p.index, p.count) if isinstance(p, NiftiVolume) else _Unit(rec) for p in parts)
    return out


def _volumes(table: pa.Table) -> list[int | None]:
    """The ``volume`` column as a list; all null for a table written before it existed."""
    if "volume" in table.column_names:
        return table.column("volume").to_pylist()
    return [None] * table.num_rows


def _row_keys(table: pa.Table) -> list[tuple[Any, Any, Any]]:
    """(path, volume, fold) of each row."""
    return list(zip(table.column("path").to_pylist(), _volumes(table), table.column("fold").to_pylist()))


def _build_table(
    records: Sequence[InputRecord | _Unit], fold_ids: Sequence[int | None], model_name: str,
    indices: Sequence[int], features: np.ndarray, infos: Sequence[dict[str, Any]],
    dim: int | None = None, fingerprints: Sequence[tuple[str | None, int | None, int | None]] | None = None,
) -> pa.Table:
    """The rows of one batch (one per input, or volume of a 4D input, and fold) as a table, columns in the order above."""
    import pyarrow as pa

    n_folds = len(fold_ids)
    if dim is None:
        dim = features.shape[1] // n_folds
    cols: dict[str, list[Any]] = {k: [] for k in (*_ID_TYPES, *_FINGERPRINT_TYPES)}
    feat_rows: list[np.ndarray] = []
    extra: dict[str, list[Any]] = {k: [] for k in _FIXED_QC_TYPES}
    for row, idx in enumerate(indices):
        unit = records[idx]
        rec, volume = (unit.record, unit.volume) if isinstance(unit, _Unit) else (unit, None)
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
            for name, value in zip(cols, (rec.path, volume, rec.subject, rec.session, rec.run, model_name, fold, *fingerprint)):
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
    """Rows by path, then volume, then fold: the order of every table a run writes (a table
    without ``volume``, written before it existed, by path and fold)."""
    keys = ["path", "volume", "fold"] if "volume" in table.column_names else ["path", "fold"]
    return table.sort_by([(k, "ascending") for k in keys])


def _dedupe(table: pa.Table) -> pa.Table:
    """Keep the first row of each (path, volume, fold) (a resumed run never writes one twice, but be safe)."""
    first: dict[tuple[Any, Any, Any], int] = {}
    for i, key in enumerate(_row_keys(table)):
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
