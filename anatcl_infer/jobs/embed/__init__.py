"""The ``anatcl embed`` job: inputs -> features table, written as batches complete.

Nothing is lost: each finished batch is written at once as a small Parquet part in
``<out>.partial/`` (temporary name, then rename); the final file is assembled from
the parts and appears atomically; ``resume=True`` skips the inputs already done (and
re-embeds those whose file changed, drops rows of inputs no longer there); a bad input
is recorded (path, stage, message) and never stops the others.

Files and folders get the process umask's modes (a lab's shared folder stays readable);
a lock beside the output stops two runs from interleaving; SIGTERM/SIGINT end with the
finished batches kept and a hint to ``--resume``; a full or read-only disk is an
:class:`~anatcl_infer.errors.OutputError` with a one-line message.

A folder output (``--out feats/``, or any ``--shard``) is a Parquet dataset: the folder
holds only ``part-IIIII-of-NNNNN.parquet`` files, which every Parquet reader (pyarrow,
pandas, polars, DuckDB, Spark) reads as one table; the errors files and unfinished work
live beside it, in ``feats.errors/`` and ``feats.partial/``.

Modules, each importing only those above it in this list:

- ``table``: the table's columns and types, building rows from a batch, sorting, head columns.
- ``outputs``: what ``--out`` means (:func:`output_layout`), atomic writes, the parts of an
  unfinished run, the final table and errors file, one-line write errors.
- ``lock``: the lock file beside an output.
- ``signals``: SIGTERM/SIGINT and :class:`Interrupted`.
- ``progress``: progress lines in logs off a terminal.
- ``models``: the fold stack, :func:`weights_sha256`, the provenance metadata, ``check_head``.
- ``resume``: input fingerprints and what ``--resume`` keeps or re-embeds.
- ``run``: :func:`run_embed`, the run itself.
"""

from __future__ import annotations

from ...downstream.features import METADATA_KEY

from .models import check_head, weights_sha256, weights_unchanged
from .outputs import OutputLayout, _Parts, _output_error, _read_table, _write_table, check_output_free, errors_path_for, output_layout
from .resume import _file_sha256
from .run import EmbedSummary, distributed_shard, run_embed, shard_records
from .signals import Interrupted
from .table import _sort_table

#: Seconds between progress lines in logs when stderr is not a terminal (no progress bar there);
#: the environment variable ``ANATCL_PROGRESS_INTERVAL`` overrides it. Defined here, on the
#: package, and read from here by :mod:`.progress` when a run starts (so setting it here works).
PROGRESS_EVERY_S = 30.0

__all__ = [
    "EmbedSummary",
    "Interrupted",
    "OutputLayout",
    "output_layout",
    "check_output_free",
    "run_embed",
    "shard_records",
    "distributed_shard",
    "weights_sha256",
    "METADATA_KEY",
]
