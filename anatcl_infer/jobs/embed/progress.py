"""Progress lines in the log (count, rate, ETA) for runs whose stderr is not a terminal.

The interval is ``anatcl_infer.jobs.embed.PROGRESS_EVERY_S`` (30 s), or the environment
variable ``ANATCL_PROGRESS_INTERVAL``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any

logger = logging.getLogger(__package__)  # one logger for the whole job, named as before the split


def _progress_every_s() -> float:
    """The package's ``PROGRESS_EVERY_S``, read when a run starts.

    The constant is defined on the package ``anatcl_infer.jobs.embed`` (its public home, where
    a caller or a test sets it: ``monkeypatch.setattr(embed, "PROGRESS_EVERY_S", 0.0)``). It is
    looked up there at call time through ``sys.modules``, not imported: ``from . import
    PROGRESS_EVERY_S`` would copy the value once, and any import of the package from here would
    make this module depend on the package that imports it (a cycle). The package is in
    ``sys.modules`` whenever this module is, since importing a submodule imports its package first.
    """
    return sys.modules[__package__].PROGRESS_EVERY_S


class _ProgressLog:
    """Progress lines (count, rate, ETA) in the log when stderr is no terminal (batch jobs).

    On a terminal the progress bar shows this; in a SLURM log the bar is invisible, so a
    line every ``anatcl_infer.jobs.embed.PROGRESS_EVERY_S`` seconds says how far the run is.
    """

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled and total > 0 and not _isatty(sys.stderr)
        self.every = _progress_every_s()
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
