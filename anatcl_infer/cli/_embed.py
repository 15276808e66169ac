"""`anatcl embed`: a folder, files, globs, a list or a BIDS dataset -> one features table."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from .app import app, check_device, fail, model_sources, precision_name, setup_logging

_EPILOG = (
    "Examples:\n\n"
    "  anatcl embed derivatives/cat12/ --out feats.parquet\n\n"
    "  anatcl embed 'scans/*_mwp1.nii.gz' --fold all --out feats.parquet --resume\n\n"
    "  anatcl embed bids_root/ --out feats/ --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT\n\n"
    "  anatcl embed native_t1s/ --from-t1 --model runs/t1/export --out feats.parquet --prep-dir prep/\n\n"
    "Inputs must be CAT12-style mwp1 grey-matter maps in MNI space for the published models "
    "(see `anatcl qc` to check what the model sees), or raw T1s with --from-t1 ([prep] extra)."
)



def _skull_strip_choice(value: Optional[str]) -> Optional[bool]:
    """``--skull-strip auto|yes|no`` as None/True/False (a tri-state option keeps --help narrow)."""
    if value is None or isinstance(value, bool):
        return value
    choice = {"auto": None, "yes": True, "no": False}
    if value.lower() not in choice:
        raise typer.BadParameter(f"{value!r}: use auto, yes or no")
    return choice[value.lower()]

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


def _input_kind(sources: list[tuple[str, int | None]]) -> str:
    """The input kind of the model named, read without loading it (``gm`` when it cannot be told)."""
    from ..weights.sources import peek_config

    config = peek_config(sources[0][0])
    return config.preprocess.input_kind if config is not None else "gm"


def _discover(inputs: list[str], input_kind: str, layout: Any) -> tuple[list, list[dict]]:
    """The input records, and what discovery could not use as failures (reported once, by shard 0)."""
    from ..inputs.discovery import discover_inputs

    problems: list[tuple[str, str, str]] = []
    records = discover_inputs(inputs, input_kind=input_kind, problems=problems)
    if layout.shard is not None and layout.shard[0] != 0:  # report what discovery could not use once, not in every shard
        return records, []
    return records, [{"path": p, "fold": None, "stage": st, "message": m} for p, st, m in problems]


def _plan(
    inputs: list[str], out: str, fmt: Optional[str], part: Optional[tuple[int, int]], sources: list[tuple[str, int | None]],
    resume: bool, overwrite: bool, head: Optional[Path], from_t1: bool,
) -> tuple[Any, Optional[list], list[dict]]:
    """The checks that need no model: the output (format, conflicts), the head folder, the inputs.

    Returns the output layout, the input records (``None`` with ``--from-t1``: found after
    loading) and discovery's failures. When no input exists at all, the errors file is written
    and the command ends here, before any model is loaded and without an output table.
    """
    import os

    from ..jobs.embed import check_output_free, output_layout
    from ..jobs.embed.outputs import _write_errors

    layout = output_layout(out, fmt, part)
    check_output_free(layout, resume=resume, overwrite=overwrite)
    if head is not None:
        from .._optional import require

        require("sklearn", "sklearn", "pandas")  # applying a head needs the [sklearn] extra: say so first
        if not (Path(head) / "head.json").is_file():
            raise fail(f"--head {head} is not a head folder (no head.json); make one with `anatcl fit-head`", 2)
    if from_t1:
        from ..inputs.discovery import discover_inputs

        return layout, discover_inputs(inputs, input_kind="t1"), []
    records, failures = _discover(inputs, _input_kind(sources), layout)
    if records and not any(os.path.lexists(r.path) for r in records):
        listed = {f["path"] for f in failures}
        failures += [{"path": r.path, "fold": None, "stage": "read", "message": "does not exist; check the path"}
                     for r in records if r.path not in listed]
        _write_errors(layout.errors_path, failures)
        names = ", ".join(r.path for r in records[:3]) + (f" and {len(records) - 3} more" if len(records) > 3 else "")
        raise fail(
            f"no input exists ({names}), so nothing was embedded and no output was written; "
            f"see {layout.errors_path}, fix the paths and rerun", 1,
        )
    return layout, records, failures


@app.command("embed", epilog=_EPILOG)
def embed(
    inputs: list[str] = typer.Argument(..., help="NIfTI files, directories (searched recursively), glob patterns, a .txt list of paths, or a BIDS root.", show_default=False),
    out: str = typer.Option(..., "--out", "-o", help="Output table: feats.parquet or feats.csv (the suffix sets the format), or a folder (feats/, or any --shard) that receives one Parquet part per shard; errors and unfinished work go beside it."),
    model: str = typer.Option("anatcl-global", "--model", "-m", help="Registry name (anatcl-global, anatcl-local), untrained (random weights, offline: to try things), hf://org/name[@rev], URL, .pth/.safetensors file or model directory."),
    weights: str = typer.Option("model", "--weights", help="model or ema: which weights of a .pth --model holding both to use (timm's use_ema)."),
    fold: str = typer.Option("0", "--fold", help="Fold 0-4 of a registry model (or fold<k>/ of a folder of fold models), or 'all' for one row per input and fold (never average embeddings across folds)."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Volumes per forward pass (does not change the result)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, mps."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Loader processes (default: chosen from the device)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="parquet or csv (default: from the --out suffix; a contradiction is an error)."),
    resume: bool = typer.Option(False, "--resume", help="Keep what an earlier (interrupted) run wrote and embed only the rest; inputs whose file changed are re-embedded, rows of inputs no longer given dropped; the model must be the same (SHA-256 of its weights)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    strict: bool = typer.Option(False, "--strict", help="Fail inputs that do not look like what the model expects (instead of warning)."),
    qc: bool = typer.Option(False, "--qc", help="Add QC metrics as qc_* columns (template correlation, coverage, value range...)."),
    head: Optional[Path] = typer.Option(None, "--head", help="A head directory (anatcl fit-head): add its prediction columns."),
    coverage: float = typer.Option(0.9, "--coverage", min=0.5, max=0.999, help="With --head: coverage of the prediction interval columns (<target>_pred_lo/_hi)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: embed only block I of N of the sorted inputs (SLURM arrays); --out is then a directory."),
    precision: str = typer.Option("fp32", "--precision", callback=precision_name, help="fp32 (default), bf16 or fp16: arithmetic of the forward pass. bf16 needs a GPU or a CPU with native bf16 (AVX512-BF16/AMX); ~2.5x faster there; rows stay at cosine ~0.99999 to fp32 but subject differences shift more (benchmarks/NOTES.md): validate on your cohort. Recorded in the table's metadata."),
    backend: str = typer.Option("auto", "--backend", help="auto, torch or openvino: who runs the forward pass. auto: OpenVINO on CPU when installed (extra [openvino]) and its conversion of the model was verified against torch, else torch. Recorded in the table's metadata."),
    amp: bool = typer.Option(False, "--amp", help="Deprecated: use --precision bf16 (CUDA only)."),
    from_t1: bool = typer.Option(False, "--from-t1", help="Inputs are raw native-space T1s (extra [prep]); the route follows the model's input kind: grey-matter models -> deepmriprep mwp1 maps (downloads its weights once); T1 models -> deepbet skull-stripping, affine registration to MNI152 (SimpleITK), the model's grid (offline). Runs in the loader workers."),
    prep_dir: Optional[Path] = typer.Option(None, "--prep-dir", help="Where --from-t1 writes its maps / registered T1s with JSON sidecars (default: <out>.prep/ beside the output); those whose source is unchanged (SHA-256) are reused."),
    skull_strip: Optional[str] = typer.Option(None, "--skull-strip", metavar="auto|yes|no", callback=_skull_strip_choice, help="auto (default: decided per input), yes or no. T1 models with --from-t1: deepbet skull-stripping; auto leaves already skull-stripped inputs alone."),
    min_ncc: float = typer.Option(0.7, "--min-ncc", min=-1.0, max=1.0, help="T1 models with --from-t1: an input whose registration to MNI152 is less similar than this to the template (NCC) fails instead of being embedded misplaced."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, warnings and errors only."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Embed brain maps into 512-d AnatCL features, one row per input (and fold); a 4D file of N volumes gives N rows, told apart by the volume column.

    Options, the output and the inputs are checked before the model loads; when no input exists or every input fails, no table is written (only the errors file). Rows are written as batches finish; the output appears atomically at the end. A bad input never stops the run: it is reported on stderr and in an errors file beside the output (feats.errors.csv for feats.parquet, feats.errors/ for a folder), and the exit status is 1. SIGTERM or Ctrl-C keeps the finished batches: rerun with --resume. Two runs on one output are refused (a lock file beside it). Off a terminal, progress lines (count, rate, ETA) go to the log.
    """
    setup_logging(quiet=quiet, verbose=verbose)
    from ..encoding.allocator import yield_idle_threads

    yield_idle_threads()  # before torch loads: OpenMP threads sleep while the loader works
    import logging

    from ..errors import AnatCLError
    from ..jobs.embed import Interrupted, distributed_shard

    log = logging.getLogger("anatcl_infer.cli")
    if amp:
        log.warning("--amp is deprecated; use --precision bf16 (or fp16)")
    # Everything that can be checked without the model is checked first: a typo costs a second, not a model load.
    if fmt is not None and fmt not in ("parquet", "csv"):
        raise fail(f"--format must be parquet or csv, got {fmt!r}", 2)
    if backend not in ("auto", "torch", "openvino"):
        raise fail(f"--backend must be auto, torch or openvino, got {backend!r}", 2)
    part: tuple[int, int] | None = _parse_shard(shard) if shard else None
    dist = distributed_shard()
    if dist is not None and part is None:
        part = (dist[0], dist[1])
    sources = model_sources(model, fold)
    layout = None
    try:
        layout, records, prep_failures = _plan(inputs, out, fmt, part, sources, resume, overwrite, head, from_t1)
        dev = check_device(device, precision, amp, dist if shard is None else None)
        from ..encoding.allocator import retain_freed_memory
        from ..jobs.embed import run_embed
        from ..weights.loading import load_model

        retain_freed_memory()  # this process only embeds: reuse activation memory between volumes
        models = [load_model(src, fold=f, device=dev, weights=weights) for src, f in sources]
        if head is not None:
            from ..jobs.embed import check_head

            check_head(head, models, source=model)  # a mismatched head fails now, not after embedding everything
        if records is None or (not from_t1 and models[0].config.preprocess.input_kind != _input_kind(sources)):
            records, prep_failures = _discover(inputs, models[0].config.preprocess.input_kind, layout)
        route = None
        t1_model = models[0].config.preprocess.input_kind == "t1"
        if skull_strip is not None and not (from_t1 and t1_model):
            log.warning("--skull-strip only applies to T1 models with --from-t1; ignored")
        if from_t1 and t1_model:
            from ..inputs.t1_route import T1Route, check_t1_route

            base = layout.dataset or layout.out
            # deepbet runs in the loader workers, which are forked: CUDA cannot be used there, so the route
            # stays on the CPU (the forward still uses --device)
            route = T1Route(prep_dir=str(prep_dir or base.with_name(base.name + ".prep")), skull_strip=skull_strip,
                            min_ncc=min_ncc, device="cpu")
            check_t1_route(models[0].config.preprocess, route)  # a missing tool: exit 2 before any input
        elif from_t1:
            base = layout.dataset or layout.out
            records, t1_failures = _t1_to_gm_records(records, prep_dir or base.with_name(base.name + ".prep"), device, quiet)
            prep_failures = prep_failures + t1_failures
        if layout.shard is not None:
            log.info("shard %d/%d of %d inputs -> %s", layout.shard[0], layout.shard[1], len(records), layout.out)
        summary = run_embed(
            records, models, out, fmt=layout.fmt, batch_size=batch_size,
            device=dev, num_workers=workers, resume=resume,
            overwrite=overwrite, strict=strict, progress=not quiet, amp=amp, qc=qc, head=head, precision=precision,
            prior_failures=prep_failures, shard=layout.shard, coverage=coverage, from_t1=route, backend=backend,
        )
    except AnatCLError as exc:
        raise fail(str(exc), 2) from None
    except KeyboardInterrupt as exc:
        import signal

        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        kept = layout.partial_dir if layout is not None and layout.partial_dir.is_dir() else None
        raise fail(
            f"interrupted by {signal.Signals(signum).name}"
            + (f"; the finished batches are kept in {kept}" if kept else "")
            + "; rerun the same command with --resume to continue",
            128 + int(signum),
        ) from None
    if not summary.written:
        raise fail(
            f"all {len(summary.failures)} inputs failed, so nothing was written (no {summary.out}); "
            f"see {summary.errors_path}, fix the inputs and rerun the same command", 1,
        )
    msg = f"wrote {summary.out} ({summary.n_rows} rows; {summary.n_written} inputs embedded now"
    if summary.n_skipped:
        msg += f", {summary.n_skipped} already there"
    if summary.changed:
        msg += f", {len(summary.changed)} re-embedded because their file changed"
    if summary.n_dropped:
        msg += f", rows of {summary.n_dropped} inputs no longer given dropped"
    msg += ")"
    if not quiet:
        typer.echo(msg, err=True)
    if summary.n_warned:
        typer.echo(
            f"warning: {summary.n_warned} of {summary.n_inputs} inputs look wrong for this model; "
            f"see {summary.out.name} qc_warnings or run anatcl qc",
            err=True,
        )
    if summary.failures:
        typer.echo(
            f"error: {len(summary.failures)} of {summary.n_inputs} inputs failed; see {summary.errors_path}",
            err=True,
        )
        raise typer.Exit(1)
