"""Training data: the OpenBHB layout, a generic manifest, and a torch Dataset.

Every volume goes through the inference preprocessing,
:func:`anatcl_infer.inputs.preprocess.prepare` with the run's :class:`PreprocessConfig`,
so a model trained here sees exactly what it will see at inference.

Two sources of subjects:

* **OpenBHB** (:func:`read_openbhb`): ``participants.tsv`` (participant_id, age,
  sex, site, split) and, anywhere under the root, per-subject
  ``sub-{id}_preproc-cat12vbm_desc-gm_T1w.npy`` (1, 121, 145, 121) and a Desikan ROI
  array (any ``sub-{id}_*desikan*roi*.npy``, 7×68; channels: surface area, grey-matter
  volume, cortical thickness, thickness std, 3 curvature indices).
* **a manifest** CSV/TSV (:func:`read_manifest`): ``path`` (NIfTI or ``.npy``),
  ``age``; optional ``site``, ``split``, ``subject``, and descriptors either as a
  ``descriptors`` column (path to a 7×68 ROI ``.npy`` or a 68×3 ``.npy``) or as
  columns ``ct_0..ct_67``, ``gmv_0..gmv_67``, ``sa_0..sa_67``. Relative paths are
  resolved against the manifest's folder.

Descriptors are kept as (68, 3) = (CT, GMV, SA) and normalised to [0, 1] with a
min-max per (region, measure) fitted on the **training** subjects
(:func:`fit_descriptor_range`); values outside the fitted range (validation
subjects) are clipped.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import PreprocessConfig
from ..errors import ConfigError, InputError

__all__ = [
    "N_REGIONS",
    "VAL_SPLITS",
    "Subject",
    "VolumeDataset",
    "fit_descriptor_range",
    "normalize_descriptors",
    "read_manifest",
    "read_openbhb",
    "roi_to_descriptors",
    "split_subjects",
]

logger = logging.getLogger(__name__)

#: Desikan-Killiany cortical regions (both hemispheres).
N_REGIONS = 68
#: ROI-array channels (REFERENCE §7) of thickness, volume and area, in the order used here.
ROI_CHANNELS = {"ct": 2, "gmv": 1, "sa": 0}
#: ``split`` values read as validation; ``train`` (or empty) is training; anything else is held out.
VAL_SPLITS = ("val", "valid", "validation", "internal_val", "external_val")
_TRAIN_SPLITS = ("", "train", "training")


@dataclass(frozen=True)
class Subject:
    """One training scan.

    Attributes:
        subject: identifier (``participant_id`` without ``sub-``).
        path: image file (NIfTI, or ``.npy`` on the preprocessing grid).
        age: age in years.
        site: acquisition site label, or ``None``.
        split: ``train``, a value of :data:`VAL_SPLITS`, or another held-out name.
        descriptors: raw (68, 3) CT/GMV/SA, or ``None``.
    """

    subject: str
    path: str
    age: float
    site: str | None = None
    split: str = "train"
    descriptors: np.ndarray | None = field(default=None, repr=False, compare=False)


def roi_to_descriptors(roi: np.ndarray, *, source: str = "") -> np.ndarray:
    """Turn a FreeSurfer Desikan ROI array into (68, 3) = (CT, GMV, SA) float32.

    Accepts the OpenBHB (7, 68) layout (a leading 1 is squeezed), its transpose
    (68, 7), or an already reduced (68, 3) array in (CT, GMV, SA) order.

    Example:
        >>> roi = np.arange(7 * 68, dtype=float).reshape(7, 68)
        >>> roi_to_descriptors(roi)[0].tolist()  # CT, GMV, SA of region 0
        [136.0, 68.0, 0.0]
    """
    arr = np.asarray(roi, dtype=np.float32)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    order = [ROI_CHANNELS["ct"], ROI_CHANNELS["gmv"], ROI_CHANNELS["sa"]]
    if arr.shape == (7, N_REGIONS):
        out = arr[order].T
    elif arr.shape == (N_REGIONS, 7):
        out = arr[:, order]
    elif arr.shape == (N_REGIONS, 3):
        out = arr
    else:
        raise InputError(
            f"Desikan descriptors must be a (7, 68) FreeSurfer ROI array or a (68, 3) CT/GMV/SA array, got shape "
            f"{arr.shape}",
            path=source or None,
        )
    if not np.isfinite(out).all():
        raise InputError("Desikan descriptors contain NaN or inf; fix or drop this subject", path=source or None)
    return np.ascontiguousarray(out, dtype=np.float32)


def _resolve(base: Path, value: str) -> str:
    p = Path(os.path.expanduser(str(value)))
    return str(p if p.is_absolute() else base / p)


def _clean_id(value: Any) -> str:
    text = str(value).strip()
    if re.fullmatch(r"\d+\.0", text):
        text = text[:-2]
    return text.removeprefix("sub-")


def _read_table(path: Path) -> Any:
    import pandas as pd

    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        return pd.read_csv(path, sep=sep)
    except FileNotFoundError:
        raise ConfigError(f"{path} not found; give the path of an existing CSV/TSV file") from None


def read_manifest(path: str | os.PathLike[str]) -> list[Subject]:
    """Read a training manifest CSV (or TSV).

    Args:
        path: CSV with columns ``path`` and ``age``; optional ``site``, ``split``,
            ``subject``, and ``descriptors`` (a file path) or ``ct_K``/``gmv_K``/``sa_K``
            columns (K = 0..67).

    Returns:
        One :class:`Subject` per row, in file order.

    Raises:
        ConfigError: a required column is missing or an age is not a number.

    Example:
        >>> subjects = read_manifest("train.csv")  # doctest: +SKIP
        >>> subjects[0].age
        34.5
    """
    path = Path(path)
    table = _read_table(path)
    table.columns = [str(c).strip() for c in table.columns]
    lower = {c.lower(): c for c in table.columns}
    missing = [c for c in ("path", "age") if c not in lower]
    if missing:
        raise ConfigError(f"{path}: manifest needs columns 'path' and 'age'; missing {missing}; has {list(table.columns)}")
    base = path.parent
    desc_cols: list[str] | None = None
    names = [f"{m}_{k}" for m in ("ct", "gmv", "sa") for k in range(N_REGIONS)]
    if all(n in lower for n in names):
        desc_cols = [lower[n] for n in names]
    subjects = []
    for i, row in enumerate(table.to_dict("records")):
        try:
            age = float(row[lower["age"]])
        except (TypeError, ValueError):
            age = math.nan
        if not math.isfinite(age):
            raise ConfigError(f"{path}: row {i + 2} has age {row[lower['age']]!r}; every row needs a numeric age")
        image = _resolve(base, row[lower["path"]])
        desc = None
        if desc_cols is not None:
            desc = np.array([row[c] for c in desc_cols], dtype=np.float32).reshape(3, N_REGIONS).T
            desc = roi_to_descriptors(desc, source=f"{path} row {i + 2}")
        elif "descriptors" in lower and isinstance(row[lower["descriptors"]], str) and row[lower["descriptors"]]:
            dpath = _resolve(base, row[lower["descriptors"]])
            desc = roi_to_descriptors(np.load(dpath), source=dpath)
        site = row.get(lower["site"]) if "site" in lower else None
        split = row.get(lower["split"]) if "split" in lower else "train"
        subject = row.get(lower["subject"]) if "subject" in lower else Path(image).name
        subjects.append(
            Subject(
                subject=_clean_id(subject),
                path=image,
                age=age,
                site=None if site is None or (isinstance(site, float) and math.isnan(site)) else str(site),
                split="train" if not isinstance(split, str) else split.strip().lower(),
                descriptors=desc,
            )
        )
    logger.info("read %d subjects from %s", len(subjects), path)
    return subjects


_SUBJECT_FILE = re.compile(r"^sub-([^_]+)_(.+)\.npy$")


def read_openbhb(root: str | os.PathLike[str], *, require_descriptors: bool = False) -> list[Subject]:
    """Read an OpenBHB-style folder: ``participants.tsv`` + per-subject ``.npy`` files.

    Args:
        root: folder holding ``participants.tsv`` (searched recursively if not at the
            top) and the subjects' ``*_preproc-cat12vbm_desc-gm_T1w.npy`` and
            ``*desikan*roi*.npy`` files, anywhere below it.
        require_descriptors: raise when a subject has no Desikan ROI file (otherwise
            it gets ``descriptors=None``).

    Returns:
        Subjects that have a grey-matter map, in ``participants.tsv`` order.

    Raises:
        ConfigError: no ``participants.tsv``, missing columns, or no subject found.

    Example:
        >>> subjects = read_openbhb("openBHB")  # doctest: +SKIP
        >>> subjects[0].path
        'openBHB/train/sub-1000011_preproc-cat12vbm_desc-gm_T1w.npy'
    """
    root = Path(root)
    tsv = root / "participants.tsv"
    if not tsv.is_file():
        found = sorted(root.rglob("participants.tsv"))
        if not found:
            raise ConfigError(f"no participants.tsv under {root}; point --openbhb at the OpenBHB folder")
        tsv = found[0]
    images: dict[str, str] = {}
    rois: dict[str, str] = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            m = _SUBJECT_FILE.match(name)
            if not m:
                continue
            sid, rest = m.group(1), m.group(2).lower()
            if "cat12vbm" in rest and "desc-gm" in rest:
                images[sid] = os.path.join(dirpath, name)
            elif "desikan" in rest and "roi" in rest:
                rois[sid] = os.path.join(dirpath, name)
    table = _read_table(tsv)
    for col in ("participant_id", "age"):
        if col not in table.columns:
            raise ConfigError(f"{tsv} needs a {col!r} column; it has {list(table.columns)}")
    subjects = []
    skipped = 0
    for row in table.to_dict("records"):
        sid = _clean_id(row["participant_id"])
        if sid not in images:
            skipped += 1
            continue
        desc = None
        if sid in rois:
            desc = roi_to_descriptors(np.load(rois[sid]), source=rois[sid])
        elif require_descriptors:
            raise ConfigError(f"subject {sid} has no Desikan ROI file under {root}; add it or train with --descriptor none")
        split = row.get("split", "train")
        site = row.get("site")
        subjects.append(
            Subject(
                subject=sid,
                path=images[sid],
                age=float(row["age"]),
                site=None if site is None or (isinstance(site, float) and math.isnan(site)) else str(site),
                split=str(split).strip().lower() if isinstance(split, str) else "train",
                descriptors=desc,
            )
        )
    if skipped:
        logger.warning("%d participants in %s have no *_preproc-cat12vbm_desc-gm_T1w.npy file; skipped", skipped, tsv)
    if not subjects:
        raise ConfigError(f"no subject of {tsv} has a grey-matter .npy under {root}")
    logger.info("read %d OpenBHB subjects from %s (%d with Desikan descriptors)", len(subjects), root, len(rois))
    return subjects


def split_subjects(subjects: Sequence[Subject], val_splits: Sequence[str] = VAL_SPLITS) -> tuple[list[Subject], list[Subject]]:
    """Split into (train, validation) by the ``split`` field; other splits are held out.

    Example:
        >>> s = [Subject("1", "a.npy", 20.0), Subject("2", "b.npy", 30.0, split="val")]
        >>> [len(part) for part in split_subjects(s)]
        [1, 1]
    """
    train = [s for s in subjects if s.split in _TRAIN_SPLITS]
    val = [s for s in subjects if s.split in set(val_splits)]
    held = len(subjects) - len(train) - len(val)
    if held:
        logger.info("holding out %d subjects whose split is neither train nor one of %s", held, list(val_splits))
    return train, val


def fit_descriptor_range(descriptors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min and max per (region, measure) over subjects: the [0, 1] normalisation.

    Args:
        descriptors: (N, 68, 3) raw descriptors of the training subjects.

    Returns:
        ``(low, high)``, each (68, 3).

    Example:
        >>> lo, hi = fit_descriptor_range(np.random.rand(10, 68, 3))
        >>> lo.shape
        (68, 3)
    """
    arr = np.asarray(descriptors, dtype=np.float64)
    if arr.ndim != 3 or len(arr) < 2:
        raise ConfigError(f"need (N >= 2, regions, measures) descriptors to fit a range, got shape {arr.shape}")
    return arr.min(axis=0).astype(np.float32), arr.max(axis=0).astype(np.float32)


def normalize_descriptors(descriptors: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] with a fitted range; clipped; constant measures map to 0.5.

    Example:
        >>> normalize_descriptors(np.array([[2.0, 5.0]]), np.array([[0.0, 5.0]]), np.array([[4.0, 5.0]]))
        array([[0.5, 0.5]], dtype=float32)
    """
    x = np.asarray(descriptors, dtype=np.float32)
    span = np.asarray(high, dtype=np.float32) - np.asarray(low, dtype=np.float32)
    safe = np.where(span > 0, span, 1.0)
    out = np.where(span > 0, (x - low) / safe, 0.5)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


class VolumeDataset(Dataset):
    """Subjects as model-ready tensors, through the inference preprocessing.

    Each item is a dict: ``image`` (1, *config.model_input_shape) float32, ``age``
    (float32 scalar), ``descriptors`` (68, 3) in [0, 1] (zeros when the subject has
    none), ``has_descriptors`` (bool), ``site`` (int64 index into ``sites``, -1 when
    unknown) and ``index``.

    Args:
        subjects: the scans.
        config: preprocessing spec (the one saved with the exported model).
        descriptor_range: ``(low, high)`` from :func:`fit_descriptor_range`; when
            ``None`` it is fitted on ``subjects`` if they all have descriptors.
        sites: site labels defining the ``site`` index (default: sorted unique sites).

    Example:
        >>> ds = VolumeDataset(read_manifest("train.csv"), PreprocessConfig())  # doctest: +SKIP
        >>> ds[0]["image"].shape
        torch.Size([1, 121, 128, 121])
    """

    def __init__(
        self,
        subjects: Sequence[Subject],
        config: PreprocessConfig,
        *,
        descriptor_range: tuple[np.ndarray, np.ndarray] | None = None,
        sites: Sequence[str] | None = None,
    ) -> None:
        if not subjects:
            raise ConfigError("no subjects to train on; check the manifest's split column or the data folder")
        self.subjects = list(subjects)
        self.config = config
        self.has_all_descriptors = all(s.descriptors is not None for s in self.subjects)
        if descriptor_range is None and self.has_all_descriptors and len(self.subjects) >= 2:
            descriptor_range = fit_descriptor_range(np.stack([s.descriptors for s in self.subjects]))  # type: ignore[misc]
        self.descriptor_range = descriptor_range
        self.sites = sorted({s.site for s in self.subjects if s.site is not None}) if sites is None else list(sites)
        index = {name: i for i, name in enumerate(self.sites)}
        #: (N,) site index of each subject into :attr:`sites` (-1 when unknown).
        self.site_indices = np.array([index.get(s.site, -1) if s.site is not None else -1 for s in self.subjects], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.subjects)

    @property
    def ages(self) -> np.ndarray:
        """(N,) ages in subject order."""
        return np.array([s.age for s in self.subjects], dtype=np.float32)

    def with_subjects(self, subjects: Sequence[Subject]) -> VolumeDataset:
        """A dataset of other subjects sharing this one's config, descriptor range and site list."""
        return VolumeDataset(subjects, self.config, descriptor_range=self.descriptor_range, sites=self.sites)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from ..inputs.preprocess import prepare

        subject = self.subjects[index]
        # a path (NIfTI or .npy on the grid): prepare() reads it and names it in any InputError
        prepared = prepare(subject.path, self.config, assume_reference_grid=True, emit_warnings=False)
        image = torch.from_numpy(np.ascontiguousarray(prepared.array, dtype=np.float32))
        if subject.descriptors is not None and self.descriptor_range is not None:
            desc = torch.from_numpy(normalize_descriptors(subject.descriptors, *self.descriptor_range))
            has = True
        else:
            desc = torch.zeros(N_REGIONS, 3)
            has = False
        return {
            "image": image,
            "age": torch.tensor(subject.age, dtype=torch.float32),
            "descriptors": desc,
            "has_descriptors": torch.tensor(has),
            "site": torch.tensor(int(self.site_indices[index])),
            "index": torch.tensor(index),
        }
