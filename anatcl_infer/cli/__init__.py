"""Command-line interface: ``anatcl``."""

from __future__ import annotations

from . import _embed, _heads, _qc, _train, _weights  # noqa: F401  (register commands)
from . import _explain  # noqa: F401,E402
from . import _bids  # noqa: F401,E402  (the BIDS App: anatcl bids)
from .app import app
from . import _version_cmd  # noqa: F401,E402  (listed last in --help)

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the ``anatcl`` console script."""
    app()
