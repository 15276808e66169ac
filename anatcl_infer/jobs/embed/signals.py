"""How a run stops early: SIGTERM and SIGINT raise :class:`Interrupted`, finished batches are kept."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (SIGINT, SIGTERM); finished batches are kept for ``--resume``.

    Attributes:
        signum: the signal number (``signal.SIGTERM`` is what SLURM sends at the time limit).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[dict[str, int]]:
    """SIGTERM (SLURM's time limit, ``kill``) and SIGINT raise :class:`Interrupted` in the main thread.

    Yields a dict whose ``"signum"`` is set once a signal arrived, so an error caused by the
    same signal (a DataLoader worker killed with the job) is reported as the interruption.
    """
    state: dict[str, int] = {}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum: int, frame: Any) -> None:
        first = "signum" not in state
        state.setdefault("signum", signum)
        if first:
            raise Interrupted(signum)

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
