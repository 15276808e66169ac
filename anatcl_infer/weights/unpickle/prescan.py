"""The opcode pre-scan: a pickle's size, opcode count, memo slots and frame lengths, checked before it is unpickled.

The C unpickler allocates what a ``BINBYTES8``/``FRAME`` declares and grows its memo to the
largest index named *before* reading; :func:`_scan` walks the opcodes (building no object)
within a :class:`_Bounded` view of the stream and refuses what breaks :data:`LIMITS`.
"""

from __future__ import annotations

import pickletools
import struct
from typing import Any

from ...errors import CheckpointError
from .limits import LIMITS


def _scan(stream: Any, size: int, path: str) -> None:
    """Walk the pickle's opcodes (no objects built): bound its size, opcode count and declared lengths.

    The C unpickler allocates a ``BINBYTES8``/``FRAME`` of the length the file declares *before*
    reading it, and grows its memo to the largest index named; these are checked here first.
    """
    limit = LIMITS["opcodes"]
    start = stream.tell()
    count = 0
    try:
        for opcode, arg, pos in pickletools.genops(_Bounded(stream, start + size)):
            count += 1
            if count > limit:
                raise CheckpointError(f"{path}: the pickle holds more than {limit} objects; refusing to build it", path=path)
            if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET") and int(arg) > limit:
                raise CheckpointError(f"{path}: the pickle names memo slot {arg} (limit {limit})", path=path)
            if opcode.name == "FRAME" and int(arg) > size:
                raise CheckpointError(f"{path}: the pickle declares a frame of {arg} bytes in a stream of {size}", path=path)
            if opcode.name == "STOP":
                break
    except CheckpointError:
        raise
    except (ValueError, TypeError, EOFError, OverflowError, struct.error) as exc:
        raise CheckpointError(f"{path}: the pickle stream is malformed ({exc}); the file may be damaged, download it again", path=path) from None
    stream.seek(start)


class _Bounded:
    """A read-only view of a stream that refuses reads past ``end`` (declared lengths are not trusted)."""

    def __init__(self, stream: Any, end: int) -> None:
        self._s, self._end = stream, end

    def read(self, n: int = -1) -> bytes:
        left = self._end - self._s.tell()
        if n is None or n < 0:
            n = left
        if n > left:
            raise ValueError(f"a length of {n} bytes runs past the end of the pickle ({left} bytes left)")
        return self._s.read(n)

    def readline(self) -> bytes:
        line = self._s.readline(max(self._end - self._s.tell(), 0))
        return line

    def tell(self) -> int:
        return self._s.tell()
