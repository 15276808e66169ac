"""Which scans of a BIDS dataset a participant run embeds: :func:`find_scans`."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import ConfigError, InputError
from .names import _listing

if TYPE_CHECKING:
    from ...inputs.discovery import InputRecord

logger = logging.getLogger(__package__)


def check_bids_root(bids_dir: str | os.PathLike[str], derivatives: str | os.PathLike[str] | None = None) -> Path:
    """The dataset root, checked: a folder with ``dataset_description.json`` (and ``derivatives`` a folder).

    Raises:
        ConfigError: not a folder, not a BIDS dataset, or ``derivatives`` is not a folder.
    """
    root = Path(bids_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"BIDS_DIR {root} is not a directory; give the root of a BIDS dataset")
    if not (root / "dataset_description.json").is_file():
        raise ConfigError(
            f"{root} has no dataset_description.json, so it is not the root of a BIDS dataset; give the dataset root "
            "(for a plain folder of maps use `anatcl embed FOLDER --out feats.parquet`)"
        )
    if derivatives is not None and not Path(derivatives).expanduser().is_dir():
        raise ConfigError(f"--derivatives {Path(derivatives).expanduser()} is not a directory; give the CAT12/deepmriprep output folder")
    return root


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
    from ...inputs.discovery import discover_inputs

    root = check_bids_root(bids_dir, derivatives)
    source = Path(derivatives).expanduser() if derivatives is not None else root
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
