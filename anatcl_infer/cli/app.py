"""The Typer application every ``anatcl`` sub-command registers on.

Command modules import heavy libraries (torch, pandas...) inside the command
functions, so ``anatcl --help`` stays fast.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import typer
from typer.core import TyperCommand

__all__ = ["app", "setup_logging", "fail", "cli_words", "model_sources", "precision_name", "check_device"]


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


#: Python arguments that are also options of the commands, with the same meaning: errors raised by the
#: Python API name the argument (``device="cpu"``); the command line shows them as its options.
_PY_TO_CLI = {"device": "--device", "precision": "--precision", "fold": "--fold", "batch_size": "--batch-size",
              "num_workers": "--workers", "head": "--head", "cv": "--cv"}
_PY_ARG = re.compile(r"\b(" + "|".join(_PY_TO_CLI) + r")=(?:\"([^\"]*)\"|'([^']*)'|([\w:.+-]+))?")


def cli_words(message: str) -> str:
    """A Python-API message in command-line words: ``device="cpu"`` -> ``--device cpu``, ``fold=`` -> ``--fold``.

    Example:
        >>> cli_words('CUDA is not available; use device="cpu"')
        'CUDA is not available; use --device cpu'
    """
    def repl(m: re.Match[str]) -> str:
        value = next((g for g in m.groups()[1:] if g is not None), None)
        if m.group(1) == "device" and value == "None":
            value = "auto"
        return _PY_TO_CLI[m.group(1)] + (f" {value}" if value else "")

    return _PY_ARG.sub(repl, message)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` on stderr (no traceback) and return an Exit to raise.

    Python argument names in the message become the command's options (:func:`cli_words`).
    """
    typer.echo(f"error: {cli_words(message)}", err=True)
    return typer.Exit(code)


def model_sources(model: str, fold: str) -> list[tuple[str, int | None]]:
    """``--model``/``--fold`` -> the ``(source, fold)`` pairs to load (no weights are read).

    ``--fold all`` takes every fold of a registry model, or every ``fold<k>/`` model folder of a
    directory; ``--fold K`` over such a directory picks ``fold<K>/``.
    """
    from ..errors import AnatCLError
    from ..weights.sources import fold_sources

    try:
        return fold_sources(model, fold)
    except AnatCLError as exc:
        raise fail(str(exc), 2) from None


#: spellings ``--precision`` accepts (checked while the command line is parsed, before anything loads)
PRECISION_NAMES = ("fp32", "bf16", "fp16", "float32", "bfloat16", "float16")


def precision_name(value: str) -> str:
    """Typer callback of ``--precision``: a known spelling, or a usage error at once."""
    if str(value).lower() not in PRECISION_NAMES:
        raise typer.BadParameter(f"must be fp32, bf16 or fp16, got {value!r}")
    return value


def check_device(device: str, precision: str, amp: bool, dist: tuple[int, int, int] | None = None) -> str | None:
    """``--device`` and ``--precision`` checked against this machine (imports torch, loads no model).

    Returns the device to pass on (``None`` for auto; ``cuda:LOCAL_RANK`` under torchrun).

    Raises:
        ConfigError: CUDA asked for but absent, or a precision this device cannot run natively.
    """
    from ..encoding.encoder import resolve_precision
    from ..model.devices import resolve_device

    if dist is not None and device == "auto":
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{dist[2]}"
    dev = None if device == "auto" else device
    resolve_precision(precision, resolve_device(dev), amp)
    return dev
