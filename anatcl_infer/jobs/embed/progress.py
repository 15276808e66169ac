"""Progress lines in the log (count, rate, ETA) for runs whose stderr is not a terminal.

The interval is ``anatcl_infer.jobs.embed.PROGRESS_EVERY_S`` (30 s), or the environment
variable ``ANATCL_PROGRESS_INTERVAL``. The lines themselves are
:class:`anatcl_infer.encoding.progress.ProgressLog`'s, shared with ``anatcl qc`` and ``anatcl explain``.
"""

from __future__ import annotations

import logging
import sys

from ...encoding.progress import ProgressLog, _duration, isatty as _isatty  # noqa: F401  (_duration, _isatty: old names)

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


class _ProgressLog(ProgressLog):
    """Progress lines of an embed run: every ``anatcl_infer.jobs.embed.PROGRESS_EVERY_S`` seconds, in the job's log."""

    def __init__(self, total: int, enabled: bool) -> None:
        super().__init__(total, enabled, every=_progress_every_s(), verb="embedded", log=logger)
