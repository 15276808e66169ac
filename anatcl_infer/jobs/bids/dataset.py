"""The files that make OUTPUT_DIR a BIDS derivatives dataset the validator accepts.

* ``dataset_description.json``: ``DatasetType: derivative``, ``GeneratedBy`` naming this package
  and every model whose features the dataset holds (each fold with the SHA-256 of its weights
  file and of the tensors loaded), ``SourceDatasets`` and ``DatasetLinks``;
* ``README.md``: what the files are and how to read them (written once; never replaced);
* ``.bidsignore``: the specification has no suffix for feature tables and no ``.parquet``
  extension, so the ``*_features.parquet``/``.json`` files (and the ``sub-*/log`` folders of failed
  scans) are listed there, as BIDS asks for files it does not cover; bids-validator 3 then reports
  no error, and pybids (which does not read ``.bidsignore``) still indexes every file with its entities.

Every file is written atomically with bytes that depend only on the arguments, so concurrent
participant jobs (a SLURM array over subjects) write the same content and need no coordination.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..._files import atomic_path
from ..._version import __version__
from ...errors import ConfigError
from ..embed import weights_sha256
from .names import BIDS_VERSION, CODE_URL, EXTENSION, PIPELINE_NAME, SUFFIX, model_desc

if TYPE_CHECKING:
    from ...model.network import AnatCL

logger = logging.getLogger(__package__)

#: What ``.bidsignore`` must hold: the files the specification does not cover.
BIDSIGNORE_LINES = (f"*_{SUFFIX}{EXTENSION}", f"*_{SUFFIX}.json", "sub-*/log")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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


def _is_ours(desc: Any) -> bool:
    return isinstance(desc, dict) and desc.get("DatasetType") == "derivative" and any(
        isinstance(g, dict) and g.get("Name") == PIPELINE_NAME for g in desc.get("GeneratedBy", []))


def check_output_dir(output_dir: str | os.PathLike[str], bids_dir: str | os.PathLike[str]) -> Path:
    """OUTPUT_DIR, checked: not the BIDS dataset itself, and not a dataset made by anything else.

    Raises:
        ConfigError: OUTPUT_DIR is BIDS_DIR, or holds a ``dataset_description.json`` this pipeline did not write.
    """
    out = Path(output_dir).expanduser()
    path = out / "dataset_description.json"
    if path.exists() and not _is_ours(_read_json(path)):
        raise ConfigError(
            f"{path} exists and was not written by {PIPELINE_NAME}; OUTPUT_DIR must be a folder of its own "
            "(e.g. BIDS_DIR/derivatives/anatcl), never the BIDS dataset itself"
        )
    if out.resolve() == Path(bids_dir).expanduser().resolve():
        raise ConfigError("OUTPUT_DIR must not be BIDS_DIR; use e.g. BIDS_DIR/derivatives/anatcl")
    return out


def model_entries(models: Sequence[AnatCL]) -> list[dict[str, Any]]:
    """One ``GeneratedBy`` entry per fold model: name, fold, the SHA-256 of its weights file and of its tensors.

    ``Version`` is ``sha256:<hex>`` of the weights file the model was read from (the hash the
    registry verifies), or of the tensors loaded when no file is known (an in-memory model).
    """
    out = []
    for m in models:
        cfg = m.config
        tensors = weights_sha256(m)
        entry: dict[str, Any] = {
            "Name": cfg.name,
            "Version": f"sha256:{cfg.source_sha256 or tensors}",
            "Description": (
                f"AnatCL model whose features the desc-{model_desc(cfg)} files hold: {cfg.architecture}, variant "
                f"{cfg.variant}, fold {cfg.fold}. SHA256 is the hash of the weights file it was read from, "
                "WeightsSHA256 that of the tensors loaded (as recorded in each sidecar)."
            ),
        }
        if str(cfg.source).startswith(("http://", "https://")):
            entry["CodeURL"] = cfg.source
        entry.update({"Fold": cfg.fold, "Source": cfg.source, "WeightsSHA256": tensors})
        if cfg.source_sha256:
            entry["SHA256"] = cfg.source_sha256
        out.append(entry)
    return out


def write_dataset_description(
    output_dir: str | os.PathLike[str],
    bids_dir: str | os.PathLike[str],
    derivatives: str | os.PathLike[str] | None = None,
    models: Sequence[AnatCL] = (),
) -> Path:
    """Write ``OUTPUT_DIR/dataset_description.json`` (BIDS derivatives), atomically and idempotently.

    Every participant run calls this with the same arguments and writes the same bytes, so concurrent
    runs cannot corrupt it. An existing description made by this pipeline is kept (a newer package
    version, or a model not listed yet, is added to ``GeneratedBy``); one made by anything else is an
    error, so that a BIDS dataset is never overwritten by mistake.

    Args:
        output_dir: the derivatives dataset.
        bids_dir: the raw dataset it derives from.
        derivatives: the CAT12/deepmriprep folder the maps were read from, if not under ``bids_dir``.
        models: the fold models whose features are written: one ``GeneratedBy`` entry each, with
            the SHA-256 of their weights (:func:`model_entries`).

    Example:
        >>> write_dataset_description("out", "ds000001")  # doctest: +SKIP
        PosixPath('out/dataset_description.json')
    """
    out = check_output_dir(output_dir, bids_dir)
    path = out / "dataset_description.json"
    root = Path(bids_dir).expanduser()
    source_desc = _read_json(root / "dataset_description.json") or {}
    source: dict[str, str] = {"URL": root.resolve().as_uri()}
    if source_desc.get("DatasetDOI"):
        source["DOI"] = str(source_desc["DatasetDOI"])
    generated = {"Name": PIPELINE_NAME, "Version": __version__, "CodeURL": CODE_URL,
                 "Description": "AnatCL brain-MRI foundation-model features of grey-matter maps"}
    entries = model_entries(models)
    desc: dict[str, Any] = {
        "Name": f"AnatCL features of {source_desc.get('Name') or root.name}",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated, *entries],
        "SourceDatasets": [source],
        "DatasetLinks": {name: p.as_uri() for name, p in _source_roots(root, derivatives).items()},
    }
    existing = _read_json(path) if path.exists() else None
    if existing is not None:
        if existing.get("SourceDatasets") != desc["SourceDatasets"]:
            logger.warning("%s names other source datasets (%s); keeping it", path, existing.get("SourceDatasets"))
        listed = [g for g in existing["GeneratedBy"] if isinstance(g, dict)]
        if not any(g.get("Name") == PIPELINE_NAME and g.get("Version") == __version__ for g in listed):
            existing["GeneratedBy"] = [*existing["GeneratedBy"], generated]
        for entry in entries:
            key = (entry["Name"], entry["Fold"], entry["WeightsSHA256"])
            if not any((g.get("Name"), g.get("Fold"), g.get("WeightsSHA256")) == key for g in listed):
                existing["GeneratedBy"] = [*existing["GeneratedBy"], entry]
        desc = existing
    text = json.dumps(desc, indent=2) + "\n"
    _write_text(path, text)
    return path


def write_bidsignore(output_dir: str | os.PathLike[str]) -> Path:
    """Make sure ``OUTPUT_DIR/.bidsignore`` lists the feature files (lines already there are kept).

    Example:
        >>> write_bidsignore("out").read_text().splitlines()[-3:]  # doctest: +SKIP
        ['*_features.parquet', '*_features.json', 'sub-*/log']
    """
    path = Path(output_dir) / ".bidsignore"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ("# Files the BIDS specification has no name for yet (anatcl-infer feature tables, see README.md);\n"
                "# listed here so that bids-validator checks everything else.\n")
    present = {line.strip() for line in text.splitlines()}
    missing = [line for line in BIDSIGNORE_LINES if line not in present]
    if missing:
        text = text + ("" if not text or text.endswith("\n") else "\n") + "\n".join(missing) + "\n"
    _write_text(path, text)
    return path


_README = """# AnatCL features

A BIDS derivatives dataset written by [anatcl-infer]({code_url}) (`anatcl bids`): features of the
AnatCL brain-MRI foundation models (Barbano et al., *Anatomical Foundation Models for Brain MRIs*,
arXiv:2408.07079) computed from CAT12/deepmriprep grey-matter maps (`mwp1`) of the source dataset
named in `dataset_description.json`.

## Files

- `sub-<label>/[ses-<label>/]anat/sub-<label>_[ses-<label>_]..._desc-<model>_features.parquet`: one
  Parquet table per scan, one row per model fold (per volume and fold for a 4D map), with the columns
  `path`, `volume` (empty but for a 4D map's volumes), `subject`, `session`, `run`, `model`, `fold`,
  `feat_000` ... (float32) and `qc_*`; its metadata records the model, the
  SHA-256 of its weights and the preprocessing.
- the `.json` sidecar beside each: the model and its SHA-256, the fold, the preprocessing spec, the
  source map and its SHA-256.
- `desc-<model>_features.parquet` (written by `anatcl bids ... group`): every scan in one table,
  equal to the table `anatcl embed` writes for the same maps.
- `sub-<label>/log/`: the scans of that subject that failed, when any did.

`dataset_description.json` lists in `GeneratedBy` the package version and every model whose
features are here, with the SHA-256 of its weights.

The BIDS specification has no suffix for feature tables and no `.parquet` extension yet, so
`.bidsignore` lists these files; the validator checks the rest.

## Reading

```python
import pyarrow.parquet as pq
table = pq.read_table("desc-anatclglobal_features.parquet")

from anatcl_infer import read_features  # features and their provenance metadata
df, meta = read_features("desc-anatclglobal_features.parquet")
```

The features of different folds live in different spaces: never average them; ensemble the
predictions of per-fold heads instead (`anatcl fit-head`).
"""


def write_readme(output_dir: str | os.PathLike[str]) -> Path:
    """Write ``OUTPUT_DIR/README.md`` describing the dataset, unless a README is there already.

    Example:
        >>> write_readme("out").name  # doctest: +SKIP
        'README.md'
    """
    out = Path(output_dir)
    for name in ("README", "README.md", "README.rst", "README.txt"):
        if (out / name).exists():
            return out / name
    path = out / "README.md"
    _write_text(path, _README.format(code_url=CODE_URL))
    return path


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically, unless the file already holds exactly it (then it is left untouched)."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
