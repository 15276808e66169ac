"""A memory cap for subprocess tests that holds whatever torch build pip installed.

``RLIMIT_AS`` counts every mapped byte, used or not: the CUDA libraries of the index's default
torch build (≈3 GB mapped on import, GPU or not), glibc's 64 MB arena reservation per thread,
CUDA's virtual-address reservations. A fixed address-space cap that leaves room with the CPU
wheel therefore kills the process with the default build (``MemoryError`` importing torch,
"cannot allocate memory for thread-local data", a SIGSEGV, ``std::bad_alloc``).

``RLIMIT_DATA`` counts only private writable memory (the heap, anonymous mappings, thread stacks,
the libraries' data segments): what a runaway allocation consumes, and not what a library merely
maps or reserves. The cap is set relative to what the process itself holds once torch is imported
and its thread pool started, so every build gets the same room for the work under test.

Use it as the first lines of a subprocess script: ``PRELUDE.format(budget=BUDGET)``.
"""

from __future__ import annotations

import textwrap

#: Private writable memory allowed above the process's own baseline (torch imported, pool warm).
BUDGET = 2 << 30

PRELUDE = textwrap.dedent(
    """
    import re as _re, resource as _resource
    import torch as _torch
    _torch.ones(1 << 20).exp().sum()  # start the intra-op thread pool: its stacks are baseline
    with open("/proc/self/status") as _fh:
        _baseline = int(_re.search(r"VmData:\\s+(\\d+) kB", _fh.read()).group(1)) * 1024
    _resource.setrlimit(_resource.RLIMIT_DATA, (_baseline + {budget}, _baseline + {budget}))
    del _re, _resource, _torch, _fh, _baseline
    """
)


def prelude(budget: int = BUDGET) -> str:
    """Python source that caps the running process at its baseline plus `budget` bytes of data."""
    return PRELUDE.format(budget=int(budget))
