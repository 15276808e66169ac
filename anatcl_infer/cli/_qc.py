"""`anatcl qc`: see what the model sees — pictures, metrics, flags, one HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app, fail, setup_logging

_EPILOG = (
    "Examples:\n\n"
    "  anatcl qc derivatives/cat12/ --out qc/\n\n"
    "  anatcl qc 'scans/*_mwp1.nii.gz' --out qc/ --workers 2\n\n"
    "  anatcl qc scans/ --out qc/ --model path/to/model_dir   (that model's preprocessing spec)\n\n"
    "Open qc/index.html in a browser: failed and flagged inputs come first. "
    "Needs matplotlib: pip install \"anatcl-infer[qc]\"."
)


def _resolve_spec(model: Optional[str]) -> tuple[object, str]:
    """``(PreprocessConfig, label)`` for ``--model``: a model directory/config.json, or a registry name."""
    from ..config import ModelConfig, PreprocessConfig

    if model is None:
        return PreprocessConfig(), "the published grey-matter spec"
    path = Path(model)
    if path.exists():
        return ModelConfig.load(path).preprocess, str(path)
    from ..weights.registry import canonical_name
    from ..weights.untrained import UNTRAINED, is_untrained_name

    if is_untrained_name(model):
        return PreprocessConfig(), UNTRAINED  # random weights on the published spec
    name = canonical_name(model)  # raises UnknownModelError with the valid names
    return PreprocessConfig(), name  # every registry model uses the published spec


@app.command("qc", epilog=_EPILOG)
def qc(
    inputs: list[str] = typer.Argument(..., help="NIfTI files, directories (searched recursively), glob patterns, a .txt list of paths, or a BIDS root.", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Report folder: index.html, qc_metrics.csv, images/, contact_sheet.png."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Whose preprocessing spec to use: a registry name, untrained, or a model directory (no weights are needed). Default: the published grey-matter spec."),
    strict: bool = typer.Option(False, "--strict", help="Fail inputs that do not look like what the model expects (instead of flagging them)."),
    workers: int = typer.Option(1, "--workers", "-j", min=1, help="Processes preparing and drawing in parallel."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, warnings and errors only."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Check inputs before embedding: for each, three slices of exactly what the model receives, with the reference brain outline and the crop box, plus QC metrics; odd ones are flagged.

    A bad input never stops the run: it is listed (path, stage, message) on stderr and in the report, and the exit status is 1.
    """
    setup_logging(quiet=quiet, verbose=verbose)
    from ..inputs.discovery import discover_inputs
    from ..errors import AnatCLError, InputError
    from ..qc.report import build_qc_report

    try:
        config, label = _resolve_spec(model)
    except AnatCLError as exc:
        raise fail(str(exc), 2) from None
    paths: list[str] = []
    failures: list[tuple[str, str, str]] = []
    for spec in inputs:  # one spec at a time, so a missing one is reported and the others still run
        try:
            problems: list[tuple[str, str, str]] = []
            paths.extend(r.path for r in discover_inputs([spec], input_kind=config.input_kind, problems=problems))  # type: ignore[attr-defined]
            failures.extend(problems)
        except InputError as exc:
            failures.append((spec, exc.stage, str(exc.args[0])))
    paths = list(dict.fromkeys(paths))
    try:
        report = build_qc_report(
            paths, out, config=config, strict=strict, workers=workers,  # type: ignore[arg-type]
            model_name=None if model is None else label, progress=not quiet, failures=failures,
        )
    except AnatCLError as exc:
        raise fail(str(exc), 2) from None
    except KeyboardInterrupt:
        raise fail("interrupted; nothing was written for the unfinished inputs, rerun the command", 130) from None
    n = len(report.items)
    if not quiet:
        typer.echo(
            f"wrote {report.index} ({n} inputs, {len(report.flagged)} flagged, {len(report.failed)} failed)", err=True
        )
    if report.failed:  # each failure was logged (path, stage, message) as it happened
        typer.echo(f"error: {len(report.failed)} of {n} inputs failed; see {report.metrics_csv}", err=True)
        raise typer.Exit(1)
