"""The Typer application every ``anatcl`` sub-command registers on.

Command modules import heavy libraries (torch, pandas...) inside the command
functions, so ``anatcl --help`` stays fast.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import typer
from typer.core import TyperCommand

__all__ = ["app", "setup_logging", "fail", "parse_folds"]


class _NoRepeatsCommand(TyperCommand):
    """A command that refuses an option given twice with different values.

    Click keeps the last of a repeated single-value option silently (``--model a --model b``
    embeds with ``b``); here that is a usage error naming both values. The arguments are
    scanned here because Click offers no hook for it, and re-running its (private) parser with
    the options made ``multiple`` fails on Typer's options (tried with click 8.5, typer 0.29).
    """

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        opts: dict[str, Any] = {}
        for param in self.params:
            if getattr(param, "param_type_name", "") != "option" or getattr(param, "multiple", False) or getattr(param, "count", False):
                continue
            for name in [*param.opts, *getattr(param, "secondary_opts", [])]:
                opts[name] = param
        seen: dict[str, list[str]] = {}
        tokens = list(args)
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            if tok == "--":
                break
            name, _, inline = tok.partition("=") if tok.startswith("--") else (tok, "", "")
            param = opts.get(name)
            if param is None:
                i += 1
                continue
            if getattr(param, "is_flag", False):
                value = name
            elif inline or "=" in tok:
                value = inline
            else:
                value = tokens[i + 1] if i + 1 < len(tokens) else ""
                i += 1
            seen.setdefault(param.name, []).append(value)
            i += 1
        for pname, values in seen.items():
            if len(set(values)) > 1:
                param = next(p for p in self.params if p.name == pname)
                shown = " and ".join(repr(v) for v in values)
                raise typer.BadParameter(
                    f"given {len(values)} times ({shown}); give it once", ctx=ctx, param=param,
                )
        return super().parse_args(ctx, args)


class _Typer(typer.Typer):
    """``typer.Typer`` whose commands refuse repeated options (see :class:`_NoRepeatsCommand`)."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", _NoRepeatsCommand)
        return super().command(*args, **kwargs)


app = _Typer(
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



def parse_folds(model: str, fold: str) -> list[int]:
    """``--fold``: a fold number, or ``all`` for every fold the registry lists for ``model``."""
    from ..errors import AnatCLError

    if fold == "all":
        from ..weights.registry import canonical_name, load_manifest

        try:
            return sorted(int(k) for k in load_manifest()["models"][canonical_name(model)]["folds"])
        except AnatCLError:
            raise fail(f"--fold all needs a registry model name (anatcl-global, anatcl-local), got {model!r}", 2) from None
    try:
        return [int(fold)]
    except ValueError:
        raise fail(f"--fold must be a number or 'all', got {fold!r}", 2) from None
