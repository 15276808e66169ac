"""The Typer application every ``anatcl`` sub-command registers on.

Command modules import heavy libraries (torch, pandas...) inside the command
functions, so ``anatcl --help`` stays fast.
"""

from __future__ import annotations

import logging
import sys

import typer

__all__ = ["app", "setup_logging", "fail"]

app = typer.Typer(
    name="anatcl",
    help=(
        "AnatCL brain-MRI foundation models: embed grey-matter maps, fit and apply heads, "
        "inspect inputs, manage weights, and train.\n\n"
        "Start with:  anatcl embed DIR --out feats.parquet"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    """Send package logs to stderr (the CLI is the only place handlers are configured)."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger("anatcl_infer")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` on stderr (no traceback) and return an Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)

