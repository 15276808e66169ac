"""A BIDS dataset -> a features Parquet file -> a pandas DataFrame joined with participants.tsv.

With your data (a BIDS root whose ``derivatives/`` hold CAT12 or deepmriprep mwp1 maps)::

    python examples/bids_to_pandas.py --bids /data/my_study --model anatcl-global --out feats.parquet

The same as ``anatcl embed /data/my_study --out feats.parquet``. With no arguments it
builds a small synthetic BIDS dataset (MNI152-derived maps on a coarse 4 mm grid,
an untrained demonstration model) and runs offline in a few seconds.

What you get: one row per map with ``path``, ``subject``, ``session``, ``run``,
``model``, ``fold``, ``feat_000`` ... ``feat_511``; the file's metadata records the
model (name, source, SHA-256), the preprocessing and the package version.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

logger = logging.getLogger("bids_to_pandas")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; returns the joined DataFrame and the file's metadata."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bids", help="BIDS root (default: a synthetic one)")
    parser.add_argument("--model", help="model name or directory (default: an untrained demo model)")
    parser.add_argument("--fold", default=0, type=int, help="fold of a registry model")
    parser.add_argument("--out", default=None, help="features Parquet file (default: in a temporary folder)")
    parser.add_argument("--n", type=int, default=6, help="synthetic subjects (without --bids)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")

    from anatcl_infer import load_model
    from anatcl_infer.inputs.discovery import discover_inputs
    from anatcl_infer.jobs.embed import run_embed
    from anatcl_infer.downstream.features import (
        feature_columns,
        feature_matrix,
        read_features,
        read_labels,
    )

    work = Path(tempfile.mkdtemp(prefix="anatcl-bids-"))
    if args.bids is None:
        from _synthetic import make_cohort, make_demo_model

        bids = work / "bids"
        make_cohort(bids, args.n, seed=0, bids=True)
        model_src = args.model or str(make_demo_model(work / "demo-model"))
    else:
        if not args.model:
            parser.error("--bids needs --model")
        bids, model_src = Path(args.bids), args.model
    out = Path(args.out) if args.out else work / "features.parquet"

    # 1. BIDS -> Parquet (what `anatcl embed BIDS_ROOT --out features.parquet` does)
    model = load_model(model_src, fold=args.fold, device="cpu" if args.bids is None else None)
    records = discover_inputs([str(bids)], input_kind=model.config.preprocess.input_kind)
    summary = run_embed(records, [model], out, overwrite=True, progress=False)
    print(f"embedded {summary.n_written} of {summary.n_inputs} maps into {out}")

    # 2. Parquet -> pandas, with provenance, joined with participants.tsv on subject
    df, meta = read_features(out)
    participants = read_labels(bids / "participants.tsv")  # participant_id "sub-001" -> subject "001"
    joined = df.merge(participants, on="subject", how="left", validate="many_to_one")
    X = feature_matrix(joined)
    sha = meta["model"].get("source_sha256") or "not recorded"
    print(f"model {meta['model']['name']} (source sha256: {sha}), "
          f"features {X.shape}, {len(feature_columns(joined))} feature columns")
    print(joined[["subject", "age", "sex"]].head().to_string(index=False))
    return {"df": joined, "meta": meta, "out": out, "X": X}


if __name__ == "__main__":
    main()
