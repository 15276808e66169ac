"""Atomic writes that honour the process umask.

``tempfile.mkstemp``/``mkdtemp`` create owner-only files (0600) and folders (0700); a result
renamed into place from them stays owner-only whatever the umask, so a colleague cannot read a
shared cache or a features table. Every writer in the package goes through these helpers instead.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["current_umask", "shareable", "atomic_path", "atomic_dir", "makedirs", "regular_file_sha256", "output_stem"]


def current_umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shareable(path: str | os.PathLike[str]) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have given it under the umask."""
    p = Path(path)
    base = 0o777 if p.is_dir() else 0o666
    os.chmod(p, base & ~current_umask())


def makedirs(path: str | os.PathLike[str]) -> Path:
    """``mkdir -p`` (folders get the umask's mode, like ``os.makedirs``)."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it is renamed onto ``dest``.

    The temporary file is removed on error, so ``dest`` is either the old file or the whole new one.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> with atomic_path(d / "x.txt") as tmp:
        ...     _ = tmp.write_text("hello")
        >>> (d / "x.txt").read_text()
        'hello'
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        shareable(tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; on success it replaces ``dest`` (files keep umask modes)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        for p in [tmp, *tmp.rglob("*")]:
            shareable(p)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def regular_file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """SHA-256 of a regular file's content.

    Anything else is refused before a byte is read: a FIFO would block for ever, a link to
    ``/dev/zero`` would never end (``O_NONBLOCK`` open, then ``fstat`` on the same descriptor).

    Raises:
        OSError: the file cannot be opened or read, or is not a regular file (``EINVAL``).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        h = hashlib.sha256()
        with os.fdopen(fd, "rb", closefd=False) as fh:
            while block := fh.read(chunk):
                h.update(block)
        return h.hexdigest()
    finally:
        os.close(fd)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def output_stem(index: int, path: str | os.PathLike[str]) -> str:
    """A file-name stem for one input's output: its index, then its name without the image suffix.

    Only letters, digits, ``.``, ``_`` and ``-`` are kept, so a hostile input name cannot escape
    the output folder or break the HTML that links it.

    Example:
        >>> output_stem(3, "/data/sub-01 (copy)_mwp1.nii.gz")
        '0003_sub-01_copy__mwp1'
    """
    name = os.path.basename(str(path).rstrip("/\\")) or "input"
    for ext in (".nii.gz", ".nii", ".npy", ".mgz"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return f"{index:04d}_{_UNSAFE.sub('_', name)[:80]}"
