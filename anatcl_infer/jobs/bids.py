"""The BIDS App: ``anatcl bids BIDS_DIR OUTPUT_DIR participant|group``.

``participant`` embeds the grey-matter maps (CAT12 / deepmriprep derivatives) of the chosen
subjects and writes a BIDS *derivatives* dataset::

    OUTPUT_DIR/
      dataset_description.json                      DatasetType "derivative", GeneratedBy, SourceDatasets
      sub-01/anat/sub-01_desc-anatclglobal_features.parquet   (+ .json sidecar)
      sub-02/ses-1/anat/sub-02_ses-1_desc-anatclglobal_features.parquet   (+ .json)
      sub-02/log/sub-02_desc-anatclglobal_errors.csv          (only when a scan of sub-02 failed)
      desc-anatclglobal_features.parquet            written by ``group``

Why one Parquet file per scan (suffix ``features``, entity ``desc-<model>``): it holds exactly the rows
``anatcl embed`` writes for that scan (``path``, ``subject``, ``session``, ``run``, ``model``,
``fold``, ``feat_000``... float32, ``qc_*``), one row per fold, bit-exact and with the provenance block
in its metadata, so ``group`` is a plain concatenation that equals the table of ``anatcl embed``
on the same scans. BIDS's own tabular format (TSV) would round 512 floats per row through text and
lose the types; ``.npy`` would drop the identifiers and the QC columns. The JSON sidecar says what
made the file (model, its SHA-256 and fold, preprocessing spec, package version, source file and
its SHA-256), as BIDS derivatives do.

Participant runs are independent: each writes only its own subject's folder, and
``dataset_description.json`` is written atomically with the same content by every run, so a SLURM
array over subjects needs no coordination. Embedding is done by :func:`anatcl_infer.jobs.embed.run_embed`
(crash-safe parts in ``sub-XX/log/``, ``--resume`` continues an interrupted run).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._files import atomic_path
from .._version import __version__
from ..errors import ConfigError, InputError
from .embed import _file_sha256, _read_table, _sort_table, _write_table, weights_sha256, weights_unchanged

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

    from ..inputs.discovery import InputRecord
    from ..model.network import AnatCL

__all__ = [
    "BIDS_VERSION",
    "BidsSummary",
    "normalise_labels",
    "find_scans",
    "model_desc",
    "output_paths",
    "write_dataset_description",
    "run_participant",
    "run_group",
]

logger = logging.getLogger(__name__)

#: BIDS version the derivatives dataset follows.
BIDS_VERSION = "1.10.0"
CODE_URL = "https://pypi.org/project/anatcl-infer/"
PIPELINE_NAME = "anatcl-infer"
SUFFIX = "features"
EXTENSION = ".parquet"

_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_PAIR = re.compile(r"^([A-Za-z]+)-([A-Za-z0-9]+)$")
# BIDS entity order (the part that can occur in anatomical derivatives); others go before desc.
_ORDER = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "mod", "echo", "part", "space", "res", "den", "label")


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


def normalise_labels(labels: Iterable[str] | None, prefix: str) -> list[str] | None:
    """Labels as given on a command line (``sub-01``, ``01``, ``01,02``) -> ``["01", "02"]``.

    Raises:
        ConfigError: a label that is not alphanumeric.

    Example:
        >>> normalise_labels(["sub-01", "02,sub-03"], "sub")
        ['01', '02', '03']
    """
    if not labels:
        return None
    out: list[str] = []
    for item in labels:
        for raw in str(item).replace(",", " ").split():
            label = raw[len(prefix) + 1:] if raw.startswith(f"{prefix}-") else raw
            if not _LABEL.match(label):
                raise ConfigError(f"{raw!r} is not a BIDS {prefix} label; labels are letters and digits, e.g. {prefix}-01 or 01")
            if label not in out:
                out.append(label)
    return out or None


def model_desc(config: Any) -> str:
    """The ``desc-`` label naming a model's outputs: its name without punctuation (``anatclglobal``).

    Example:
        >>> from anatcl_infer.config import ModelConfig
        >>> model_desc(ModelConfig(name="anatcl-global"))
        'anatclglobal'
    """
    label = re.sub(r"[^A-Za-z0-9]", "", str(getattr(config, "name", "") or "")).lower()
    return label or "anatcl"


def _entities(record: InputRecord) -> list[tuple[str, str]]:
    """BIDS entities of a source map, in BIDS order (CAT12 prefixes and the source's ``desc`` dropped)."""
    name = Path(record.path).name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
    start = name.find("sub-")
    pairs: dict[str, str] = {}
    if start >= 0:
        for token in name[start:].split("_"):
            m = _PAIR.match(token)
            if m and m.group(1) not in pairs and m.group(1) != "desc":
                pairs[m.group(1)] = m.group(2)
    pairs["sub"] = str(record.subject)
    if record.session and "ses" not in pairs:
        pairs["ses"] = record.session
    known = [(k, pairs[k]) for k in _ORDER if k in pairs]
    return known + [(k, v) for k, v in pairs.items() if k not in _ORDER]


def output_paths(output_dir: str | os.PathLike[str], record: InputRecord, desc: str) -> tuple[Path, Path]:
    """(features file, JSON sidecar) of one scan: ``sub-X/[ses-Y/]anat/sub-X_[ses-Y_]..._desc-D_features``.

    Example:
        >>> from anatcl_infer.inputs.discovery import InputRecord
        >>> rec = InputRecord("/d/cat12/sub-01/ses-1/mri/mwp1sub-01_ses-1_run-2_T1w.nii", "01", "1", "2")
        >>> output_paths("/out", rec, "anatclglobal")[0].as_posix()
        '/out/sub-01/ses-1/anat/sub-01_ses-1_run-2_desc-anatclglobal_features.parquet'
    """
    ents = _entities(record)
    folder = Path(output_dir) / f"sub-{record.subject}"
    ses = dict(ents).get("ses")
    if ses:
        folder = folder / f"ses-{ses}"
    stem = "_".join(f"{k}-{v}" for k, v in ents) + f"_desc-{desc}_{SUFFIX}"
    features = folder / "anat" / f"{stem}{EXTENSION}"
    return features, features.with_suffix(".json")


def find_scans(
    bids_dir: str | os.PathLike[str],
    *,
    derivatives: str | os.PathLike[str] | None = None,
    participant_labels: Sequence[str] | None = None,
    session_labels: Sequence[str] | None = None,
    input_kind: str = "gm",
) -> list[InputRecord]:
    """The scans of a BIDS dataset to embed, filtered by subject and session.

    Grey-matter maps are found as ``anatcl embed`` finds them
    (:func:`anatcl_infer.inputs.discovery.discover_inputs`): CAT12 ``mwp1*`` / deepmriprep
    ``*desc-gm*`` maps under ``BIDS_DIR/derivatives/`` (else anywhere in the dataset), or under
    ``derivatives`` when it is given; for raw-T1 models, ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``.

    Args:
        bids_dir: the BIDS dataset root (it must hold ``dataset_description.json``).
        derivatives: a folder of CAT12/deepmriprep output to use instead of ``BIDS_DIR/derivatives``.
        participant_labels: subjects to keep (without ``sub-``); all when ``None``.
        session_labels: sessions to keep (without ``ses-``); all when ``None``.
        input_kind: the model's input kind (``"gm"`` or ``"t1"``).

    Raises:
        ConfigError: ``bids_dir`` is not a BIDS dataset, or a label matches nothing (the message lists
            the labels found).
        InputError: no maps at all.

    Example:
        >>> find_scans("ds000001", participant_labels=["01"])  # doctest: +SKIP
        [InputRecord(path='/data/ds000001/derivatives/cat12/sub-01/mri/mwp1sub-01_T1w.nii', subject='01', ...)]
    """
    from ..inputs.discovery import discover_inputs

    root = Path(bids_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"BIDS_DIR {root} is not a directory; give the root of a BIDS dataset")
    if not (root / "dataset_description.json").is_file():
        raise ConfigError(
            f"{root} has no dataset_description.json, so it is not the root of a BIDS dataset; give the dataset root "
            "(for a plain folder of maps use `anatcl embed FOLDER --out feats.parquet`)"
        )
    if derivatives is not None:
        source = Path(derivatives).expanduser()
        if not source.is_dir():
            raise ConfigError(f"--derivatives {source} is not a directory; give the CAT12/deepmriprep output folder")
    else:
        source = root
    records = discover_inputs([source], input_kind=input_kind)
    unnamed = [r.path for r in records if not r.subject]
    if unnamed:
        logger.warning("skipping %d maps without a sub- label in their name or folders (e.g. %s)", len(unnamed), unnamed[0])
    records = [r for r in records if r.subject]
    subjects = sorted({str(r.subject) for r in records})
    if participant_labels:
        missing = [p for p in participant_labels if p not in subjects]
        if missing:
            raise ConfigError(
                f"no maps for participant(s) {', '.join('sub-' + m for m in missing)} under {source}; "
                f"found: {_listing(subjects, 'sub')}"
            )
        records = [r for r in records if r.subject in participant_labels]
    if session_labels:
        sessions = sorted({str(r.session) for r in records if r.session})
        records = [r for r in records if r.session in session_labels]
        if not records:
            raise ConfigError(
                f"no maps for session(s) {', '.join('ses-' + s for s in session_labels)}"
                + (" of the chosen participants" if participant_labels else "")
                + f"; found: {_listing(sessions, 'ses')}"
            )
    if not records:
        raise InputError(f"no grey-matter maps with a sub- label under {source}", stage="discover")
    return records


def _listing(labels: Sequence[str], prefix: str) -> str:
    shown = ", ".join(f"{prefix}-{x}" for x in labels[:20])
    return (shown + (f" ... ({len(labels)} in all)" if len(labels) > 20 else "")) or "none"


def _source_roots(bids_dir: Path, derivatives: str | os.PathLike[str] | None) -> dict[str, Path]:
    """The datasets the features derive from, by ``DatasetLinks`` name: the raw dataset, and the maps' folder if given."""
    roots = {"raw": bids_dir.resolve()}
    if derivatives:
        roots["maps"] = Path(derivatives).expanduser().resolve()
    return roots


def _bids_uri(path: str, roots: dict[str, Path]) -> str:
    """``bids:<link>:<relative path>`` when ``path`` lies in a linked dataset, else the absolute path."""
    p = Path(path).resolve()
    for name in ("maps", "raw"):
        if name in roots and p.is_relative_to(roots[name]):
            return f"bids:{name}:{p.relative_to(roots[name]).as_posix()}"
    return str(p)


def write_dataset_description(
    output_dir: str | os.PathLike[str], bids_dir: str | os.PathLike[str], derivatives: str | os.PathLike[str] | None = None
) -> Path:
    """Write ``OUTPUT_DIR/dataset_description.json`` (BIDS derivatives), atomically and idempotently.

    Every participant run calls this with the same arguments and writes the same bytes, so concurrent
    runs cannot corrupt it. An existing description made by this pipeline is kept (a newer package
    version is added to ``GeneratedBy``); one made by anything else is an error, so that a BIDS
    dataset is never overwritten by mistake.

    Example:
        >>> write_dataset_description("out", "ds000001")  # doctest: +SKIP
        PosixPath('out/dataset_description.json')
    """
    out = Path(output_dir)
    path = out / "dataset_description.json"
    root = Path(bids_dir).expanduser()
    source_desc = _read_json(root / "dataset_description.json") or {}
    source: dict[str, str] = {"URL": root.resolve().as_uri()}
    if source_desc.get("DatasetDOI"):
        source["DOI"] = str(source_desc["DatasetDOI"])
    generated = {"Name": PIPELINE_NAME, "Version": __version__, "CodeURL": CODE_URL,
                 "Description": "AnatCL brain-MRI foundation-model features of grey-matter maps"}
    desc: dict[str, Any] = {
        "Name": f"AnatCL features of {source_desc.get('Name') or root.name}",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "SourceDatasets": [source],
        "DatasetLinks": {name: p.as_uri() for name, p in _source_roots(root, derivatives).items()},
    }
    if path.exists():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            existing = None
        ours = isinstance(existing, dict) and existing.get("DatasetType") == "derivative" and any(
            isinstance(g, dict) and g.get("Name") == PIPELINE_NAME for g in existing.get("GeneratedBy", []))
        if not ours:
            raise ConfigError(
                f"{path} exists and was not written by {PIPELINE_NAME}; OUTPUT_DIR must be a folder of its own "
                "(e.g. BIDS_DIR/derivatives/anatcl), never the BIDS dataset itself"
            )
        assert isinstance(existing, dict)
        if existing.get("SourceDatasets") != desc["SourceDatasets"]:
            logger.warning("%s names other source datasets (%s); keeping it", path, existing.get("SourceDatasets"))
        if any(g.get("Version") == __version__ for g in existing["GeneratedBy"] if isinstance(g, dict)):
            return path
        existing["GeneratedBy"] = [*existing["GeneratedBy"], generated]
        desc = existing
    text = json.dumps(desc, indent=2) + "\n"
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return path
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


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


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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
    import pyarrow.compute as pc

    from .embed import run_embed

    if not models:
        raise ConfigError("run_participant needs at least one model")
    out = Path(output_dir).expanduser()
    root = Path(bids_dir).expanduser()
    if out.resolve() == root.resolve():
        raise ConfigError("OUTPUT_DIR must not be BIDS_DIR; use e.g. BIDS_DIR/derivatives/anatcl")
    records = find_scans(root, derivatives=derivatives, participant_labels=participant_labels,
                         session_labels=session_labels, input_kind=models[0].config.preprocess.input_kind)
    desc = model_desc(models[0].config)
    plan = [(rec, *output_paths(out, rec, desc)) for rec in records]
    _check_collisions(plan)
    write_dataset_description(out, root, derivatives)
    identity = _identity(models)
    roots = _source_roots(root, derivatives)
    summary = BidsSummary(out)

    todo: dict[str, list[tuple[InputRecord, Path, Path, str | None]]] = {}
    for rec, feats, side in plan:
        sha = _file_sha256(rec.path)
        if (feats.exists() or side.exists()) and not overwrite:
            if not resume:
                raise ConfigError(f"{feats} already exists; pass --resume to embed only what is missing, or --overwrite to redo it")
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
        table, raw_meta = _read_table(result.out)
        raw_meta = raw_meta or b"{}"  # run_embed always writes it
        run_meta = json.loads(raw_meta)
        for rec, feats, side, sha in items:
            rows = table.filter(pc.equal(table.column("path"), rec.path))
            if rows.num_rows == 0:  # failed: never leave features of an older version of this scan
                feats.unlink(missing_ok=True)
                side.unlink(missing_ok=True)
                continue
            _write_table(rows, feats, raw_meta)
            sidecar = _sidecar(rec, sha, identity, run_meta, roots)
            with atomic_path(side) as tmp:
                tmp.write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
            summary.written.append(feats)
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


def _sidecar(rec: InputRecord, sha: str | None, identity: dict[str, Any], run_meta: dict[str, Any], roots: dict[str, Path]) -> dict[str, Any]:
    folds = identity["Model"]["Folds"]
    return {
        "Description": (
            f"AnatCL features of one scan: {len(folds)} row(s), one per fold {folds}, with columns path, subject, "
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


def _desc_of(path: Path) -> str | None:
    m = re.search(r"_desc-([A-Za-z0-9]+)_" + SUFFIX + re.escape(EXTENSION) + "$", path.name)
    return m.group(1) if m else None


def run_group(
    output_dir: str | os.PathLike[str],
    *,
    participant_labels: Sequence[str] | None = None,
) -> list[Path]:
    """Gather the per-scan features files into ``OUTPUT_DIR/desc-<model>_features.parquet``.

    The table has the rows, columns, order and provenance metadata of the table ``anatcl embed``
    writes for the same scans (one table per model found, usually one).

    Args:
        output_dir: a derivatives dataset written by :func:`run_participant`.
        participant_labels: gather only these subjects (all when ``None``).

    Returns:
        The tables written.

    Raises:
        InputError: no features files (run the participant level first).
        ConfigError: the files of one model were made with different weights or preprocessing.

    Example:
        >>> run_group("ds/derivatives/anatcl")  # doctest: +SKIP
        [PosixPath('ds/derivatives/anatcl/desc-anatclglobal_features.parquet')]
    """
    import pyarrow as pa

    out = Path(output_dir).expanduser()
    pattern = f"*_{SUFFIX}{EXTENSION}"
    files = sorted([*out.glob(f"sub-*/anat/{pattern}"), *out.glob(f"sub-*/ses-*/anat/{pattern}")])
    if participant_labels:
        files = [f for f in files if f.relative_to(out).parts[0].removeprefix("sub-") in participant_labels]
    by_desc: dict[str, list[Path]] = {}
    for f in files:
        d = _desc_of(f)
        if d is not None:
            by_desc.setdefault(d, []).append(f)
    if not by_desc:
        raise InputError(
            f"no *_desc-*_{SUFFIX}{EXTENSION} files under {out}/sub-*/[ses-*/]anat/; run the participant level first "
            f"(anatcl bids BIDS_DIR {out} participant)",
            stage="discover",
        )
    written = []
    for desc, paths in sorted(by_desc.items()):
        reference: dict[str, Any] | None = None
        tables: list[pa.Table] = []
        meta_bytes: bytes | None = None
        for p in paths:
            made = _read_json(p.with_suffix(".json")) or {}
            ident = {"Model": made.get("Model"), "Preprocessing": made.get("Preprocessing")}
            if reference is None:
                reference = ident
            elif ident != reference:
                raise ConfigError(
                    f"{p} was made with other weights or preprocessing than {paths[0]}; re-run the participant level "
                    "with one model (--overwrite), or write the runs to separate OUTPUT_DIRs"
                )
            table, raw = _read_table(p)
            if meta_bytes is None:
                meta_bytes = raw
            tables.append(table)
        table = _sort_table(pa.concat_tables(tables, promote_options="default"))
        dest = out / f"desc-{desc}_{SUFFIX}{EXTENSION}"
        _write_table(table, dest, meta_bytes)
        logger.info("wrote %s (%d rows from %d scans)", dest, table.num_rows, len(paths))
        written.append(dest)
    return written
