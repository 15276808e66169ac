"""The ``anatcl embed`` job: inputs -> features table, written as batches complete.

Nothing is lost: each finished batch is written at once as a small Parquet part in
``<out>.partial/`` (temporary name, then rename); the final file is assembled from
the parts and appears atomically; ``resume=True`` skips the inputs already done; a
bad input is recorded (path, stage, message) and never stops the others.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._version import __version__
from ..errors import ConfigError
from ..downstream.features import feature_names

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

    from ..inputs.discovery import InputRecord
    from ..model.network import AnatCL

__all__ = ["EmbedSummary", "run_embed", "shard_records", "distributed_shard", "METADATA_KEY"]

logger = logging.getLogger(__name__)

METADATA_KEY = b"anatcl_infer"
_ID_COLUMNS = ("path", "subject", "session", "run", "model", "fold")


@dataclass
class EmbedSummary:
    """What a run did: counts and where it wrote."""

    out: Path
    errors_path: Path | None
    n_inputs: int
    n_written: int
    n_skipped: int
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no input failed."""
        return not self.failures


def shard_records(records: Sequence[Any], index: int, count: int) -> list[Any]:
    """Contiguous block ``index`` of ``count`` of the (already sorted) records.

    Concatenating the blocks in order gives the records back, so reading the parts
    of a sharded run in name order gives exactly the single-process table.
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


class _FoldStack:
    """Runs several fold models on the same prepared batch (inputs are prepared once)."""

    def __init__(self, models: Sequence[AnatCL]) -> None:
        import torch

        self.models = list(models)
        first = self.models[0].config
        for m in self.models[1:]:
            if m.config.preprocess != first.preprocess:
                raise ConfigError("all folds must share one preprocessing spec to be embedded in one pass")
        self.module = torch.nn.ModuleList(self.models)
        self.config = dataclasses.replace(first, feature_dim=first.feature_dim * len(self.models))

    # The small surface iter_encoded needs from a model.
    @property
    def device(self) -> torch.device:
        return self.models[0].device

    def to(self, device: torch.device) -> _FoldStack:
        self.module.to(device)
        return self

    def eval(self) -> _FoldStack:
        self.module.eval()
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.cat([m(x) for m in self.models], dim=1)


def _metadata(models: Sequence[AnatCL], device: str) -> dict[str, Any]:
    import torch

    cfg = models[0].config
    return {
        "package_version": __version__,
        "model": {
            "name": cfg.name,
            "source": cfg.source,
            "source_sha256": [m.config.source_sha256 for m in models] if len(models) > 1 else cfg.source_sha256,
            "architecture": cfg.architecture,
            "variant": cfg.variant,
            "folds": [m.config.fold for m in models],
        },
        "preprocess": cfg.preprocess.to_dict(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": device,
    }


def _comparable(meta: dict[str, Any]) -> dict[str, Any]:
    """The part of the metadata that must agree for a resume to be valid."""
    # Tables from before --precision existed were float32.
    return {"model": meta.get("model"), "preprocess": meta.get("preprocess"), "precision": meta.get("precision", "fp32")}


class _Parts:
    """Crash-safe store of finished batches: one Parquet file per batch, plus an errors log."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._seq = len(list(directory.glob("part-*.parquet")))

    def write(self, table: pa.Table, meta: dict[str, Any]) -> None:
        import pyarrow.parquet as pq

        self._seq += 1
        final = self.directory / f"part-{self._seq:07d}.parquet"
        tmp = self.directory / f".{final.name}.tmp"
        pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta)}), tmp)
        os.replace(tmp, final)

    def tables(self) -> list[pa.Table]:
        import pyarrow.parquet as pq

        return [pq.read_table(p) for p in sorted(self.directory.glob("part-*.parquet"))]

    def metadata(self) -> dict[str, Any] | None:
        import pyarrow.parquet as pq

        for p in sorted(self.directory.glob("part-*.parquet")):
            md = pq.read_schema(p).metadata or {}
            if METADATA_KEY in md:
                return json.loads(md[METADATA_KEY])
        return None


def _read_existing(path: Path, fmt: str) -> tuple[pa.Table | None, dict[str, Any] | None]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not path.exists():
        return None, None
    if fmt == "parquet":
        table = pq.read_table(path)
        md = table.schema.metadata or {}
        meta = json.loads(md[METADATA_KEY]) if METADATA_KEY in md else None
        return table.replace_schema_metadata(None), meta
    meta_path = path.with_name(path.name + ".meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    return pacsv.read_csv(path), meta


def _build_table(
    records: Sequence[InputRecord], fold_ids: Sequence[int | None], model_name: str,
    indices: Sequence[int], features: np.ndarray, infos: Sequence[dict[str, Any]],
) -> pa.Table:
    import pyarrow as pa

    n_folds = len(fold_ids)
    dim = features.shape[1] // n_folds if len(indices) else 0
    cols: dict[str, list[Any]] = {k: [] for k in _ID_COLUMNS}
    feat_rows: list[np.ndarray] = []
    extra: dict[str, list[Any]] = {}
    for row, idx in enumerate(indices):
        rec = records[idx]
        info = infos[row]
        for k, fold in enumerate(fold_ids):
            cols["path"].append(rec.path)
            cols["subject"].append(rec.subject)
            cols["session"].append(rec.session)
            cols["run"].append(rec.run)
            cols["model"].append(model_name)
            cols["fold"].append(fold)
            feat_rows.append(features[row, k * dim:(k + 1) * dim])
            qc = {
                "qc_method": info.get("method"),
                "qc_kind": info.get("kind"),
                "qc_kind_confidence": info.get("kind_confidence"),
                "qc_n_warnings": len(info.get("warnings", [])),
                "qc_warnings": "; ".join(info.get("warnings", [])),
            }
            qc.update({k2: v for k2, v in info.items() if k2.startswith("qc_")})
            for key, value in qc.items():
                extra.setdefault(key, []).append(value)
    arrays: dict[str, pa.Array] = {
        "path": pa.array(cols["path"], pa.string()),
        "subject": pa.array(cols["subject"], pa.string()),
        "session": pa.array(cols["session"], pa.string()),
        "run": pa.array(cols["run"], pa.string()),
        "model": pa.array(cols["model"], pa.string()),
        "fold": pa.array(cols["fold"], pa.int64()),
    }
    mat = np.stack(feat_rows).astype(np.float32) if feat_rows else np.zeros((0, dim), np.float32)
    for j, name in enumerate(feature_names(mat.shape[1])):
        arrays[name] = pa.array(mat[:, j], pa.float32())
    for key, values in extra.items():
        arrays[key] = pa.array(values)
    return pa.table(arrays)


def _sort_table(table: pa.Table) -> pa.Table:
    return table.sort_by([("path", "ascending"), ("fold", "ascending")])


def _write_final(table: pa.Table, out: Path, fmt: str, meta: dict[str, Any]) -> None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if fmt == "parquet":
            pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta)}), tmp)
        else:
            pacsv.write_csv(table, tmp)
            meta_path = out.with_name(out.name + ".meta.json")
            meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_errors(path: Path, failures: Sequence[dict[str, Any]]) -> None:
    if not failures:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "fold", "stage", "message"])
        writer.writeheader()
        for f in failures:
            writer.writerow({k: f.get(k) for k in ("path", "fold", "stage", "message")})
    os.replace(tmp, path)


def errors_path_for(out: Path) -> Path:
    """``feats.parquet`` -> ``feats.errors.csv`` beside it."""
    stem = out.name.split(".")[0] if "." in out.name else out.name
    return out.with_name(f"{stem}.errors.csv")


def run_embed(
    records: Sequence[InputRecord],
    models: Sequence[AnatCL],
    out: str | os.PathLike[str],
    *,
    fmt: str = "parquet",
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
) -> EmbedSummary:
    """Embed ``records`` with one model per fold and write one table.

    Args:
        records: inputs (from :func:`anatcl_infer.inputs.discovery.discover_inputs`), sorted.
        models: one loaded model per fold, sharing a preprocessing spec.
        out: output file (``.parquet`` or ``.csv``).
        fmt: ``"parquet"`` or ``"csv"``.
        resume: keep what an earlier run of the same job wrote and embed only the rest.
        overwrite: replace an existing output (otherwise an existing output is an error).
        qc: add the QC metrics of :func:`anatcl_infer.qc.qc_metrics` as columns.
        head: a head directory whose predictions are added as columns.
        precision: "fp32" (default), "bf16" or "fp16" (see :func:`anatcl_infer.encoding.encoder.encode`);
            recorded in the table's metadata, and a resume must use the same one.
        prior_failures: failures of earlier stages (e.g. the raw-T1 route) to report with these.

    Returns:
        An :class:`EmbedSummary`; ``summary.failures`` lists the inputs that failed.
    """
    from ..model.devices import resolve_device
    from ..encoding.encoder import iter_encoded, resolve_precision

    if fmt not in ("parquet", "csv"):
        raise ConfigError(f"format must be 'parquet' or 'csv', got {fmt!r}")
    if not models:
        raise ConfigError("run_embed needs at least one model")
    out = Path(out)
    partial_dir = out.with_name(out.name + ".partial")
    errors_path = errors_path_for(out)
    dev = resolve_device(device)
    meta = _metadata(models, str(dev))
    precision = resolve_precision(precision, dev, amp)
    meta["precision"] = precision

    if out.exists() and not (resume or overwrite):
        raise ConfigError(f"{out} already exists; pass --resume to add what is missing, or --overwrite to replace it")
    if partial_dir.exists() and not (resume or overwrite):
        raise ConfigError(
            f"an interrupted run left {partial_dir}; pass --resume to continue it, or --overwrite to start over"
        )
    if overwrite and not resume:
        shutil.rmtree(partial_dir, ignore_errors=True)

    parts = _Parts(partial_dir)
    done: set[tuple[str, int | None]] = set()
    if resume:
        existing, existing_meta = _read_existing(out, fmt) if out.exists() else (None, None)
        for label, m in (("the existing output", existing_meta), ("the interrupted run", parts.metadata())):
            if m is not None and _comparable(m) != _comparable(meta):
                raise ConfigError(
                    f"{label} was made with another model, preprocessing or precision "
                    f"({m.get('model')}, precision {m.get('precision', 'fp32')}); resume with the same "
                    "model and --precision, use another --out, or --overwrite to start over"
                )
        for t in ([existing] if existing is not None else []) + parts.tables():
            done.update(zip(t.column("path").to_pylist(), t.column("fold").to_pylist()))

    fold_ids = [m.config.fold for m in models]
    todo = [r for r in records if any((r.path, f) not in done for f in fold_ids)]
    skipped = len(records) - len(todo)
    if skipped:
        logger.info("resuming: %d of %d inputs already embedded", skipped, len(records))

    extra = None
    if qc:
        import functools

        from ..qc.metrics import qc_metrics

        extra = functools.partial(qc_metrics, config=models[0].config.preprocess)
    runner = models[0] if len(models) == 1 else _FoldStack(models)
    failures: list[dict[str, Any]] = list(prior_failures)
    n_written = 0
    try:
        for batch in iter_encoded(
            runner, [r.path for r in todo], batch_size=batch_size, device=dev, num_workers=num_workers,  # type: ignore[arg-type]
            progress=progress, precision=precision, strict=strict, extra_info=extra,
        ):
            for f in batch.failures:
                rec = {"path": f.path, "fold": "all" if len(fold_ids) > 1 else fold_ids[0], "stage": f.stage, "message": f.message}
                failures.append(rec)
                logger.error("%s [%s]: %s", f.path, f.stage, f.message)
            if batch.indices:
                table = _build_table(todo, fold_ids, models[0].config.name, batch.indices, batch.features, batch.infos)
                parts.write(table, meta)
                n_written += len(batch.indices)
    except KeyboardInterrupt:
        logger.error("interrupted: %d inputs written to %s; rerun with --resume to continue", n_written, partial_dir)
        raise

    import pyarrow as pa

    # Re-read everything written (earlier output + all parts) and assemble the final table.
    all_tables: list[pa.Table] = []
    if resume and out.exists():
        existing, _ = _read_existing(out, fmt)
        if existing is not None:
            all_tables.append(existing)
    all_tables.extend(t.replace_schema_metadata(None) for t in parts.tables())
    if all_tables:
        final = pa.concat_tables(all_tables, promote_options="default")
    else:
        final = _build_table([], fold_ids, models[0].config.name, [], np.zeros((0, models[0].config.feature_dim * len(models)), np.float32), [])
    final = _dedupe(_sort_table(final))
    if head is not None:
        final = _add_head_columns(final, head, meta)
    _write_final(final, out, fmt, meta)
    shutil.rmtree(partial_dir, ignore_errors=True)
    _write_errors(errors_path, failures)
    n_inputs = len(records) + len(prior_failures)
    return EmbedSummary(out, errors_path if failures else None, n_inputs, n_written, skipped, failures)


def _dedupe(table: pa.Table) -> pa.Table:
    """Keep the first row of each (path, fold) (a resumed run never writes one twice, but be safe)."""
    keys = list(zip(table.column("path").to_pylist(), table.column("fold").to_pylist()))
    seen: set[tuple[Any, Any]] = set()
    keep = []
    for i, key in enumerate(keys):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    if len(keep) == len(keys):
        return table
    return table.take(keep)


def _add_head_columns(table: pa.Table, head_dir: str | os.PathLike[str], meta: dict[str, Any]) -> pa.Table:
    import pyarrow as pa

    from ..downstream.heads import Head

    head = Head.load(head_dir)
    df = table.to_pandas()
    preds = head.predict_frame(df, metadata=meta)  # checks model name, sha256 and folds
    for name in preds.columns:
        if name in table.column_names:
            continue
        table = table.append_column(name, pa.array(preds[name].to_numpy()))
    return table

