"""The ``anatcl embed`` job: inputs -> features table, written as batches complete.

Nothing is lost: each finished batch is written at once as a small Parquet part in
``<out>.partial/`` (temporary name, then rename); the final file is assembled from
the parts and appears atomically; ``resume=True`` skips the inputs already done (and
re-embeds those whose file changed, drops rows of inputs no longer there); a bad input
is recorded (path, stage, message) and never stops the others.

Files and folders get the process umask's modes (a lab's shared folder stays readable);
a lock beside the output stops two runs from interleaving; SIGTERM/SIGINT end with the
finished batches kept and a hint to ``--resume``; a full or read-only disk is an
:class:`~anatcl_infer.errors.OutputError` with a one-line message.

A folder output (``--out feats/``, or any ``--shard``) is a Parquet dataset: the folder
holds only ``part-IIIII-of-NNNNN.parquet`` files, which every Parquet reader (pyarrow,
pandas, polars, DuckDB, Spark) reads as one table; the errors files and unfinished work
live beside it, in ``feats.errors/`` and ``feats.partial/``.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import dataclasses
import errno
import functools
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._files import atomic_path, regular_file_sha256, shareable
from .._version import __version__
from ..errors import ConfigError, OutputError
from ..downstream.features import METADATA_KEY, feature_names, part_name

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

    from ..inputs.discovery import InputRecord
    from ..model.network import AnatCL

__all__ = [
    "EmbedSummary",
    "Interrupted",
    "OutputLayout",
    "output_layout",
    "run_embed",
    "shard_records",
    "distributed_shard",
    "weights_sha256",
    "METADATA_KEY",
]

logger = logging.getLogger(__name__)

#: Arrow types of the identifying columns, in table order (BIDS entities stay strings: "01" is not 1).
_ID_TYPES = {"path": "string", "subject": "string", "session": "string", "run": "string", "model": "string", "fold": "int64"}
#: Columns recording which file content each row came from (checked by ``--resume``), last in the table.
_FINGERPRINT_TYPES = {"input_sha256": "string", "input_size": "int64", "input_mtime_ns": "int64"}
_FINGERPRINT_COLUMNS = tuple(_FINGERPRINT_TYPES)
#: Seconds between progress lines in logs when stderr is not a terminal (no progress bar there);
#: the environment variable ``ANATCL_PROGRESS_INTERVAL`` overrides it.
PROGRESS_EVERY_S = 30.0


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (SIGINT, SIGTERM); finished batches are kept for ``--resume``.

    Attributes:
        signum: the signal number (``signal.SIGTERM`` is what SLURM sends at the time limit).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class EmbedSummary:
    """What a run did: counts and where it wrote."""

    out: Path
    errors_path: Path | None
    n_inputs: int
    n_written: int
    n_skipped: int
    failures: list[dict[str, Any]] = field(default_factory=list)
    #: inputs re-embedded on ``--resume`` because their file changed since the earlier run
    changed: list[str] = field(default_factory=list)
    #: inputs whose rows were dropped on ``--resume`` because they are no longer among the inputs
    n_dropped: int = 0
    #: number of rows in the table written
    n_rows: int = 0
    n_warned: int = 0  # inputs written with a warning (wrong kind, odd position...), each logged once

    @property
    def ok(self) -> bool:
        """True when no input failed."""
        return not self.failures


def shard_records(records: Sequence[Any], index: int, count: int) -> list[Any]:
    """Contiguous block ``index`` of ``count`` of the (already sorted) records.

    Concatenating the blocks in order gives the records back, so reading the parts
    of a sharded run in name order gives exactly the single-process table.
    """
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"shard must be i/n with 0 <= i < n, got {index}/{count}")
    bounds = np.linspace(0, len(records), count + 1).round().astype(int)
    return list(records[bounds[index]: bounds[index + 1]])


def distributed_shard() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when launched by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


class _FoldStack:
    """Runs several fold models on the same prepared batch (inputs are prepared once)."""

    def __init__(self, models: Sequence[AnatCL]) -> None:
        import torch

        self.models = list(models)
        first = self.models[0].config
        for m in self.models[1:]:
            if m.config.preprocess != first.preprocess:
                raise ConfigError("all folds must share one preprocessing spec to be embedded in one pass")
        self.module = torch.nn.ModuleList(self.models)
        self.config = dataclasses.replace(first, feature_dim=first.feature_dim * len(self.models))

    # The small surface iter_encoded needs from a model.
    @property
    def device(self) -> torch.device:
        return self.models[0].device

    def to(self, device: torch.device) -> _FoldStack:
        self.module.to(device)
        return self

    def eval(self) -> _FoldStack:
        self.module.eval()
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.cat([m(x) for m in self.models], dim=1)


def weights_sha256(model: Any) -> str:
    """SHA-256 of the weights a model actually holds (its state dict: names, dtypes, shapes, bytes).

    Unlike ``config.source_sha256`` (the file it came from, unknown for a re-exported or
    in-memory model) this identifies the numbers that produce the features, however they
    were loaded.

    Example:
        >>> weights_sha256(model)[:12]  # doctest: +SKIP
        '3f5a0c9e1b2d'
    """
    import torch

    memo = _WEIGHTS_MEMO.get()
    if memo is not None and id(model) in memo:
        return memo[id(model)][1]
    h = hashlib.sha256()
    module = model.module if isinstance(model, _FoldStack) else model
    for name, value in sorted(module.state_dict().items()):
        t = value.detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    if memo is not None:
        memo[id(model)] = (model, digest)  # the model is held, so its id is not reused inside the block
    return digest


#: digests remembered inside :func:`weights_unchanged` (None outside it)
_WEIGHTS_MEMO: contextvars.ContextVar[dict[int, tuple[Any, str]] | None] = contextvars.ContextVar("anatcl_weights_memo", default=None)


@contextlib.contextmanager
def weights_unchanged() -> Iterator[None]:
    """Inside the block, :func:`weights_sha256` hashes each model object once.

    For callers that run many jobs with the same loaded models and do not change their
    weights meanwhile (``anatcl bids`` runs one embed job per subject: hashing ~130 MB of
    weights per subject and fold costs ~0.07 s each time).
    """
    token = _WEIGHTS_MEMO.set({})
    try:
        yield
    finally:
        _WEIGHTS_MEMO.reset(token)


def _metadata(models: Sequence[AnatCL], device: str) -> dict[str, Any]:
    import torch

    cfg = models[0].config
    digests = [weights_sha256(m) for m in models]
    return {
        "package_version": __version__,
        "model": {
            "name": cfg.name,
            "source": cfg.source,
            "source_sha256": [m.config.source_sha256 for m in models] if len(models) > 1 else cfg.source_sha256,
            "weights_sha256": digests if len(models) > 1 else digests[0],
            "architecture": cfg.architecture,
            "variant": cfg.variant,
            "folds": [m.config.fold for m in models],
        },
        "preprocess": cfg.preprocess.to_dict(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": device,
    }


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
        return {"model": model, "preprocess": m.get("preprocess"), "precision": m.get("precision", "fp32")}

    by_weights = bool((meta.get("model") or {}).get("weights_sha256")) and bool((other.get("model") or {}).get("weights_sha256"))
    return pick(meta, by_weights), pick(other, by_weights)


# --------------------------------------------------------------------------- output layout


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


class _OutputLock:
    """An exclusive ``flock`` on a file beside the output, held while a run writes it.

    A second run on the same output is refused at once with a message naming the holder.
    On file systems without ``flock`` (some Lustre mounts, old NFS) the run goes on with a
    warning: keep one run per output there. Hand-written rather than ``filelock`` (installed
    with torch): its timeout error does not say who holds the lock, and without ``flock`` it
    switches to a marker-file lock instead of warning.
    """

    def __init__(self, path: Path, what: Path) -> None:
        self.path = path
        self.what = what
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no flock
            logger.debug("no fcntl on this platform: %s is not locked", self.what)
            return
        with _writing(self.path):
            _mkdirs(self.path.parent)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                    os.close(fd)
                    raise OutputError(
                        f"another run is writing {self.what} ({holder}; lock file {self.path}); "
                        "wait for it to end, or choose another --out",
                        path=str(self.what),
                    ) from None
                except OSError as exc:
                    os.close(fd)
                    if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS):
                        logger.warning("cannot lock %s on this file system (%s): make sure only one run writes it", self.what, exc.strerror)
                        return
                    raise
                try:  # the file we locked may have been unlinked by a run that just finished
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
            shareable(self.path)
            self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[dict[str, int]]:
    """SIGTERM (SLURM's time limit, ``kill``) and SIGINT raise :class:`Interrupted` in the main thread.

    Yields a dict whose ``"signum"`` is set once a signal arrived, so an error caused by the
    same signal (a DataLoader worker killed with the job) is reported as the interruption.
    """
    state: dict[str, int] = {}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum: int, frame: Any) -> None:
        first = "signum" not in state
        state.setdefault("signum", signum)
        if first:
            raise Interrupted(signum)

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class _ProgressLog:
    """Progress lines (count, rate, ETA) in the log when stderr is no terminal (batch jobs).

    On a terminal the progress bar shows this; in a SLURM log the bar is invisible, so a
    line every :data:`PROGRESS_EVERY_S` seconds says how far the run is.
    """

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled and total > 0 and not _isatty(sys.stderr)
        self.every = PROGRESS_EVERY_S
        env = os.environ.get("ANATCL_PROGRESS_INTERVAL")
        if env:
            try:
                self.every = max(float(env), 0.0)
            except ValueError:
                logger.warning("ignoring ANATCL_PROGRESS_INTERVAL=%r (not a number of seconds)", env)
        self.start = self.last = time.monotonic()
        self.done = 0
        self.failed = 0

    def update(self, n_ok: int, n_failed: int) -> None:
        self.done += n_ok + n_failed
        self.failed += n_failed
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.every or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            failed = f", {self.failed} failed" if self.failed else ""
            logger.info("embedded %d/%d inputs (%.0f%%%s), %.2f inputs/s, ETA %s",
                        self.done, self.total, 100.0 * self.done / self.total, failed, rate, _duration(eta))


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    """``1:02:05`` or ``02:05``, as the progress bar shows times; ``unknown`` before the first input."""
    from tqdm import tqdm

    return tqdm.format_interval(seconds) if math.isfinite(seconds) else "unknown"


# --------------------------------------------------------------------------- input fingerprints


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
    """Hashes the inputs in two background threads, a little ahead of the encoder."""

    def __init__(self, paths: Sequence[str], ahead: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.paths = list(paths)
        self.ahead = max(ahead, 1)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="anatcl-hash")
        self.futures: dict[int, Any] = {}
        self._submitted = 0
        self._submit(self.ahead)

    def _submit(self, upto: int) -> None:
        while self._submitted < min(upto, len(self.paths)):
            self.futures[self._submitted] = self.pool.submit(_fingerprint, self.paths[self._submitted])
            self._submitted += 1

    def get(self, index: int) -> tuple[str | None, int | None, int | None]:
        self._submit(max(index + 1, 0) + self.ahead)
        return self.futures.pop(index).result()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- parts and tables


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
    return table.sort_by([("path", "ascending"), ("fold", "ascending")])


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


def _write_errors(path: Path, failures: Sequence[dict[str, Any]]) -> None:
    if not failures:
        path.unlink(missing_ok=True)
        if path.parent.name.endswith(".errors"):  # feats.errors/ beside a folder output, once empty
            with contextlib.suppress(OSError):
                path.parent.rmdir()
        return
    with atomic_path(path) as tmp:
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["path", "fold", "stage", "message"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(failures)


def errors_path_for(out: Path) -> Path:
    """``feats.parquet`` -> ``feats.errors.csv`` beside it."""
    stem = out.name.split(".")[0] if "." in out.name else out.name
    return out.with_name(f"{stem}.errors.csv")


def run_embed(
    records: Sequence[InputRecord],
    models: Sequence[AnatCL],
    out: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    strict: bool = False,
    progress: bool = True,
    amp: bool | str = False,
    qc: bool = False,
    head: str | os.PathLike[str] | None = None,
    precision: str = "fp32",
    prior_failures: Sequence[dict[str, Any]] = (),
    shard: tuple[int, int] | None = None,
    coverage: float | None = 0.9,
) -> EmbedSummary:
    """Embed ``records`` with one model per fold and write one table.

    Args:
        records: inputs (from :func:`anatcl_infer.inputs.discovery.discover_inputs`), sorted;
            with ``shard``, all of them (this run embeds its block).
        models: one loaded model per fold, sharing a preprocessing spec.
        out: output file (``.parquet`` or ``.csv``), or a folder (trailing ``/``, an existing
            folder, or any ``shard``) that receives one part per shard.
        fmt: ``"parquet"`` or ``"csv"``; default: from the suffix of ``out`` (must agree with it).
        resume: keep what an earlier run of the same job wrote and embed only the rest; inputs
            whose file changed since are re-embedded, rows of inputs no longer given dropped.
        overwrite: replace an existing output (otherwise an existing output is an error).
        qc: add the QC metrics of :func:`anatcl_infer.qc.qc_metrics` as columns, plus ``qc_flag`` and
            ``qc_reasons`` (:func:`anatcl_infer.qc.metrics.add_qc_flags`), equal to ``anatcl qc``'s.
        head: a head directory whose predictions are added as columns (checked against ``models`` first).
        coverage: the head's prediction-interval coverage (``None``: no interval columns).
        precision: "fp32" (default), "bf16" or "fp16" (see :func:`anatcl_infer.encoding.encoder.encode`);
            recorded in the table's metadata, and a resume must use the same one.
        prior_failures: failures of earlier stages (e.g. the raw-T1 route) to report with these.
        shard: ``(i, n)``: embed block ``i`` of ``n`` of ``records`` into ``out/part-i-of-n``.

    Returns:
        An :class:`EmbedSummary`; ``summary.failures`` lists the inputs that failed.

    Raises:
        ConfigError: an existing output without ``resume``/``overwrite``, or a resume on another model.
        OutputError: the output cannot be written (full disk, read-only, permissions), or another
            run holds its lock.
        Interrupted: SIGTERM or SIGINT; the finished batches are kept for ``resume``.
    """
    from ..model.devices import resolve_device
    from ..encoding.encoder import resolve_precision

    if not models:
        raise ConfigError("run_embed needs at least one model")
    layout = output_layout(out, fmt, shard)
    if layout.shard is not None and shard is not None:
        n_total = len(records)
        records = shard_records(records, *shard)
        if not records:
            logger.warning("shard %d/%d has no inputs (%d inputs over %d shards): writing an empty part",
                           shard[0], shard[1], n_total, shard[1])
    else:
        n_total = len(records)
    if head is not None:
        from .._optional import require

        require("sklearn", "sklearn", "pandas")
    dev = resolve_device(device)
    meta = _metadata(models, str(dev))
    precision = resolve_precision(precision, dev, amp)
    meta["precision"] = precision
    if head is not None:
        check_head(head, models)  # before any embedding
    if layout.shard is not None:
        meta["shard"] = {"index": layout.shard[0], "count": layout.shard[1], "n_inputs": n_total}
    dim = models[0].config.feature_dim

    lock = _OutputLock(layout.lock_path, layout.dataset or layout.out)
    lock.acquire()
    try:
        with _stop_on_signals() as stopped:
            try:
                return _run_locked(
                    records, models, layout, meta, dim, dev, stopped,
                    resume=resume, overwrite=overwrite, progress=progress, qc=qc, head=head, coverage=coverage,
                    prior_failures=prior_failures,
                    # passed through to iter_encoded as they are:
                    batch_size=batch_size, num_workers=num_workers, precision=precision, strict=strict,
                )
            except Interrupted:
                raise
            except BaseException as exc:
                if "signum" in stopped:  # e.g. a DataLoader worker killed by the same SIGTERM
                    raise Interrupted(stopped["signum"]) from exc
                raise
    finally:
        lock.release()
        if layout.dataset is not None:
            with contextlib.suppress(OSError):
                layout.partial_dir.parent.rmdir()  # feats.partial/ once every shard is done


def _run_locked(
    records: Sequence[InputRecord], models: Sequence[AnatCL], layout: OutputLayout, meta: dict[str, Any],
    dim: int, dev: Any, stopped: dict[str, int], *, resume: bool, overwrite: bool, progress: bool, qc: bool,
    head: Any, coverage: float | None, prior_failures: Sequence[dict[str, Any]], **encode_kwargs: Any,
) -> EmbedSummary:
    """The body of :func:`run_embed`, run while holding the output's lock; ``encode_kwargs`` go to ``iter_encoded``."""
    from ..encoding.encoder import iter_encoded

    batch_size = int(encode_kwargs.get("batch_size", 8))
    out, fmt, partial_dir, errors_path = layout.out, layout.fmt, layout.partial_dir, layout.errors_path
    if out.exists() and not (resume or overwrite):
        raise ConfigError(f"{out} already exists; pass --resume to add what is missing, or --overwrite to replace it")
    if partial_dir.exists() and not (resume or overwrite):
        raise ConfigError(
            f"an interrupted run left {partial_dir}; pass --resume to continue it, or --overwrite to start over"
        )
    if overwrite and not resume:
        shutil.rmtree(partial_dir, ignore_errors=True)

    with _writing(partial_dir):
        parts = _Parts(partial_dir)
    fold_ids = [m.config.fold for m in models]
    wanted = {r.path for r in records}
    fresh = _Freshness(wanted)
    done: set[tuple[str, int | None]] = set()
    existing: pa.Table | None = None
    if resume:
        existing, existing_meta = _read_existing(out, fmt)
        for label, m in (("the existing output", existing_meta), ("the interrupted run", parts.metadata())):
            if m is None:
                continue
            a, b = _comparable(m, meta)
            if a != b:
                theirs, ours = a["model"], b["model"]
                what = "model" if a["model"] != b["model"] else ("precision" if a.get("precision") != b.get("precision") else "preprocessing")
                raise ConfigError(
                    f"{label} ({out if label.endswith('output') else partial_dir}) was made with another {what} "
                    f"({theirs.get('name')}, weights sha256 {str(theirs.get('weights_sha256') or '?')[:12]}, "
                    f"precision {a.get('precision')}) than this run "
                    f"({ours.get('name')}, weights sha256 {str(ours.get('weights_sha256') or '?')[:12]}, precision {b.get('precision')}); "
                    "resume with the same model and --precision, use another --out, or --overwrite to start over"
                )
        for t in ([existing] if existing is not None else []) + parts.tables():
            t = fresh.filter(t)
            done.update(zip(t.column("path").to_pylist(), t.column("fold").to_pylist()))
        if fresh.changed:
            logger.warning("re-embedding %d input(s) whose file changed since the earlier run (size, mtime or content): %s",
                           len(fresh.changed), _some(fresh.changed))
        if fresh.gone:
            logger.warning("dropping the rows of %d input(s) no longer among the inputs: %s", len(fresh.gone), _some(fresh.gone))

    todo = [r for r in records if any((r.path, f) not in done for f in fold_ids)]
    skipped = len(records) - len(todo)
    if skipped:
        logger.info("resuming: %d of %d inputs already embedded", skipped, len(records))

    extra = None
    if qc:
        from ..qc.metrics import qc_metrics

        extra = functools.partial(qc_metrics, config=models[0].config.preprocess)
    runner = models[0] if len(models) == 1 else _FoldStack(models)
    failures: list[dict[str, Any]] = list(prior_failures)
    n_written = 0
    prints = _Fingerprints([r.path for r in todo], ahead=4 * batch_size) if todo else None
    meter = _ProgressLog(len(todo), progress)
    n_warned = 0
    if todo:
        logger.info("embedding %d inputs with %s (fold%s %s) on %s", len(todo), models[0].config.name,
                    "s" if len(fold_ids) > 1 else "", ", ".join(str(f) for f in fold_ids), dev)
    try:
        if todo:
            for batch in iter_encoded(
                runner, [r.path for r in todo], device=dev, progress=progress, extra_info=extra, **encode_kwargs,
            ):
                for f in batch.failures:
                    rec = {"path": f.path, "fold": "all" if len(fold_ids) > 1 else fold_ids[0], "stage": f.stage, "message": f.message}
                    failures.append(rec)
                    logger.error("%s [%s]: %s", f.path, f.stage, f.message)
                for idx, info in zip(batch.indices, batch.infos):
                    if info.get("warnings"):  # one WARNING line per doubtful input, with every reason
                        n_warned += 1
                        logger.warning("%s: %s", todo[idx].path, "; ".join(info["warnings"]))
                if batch.indices:
                    fps = [prints.get(i) for i in batch.indices] if prints is not None else None
                    table = _build_table(todo, fold_ids, models[0].config.name, batch.indices, batch.features, batch.infos,
                                         dim=dim, fingerprints=fps)
                    with _writing(partial_dir, kept=partial_dir):
                        parts.write(table, meta)
                    n_written += len(batch.indices)
                meter.update(len(batch.indices), len(batch.failures))
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        stopped.setdefault("signum", signum)
        logger.info("interrupted (%s): %d inputs of this run kept in %s; rerun with --resume to continue",
                     signal.Signals(signum).name, n_written, partial_dir)
        raise exc if isinstance(exc, Interrupted) else Interrupted(signum) from None
    finally:
        if prints is not None:
            prints.close()

    import pyarrow as pa

    # Everything written (earlier output + all parts, read again), stale rows dropped, is the final table.
    all_tables = [fresh.filter(t) for t in ([existing] if existing is not None else []) + parts.tables()]
    empty = _build_table([], fold_ids, models[0].config.name, [], np.zeros((0, dim * len(models)), np.float32), [], dim=dim)
    final = pa.concat_tables([empty, *all_tables], promote_options="default") if all_tables else empty
    final = _dedupe(_sort_table(final))
    if qc:  # the cohort's outlier flags, as `anatcl qc` computes them
        from ..qc.metrics import add_qc_flags

        final = add_qc_flags(final, expected_kind=models[0].config.preprocess.input_kind)
    final = final.select([c for c in final.column_names if c not in _FINGERPRINT_COLUMNS] + list(_FINGERPRINT_COLUMNS))
    if head is not None:
        final = _add_head_columns(final, head, meta, coverage)
    with _writing(out, kept=partial_dir):
        _write_final(final, out, fmt, meta)
        _write_errors(errors_path, failures)
    shutil.rmtree(partial_dir, ignore_errors=True)
    n_inputs = len(records) + len(prior_failures)
    return EmbedSummary(out, errors_path if failures else None, n_inputs, n_written, skipped, failures,
                        changed=sorted(fresh.changed), n_dropped=len(fresh.gone), n_rows=final.num_rows, n_warned=n_warned)


def _some(paths: set[str], n: int = 3) -> str:
    names = sorted(paths)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _dedupe(table: pa.Table) -> pa.Table:
    """Keep the first row of each (path, fold) (a resumed run never writes one twice, but be safe)."""
    first: dict[tuple[Any, Any], int] = {}
    for i, key in enumerate(zip(table.column("path").to_pylist(), table.column("fold").to_pylist())):
        first.setdefault(key, i)
    if len(first) == table.num_rows:
        return table
    return table.take(list(first.values()))


def check_head(head_dir: str | os.PathLike[str], models: Sequence[AnatCL]) -> None:
    """Raise :class:`HeadError` unless the head was fitted on these models' weights (SHA-256, else name) and folds."""
    from .._optional import require
    from ..downstream.heads import Head

    require("sklearn", "sklearn", "pandas")  # applying a head needs the [sklearn] extra: say so first
    Head.load(head_dir).check_model(_metadata(models, "-"), feature_dim=models[0].config.feature_dim)


def _add_head_columns(table: pa.Table, head_dir: str | os.PathLike[str], meta: dict[str, Any], coverage: float | None = 0.9) -> pa.Table:
    import pyarrow as pa

    from ..downstream.heads import Head

    head = Head.load(head_dir)
    df = table.to_pandas()
    preds = head.predict_frame(df, metadata=meta, coverage=coverage)  # checks model sha256 (else name) and folds
    for name in preds.columns:
        if name in table.column_names:
            continue
        table = table.append_column(name, pa.array(preds[name].to_numpy()))
    return table
