"""The BIDS App: ``anatcl bids BIDS_DIR OUTPUT_DIR participant|group``.

``participant`` embeds the grey-matter maps (CAT12 / deepmriprep derivatives) of the chosen
subjects and writes a BIDS *derivatives* dataset that bids-validator accepts::

    OUTPUT_DIR/
      dataset_description.json                      DatasetType "derivative", GeneratedBy (package, models + SHA-256)
      README.md                                     what the files are, how to read them
      .bidsignore                                   the feature files, which BIDS has no name for yet
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
its SHA-256), as BIDS derivatives do. The specification has no suffix for such tables, so
``.bidsignore`` lists them (as BIDS asks for files it does not cover); pybids still indexes them.

Participant runs are independent: each writes only its own subject's folder, and the dataset's
top-level files are written atomically with the same content by every run, so a SLURM array over
subjects needs no coordination. Embedding is done by :func:`anatcl_infer.jobs.embed.run_embed`
(crash-safe parts in ``sub-XX/log/``, ``--resume`` continues an interrupted run).

Modules, each importing only those above it in this list:

- ``names``: labels, entities, output paths.
- ``scans``: the dataset root check and :func:`find_scans`.
- ``dataset``: ``dataset_description.json``, ``README.md``, ``.bidsignore``, the OUTPUT_DIR check.
- ``participant``: :func:`plan_participant` (every check that needs no weights) and :func:`run_participant`.
- ``group``: :func:`run_group`.
"""

from __future__ import annotations

from .dataset import check_output_dir, model_entries, write_bidsignore, write_dataset_description, write_readme
from .group import run_group
from .names import BIDS_VERSION, CODE_URL, EXTENSION, PIPELINE_NAME, SUFFIX, model_desc, normalise_labels, output_paths
from .participant import BidsSummary, plan_participant, run_participant
from .scans import check_bids_root, find_scans

__all__ = [
    "BIDS_VERSION",
    "BidsSummary",
    "normalise_labels",
    "find_scans",
    "check_bids_root",
    "check_output_dir",
    "model_desc",
    "model_entries",
    "output_paths",
    "write_dataset_description",
    "write_bidsignore",
    "write_readme",
    "plan_participant",
    "run_participant",
    "run_group",
]
