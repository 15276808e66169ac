"""Progress as people see it: a bar on a terminal, log lines (count, rate, ETA) in a batch log.

A progress bar written into a file (a SLURM log, ``2> run.log``) is hundreds of carriage-return
updates on one line; there, :class:`ProgressLog` writes one INFO line every ``every`` seconds
(``ANATCL_PROGRESS_INTERVAL`` overrides it) instead. :func:`bar_wanted` says whether a bar is
drawn. ``anatcl embed``, ``anatcl qc`` and ``anatcl explain`` all work this way.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any

__all__ = ["ProgressLog", "bar_wanted", "isatty"]

logger = logging.getLogger(__name__)


def isatty(stream: Any) -> bool:
    """Whether ``stream`` is a terminal (``False`` for anything without a working ``isatty``)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def bar_wanted(progress: bool) -> bool:
    """Whether to draw a progress bar: asked for, and stderr is a terminal.

    Example:
        >>> bar_wanted(False)
        False
    """
    return bool(progress) and isatty(sys.stderr)


def _duration(seconds: float) -> str:
    """``1:02:05`` or ``02:05``, as the progress bar shows times; ``unknown`` before the first input."""
    from tqdm import tqdm

    return tqdm.format_interval(seconds) if math.isfinite(seconds) else "unknown"


class ProgressLog:
    """Progress lines (count, rate, ETA) in the log when stderr is no terminal (batch jobs).

    Args:
        total: how many items the run has.
        enabled: progress was asked for (lines are written only off a terminal, where no bar is drawn).
        every: seconds between lines (``ANATCL_PROGRESS_INTERVAL`` overrides it); the last item always logs.
        verb: what was done to the items, for the line (``"embedded"``, ``"checked"``...).
        log: the logger the lines go to.

    Example:
        >>> meter = ProgressLog(10, enabled=True, every=30.0, verb="checked")
        >>> meter.update(1, 0)  # logs "checked 1/10 inputs (10%), ..." only after 30 s, off a terminal
    """

    def __init__(self, total: int, enabled: bool, *, every: float = 30.0, verb: str = "embedded",
                 log: logging.Logger | None = None) -> None:
        self.total = total
        self.enabled = enabled and total > 0 and not isatty(sys.stderr)
        self.every = every
        self.verb = verb
        self.log = log or logger
        env = os.environ.get("ANATCL_PROGRESS_INTERVAL")
        if env:
            try:
                self.every = max(float(env), 0.0)
            except ValueError:
                self.log.warning("ignoring ANATCL_PROGRESS_INTERVAL=%r (not a number of seconds)", env)
        self.start = self.last = time.monotonic()
        self.done = 0
        self.failed = 0

    def update(self, n_ok: int, n_failed: int) -> None:
        """Count ``n_ok`` finished and ``n_failed`` failed items; log a line when it is time."""
        self.done += n_ok + n_failed
        self.failed += n_failed
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.every or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            failed = f", {self.failed} failed" if self.failed else ""
            self.log.info("%s %d/%d inputs (%.0f%%%s), %.2f inputs/s, ETA %s", self.verb,
                          self.done, self.total, 100.0 * self.done / self.total, failed, rate, _duration(eta))
