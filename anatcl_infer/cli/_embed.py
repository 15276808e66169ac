"""`anatcl embed`: a folder, files, globs, a list or a BIDS dataset -> one features table."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app, fail, setup_logging

_EPILOG = (
    "Examples:\n\n"
    "  anatcl embed derivatives/cat12/ --out feats.parquet\n\n"
    "  anatcl embed 'scans/*_mwp1.nii.gz' --fold all --out feats.parquet --resume\n\n"
    "  anatcl embed bids_root/ --out feats/ --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT\n\n"
    "Inputs must be CAT12-style mwp1 grey-matter maps in MNI space for the published models "
    "(see `anatcl qc` to check what the model sees)."
)


def _parse_shard(value: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise typer.BadParameter(f"expected I/N like 0/4, got {value!r}") from None
    if n < 1 or not 0 <= i < n:
        raise typer.BadParameter(f"need 0 <= I < N, got {value!r}")
    return i, n


def _t1_to_gm_records(records: list, prep_dir: Path, device: str, quiet: bool) -> tuple[list, list[dict]]:
    """Run the raw-T1 route on each record; return records of the maps and the failures."""
    import dataclasses
    import logging

    from ..errors import InputError
    from ..inputs.raw_t1 import t1_to_gm

    log = logging.getLogger("anatcl_infer.cli")
    out_records, failures = [], []
    for i, rec in enumerate(records, 1):
        name = Path(rec.path).name
        for suffix in (".nii.gz", ".nii"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        existing = prep_dir / f"mwp1{name}.nii.gz"
        try:
            if existing.is_file() and existing.with_name(existing.name.replace(".nii.gz", ".json")).is_file():
                gm = existing
            else:
                if not quiet:
                    log.info("[%d/%d] deepmriprep: %s", i, len(records), rec.path)
                gm = t1_to_gm(rec.path, prep_dir, device="cpu" if device == "auto" else device)
        except InputError as exc:
            failures.append({"path": rec.path, "fold": None, "stage": "prep", "message": str(exc.args[0])})
            log.error("%s [prep]: %s", rec.path, exc.args[0])
            continue
        out_records.append(dataclasses.replace(rec, path=str(Path(gm).resolve())))
    return out_records, failures


@app.command("embed", epilog=_EPILOG)
def embed(
    inputs: list[str] = typer.Argument(..., help="NIfTI files, directories (searched recursively), glob patterns, a .txt list of paths, or a BIDS root.", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Output table (.parquet or .csv). With --shard or torchrun: a directory that receives one part per shard."),
    model: str = typer.Option("anatcl-global", "--model", "-m", help="Registry name (anatcl-global, anatcl-local), hf://org/name[@rev], URL, .pth/.safetensors file or model directory."),
    fold: str = typer.Option("0", "--fold", help="Fold 0-4 of a registry model, or 'all' for one row per input and fold (never average embeddings across folds)."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Volumes per forward pass (does not change the result)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, mps."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Loader processes (default: chosen from the device)."),
    fmt: str = typer.Option("parquet", "--format", help="parquet or csv."),
    resume: bool = typer.Option(False, "--resume", help="Keep what an earlier (interrupted) run wrote and embed only the rest."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    strict: bool = typer.Option(False, "--strict", help="Fail inputs that do not look like what the model expects (instead of warning)."),
    qc: bool = typer.Option(False, "--qc", help="Add QC metrics as qc_* columns (template correlation, coverage, value range...)."),
    head: Optional[Path] = typer.Option(None, "--head", help="A head directory (anatcl fit-head): add its prediction columns."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: embed only block I of N of the sorted inputs (SLURM arrays); --out is then a directory."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 (default), bf16 or fp16: arithmetic of the forward pass. bf16 needs a GPU or a CPU with native bf16 (AVX512-BF16/AMX); ~2.5x faster there; rows stay at cosine ~0.99999 to fp32 but subject differences shift more (benchmarks/NOTES.md): validate on your cohort. Recorded in the table's metadata."),
    amp: bool = typer.Option(False, "--amp", help="Deprecated: use --precision bf16 (CUDA only)."),
    from_t1: bool = typer.Option(False, "--from-t1", help="Inputs are raw T1s: make mwp1 grey-matter maps with deepmriprep first (extra [prep]), then embed them."),
    prep_dir: Optional[Path] = typer.Option(None, "--prep-dir", help="Where --from-t1 writes its maps (default: <out>.prep/ beside the output); maps already there are reused."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, warnings and errors only."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Embed brain maps into 512-d AnatCL features, one row per input (and fold).

    Rows are written as batches finish; the output appears atomically at the end. A bad input never stops the run: it is reported on stderr and in an errors file beside the output (feats.errors.csv for feats.parquet), and the exit status is 1.
    """
    setup_logging(quiet=quiet, verbose=verbose)
    from ..encoding.allocator import yield_idle_threads

    yield_idle_threads()  # before torch loads: OpenMP threads sleep while the loader works
    import logging

    from ..inputs.discovery import discover_inputs
    from ..jobs.embed import distributed_shard, run_embed, shard_records
    from ..errors import AnatCLError
    from ..weights.loading import load_model

    from ..encoding.allocator import retain_freed_memory

    log = logging.getLogger("anatcl_infer.cli")
    retain_freed_memory()  # this process only embeds: reuse activation memory between volumes
    if amp:
        log.warning("--amp is deprecated; use --precision bf16 (or fp16)")
    if fmt not in ("parquet", "csv"):
        raise fail(f"--format must be parquet or csv, got {fmt!r}", 2)
    part: tuple[int, int] | None = _parse_shard(shard) if shard else None
    dist = distributed_shard()
    if dist is not None and part is None:
        rank, world, local_rank = dist
        part = (rank, world)
        if device == "auto":
            import torch

            if torch.cuda.is_available():
                device = f"cuda:{local_rank}"
    try:
        if fold == "all":
            from ..weights.registry import canonical_name, load_manifest

            try:
                folds = sorted(int(k) for k in load_manifest()["models"][canonical_name(model)]["folds"])
            except AnatCLError:
                raise fail(f"--fold all needs a registry model name (anatcl-global, anatcl-local), got {model!r}", 2) from None
        else:
            try:
                folds = [int(fold)]
            except ValueError:
                raise fail(f"--fold must be a number or 'all', got {fold!r}", 2) from None
        models = [load_model(model, fold=f, device=None if device == "auto" else device) for f in folds]
        prep_failures: list[dict] = []
        if from_t1:
            records = discover_inputs(inputs, input_kind="t1")
            records, prep_failures = _t1_to_gm_records(records, prep_dir or out.with_name(out.name + ".prep"), device, quiet)
        else:
            records = discover_inputs(inputs, input_kind=models[0].config.preprocess.input_kind)
        target = out
        if part is not None:
            records = shard_records(records, *part)
            suffix = ".parquet" if fmt == "parquet" else ".csv"
            target = out / f"part-{part[0]:05d}-of-{part[1]:05d}{suffix}"
            log.info("shard %d/%d: %d inputs -> %s", part[0], part[1], len(records), target)
        summary = run_embed(
            records, models, target, fmt=fmt, batch_size=batch_size,
            device=None if device == "auto" else device, num_workers=workers, resume=resume,
            overwrite=overwrite, strict=strict, progress=not quiet, amp=amp, qc=qc, head=head, precision=precision,
            prior_failures=prep_failures,
        )
    except AnatCLError as exc:
        raise fail(str(exc), 2) from None
    except KeyboardInterrupt:
        raise fail("interrupted; rerun the same command with --resume to continue", 130) from None
    msg = f"wrote {summary.out} ({summary.n_written} new inputs"
    if summary.n_skipped:
        msg += f", {summary.n_skipped} already there"
    msg += ")"
    if not quiet:
        typer.echo(msg, err=True)
    if summary.failures:
        typer.echo(
            f"error: {len(summary.failures)} of {summary.n_inputs} inputs failed; see {summary.errors_path}",
            err=True,
        )
        raise typer.Exit(1)
