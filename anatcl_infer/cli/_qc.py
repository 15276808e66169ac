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



def _skull_strip_choice(value: Optional[str]) -> Optional[bool]:
    """``--skull-strip auto|yes|no`` as None/True/False (a tri-state option keeps --help narrow)."""
    if value is None or isinstance(value, bool):
        return value
    choice = {"auto": None, "yes": True, "no": False}
    if value.lower() not in choice:
        raise typer.BadParameter(f"{value!r}: use auto, yes or no")
    return choice[value.lower()]

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
    from_t1: bool = typer.Option(False, "--from-t1", help="Inputs are raw native-space T1s: run the route of the model's input kind first (extra [prep]); pictures show the registered image, with its similarity to MNI152 (flagged when low)."),
    prep_dir: Optional[Path] = typer.Option(None, "--prep-dir", help="With --from-t1: where the registered images and sidecars go (default: <out>/prep); unchanged sources are reused, e.g. from an `anatcl embed --from-t1 --prep-dir` run."),
    skull_strip: Optional[str] = typer.Option(None, "--skull-strip", metavar="auto|yes|no", callback=_skull_strip_choice, help="auto (default: decided per input), yes or no. With --from-t1 and a T1 model: deepbet skull-stripping."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, warnings and errors only."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Check inputs before embedding: for each, three slices of exactly what the model receives, with the reference brain outline and the crop box, plus QC metrics; odd ones are flagged.

    Every NIfTI file of a folder is in the report: those `anatcl embed` would skip (not named like the model's inputs, e.g. a T1 or an s6mwp1 map beside the mwp1 maps) are flagged with the reason. A bad input never stops the run: it is listed (path, stage, message) on stderr and in the report, and the exit status is 1.
    """
    setup_logging(quiet=quiet, verbose=verbose)
    from ..inputs.discovery import discover_inputs
    from ..errors import AnatCLError, InputError
    from ..qc.report import build_qc_report

    try:
        config, label = _resolve_spec(model)
    except AnatCLError as exc:
        raise fail(str(exc), 2) from None
    import logging
    import os

    paths: list[str] = []
    failures: list[tuple[str, str, str]] = []
    skipped: list[tuple[str, str]] = []  # NIfTI files `anatcl embed` would leave out of a folder: QC'd and flagged here
    for spec in inputs:  # one spec at a time, so a missing one is reported and the others still run
        try:
            problems: list[tuple[str, str, str]] = []
            paths.extend(r.path for r in discover_inputs([spec], input_kind="t1" if from_t1 else config.input_kind, problems=problems,  # type: ignore[attr-defined]
                                                         skipped=skipped))
            failures.extend(problems)
        except InputError as exc:
            failures.append((spec, exc.stage, str(exc.args[0])))
    skipped_by_path = {os.path.abspath(p): why for p, why in skipped}
    if skipped_by_path:
        names = ", ".join(os.path.basename(p) for p in list(skipped_by_path)[:5])
        logging.getLogger("anatcl_infer.cli").warning(
            "%d NIfTI file%s in the folder%s given would be skipped by `anatcl embed` (not named like the model's "
            "inputs): %s%s; they are in this report, flagged with the reason",
            len(skipped_by_path), "" if len(skipped_by_path) == 1 else "s", "" if len(inputs) == 1 else "s", names,
            f" and {len(skipped_by_path) - 5} more" if len(skipped_by_path) > 5 else "",
        )
    paths = list(dict.fromkeys([*paths, *skipped_by_path]))
    route = None
    if from_t1:
        from ..inputs.t1_route import T1Route

        route = T1Route(prep_dir=str(prep_dir or out / "prep"), skull_strip=skull_strip)
    try:
        report = build_qc_report(
            paths, out, config=config, strict=strict, workers=workers,  # type: ignore[arg-type]
            model_name=None if model is None else label, progress=not quiet, failures=failures,
            skipped=skipped_by_path, from_t1=route,
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
