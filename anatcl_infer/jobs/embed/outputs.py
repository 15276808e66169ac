"""Where a run writes and how: the output layout, atomic writes, the parts store, the errors file.

:func:`output_layout` decides what ``--out`` means (one file, or a part of a folder
dataset) and names every path a run touches. Every write goes to a temporary name and
is renamed (:func:`~anatcl_infer._files.atomic_path`); finished batches are Parquet parts
in ``<out>.partial/`` (:class:`_Parts`); an OSError while writing becomes a one-line
:class:`~anatcl_infer.errors.OutputError` (:func:`_output_error`, :func:`_writing`).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..._files import atomic_path
from ...errors import ConfigError, OutputError
from ...downstream.features import METADATA_KEY, part_name
from .table import _FINGERPRINT_TYPES, _FIXED_QC_TYPES, _ID_TYPES

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class OutputLayout:
    """Where one run writes: the table, its unfinished batches, its errors file and its lock.

    Attributes:
        out: the table file (a part ``DIR/part-IIIII-of-NNNNN.parquet`` for a folder output).
        fmt: ``"parquet"`` or ``"csv"``.
        partial_dir: finished batches of an unfinished run (removed when the table is written).
        errors_path: the errors CSV (written only when an input failed).
        lock_path: the lock file held while the run writes.
        dataset: the folder of parts, for a folder output; else ``None``.
        shard: ``(index, count)`` for a folder output.
    """

    out: Path
    fmt: str
    partial_dir: Path
    errors_path: Path
    lock_path: Path
    dataset: Path | None = None
    shard: tuple[int, int] | None = None


_SUFFIX_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}


def _is_folder_out(out: str | os.PathLike[str]) -> bool:
    s = os.fspath(out)
    return s.endswith(("/", os.sep)) or os.path.isdir(s)


def output_layout(
    out: str | os.PathLike[str], fmt: str | None = None, shard: tuple[int, int] | None = None,
) -> OutputLayout:
    """Decide what ``--out`` means.

    A folder (trailing slash, an existing folder, or any ``shard``) is a Parquet (or CSV)
    dataset: this run writes part ``shard`` (default ``0/1``) into it, and keeps its errors
    file and unfinished work *beside* it, so the folder holds nothing but parts. Otherwise
    the suffix decides the format (``.parquet``/``.pq``, ``.csv``); ``fmt`` must agree
    with it.

    Raises:
        ConfigError: the suffix and ``fmt`` contradict each other, or neither names a format.

    Example:
        >>> output_layout("feats.csv").fmt
        'csv'
        >>> output_layout("feats/", shard=(2, 8)).out.name
        'part-00002-of-00008.parquet'
    """
    if fmt is not None and fmt not in ("parquet", "csv"):
        raise ConfigError(f"format must be 'parquet' or 'csv', got {fmt!r}")
    path = Path(out)
    suffix_fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
    if shard is not None or _is_folder_out(out):
        if path.is_file():
            raise ConfigError(f"--out {path} is a file, but a folder output was asked for (--shard or a trailing /); choose a folder name")
        i, n = shard if shard is not None else (0, 1)
        if n < 1 or not 0 <= i < n:
            raise ConfigError(f"shard must be i/n with 0 <= i < n, got {i}/{n}")
        if fmt is None:
            fmt = suffix_fmt if suffix_fmt == "csv" else "parquet"
        name = part_name(i, n, fmt)
        part = path / name
        stem = name.rsplit(".", 1)[0]
        side = path.parent / f"{path.name}.partial"
        return OutputLayout(
            out=part, fmt=fmt, partial_dir=side / stem,
            errors_path=path.parent / f"{path.name}.errors" / f"{stem}.errors.csv",
            lock_path=side / f"{stem}.lock", dataset=path, shard=(i, n),
        )
    if fmt is None:
        if suffix_fmt is None:
            raise ConfigError(
                f"cannot tell the format of --out {path} from its name; use {path.name}.parquet or {path.name}.csv, "
                f"or {path}/ for a folder of Parquet parts"
            )
        fmt = suffix_fmt
    elif suffix_fmt is not None and suffix_fmt != fmt:
        raise ConfigError(f"--out {path} names a {suffix_fmt} file but --format is {fmt}; change one of them")
    return OutputLayout(
        out=path, fmt=fmt, partial_dir=path.with_name(path.name + ".partial"),
        errors_path=errors_path_for(path), lock_path=path.with_name(f".{path.name}.lock"),
    )


def check_output_free(layout: OutputLayout, *, resume: bool = False, overwrite: bool = False) -> None:
    """Raise :class:`ConfigError` when the run would clobber an output or an interrupted run's work.

    Checked before the model is loaded (a mistake costs nothing) and again under the output's lock.

    Example:
        >>> check_output_free(output_layout("new.parquet"))
    """
    if resume or overwrite:
        return
    if layout.out.exists():
        raise ConfigError(f"{layout.out} already exists; pass --resume to add what is missing, or --overwrite to replace it")
    if layout.partial_dir.exists():
        raise ConfigError(
            f"an interrupted run left {layout.partial_dir}; pass --resume to continue it, or --overwrite to start over"
        )


def errors_path_for(out: Path) -> Path:
    """``feats.parquet`` -> ``feats.errors.csv`` beside it."""
    stem = out.name.split(".")[0] if "." in out.name else out.name
    return out.with_name(f"{stem}.errors.csv")


def _output_error(exc: OSError, path: Path | str, *, kept: Path | None = None) -> OutputError:
    """One line saying what could not be written, why, and what to do next."""
    code = exc.errno
    text = str(exc)
    where = getattr(exc, "filename", None) or path
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "quota" in text.lower():
        why, todo = "the disk is full (or the quota is exceeded)", "free some space or choose another --out"
    elif code == errno.EROFS or "Read-only file system" in text:
        why, todo = "the file system is read-only", "choose a writable folder for --out"
    elif code in (errno.EACCES, errno.EPERM) or "Permission denied" in text:
        why, todo = "permission denied", "choose a folder you can write to for --out (or ask for write access)"
    else:
        why, todo = (exc.strerror or text or type(exc).__name__), "check the output folder"
    msg = f"cannot write {where}: {why}; {todo}"
    if kept is not None and kept.is_dir() and any(kept.glob("part-*")):
        msg += f"; the finished batches are kept in {kept}: rerun with --resume to continue"
    return OutputError(msg, path=str(where))


@contextlib.contextmanager
def _writing(path: Path, kept: Path | None = None) -> Iterator[None]:
    """Turn an OSError while writing ``path`` into an :class:`OutputError` with a one-line message."""
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        raise _output_error(exc, path, kept=kept) from exc


def _mkdirs(path: Path) -> None:
    for _ in range(5):  # a sibling shard may remove an empty shared folder at the same moment
        try:
            path.mkdir(parents=True, exist_ok=True)
            return
        except FileNotFoundError:
            continue
    path.mkdir(parents=True, exist_ok=True)


class _Parts:
    """Crash-safe store of finished batches: one Parquet file per batch, plus an errors log."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        _mkdirs(directory)
        self._seq = len(list(directory.glob("part-*.parquet")))

    def write(self, table: pa.Table, meta: dict[str, Any]) -> None:
        self._seq += 1
        _write_table(table, self.directory / f"part-{self._seq:07d}.parquet", json.dumps(meta))

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("part-*.parquet")) if self.directory.is_dir() else []

    def tables(self) -> list[pa.Table]:
        return [_read_table(p)[0] for p in self.files()]

    def metadata(self) -> dict[str, Any] | None:
        import pyarrow.parquet as pq

        for p in self.files():
            md = pq.read_schema(p).metadata or {}
            if METADATA_KEY in md:
                return json.loads(md[METADATA_KEY])
        return None


def _write_table(table: pa.Table, path: Path, metadata: str | bytes | None) -> None:
    """Write ``table`` to the Parquet file ``path`` atomically, with ``metadata`` (the provenance JSON) as its metadata."""
    import pyarrow.parquet as pq

    if metadata is not None:
        table = table.replace_schema_metadata({METADATA_KEY: metadata})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _read_table(path: Path) -> tuple[pa.Table, bytes | None]:
    """A Parquet file's table, without its metadata, and the provenance JSON that metadata holds (``None`` if none)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return table.replace_schema_metadata(None), (table.schema.metadata or {}).get(METADATA_KEY)


def _read_existing(path: Path, fmt: str) -> tuple[pa.Table | None, dict[str, Any] | None]:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    if not path.exists():
        return None, None
    if fmt == "parquet":
        table, raw = _read_table(path)
        return table, json.loads(raw) if raw is not None else None
    meta_path = path.with_name(path.name + ".meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    # BIDS entities stay strings ("01" is not 1); the fold stays an integer
    types = {c: pa.type_for_alias(t) for c, t in {**_ID_TYPES, **_FINGERPRINT_TYPES}.items()}
    table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=types))
    for i, name in enumerate(table.column_names):  # CSV has no float32: back to the types a run writes
        typ = pa.float32() if name.startswith("feat_") else (pa.type_for_alias(_FIXED_QC_TYPES[name]) if name in _FIXED_QC_TYPES else None)
        if typ is not None and table.schema.field(i).type != typ:
            table = table.set_column(i, name, table.column(i).cast(typ))
    return table, meta


def _write_final(table: pa.Table, out: Path, fmt: str, meta: dict[str, Any]) -> None:
    import pyarrow.csv as pacsv

    if fmt == "parquet":
        _write_table(table, out, json.dumps(meta))
        return
    meta_path = out.with_name(out.name + ".meta.json")
    with atomic_path(meta_path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    with atomic_path(out) as tmp:
        pacsv.write_csv(table, tmp)


def _remove_output(out: Path, fmt: str) -> None:
    """Remove an output table (and a CSV's metadata file) that a run replaces with nothing."""
    out.unlink(missing_ok=True)
    if fmt == "csv":
        out.with_name(out.name + ".meta.json").unlink(missing_ok=True)


def _write_errors(path: Path, failures: Sequence[dict[str, Any]]) -> None:
    """The errors CSV: ``path``, ``volume`` (empty but for a volume of a 4D file), ``fold``, ``stage``, ``message``;
    no file when nothing failed."""
    if not failures:
        path.unlink(missing_ok=True)
        if path.parent.name.endswith(".errors"):  # feats.errors/ beside a folder output, once empty
            with contextlib.suppress(OSError):
                path.parent.rmdir()
        return
    with atomic_path(path) as tmp:
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["path", "volume", "fold", "stage", "message"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(failures)
