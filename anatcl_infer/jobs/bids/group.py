"""The group level: gather the per-scan features files into one table per model."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError, InputError
from ..embed import _read_table, _sort_table, _write_table
from .dataset import _read_json
from .names import EXTENSION, SUFFIX, _desc_of

if TYPE_CHECKING:
    import pyarrow as pa

logger = logging.getLogger(__package__)


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
