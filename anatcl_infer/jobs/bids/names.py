"""BIDS names of the derivatives: labels given on the command line, entities, output paths.

Each scan's features are ``sub-X/[ses-Y/]anat/sub-X_[ses-Y_]..._desc-<model>_features.parquet``
with a ``.json`` sidecar; ``group`` writes ``desc-<model>_features.parquet`` at the top.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError

if TYPE_CHECKING:
    from ...inputs.discovery import InputRecord

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


def _desc_of(path: Path) -> str | None:
    m = re.search(r"_desc-([A-Za-z0-9]+)_" + SUFFIX + re.escape(EXTENSION) + "$", path.name)
    return m.group(1) if m else None


def _listing(labels: Sequence[str], prefix: str) -> str:
    shown = ", ".join(f"{prefix}-{x}" for x in labels[:20])
    return (shown + (f" ... ({len(labels)} in all)" if len(labels) > 20 else "")) or "none"
