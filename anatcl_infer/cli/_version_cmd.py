"""`anatcl version`."""

from __future__ import annotations

import typer

from .app import app


@app.command("version")
def version() -> None:
    """Print the versions of anatcl-infer, torch and the Python it runs on."""
    import platform

    import torch

    from .._version import __version__

    typer.echo(f"anatcl-infer {__version__}  torch {torch.__version__}  python {platform.python_version()}")
