"""The lock beside an output: one run writes an output at a time."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from pathlib import Path

from ..._files import shareable
from ...errors import OutputError
from .outputs import _mkdirs, _writing

logger = logging.getLogger(__package__)  # one logger for the whole job, named as before the split


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
