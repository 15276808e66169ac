"""The run itself: :func:`run_embed` embeds the inputs batch by batch and writes the table.

It picks this run's block of the inputs (:func:`shard_records`), takes the output's lock,
skips what an earlier run already wrote (``resume``), writes each finished batch as a
part, and assembles the final table from the parts at the end. A 4D input file of N volumes
is N rows (per fold), told apart by the ``volume`` column.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import ConfigError
from .lock import _OutputLock
from .models import _FoldStack, _metadata, check_head
from .outputs import OutputLayout, _Parts, _read_existing, _remove_output, _write_errors, _write_final, _writing, check_output_free, output_layout
from .progress import _ProgressLog
from .resume import _check_compatible, _Fingerprints, _Freshness, _still_done
from .signals import Interrupted, _stop_on_signals
from .table import _FINGERPRINT_COLUMNS, _add_head_columns, _build_table, _dedupe, _sort_table, _units

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

    from ...inputs.discovery import InputRecord
    from ...model.network import AnatCL

logger = logging.getLogger(__package__)  # one logger for the whole job, named as before the split


@dataclass
class EmbedSummary:
    """What a run did: counts and where it wrote."""

    out: Path
    errors_path: Path | None
    #: inputs, counting each volume of a 4D file as one (failures of earlier stages included)
    n_inputs: int
    n_written: int
    n_skipped: int
    failures: list[dict[str, Any]] = field(default_factory=list)
    #: inputs re-embedded on ``--resume`` because their file changed since the earlier run
    changed: list[str] = field(default_factory=list)
    #: inputs whose rows were dropped on ``--resume`` because they are no longer among the inputs
    n_dropped: int = 0
    #: number of rows in the table written
    n_rows: int = 0
    n_warned: int = 0  # inputs written with a warning (wrong kind, odd position...), each logged once
    #: whether ``out`` was written: not when no row could be made (every input failed), so that a
    #: mistyped path leaves no empty table behind to block the corrected command
    written: bool = True

    @property
    def ok(self) -> bool:
        """True when no input failed."""
        return not self.failures


def shard_records(records: Sequence[Any], index: int, count: int) -> list[Any]:
    """Contiguous block ``index`` of ``count`` of the (already sorted) records.

    Concatenating the blocks in order gives the records back, so reading the parts
    of a sharded run in name order gives exactly the single-process table. Records are
    files: every volume of a 4D file is embedded by the shard that holds the file.
    """
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"shard must be i/n with 0 <= i < n, got {index}/{count}")
    bounds = np.linspace(0, len(records), count + 1).round().astype(int)
    return list(records[bounds[index]: bounds[index + 1]])


def distributed_shard() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when launched by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def run_embed(
    records: Sequence[InputRecord],
    models: Sequence[AnatCL],
    out: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    strict: bool = False,
    progress: bool = True,
    amp: bool | str = False,
    qc: bool = False,
    head: str | os.PathLike[str] | None = None,
    precision: str = "fp32",
    prior_failures: Sequence[dict[str, Any]] = (),
    shard: tuple[int, int] | None = None,
    coverage: float | None = 0.9,
    from_t1: Any = None,
    backend: str = "auto",
) -> EmbedSummary:
    """Embed ``records`` with one model per fold and write one table.

    Args:
        records: inputs (from :func:`anatcl_infer.inputs.discovery.discover_inputs`), sorted;
            with ``shard``, all of them (this run embeds its block). A 4D file of N volumes gives
            N rows (per fold), its ``volume`` column 0..N-1 (null for a 3D file); its fingerprint
            is the file's, and ``resume`` embeds only the volumes missing.
        models: one loaded model per fold, sharing a preprocessing spec.
        out: output file (``.parquet`` or ``.csv``), or a folder (trailing ``/``, an existing
            folder, or any ``shard``) that receives one part per shard.
        fmt: ``"parquet"`` or ``"csv"``; default: from the suffix of ``out`` (must agree with it).
        resume: keep what an earlier run of the same job wrote and embed only the rest; inputs
            whose file changed since are re-embedded, rows of inputs no longer given dropped.
        overwrite: replace an existing output (otherwise an existing output is an error).
        qc: add the QC metrics of :func:`anatcl_infer.qc.qc_metrics` as columns, plus ``qc_flag`` and
            ``qc_reasons`` (:func:`anatcl_infer.qc.metrics.add_qc_flags`), equal to ``anatcl qc``'s.
        head: a head directory whose predictions are added as columns (checked against ``models`` first).
        coverage: the head's prediction-interval coverage (``None``: no interval columns).
        precision: "fp32" (default), "bf16" or "fp16" (see :func:`anatcl_infer.encoding.encoder.encode`);
            recorded in the table's metadata, and a resume must use the same one.
        prior_failures: failures of earlier stages (e.g. the raw-T1 route) to report with these.
        shard: ``(i, n)``: embed block ``i`` of ``n`` of ``records`` into ``out/part-i-of-n``.
        from_t1: a :class:`~anatcl_infer.inputs.t1_route.T1Route` for a T1 model's raw native-space
            T1s: skull-stripping, registration and resampling run in the loader workers, before the
            model's preprocessing; recorded in the table's metadata (a resume must use the same route).
        backend: ``"auto"``, ``"torch"`` or ``"openvino"`` (see :func:`anatcl_infer.encoding.encoder.encode`);
            recorded in the metadata; a resume in bf16/fp16 must use the same one.

    Returns:
        An :class:`EmbedSummary`; ``summary.failures`` lists the inputs that failed. When every input
        failed and no row exists, no table is written (``summary.written`` is False; an existing
        ``out`` is removed) and only the errors file is.

    Raises:
        ConfigError: an existing output without ``resume``/``overwrite``, or a resume on another model.
        OutputError: the output cannot be written (full disk, read-only, permissions), or another
            run holds its lock.
        Interrupted: SIGTERM or SIGINT; the finished batches are kept for ``resume``.
    """
    from ...model.devices import resolve_device
    from ...encoding.encoder import resolve_precision

    if not models:
        raise ConfigError("run_embed needs at least one model")
    layout = output_layout(out, fmt, shard)
    if layout.shard is not None and shard is not None:
        n_total = len(records)
        records = shard_records(records, *shard)
        if not records:
            logger.warning("shard %d/%d has no inputs (%d inputs over %d shards): writing an empty part",
                           shard[0], shard[1], n_total, shard[1])
    else:
        n_total = len(records)
    if head is not None:
        from ..._optional import require

        require("sklearn", "sklearn", "pandas")
    dev = resolve_device(device)
    meta = _metadata(models, str(dev))
    precision = resolve_precision(precision, dev, amp)
    meta["precision"] = precision
    from ...encoding.backends import runner_info, select_runner  # issue 24: the backend that will run

    for m in models:  # inference mode before the backend is chosen: OpenVINO is checked against eval-mode outputs
        m.eval()
    meta["backend"] = runner_info(select_runner(list(models), device=dev, precision=precision, backend=backend))
    if head is not None:
        check_head(head, models)  # before any embedding
    if layout.shard is not None:
        meta["shard"] = {"index": layout.shard[0], "count": layout.shard[1], "n_inputs": n_total}
    if from_t1 is not None:
        meta["t1_route"] = {k: getattr(from_t1, k) for k in ("skull_strip", "min_ncc", "iterations", "seed") if hasattr(from_t1, k)}
    dim = models[0].config.feature_dim

    lock = _OutputLock(layout.lock_path, layout.dataset or layout.out)
    lock.acquire()
    try:
        with _stop_on_signals() as stopped:
            try:
                return _run_locked(
                    records, models, layout, meta, dim, dev, stopped,
                    resume=resume, overwrite=overwrite, progress=progress, qc=qc, head=head, coverage=coverage,
                    prior_failures=prior_failures,
                    # passed through to iter_encoded as they are:
                    batch_size=batch_size, num_workers=num_workers, precision=precision, strict=strict,
                    **({"from_t1": from_t1} if from_t1 is not None else {}),
                    backend=backend,
                )
            except Interrupted:
                raise
            except BaseException as exc:
                if "signum" in stopped:  # e.g. a DataLoader worker killed by the same SIGTERM
                    raise Interrupted(stopped["signum"]) from exc
                raise
    finally:
        lock.release()
        if layout.dataset is not None:
            with contextlib.suppress(OSError):
                layout.partial_dir.parent.rmdir()  # feats.partial/ once every shard is done


def _run_locked(
    records: Sequence[InputRecord], models: Sequence[AnatCL], layout: OutputLayout, meta: dict[str, Any],
    dim: int, dev: Any, stopped: dict[str, int], *, resume: bool, overwrite: bool, progress: bool, qc: bool,
    head: Any, coverage: float | None, prior_failures: Sequence[dict[str, Any]], **encode_kwargs: Any,
) -> EmbedSummary:
    """The body of :func:`run_embed`, run while holding the output's lock; ``encode_kwargs`` go to ``iter_encoded``."""
    from ...encoding.encoder import iter_encoded
    from ...inputs.preprocess import describe_item

    batch_size = int(encode_kwargs.get("batch_size", 8))
    out, fmt, partial_dir, errors_path = layout.out, layout.fmt, layout.partial_dir, layout.errors_path
    check_output_free(layout, resume=resume, overwrite=overwrite)
    if overwrite and not resume:
        shutil.rmtree(partial_dir, ignore_errors=True)

    with _writing(partial_dir):
        parts = _Parts(partial_dir)
    fold_ids = [m.config.fold for m in models]
    wanted = {r.path for r in records}
    fresh = _Freshness(wanted)
    done: set[tuple[str, int | None, int | None]] = set()
    existing: pa.Table | None = None
    if resume:
        existing, existing_meta = _read_existing(out, fmt)
        _check_compatible([("the existing output", out, existing_meta), ("the interrupted run", partial_dir, parts.metadata())], meta)
        done = _still_done(fresh, ([existing] if existing is not None else []) + parts.tables())

    # one unit per file, one per volume of a 4D file; a 3D file already done is not opened again
    units = _units(records, lambda r: all((r.path, None, f) in done for f in fold_ids))
    todo = [u for u in units if any((*u.key, f) not in done for f in fold_ids)]
    skipped = len(units) - len(todo)
    if skipped:
        logger.info("resuming: %d of %d inputs already embedded", skipped, len(units))

    extra = None
    if qc:
        from ...qc.metrics import qc_metrics

        extra = functools.partial(qc_metrics, config=models[0].config.preprocess)
    runner = models[0] if len(models) == 1 else _FoldStack(models)
    failures: list[dict[str, Any]] = list(prior_failures)
    n_written = 0
    prints = _Fingerprints([r.path for r in todo], ahead=4 * batch_size) if todo else None
    meter = _ProgressLog(len(todo), progress)
    n_warned = 0
    if todo:
        logger.info("embedding %d inputs with %s (fold%s %s) on %s", len(todo), models[0].config.name,
                    "s" if len(fold_ids) > 1 else "", ", ".join(str(f) for f in fold_ids), dev)
    try:
        if todo:
            for batch in iter_encoded(
                runner, [u.item() for u in todo], device=dev, progress=progress, extra_info=extra, **encode_kwargs,
            ):
                for f in batch.failures:
                    unit = todo[f.index]
                    # the path as printed (undecodable bytes as \xNN: the errors file is UTF-8), its volume apart
                    rec = {"path": describe_item(unit.path), "volume": unit.volume, "fold": "all" if len(fold_ids) > 1 else fold_ids[0], "stage": f.stage, "message": f.message}
                    failures.append(rec)
                    logger.error("%s [%s]: %s", f.path, f.stage, f.message)
                for idx, info in zip(batch.indices, batch.infos):
                    if info.get("warnings"):  # one WARNING line per doubtful input, with every reason
                        n_warned += 1
                        logger.warning("%s: %s", todo[idx], "; ".join(info["warnings"]))
                if batch.indices:
                    fps = [prints.get(i) for i in batch.indices] if prints is not None else None
                    table = _build_table(todo, fold_ids, models[0].config.name, batch.indices, batch.features, batch.infos,
                                         dim=dim, fingerprints=fps)
                    with _writing(partial_dir, kept=partial_dir):
                        parts.write(table, meta)
                    n_written += len(batch.indices)
                meter.update(len(batch.indices), len(batch.failures))
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        stopped.setdefault("signum", signum)
        logger.info("interrupted (%s): %d inputs of this run kept in %s; rerun with --resume to continue",
                     signal.Signals(signum).name, n_written, partial_dir)
        raise exc if isinstance(exc, Interrupted) else Interrupted(signum) from None
    finally:
        if prints is not None:
            prints.close()

    import pyarrow as pa

    # Everything written (earlier output + all parts, read again), stale rows dropped, is the final table.
    all_tables = [fresh.filter(t) for t in ([existing] if existing is not None else []) + parts.tables()]
    empty = _build_table([], fold_ids, models[0].config.name, [], np.zeros((0, dim * len(models)), np.float32), [], dim=dim)
    final = pa.concat_tables([empty, *all_tables], promote_options="default") if all_tables else empty
    final = _dedupe(_sort_table(final))
    if qc:  # the cohort's outlier flags, as `anatcl qc` computes them
        from ...qc.metrics import add_qc_flags

        final = add_qc_flags(final, expected_kind=models[0].config.preprocess.input_kind)
    final = final.select([c for c in final.column_names if c not in _FINGERPRINT_COLUMNS] + list(_FINGERPRINT_COLUMNS))
    written = final.num_rows > 0 or not failures  # every input failed: no empty table to block the corrected rerun
    if head is not None and written:
        final = _add_head_columns(final, head, meta, coverage)
    with _writing(out, kept=partial_dir):
        if written:
            _write_final(final, out, fmt, meta)
        else:
            _remove_output(out, fmt)
            logger.info("no input could be embedded: nothing was written to %s (the failures are in %s)", out, errors_path)
        _write_errors(errors_path, failures)
    shutil.rmtree(partial_dir, ignore_errors=True)
    n_inputs = len(units) + len(prior_failures)
    return EmbedSummary(out, errors_path if failures else None, n_inputs, n_written, skipped, failures,
                        changed=sorted(fresh.changed), n_dropped=len(fresh.gone), n_rows=final.num_rows, n_warned=n_warned,
                        written=written)
