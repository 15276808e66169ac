"""Keep freed memory in the process between volumes (glibc only).

Each forward pass allocates activations of ~60 MB. glibc serves blocks above its mmap
threshold (at most 32 MB by default) with fresh ``mmap`` calls and returns them on
free, so every volume pays for page-faulting ~0.5 GB of zeroed pages again. Raising the
mmap and trim thresholds lets the allocator reuse that memory: on the 2-core benchmark
machine `anatcl embed` went from 0.52 to 0.41 s/volume (benchmarks/NOTES.md). The cost
is that the process keeps its peak memory (~0.8 GB for ResNet-18 on one volume) until
it exits.

``anatcl embed`` calls :func:`retain_freed_memory` itself; Python users who embed many
volumes on CPU can call it once at start-up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["retain_freed_memory", "yield_idle_threads"]

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_DONE: list[bool] = []


def retain_freed_memory(threshold_bytes: int = 1 << 30) -> bool:
    """Raise glibc's mmap and trim thresholds so large blocks are reused, not re-faulted.

    Args:
        threshold_bytes: blocks below this size come from (and return to) the heap.

    Returns:
        True when the setting was applied (Linux with glibc), False elsewhere.

    Example:
        >>> from anatcl_infer.encoding.allocator import retain_freed_memory
        >>> retain_freed_memory()  # doctest: +SKIP
        True
    """
    if _DONE:
        return _DONE[0]
    ok = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            ok = bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold_bytes))
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
            ok = False
    logger.debug("retain_freed_memory: %s", "applied" if ok else "not available here")
    _DONE.append(ok)
    return ok


def yield_idle_threads() -> bool:
    """Let torch's OpenMP threads sleep, not spin, while they wait (``OMP_WAIT_POLICY=PASSIVE``).

    With one loader process beside a forward pass that uses every core, spinning threads
    burn the core the loader needs and stall at the next barrier until it yields; sleeping
    threads hand it over. Measured on 2 busy cores: 0.35 -> 0.26 core-s per float32 forward,
    and 0.40 -> 0.28 core-s per volume through `anatcl embed` (benchmarks/NOTES.md).

    Only effective before torch is first imported, and never overrides a value the user set.

    Returns:
        True when the policy is (now) PASSIVE for this process.
    """
    import os

    if "OMP_WAIT_POLICY" in os.environ:
        return os.environ["OMP_WAIT_POLICY"].upper() == "PASSIVE"
    if "torch" in sys.modules:
        logger.debug("yield_idle_threads: torch is already loaded; OpenMP keeps its wait policy")
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
