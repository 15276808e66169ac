"""The participant level: embed the chosen subjects' maps, one features file and sidecar per scan.

:func:`plan_participant` checks everything that needs no weights (the dataset root, the labels,
OUTPUT_DIR, name collisions, outputs already there), so the command line runs it before loading
the model; :func:`run_participant` runs it again with the loaded models and embeds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..._files import atomic_path
from ..._version import __version__
from ...errors import ConfigError
from ..embed import _file_sha256, _read_table, _write_table, weights_sha256, weights_unchanged
from .dataset import _bids_uri, _read_json, _source_roots, check_output_dir, write_bidsignore, write_dataset_description, write_readme
from .names import EXTENSION, model_desc, output_paths
from .scans import check_bids_root, find_scans

if TYPE_CHECKING:
    import torch

    from ...config import ModelConfig
    from ...inputs.discovery import InputRecord
    from ...model.network import AnatCL

logger = logging.getLogger(__package__)


@dataclass
class BidsSummary:
    """What a participant-level run did."""

    output_dir: Path
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    errors_files: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no scan failed."""
        return not self.failures


def _identity(models: Sequence[AnatCL]) -> dict[str, Any]:
    """What must match for an existing output to count as done: model, weights, folds, preprocessing."""
    cfg = models[0].config
    ident = {
        "Model": {
            "Name": cfg.name,
            "Architecture": cfg.architecture,
            "Variant": cfg.variant,
            "Source": [m.config.source for m in models],
            "SourceSHA256": [m.config.source_sha256 for m in models],
            "WeightsSHA256": [weights_sha256(m) for m in models],
            "Folds": [m.config.fold for m in models],
            "FeatureDim": cfg.feature_dim,
        },
        "Preprocessing": cfg.preprocess.to_dict(),
    }
    return json.loads(json.dumps(ident))  # as read back from a sidecar (lists, not tuples)


def _check_collisions(plan: Sequence[tuple[InputRecord, Path, Path]]) -> None:
    seen: dict[Path, str] = {}
    for rec, feats, _side in plan:
        if feats in seen:
            raise ConfigError(
                f"{seen[feats]} and {rec.path} would both be written to {feats}; keep one preprocessing "
                "output per scan (choose the folder with --derivatives)"
            )
        seen[feats] = rec.path


def _work_name(subject: str, session_labels: Sequence[str] | None, desc: str) -> str:
    ses = f"_ses-{'+'.join(session_labels)}" if session_labels else ""
    return f"sub-{subject}{ses}_desc-{desc}"


def plan_participant(
    bids_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    config: ModelConfig | None,
    *,
    derivatives: str | os.PathLike[str] | None = None,
    participant_labels: Sequence[str] | None = None,
    session_labels: Sequence[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> list[tuple[InputRecord, Path, Path]]:
    """Every check of a participant run that needs no weights; the (map, features file, sidecar) of each scan.

    ``config`` is the model's config (``None`` when it cannot be read without loading the model:
    the maps are then searched for as grey-matter maps, and outputs already there are not checked).

    Raises:
        ConfigError: not a BIDS dataset, a label matches nothing, OUTPUT_DIR is BIDS_DIR or another
            dataset, two maps would get one output name, or outputs exist (without ``resume``/``overwrite``).
        InputError: no maps at all.

    Example:
        >>> plan_participant("ds", "ds/derivatives/anatcl", None, participant_labels=["01"])  # doctest: +SKIP
    """
    root = check_bids_root(bids_dir, derivatives)
    out = check_output_dir(output_dir, root)
    records = find_scans(root, derivatives=derivatives, participant_labels=participant_labels,
                         session_labels=session_labels, input_kind=config.preprocess.input_kind if config else "gm")
    plan = [(rec, *output_paths(out, rec, model_desc(config))) for rec in records]
    _check_collisions(plan)
    if config is not None and not (resume or overwrite):
        for _rec, feats, side in plan:
            if feats.exists() or side.exists():
                raise ConfigError(f"{feats} already exists; pass --resume to embed only what is missing, or --overwrite to redo it")
    return plan


@weights_unchanged()  # one embed job per subject: hash each fold's weights once, not per subject
def run_participant(
    bids_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    models: Sequence[AnatCL],
    *,
    derivatives: str | os.PathLike[str] | None = None,
    participant_labels: Sequence[str] | None = None,
    session_labels: Sequence[str] | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    strict: bool = False,
    qc: bool = False,
    amp: bool | str = False,
    precision: str = "fp32",
    progress: bool = True,
) -> BidsSummary:
    """Embed the chosen subjects' maps; write one features file and JSON sidecar per scan.

    Also writes the files that make OUTPUT_DIR a valid BIDS derivatives dataset
    (``dataset_description.json`` naming the models and their SHA-256, ``README.md``, ``.bidsignore``).

    Args:
        bids_dir: BIDS dataset root.
        output_dir: the derivatives dataset to write (``BIDS_DIR/derivatives/anatcl`` is usual).
        models: one loaded model per fold (sharing a preprocessing spec).
        derivatives: CAT12/deepmriprep output folder (default: ``BIDS_DIR/derivatives``).
        participant_labels: subjects (without ``sub-``); all subjects when ``None``.
        session_labels: sessions (without ``ses-``); all when ``None``.
        resume: skip scans whose outputs exist and were made by the same model from the same file
            (unchanged SHA-256), and continue an interrupted run.
        overwrite: embed every chosen scan again.
        qc: add the ``qc_*`` columns, as ``anatcl embed --qc``.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``, as in ``anatcl embed --precision``.
        batch_size, device, num_workers, strict, amp, progress: as in
            :func:`anatcl_infer.jobs.embed.run_embed`.

    Returns:
        A :class:`BidsSummary`; ``summary.failures`` lists the scans that failed (the others are written).

    Raises:
        ConfigError: outputs exist (without ``resume``/``overwrite``) or were made by another model,
            two maps would get the same output name, or OUTPUT_DIR is not a folder of its own.

    Example:
        >>> from anatcl_infer import load_model
        >>> run_participant("ds", "ds/derivatives/anatcl", [load_model()], participant_labels=["01"])  # doctest: +SKIP
    """
    from ..embed import run_embed

    if not models:
        raise ConfigError("run_participant needs at least one model")
    out = Path(output_dir).expanduser()
    root = Path(bids_dir).expanduser()
    plan = plan_participant(root, out, models[0].config, derivatives=derivatives, participant_labels=participant_labels,
                            session_labels=session_labels, resume=resume, overwrite=overwrite)
    desc = model_desc(models[0].config)
    write_dataset_description(out, root, derivatives, models)
    write_bidsignore(out)
    write_readme(out)
    identity = _identity(models)
    roots = _source_roots(root, derivatives)
    summary = BidsSummary(out)

    todo: dict[str, list[tuple[InputRecord, Path, Path, str | None]]] = {}
    for rec, feats, side in plan:
        sha = _file_sha256(rec.path)
        if (feats.exists() or side.exists()) and not overwrite:
            made = _read_json(side)
            if made is not None and feats.exists():
                if {k: made.get(k) for k in identity} != identity:
                    raise ConfigError(
                        f"{feats} was made with another model or preprocessing ({made.get('Model', {}).get('Name')}, "
                        f"folds {made.get('Model', {}).get('Folds')}); use another OUTPUT_DIR, or --overwrite to redo it"
                    )
                if made.get("SourceSHA256") == sha:
                    summary.skipped.append(feats)
                    continue
                logger.info("%s changed since %s was written; embedding it again", rec.path, feats.name)
        todo.setdefault(str(rec.subject), []).append((rec, feats, side, sha))
    if summary.skipped:
        logger.info("resuming: %d of %d scans already done", len(summary.skipped), len(plan))

    for subject, items in todo.items():
        log_dir = out / f"sub-{subject}" / "log"
        base = _work_name(subject, session_labels, desc)
        work = log_dir / f"{base}_work{EXTENSION}"
        errors_file = log_dir / f"{base}_errors.csv"
        logger.info("sub-%s: embedding %d scans", subject, len(items))
        result = run_embed(
            [it[0] for it in items], models, work, batch_size=batch_size, device=device, num_workers=num_workers,
            resume=resume, overwrite=overwrite, strict=strict, progress=progress, amp=amp, precision=precision, qc=qc,
        )
        _write_scans(result, items, identity, roots, summary)
        work.unlink(missing_ok=True)
        if result.failures and result.errors_path is not None and result.errors_path.exists():
            os.replace(result.errors_path, errors_file)
            summary.errors_files.append(errors_file)
        else:
            errors_file.unlink(missing_ok=True)
        summary.failures.extend(result.failures)
        if log_dir.is_dir() and not any(log_dir.iterdir()):
            shutil.rmtree(log_dir, ignore_errors=True)
    return summary


def _write_scans(
    result: Any, items: Sequence[tuple[InputRecord, Path, Path, str | None]], identity: dict[str, Any],
    roots: dict[str, Path], summary: BidsSummary,
) -> None:
    """Split one subject's embed table into a features file and sidecar per scan."""
    import pyarrow.compute as pc

    table, raw_meta = _read_table(result.out) if result.written else (None, None)
    raw_meta = raw_meta or b"{}"  # run_embed always writes it
    run_meta = json.loads(raw_meta)
    for rec, feats, side, sha in items:
        rows = table.filter(pc.equal(table.column("path"), rec.path)) if table is not None else None
        if rows is None or rows.num_rows == 0:  # failed: never leave features of an older version of this scan
            feats.unlink(missing_ok=True)
            side.unlink(missing_ok=True)
            continue
        _write_table(rows, feats, raw_meta)
        sidecar = _sidecar(rec, sha, identity, run_meta, roots)
        with atomic_path(side) as tmp:
            tmp.write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
        summary.written.append(feats)


def _sidecar(rec: InputRecord, sha: str | None, identity: dict[str, Any], run_meta: dict[str, Any], roots: dict[str, Path]) -> dict[str, Any]:
    folds = identity["Model"]["Folds"]
    return {
        "Description": (
            f"AnatCL features of one scan: {len(folds)} row(s), one per fold {folds} (per volume and fold for a 4D map), "
            f"with columns path, volume (null but for a 4D map's volumes), subject, "
            f"session, run, model, fold, feat_000..feat_{identity['Model']['FeatureDim'] - 1:03d} (float32) and qc_*, "
            "as written by `anatcl embed`. Never average rows of different folds."
        ),
        "Sources": [_bids_uri(rec.path, roots)],
        "SourceFile": rec.path,
        "SourceSHA256": sha,
        **identity,
        "PackageVersion": __version__,
        "TorchVersion": run_meta.get("torch_version"),
        "Device": run_meta.get("device"),
    }
