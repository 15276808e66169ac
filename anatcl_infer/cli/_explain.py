"""`anatcl explain`: relevance maps of a head (or of the features' main direction), as NIfTI and pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app, fail, setup_logging

_EPILOG = (
    "Examples:\n\n"
    "  anatcl explain scans/ --head brain-age-head/ --out explain/\n\n"
    "  anatcl explain scans/ --model anatcl-local --fold 2 --out explain/   (no head: the features' first principal direction)\n\n"
    "  anatcl explain sub-01_mwp1.nii.gz --head sex-head/ --class F --out explain/\n\n"
    "Writes, per input, NNNN_<name>_relevance.nii.gz (the model's MNI grid and affine, zeros outside the "
    "crop box; open it over the input in any viewer) and NNNN_<name>_relevance.png (three slices through "
    "the peak, red raises the score, blue lowers it), plus explain.csv. Pictures need matplotlib: "
    "pip install \"anatcl-infer[qc]\"."
)


@app.command("explain", epilog=_EPILOG)
def explain_cmd(
    inputs: list[str] = typer.Argument(..., help="NIfTI files, directories (searched recursively), glob patterns, a .txt list of paths, or a BIDS root.", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: *_relevance.nii.gz, *_relevance.png, explain.csv."),
    head: Optional[Path] = typer.Option(None, "--head", help="Head directory (from `anatcl fit-head`) whose prediction is explained. Default: the first principal direction of the inputs' features (needs >= 2 inputs)."),
    model: str = typer.Option("anatcl-global", "--model", "-m", help="Registry name, model directory, weights file or hf:// address."),
    fold: int = typer.Option(0, "--fold", "-f", help="Fold of a registry model (the head's fold when a head is given)."),
    target_class: Optional[str] = typer.Option(None, "--class", help="Classification heads: the class whose logit is explained (default: the predicted class; binary: the second class)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps (default: the best available)."),
    batch_size: int = typer.Option(2, "--batch-size", "-b", min=1, help="Inputs per backward pass (memory grows with it)."),
    smooth_mm: float = typer.Option(0.0, "--smooth", min=0.0, help="Gaussian FWHM in mm applied to each map before writing and drawing (0: raw voxel-wise map; 4-8 reads better)."),
    no_pictures: bool = typer.Option(False, "--no-pictures", help="Write the NIfTI maps only (no matplotlib needed)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, warnings and errors only."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Show which voxels drive a prediction: gradient x input through the frozen encoder, per input, on the MNI grid.

    A bad input never stops the run: it is listed (path, stage, message) on stderr and in explain.csv, and the exit status is 1.
    """
    setup_logging(quiet=quiet, verbose=verbose)
    from ..errors import AnatCLError, InputError
    from ..inputs.discovery import discover_inputs
    from ..qc.explain import explain

    try:
        input_kind = _input_kind(model)
    except AnatCLError as exc:
        raise fail(str(exc), 2) from None
    paths: list[str] = []
    failures: list[tuple[str, str, str]] = []
    for spec in inputs:  # one spec at a time, so a missing one is reported and the others still run
        try:
            paths.extend(r.path for r in discover_inputs([spec], input_kind=input_kind))
        except InputError as exc:
            failures.append((spec, exc.stage, str(exc.args[0])))
    paths = list(dict.fromkeys(paths))
    for path, stage, message in failures:
        typer.echo(f"{path}: failed at {stage}: {message}", err=True)
    typed_class: object = target_class
    if target_class is not None and head is not None:
        typed_class = _class_value(head, target_class)
    try:
        maps = explain(
            paths, model, fold=fold, head=head, target_class=typed_class, out_dir=out, device=device,
            batch_size=batch_size, smooth_mm=smooth_mm, draw=not no_pictures, progress=not quiet, failures=failures,
        )
    except AnatCLError as exc:
        raise fail(str(exc), 2) from None
    except KeyboardInterrupt:
        raise fail("interrupted; rerun the command (finished maps are complete files)", 130) from None
    bad = [m for m in maps if not m.ok]
    if not quiet:
        typer.echo(f"wrote {len(maps) - len(bad)} relevance maps to {out} (summary: {out / 'explain.csv'})", err=True)
    if bad:
        typer.echo(f"error: {len(bad)} of {len(maps)} inputs failed; see {out / 'explain.csv'}", err=True)
        raise typer.Exit(1)


def _input_kind(model: str) -> str:
    """What a folder or BIDS dataset is searched for: the input kind in a model directory's
    ``config.json`` (no weights are read); grey-matter maps for registry models and weight files."""
    from ..weights.sources import peek_config

    config = peek_config(model)
    return config.preprocess.input_kind if config is not None else "gm"


def _class_value(head: Path, text: str) -> object:
    """The head's class label matching ``text`` (class labels may be numbers in head.json)."""
    import json

    try:
        classes = json.loads((head / "head.json").read_text()).get("classes") or []
    except (OSError, ValueError):
        return text
    for c in classes:
        if str(c) == text:
            return c
    return text
