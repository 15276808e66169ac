"""`anatcl bids BIDS_DIR OUTPUT_DIR participant|group`: the BIDS App entry point."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from .app import app, check_device, fail, model_sources, precision_name, setup_logging

_EPILOG = (
    "Examples:\n\n"
    "  anatcl bids /data/ds000001 /data/ds000001/derivatives/anatcl participant --participant-label 01\n\n"
    "  anatcl bids ds out participant --participant-label $(sed -n ${SLURM_ARRAY_TASK_ID}p subjects.txt) --resume\n\n"
    "  anatcl bids /data/ds000001 /data/ds000001/derivatives/anatcl group\n\n"
    "Grey-matter maps are read from the CAT12/deepmriprep output under BIDS_DIR/derivatives/ "
    "(mwp1*, *desc-gm*), or from --derivatives DIR."
)


class AnalysisLevel(str, Enum):
    """BIDS App analysis levels."""

    participant = "participant"
    group = "group"


@app.command("bids", epilog=_EPILOG, context_settings={"allow_extra_args": True})
def bids(
    ctx: typer.Context,
    bids_dir: Path = typer.Argument(..., help="Root of the BIDS dataset (holds dataset_description.json).", show_default=False),
    output_dir: Path = typer.Argument(..., help="The derivatives dataset to write, e.g. BIDS_DIR/derivatives/anatcl.", show_default=False),
    analysis_level: AnalysisLevel = typer.Argument(..., help="participant: embed each scan; group: gather them into one table.", show_default=False),
    participant_label: Optional[list[str]] = typer.Option(None, "--participant-label", help="Subject(s) to process, with or without sub- (repeat, or 01,02); --participant_label works too. Default: all."),
    participant_label_bids: Optional[list[str]] = typer.Option(None, "--participant_label", hidden=True),  # the BIDS Apps spelling
    session_label: Optional[list[str]] = typer.Option(None, "--session-label", help="Session(s) to process, with or without ses- (repeat, or 1,2); --session_label works too. Default: all."),
    session_label_bids: Optional[list[str]] = typer.Option(None, "--session_label", hidden=True),
    derivatives: Optional[Path] = typer.Option(None, "--derivatives", help="Folder of CAT12/deepmriprep output to read the maps from (default: BIDS_DIR/derivatives)."),
    model: str = typer.Option("anatcl-global", "--model", "-m", help="Registry name (anatcl-global, anatcl-local), hf://org/name[@rev], URL, .pth/.safetensors file or model directory."),
    fold: str = typer.Option("0", "--fold", help="Fold 0-4 of a registry model (or fold<k>/ of a folder of fold models), or 'all' for one row per scan and fold."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Volumes per forward pass (does not change the result)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, mps."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Loader processes (default: chosen from the device)."),
    resume: bool = typer.Option(False, "--resume", help="Skip scans already embedded by the same model from the same file; continue an interrupted run."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Embed the chosen scans again, replacing their outputs."),
    strict: bool = typer.Option(False, "--strict", help="Fail maps that do not look like what the model expects (instead of warning)."),
    qc: bool = typer.Option(False, "--qc", help="Add QC metrics as qc_* columns."),
    precision: str = typer.Option("fp32", "--precision", callback=precision_name, help="fp32 (default), bf16 or fp16, as in `anatcl embed --precision`."),
    amp: bool = typer.Option(False, "--amp", help="Deprecated: use --precision bf16 (CUDA only)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, warnings and errors only."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Run as a BIDS App: embed CAT12/deepmriprep grey-matter maps into a BIDS derivatives dataset.

    participant: for each scan, OUTPUT_DIR/sub-X/[ses-Y/]anat/sub-X_[ses-Y_]desc-MODEL_features.parquet (the rows `anatcl embed` writes for it) and a .json sidecar (model, SHA-256, fold, preprocessing, source file and its SHA-256). Subjects are independent: run one job per subject. group: OUTPUT_DIR/desc-MODEL_features.parquet, the table `anatcl embed` writes for the same scans.
    """
    setup_logging(quiet=quiet, verbose=verbose)
    from ..errors import AnatCLError
    from ..jobs.bids import normalise_labels, plan_participant, run_group, run_participant

    if ctx.args:
        raise fail(
            f"unexpected argument(s) {' '.join(ctx.args)}; give several labels as --participant-label 01,02 "
            "or repeat the option (--participant-label 01 --participant-label 02)", 2,
        )
    try:
        participants = normalise_labels([*(participant_label or []), *(participant_label_bids or [])], "sub")
        sessions = normalise_labels([*(session_label or []), *(session_label_bids or [])], "ses")
        if analysis_level is AnalysisLevel.group:
            for path in run_group(output_dir, participant_labels=participants):
                typer.echo(str(path))
            return
        # Everything that needs no weights is checked before the model is loaded: a typo costs a second.
        from ..weights.sources import peek_config

        sources = model_sources(model, fold)
        plan_participant(bids_dir, output_dir, peek_config(sources[0][0]), derivatives=derivatives,
                         participant_labels=participants, session_labels=sessions, resume=resume, overwrite=overwrite)
        dev = check_device(device, precision, amp)
        from ..encoding.allocator import retain_freed_memory
        from ..weights.loading import load_model

        retain_freed_memory()
        models = [load_model(src, fold=f, device=dev) for src, f in sources]
        summary = run_participant(
            bids_dir, output_dir, models, derivatives=derivatives, participant_labels=participants,
            session_labels=sessions, batch_size=batch_size, device=dev, num_workers=workers, resume=resume,
            overwrite=overwrite, strict=strict, qc=qc, amp=amp, precision=precision, progress=not quiet,
        )
    except AnatCLError as exc:
        raise fail(str(exc), 2) from None
    except KeyboardInterrupt:
        raise fail("interrupted; rerun the same command with --resume to continue", 130) from None
    if not quiet:
        msg = f"wrote {len(summary.written)} scans to {output_dir}"
        if summary.skipped:
            msg += f" ({len(summary.skipped)} already there)"
        typer.echo(msg, err=True)
    if summary.failures:
        where = ", ".join(str(p) for p in summary.errors_files) or "the log above"
        typer.echo(f"error: {len(summary.failures)} scans failed; see {where}", err=True)
        raise typer.Exit(1)
