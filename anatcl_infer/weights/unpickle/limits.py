"""Resource bounds of one load, and the errors that say a file broke one or is malformed.

:data:`LIMITS` is the one place the bounds are set; :class:`_Refused` marks a failed bound or
size check (reported as "damaged or hostile"), :func:`_bad` a malformed pickle.
"""

from __future__ import annotations

import pickle

from ...errors import CheckpointError

#: resource bounds of one load (bytes, counts, levels)
LIMITS: dict[str, int] = {
    "pickle_bytes": 256 << 20,  # the pickle stream itself (data.pkl)
    "opcodes": 5_000_000,  # pickle opcodes, i.e. objects created
    "depth": 200,  # nesting of the loaded object
    "object_bytes": 256 << 20,  # one bytes/bytearray/array built by a call in the pickle
    "inflate_slack": 256 << 20,  # declared sizes inside the archive beyond the file's own size
}


def _bad(message: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(message)


class _Refused(pickle.UnpicklingError):
    """A bound of :data:`LIMITS` or a size check failed: the file asks for more than it holds."""


def _refuse_sizes(path: str, message: str) -> CheckpointError:
    return CheckpointError(f"{path}: {message}; the file is damaged or hostile, refusing it", path=path)
