"""`anatcl` sub-commands: weights."""

from __future__ import annotations

from .app import app  # noqa: F401

