"""Forward-only byte streams of an image file, decompressed on the fly, with bounded memory and a deadline.

The reader (:mod:`anatcl_infer.inputs.io`) moves bytes through these streams and nothing else:
what the bytes mean is decided by nibabel's header classes (:mod:`anatcl_infer.inputs.headers`).

* :class:`PlainStream`: an uncompressed file (``seek`` to skip, ``readinto`` straight into the
  caller's array).
* :class:`CompressedStream`: a gzip (``isal`` when installed, else ``zlib``) or bzip2 file, read
  from disk in 1 MiB chunks and inflated into the caller's buffer. Every gzip member is read
  (``pigz -i``, ``bgzip``), in time linear in the file's length whatever the number of members:
  each member's decoder is fed a piece that starts small and doubles, so the bytes a finished
  member leaves over (which ``zlib`` copies) are never more than what it consumed.

Neither ever holds the whole file: memory is the caller's buffer plus one chunk. Each stream
carries a :class:`Deadline`; past it, the next step raises :class:`DeadlineExceeded`.
:func:`open_regular` opens only regular files (a FIFO, a device, a directory or a broken link is
refused, with its reason, before anything is read).
"""

from __future__ import annotations

import bz2
import errno
import os
import stat
import time
import zlib
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import InputError

__all__ = [
    "Deadline",
    "StreamError",
    "Truncated",
    "CorruptStream",
    "DeadlineExceeded",
    "PlainStream",
    "CompressedStream",
    "GZIP_MAGIC",
    "BZIP2_MAGIC",
    "open_regular",
    "printable",
]

GZIP_MAGIC = b"\x1f\x8b"
BZIP2_MAGIC = b"BZh"

_CHUNK = 1 << 20  # compressed bytes read from disk at a time
_FIRST_CHUNK = 1 << 16  # the first read, enough for a header
_MIN_PIECE = 64  # first piece fed to a new member's decoder (an empty gzip member is 20 bytes)
_MAX_OUT = 4 << 20  # decompressed bytes produced per decoder call
_PLAIN_STEP = 64 << 20  # uncompressed bytes read per system call (a deadline check between)


class StreamError(Exception):
    """Base of the stream errors (turned into :class:`~anatcl_infer.errors.InputError` by the reader).

    Attributes:
        codec: ``"gzip"`` or ``"bzip2"`` (the compression whose stream failed).
    """

    def __init__(self, message: str, codec: str = "gzip") -> None:
        super().__init__(message)
        self.codec = codec


class Truncated(StreamError):
    """The compressed stream ends inside a member: the file was cut short."""


class CorruptStream(StreamError):
    """The decoder refused the stream (bad data, CRC or length)."""


class DeadlineExceeded(StreamError):
    """Reading this input took longer than its deadline."""


class Deadline:
    """A point in time after which reading one input stops.

    Args:
        seconds: the time allowed from now; ``None`` or a value <= 0 for no limit.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds if seconds is not None and seconds > 0 else None
        self._end = time.monotonic() + self.seconds if self.seconds is not None else None

    def check(self) -> None:
        """Raise :class:`DeadlineExceeded` once the deadline has passed."""
        if self._end is not None and time.monotonic() > self._end:
            raise DeadlineExceeded(f"reading took longer than its {self.seconds:g} s deadline")


class PlainStream:
    """An uncompressed file read forward (skips are seeks).

    Attributes:
        position: how many bytes of the file lie before the next byte read.
    """

    def __init__(self, fh: BinaryIO, deadline: Deadline) -> None:
        self._fh = fh
        self.deadline = deadline
        self.position = 0

    def readinto(self, out: memoryview) -> int:
        """Fill ``out`` from the file; returns how many bytes it holds (fewer at the end of the file)."""
        filled = 0
        while filled < len(out):
            self.deadline.check()
            n = self._fh.readinto(out[filled: filled + _PLAIN_STEP])
            if not n:
                break
            filled += n
        self.position += filled
        return filled

    def skip(self, n: int) -> int:
        """Move ``n`` bytes forward (past the end of the file is allowed: the next read gets nothing)."""
        self._fh.seek(n, 1)
        self.position += n
        return n

    def close(self) -> None:
        """Close the file."""
        self._fh.close()


def _gzip_backend() -> Any:
    try:
        from isal import isal_zlib as backend
    except ImportError:  # pragma: no cover - isal is a dependency on CPython
        backend = zlib
    return backend


def _bzip2_feed(d: Any, piece: memoryview, max_out: int) -> tuple[bytes, int, bool, bytes]:
    """Feed a ``bz2.BZ2Decompressor`` (which keeps the input it does not use yet): (output, input
    bytes consumed, stream ended, bytes after the stream's end that must be read again)."""
    if d.needs_input:
        out, consumed = d.decompress(piece, max_out), len(piece)
    else:
        out, consumed = d.decompress(b"", max_out), 0
    return out, consumed, bool(d.eof), (d.unused_data if d.eof else b"")


class CompressedStream:
    """The decompressed bytes of a gzip or bzip2 file, read forward in bounded memory.

    Args:
        fh: the open file, positioned at its start.
        codec: ``"gzip"`` or ``"bzip2"``.
        deadline: when reading must stop.

    Attributes:
        position: how many decompressed bytes lie before the next byte read.
        members: how many members (gzip) or streams (bzip2) have been started.
        garbage: the stream has ended, and what follows its last member is neither zero padding
            nor another member (Python's gzip module refuses such a file when it reads that far).
    """

    def __init__(self, fh: BinaryIO, codec: str, deadline: Deadline) -> None:
        self._fh = fh
        self.deadline = deadline
        self.codec = codec
        self._magic = GZIP_MAGIC if codec == "gzip" else BZIP2_MAGIC
        self._gzip = codec == "gzip"
        self._backend = _gzip_backend() if self._gzip else None
        self._buf = memoryview(b"")
        self._pos = 0
        self._member: Any = None
        self._piece = _MIN_PIECE
        self._ended = False
        self._scratch: bytearray | None = None
        self.position = 0
        self.members = 0
        self.garbage = False

    def _more_input(self) -> bool:
        """Read the next chunk of the file (64 KiB first: a header needs little), keeping what is left of the current one."""
        data = self._fh.read(_CHUNK if self.position or self.members > 1 else _FIRST_CHUNK)
        if not data:
            return False
        rest = self._buf[self._pos:]
        self._buf = memoryview(bytes(rest) + data if len(rest) else data)
        self._pos = 0
        return True

    def _start_member(self) -> bool:
        """At a member boundary: start the next member, or end the stream (end of file, zero
        padding or other trailing bytes, which gzip readers ignore or refuse only when reached)."""
        magic = self._magic
        while len(self._buf) - self._pos < len(magic):
            if not self._more_input():
                break
        if self._buf[self._pos: self._pos + len(magic)] != magic:
            if self.members == 0:
                raise CorruptStream(f"the file does not start with the {self.codec} signature", self.codec)
            self._ended = True
            # zero padding is ignored (as Python's gzip module does); other bytes are garbage
            self.garbage = bool(bytes(self._buf[self._pos: self._pos + 64]).strip(b"\0"))
            return False
        # gzip: 16 + 15 = a gzip header and trailer (CRC and length checked); bzip2: one stream
        self._member = self._backend.decompressobj(31) if self._gzip else bz2.BZ2Decompressor()
        self._piece = _MIN_PIECE
        self.members += 1
        return True

    def readinto(self, out: memoryview) -> int:
        """Fill ``out`` with the next decompressed bytes; returns how many (fewer at the end of the stream).

        Raises:
            Truncated: the file ends inside a member.
            CorruptStream: the decoder refuses the data.
            DeadlineExceeded: the deadline passed.
        """
        filled = 0
        want = len(out)
        gz = self._gzip
        while filled < want and not self._ended:
            self.deadline.check()
            if self._member is None and not self._start_member():
                break
            if self._pos >= len(self._buf) and not self._more_input():
                raise Truncated("the compressed stream ends before its end marker", self.codec)
            piece = self._buf[self._pos: self._pos + self._piece]
            d = self._member
            try:
                if gz:  # zlib-style: what is not used is left in unconsumed_tail / unused_data
                    part = d.decompress(piece, min(want - filled, _MAX_OUT))
                    consumed, eof, back = len(piece) - len(d.unconsumed_tail) - len(d.unused_data), d.eof, b""
                else:
                    part, consumed, eof, back = _bzip2_feed(d, piece, min(want - filled, _MAX_OUT))
            except Exception as exc:  # zlib.error, isal's IsalError (an OSError), bz2's OSError/EOFError...
                raise CorruptStream(f"{type(exc).__name__}: {exc}", self.codec) from None
            if part:
                out[filled: filled + len(part)] = part
                filled += len(part)
            self._pos += consumed
            if back:  # bytes after a bzip2 stream that its decoder had taken in: read them again
                self._buf = memoryview(back + bytes(self._buf[self._pos:]))
                self._pos = 0
            if eof:
                self._member = None
            elif consumed == len(piece) and self._piece < _CHUNK:
                self._piece *= 2  # the member goes on: feed it more at a time
        self.position += filled
        return filled

    def skip(self, n: int) -> int:
        """Decompress and drop ``n`` bytes (into a 1 MiB scratch buffer); returns how many were there."""
        if self._scratch is None:
            self._scratch = bytearray(min(_CHUNK, max(n, 1)))
        view = memoryview(self._scratch)
        done = 0
        while done < n:
            got = self.readinto(view[: min(len(view), n - done)])
            done += got
            if not got:
                break
        return done

    def exceeds(self, limit: int) -> bool:
        """Whether more than ``limit`` decompressed bytes are left (reads at most ``limit + 1``)."""
        return self.skip(limit + 1) > limit

    def close(self) -> None:
        """Close the file."""
        self._fh.close()


def _not_a_file(message: str, name: str) -> InputError:
    return InputError(message, path=name, stage="read", reason="not-a-file")


def printable(name: str) -> str:
    """``name`` with undecodable bytes shown as ``\\xNN`` (safe to print and store)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def open_regular(p: Path, name: str) -> int:
    """Open ``p`` for reading if it is a regular file (a FIFO never blocks: checked first)."""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if os.path.lexists(p):
            raise _not_a_file("is a broken symbolic link (its target does not exist); fix or remove the link", name) from None
        raise _not_a_file("file not found (it may have been moved or deleted); check the path", name) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _not_a_file("is a symbolic link loop; fix or remove the link", name) from None
        raise _not_a_file(f"cannot be examined ({exc.strerror or exc}); check the path and its permissions", name) from None
    if stat.S_ISDIR(st.st_mode):
        raise _not_a_file("is a directory, not an image file; give the image files inside it, or the folder to search", name)
    if not stat.S_ISREG(st.st_mode):
        what = "a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else ("a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a socket or special file")
        raise _not_a_file(f"is {what}, not a regular file; only image files are read", name)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise _not_a_file("file not found (it was deleted after it was listed); check the path", name) from None
    except OSError as exc:
        raise _not_a_file(f"cannot be opened ({exc.strerror or exc}); check its permissions", name) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between stat and open
        os.close(fd)
        raise _not_a_file("is not a regular file; only image files are read", name)
    return fd
