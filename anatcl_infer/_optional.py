"""Checks for optional dependencies, so a missing extra is a clear error and not a traceback."""

from __future__ import annotations

import importlib.util

from .errors import MissingDependencyError

__all__ = ["require"]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module blocked in sys.modules
        return False


def require(extra: str, *modules: str) -> None:
    """Raise :class:`MissingDependencyError` naming the extra when a module is not installed.

    Example:
        >>> require("sklearn", "numpy")  # installed: returns quietly
    """
    missing = [m for m in modules if not _installed(m)]
    if missing:
        names = ", ".join(missing)
        raise MissingDependencyError(
            f"{names} {'is' if len(missing) == 1 else 'are'} needed for this; install it with "
            f'pip install "anatcl-infer[{extra}]"',
            package=missing[0],
            extra=extra,
        )
