"""Checks for optional dependencies, so a missing extra is a clear error and not a traceback."""

from __future__ import annotations

import importlib.util

from .errors import MissingDependencyError

__all__ = ["require"]


def require(extra: str, *modules: str) -> None:
    """Raise :class:`MissingDependencyError` naming the extra when a module is not installed.

    Example:
        >>> require("sklearn", "numpy")  # installed: returns quietly
    """
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        names = ", ".join(missing)
        raise MissingDependencyError(
            f"{names} {'is' if len(missing) == 1 else 'are'} needed for this; install it with "
            f'pip install "anatcl-infer[{extra}]"',
            package=missing[0],
            extra=extra,
        )
