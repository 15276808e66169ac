"""How ``--resume`` decides what is still valid and what is stale.

An earlier run's rows are reused only when it was made with the same model (SHA-256 of
its weights), preprocessing and precision (:func:`_check_compatible`), and each row only
while its input is still among the inputs and its file unchanged: same size and mtime,
or else the same SHA-256 (:class:`_Freshness`). The fingerprints of this run's inputs are
computed in background threads as they are embedded (:class:`_Fingerprints`), once per file
(the volumes of a 4D file share their file's). A row is done per (path, volume, fold).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..._files import regular_file_sha256
from ...errors import ConfigError
from .table import _FINGERPRINT_COLUMNS, _row_keys

if TYPE_CHECKING:
    import pyarrow as pa

logger = logging.getLogger(__package__)  # one logger for the whole job, named as before the split


def _file_sha256(path: str) -> str | None:
    """SHA-256 of a regular input file; ``None`` for anything else or an unreadable file."""
    try:
        return regular_file_sha256(path)
    except OSError:
        return None


def _size_mtime(path: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of an input file; ``None`` when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _fingerprint(path: str) -> tuple[str | None, int | None, int | None]:
    """(sha256, size, mtime_ns) of an input file; ``None``s when it cannot be read."""
    stat = _size_mtime(path)
    return (None, None, None) if stat is None else (_file_sha256(path), *stat)


class _Freshness:
    """Decides, on ``--resume``, whether a row written earlier still describes its input.

    A row is kept when its input is among this run's inputs and its file has the size and
    mtime recorded with the row — or, when those changed, the same SHA-256 (a ``touch`` or a
    copy does not force re-embedding). Rows written before fingerprints were recorded are kept.
    """

    def __init__(self, wanted: set[str]) -> None:
        self.wanted = wanted
        # each input is looked at once however many rows (folds, parts) name it
        self._current = functools.cache(_size_mtime)
        self._sha256 = functools.cache(_file_sha256)
        self.changed: set[str] = set()
        self.gone: set[str] = set()

    def keep(self, path: str, sha: str | None, size: int | None, mtime: int | None) -> bool:
        if path not in self.wanted:
            self.gone.add(path)
            return False
        if size is None or mtime is None:
            return True  # written before fingerprints were recorded: nothing to compare
        now = self._current(path)
        if now == (size, mtime):
            return True
        if now is not None and now[0] == size and sha and self._sha256(path) == sha:
            return True
        self.changed.add(path)
        return False

    def filter(self, table: pa.Table) -> pa.Table:
        n = table.num_rows
        prints = [table.column(c).to_pylist() if c in table.column_names else [None] * n for c in _FINGERPRINT_COLUMNS]
        keep = [i for i, (path, *fp) in enumerate(zip(table.column("path").to_pylist(), *prints)) if self.keep(path, *fp)]
        return table if len(keep) == n else table.take(keep)


class _Fingerprints:
    """Hashes the inputs in two background threads, a little ahead of the encoder.

    ``paths`` has one entry per row source: consecutive equal paths (the volumes of one 4D
    file) share one hash of the file.
    """

    def __init__(self, paths: Sequence[str], ahead: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.paths = list(paths)
        self.ahead = max(ahead, 1)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="anatcl-hash")
        self.futures: dict[int, Any] = {}
        self._submitted = 0
        self._last: tuple[str, Any] | None = None
        self._submit(self.ahead)

    def _submit(self, upto: int) -> None:
        while self._submitted < min(upto, len(self.paths)):
            i = self._submitted
            path = self.paths[i]
            if self._last is not None and self._last[0] == path:
                self.futures[i] = self._last[1]  # another volume of the same file
            else:
                self.futures[i] = self.pool.submit(_fingerprint, path)
                self._last = (path, self.futures[i])
            self._submitted += 1

    def get(self, index: int) -> tuple[str | None, int | None, int | None]:
        self._submit(max(index + 1, 0) + self.ahead)
        return self.futures.pop(index).result()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _comparable(meta: dict[str, Any], other: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The parts of two metadata blocks that must agree for a resume to be valid.

    When both name the SHA-256 of the weights actually loaded, that (with the model name,
    folds and preprocessing) decides; a file written before that was recorded falls back
    to comparing the whole model block.
    """
    def pick(m: dict[str, Any], by_weights: bool) -> dict[str, Any]:
        model = dict(m.get("model") or {})
        if by_weights:
            model = {k: model.get(k) for k in ("name", "weights_sha256", "architecture", "folds")}
        else:
            model.pop("weights_sha256", None)
        # tables from before --precision existed were float32
        precision = m.get("precision", "fp32")
        # backend (issue 24): float32 features of torch and OpenVINO agree within float32 noise and may
        # mix; reduced-precision ones differ beyond it, so those must come from the same backend
        backend = None if precision == "fp32" else (m.get("backend") or {}).get("name", "torch")
        return {"model": model, "preprocess": m.get("preprocess"), "precision": precision, "backend": backend}

    by_weights = bool((meta.get("model") or {}).get("weights_sha256")) and bool((other.get("model") or {}).get("weights_sha256"))
    return pick(meta, by_weights), pick(other, by_weights)


def _check_compatible(earlier: Sequence[tuple[str, Path, dict[str, Any] | None]], meta: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` unless each earlier piece of work (label, where, its metadata) matches ``meta``."""
    for label, where, m in earlier:
        if m is None:
            continue
        a, b = _comparable(m, meta)
        if a != b:
            theirs, ours = a["model"], b["model"]
            what = "model" if a["model"] != b["model"] else ("precision" if a.get("precision") != b.get("precision") else "preprocessing")
            if what == "preprocessing" and a.get("backend") != b.get("backend"):
                what = f"backend ({a.get('backend')}, not {b.get('backend')}: {a.get('precision')} features of two backends differ)"
            raise ConfigError(
                f"{label} ({where}) was made with another {what} "
                f"({theirs.get('name')}, weights sha256 {str(theirs.get('weights_sha256') or '?')[:12]}, "
                f"precision {a.get('precision')}) than this run "
                f"({ours.get('name')}, weights sha256 {str(ours.get('weights_sha256') or '?')[:12]}, precision {b.get('precision')}); "
                "resume with the same model and --precision (and --backend for bf16/fp16), use another --out, or --overwrite to start over"
            )


def _still_done(fresh: _Freshness, tables: Sequence[pa.Table]) -> set[tuple[str, int | None, int | None]]:
    """(path, volume, fold) of the rows of ``tables`` that still describe their input (``volume`` null for
    a 3D file, and for every row of a table written before the column existed); logs what changed and what is gone."""
    done: set[tuple[str, int | None, int | None]] = set()
    for t in tables:
        t = fresh.filter(t)
        done.update(_row_keys(t))
    if fresh.changed:
        logger.warning("re-embedding %d input(s) whose file changed since the earlier run (size, mtime or content): %s",
                       len(fresh.changed), _some(fresh.changed))
    if fresh.gone:
        logger.warning("dropping the rows of %d input(s) no longer among the inputs: %s", len(fresh.gone), _some(fresh.gone))
    return done


def _some(paths: set[str], n: int = 3) -> str:
    """The first ``n`` paths, sorted, and how many more: for one log line."""
    names = sorted(paths)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
