"""A checked cache: what a converted registry model was, recorded at conversion, verified at every load.

When a downloaded original is converted into ``<cache>/models/<name>/fold<k>/``, the SHA-256
and size of the ``model.safetensors`` and ``config.json`` just written, and the SHA-256 of the
original file they came from, are recorded beside them in ``integrity.json``. Every load
compares the folder with that record, and the record with the registry's SHA-256: weights
copied or converted elsewhere, edited, truncated or swapped are an
:class:`~anatcl_infer.errors.IntegrityError` naming the folder and how to repair it.

Hashing ~130 MB costs ~0.2 s; it is skipped when the weights file has the same (size,
mtime_ns, ctime_ns, inode, device) as when it last matched (a stamp in
``integrity-checked.json``, written when the folder is writable; any change to the file, even
``cp -p`` over it, changes its ctime and triggers a re-hash). ``config.json`` is small and
hashed every time.

The record says what this package wrote; it is not a signature: whoever can write the
folder can also write a matching record. It catches copies that went wrong, foreign weights
put in the cache's place and caches carried from another machine without their record.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from .._files import atomic_path, regular_file_sha256
from ..config import CONFIG_NAME, WEIGHTS_NAME
from ..errors import IntegrityError

__all__ = ["RECORD_NAME", "STAMP_NAME", "write_record", "mark_checked", "verify_model_dir", "integrity_problem"]

logger = logging.getLogger(__name__)

#: the record written at conversion, beside config.json and model.safetensors
RECORD_NAME = "integrity.json"
#: when the weights last matched the record (a cache of the check; safe to delete)
STAMP_NAME = "integrity-checked.json"
_FORMAT = "anatcl-infer-integrity/1"
_FILES = (WEIGHTS_NAME, CONFIG_NAME)


def _describe(path: Path) -> dict[str, Any]:
    return {"sha256": regular_file_sha256(path), "size": path.stat().st_size}


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def write_record(directory: str | os.PathLike[str], *, source: str, source_sha256: str | None) -> Path:
    """Hash the model files of a freshly converted ``directory`` and record them beside them.

    Args:
        directory: a folder holding ``config.json`` + ``model.safetensors``.
        source: where the original came from (URL).
        source_sha256: SHA-256 of the original file (the registry's, when it knows one).

    Example:
        >>> write_record("cache/models/anatcl-global/fold0", source=url, source_sha256=sha)  # doctest: +SKIP
    """
    directory = Path(directory)
    record = {
        "format": _FORMAT,
        "source": source,
        "source_sha256": source_sha256,
        "files": {name: _describe(directory / name) for name in _FILES},
    }
    path = directory / RECORD_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return path


def mark_checked(directory: str | os.PathLike[str]) -> None:
    """Stamp the weights of a folder just written with :func:`write_record` (and moved into place) as checked.

    Called by the writer once the folder is final (moving it and setting its modes change the
    ctime), so the first load does not hash again what was hashed a moment ago.
    """
    record = _read_record(Path(directory))
    if record is not None:
        _write_stamp(Path(directory), record["files"][WEIGHTS_NAME]["sha256"])


def _write_stamp(directory: Path, sha256: str) -> None:
    """Remember that the weights file, as it is now, matched (best effort: a read-only cache is hashed each time)."""
    try:
        with atomic_path(directory / STAMP_NAME) as tmp:
            tmp.write_text(json.dumps({"sha256": sha256, "stat": _stat_key(directory / WEIGHTS_NAME)}) + "\n")
    except OSError as exc:
        logger.debug("cannot write %s (%s); the weights are hashed at each load", directory / STAMP_NAME, exc)


def _stamp_matches(directory: Path, sha256: str) -> bool:
    try:
        stamp = json.loads((directory / STAMP_NAME).read_text())
        return stamp.get("sha256") == sha256 and stamp.get("stat") == _stat_key(directory / WEIGHTS_NAME)
    except (OSError, ValueError, AttributeError):
        return False


def _read_record(directory: Path) -> dict[str, Any] | None:
    """The parsed record, or None when there is none or it is not one."""
    try:
        record = json.loads((directory / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        return None
    files = record.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(files.get(n), dict) and isinstance(files[n].get("sha256"), str) for n in _FILES
    ):
        return None
    return record


def integrity_problem(directory: str | os.PathLike[str], expected_sources: Collection[str] = ()) -> str | None:
    """Why ``directory`` is not the model its record and the registry describe, or None when it is.

    Args:
        directory: a cached model folder.
        expected_sources: the SHA-256s the registry (or the caller) accepts for the original
            file; empty when none is known (only the folder's consistency is checked).

    Example:
        >>> integrity_problem(registry_model_dir("anatcl-global", 0), {"77f6d44d..."})  # doctest: +SKIP
    """
    directory = Path(directory)
    record = _read_record(directory)
    if record is None:
        return (f"it has no valid {RECORD_NAME} (it was not written by `anatcl download`/load_model of this "
                "anatcl-infer version, or was copied without it), so its weights cannot be checked")
    wanted = {s.lower() for s in expected_sources if s}
    if wanted and str(record.get("source_sha256") or "").lower() not in wanted:
        return (f"it was converted from a file with sha256 {record.get('source_sha256') or 'unknown'}, "
                f"not the registry's {' or '.join(sorted(wanted))}")
    files = record["files"]
    for name in _FILES:
        path = directory / name
        try:
            size = path.stat().st_size
            if size != files[name].get("size", size):
                return f"{name} has {size} bytes, {files[name]['size']} were written"
            if name == WEIGHTS_NAME and _stamp_matches(directory, files[name]["sha256"]):
                continue
            actual = regular_file_sha256(path)
        except OSError as exc:
            return f"{name} cannot be read ({exc.strerror or exc})"
        if actual != files[name]["sha256"]:
            return f"{name} has sha256 {actual}, {files[name]['sha256']} was written"
        if name == WEIGHTS_NAME:
            _write_stamp(directory, actual)
    return None


def verify_model_dir(directory: str | os.PathLike[str], expected_sources: Collection[str] = (), *, repair: str) -> None:
    """Raise :class:`IntegrityError` unless ``directory`` matches its record and the registry.

    Args:
        directory: a cached model folder.
        expected_sources: SHA-256s accepted for the original file (see :func:`integrity_problem`).
        repair: the command that fetches it again (quoted in the error).

    Raises:
        IntegrityError: naming the folder, what differs and ``repair``.
    """
    problem = integrity_problem(directory, expected_sources)
    if problem is not None:
        raise IntegrityError(
            f"the cached model {directory} fails its integrity check: {problem}. It was not loaded. Repair: {repair}",
            path=str(directory),
            expected=",".join(sorted(expected_sources)),
        )
