"""Resource bounds of one load, the memory budget every allocation is charged to, and the errors for a broken one.

:data:`LIMITS` is the one place the bounds are set; :class:`_Budget` is the byte budget of one
load (:func:`charge` bills it), :class:`_Refused` marks a failed bound or size check (reported as
"damaged or hostile"), :func:`_bad` a malformed pickle.
"""

from __future__ import annotations

import contextlib
import contextvars
import pickle
from collections.abc import Iterator

from ...errors import CheckpointError

#: resource bounds of one load (bytes, counts, levels)
LIMITS: dict[str, int] = {
    "pickle_bytes": 256 << 20,  # the pickle stream itself (data.pkl)
    "opcodes": 5_000_000,  # pickle opcodes, i.e. objects created
    "depth": 200,  # nesting of any object, checked on the opcode stream before anything is built
    "object_bytes": 256 << 20,  # one bytes/bytearray/array built by a call in the pickle
    "inflate_slack": 256 << 20,  # declared sizes inside the archive beyond the file's own size
    "memory_bytes": 1 << 30,  # everything one load builds, beyond the storage bytes its file holds
}

#: bytes charged per element when a call expands a sized object into a container (a set of
#: small ints costs ~60 bytes an element, a list 8 plus the element)
ITEM_BYTES = 64


def _bad(message: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(message)


class _Refused(pickle.UnpicklingError):
    """A bound of :data:`LIMITS` or a size check failed: the file asks for more than it holds."""


def _refuse_sizes(path: str, message: str) -> CheckpointError:
    return CheckpointError(f"{path}: {message}; the file is damaged or hostile, refusing it", path=path)


class _Budget:
    """The bytes one load may allocate: ``LIMITS["memory_bytes"]`` plus the size of the file.

    Storages are charged when they are read (at most the file's own bytes), and so are the pickle
    stream, its objects (per opcode), and every size a permitted call allocates (``bytearray(n)``,
    numpy arrays as itemsize x count, containers built from ranges or strings), before allocating.
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def charge(self, nbytes: int, what: str) -> None:
        """Add ``nbytes``; past the limit, refuse the file (nothing of that size was allocated)."""
        if nbytes < 0:
            raise _bad(f"{what} has a negative size")
        self.used += nbytes
        if self.used > self.limit:
            raise _Refused(
                f"{what} ({nbytes} bytes) takes the load past its memory budget of {self.limit} bytes "
                f"({self.used} bytes asked for in all)"
            )


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("anatcl_unpickle_budget", default=None)


@contextlib.contextmanager
def budget(file_size: int) -> Iterator[_Budget]:
    """Make a fresh :class:`_Budget` for a file of ``file_size`` bytes the one :func:`charge` bills."""
    own = _Budget(LIMITS["memory_bytes"] + max(int(file_size), 0))
    token = _BUDGET.set(own)
    try:
        yield own
    finally:
        _BUDGET.reset(token)


def charge(nbytes: int, what: str) -> None:
    """Charge ``nbytes`` to the current load's budget (outside a load: one object's bound only)."""
    own = _BUDGET.get()
    if own is None:
        if nbytes > LIMITS["object_bytes"]:
            raise _Refused(f"{what} asks for {nbytes} bytes (limit {LIMITS['object_bytes']})")
        return
    own.charge(nbytes, what)
