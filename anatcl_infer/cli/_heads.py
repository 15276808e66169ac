"""`anatcl fit-head` and `anatcl predict`: linear heads on features tables."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from .app import app, fail, setup_logging

if TYPE_CHECKING:
    import pandas as pd

_FIT_EPILOG = (
    "Examples:\n\n"
    "  anatcl fit-head feats.parquet participants.tsv --target age --units years --out age-head/\n\n"
    "  anatcl fit-head feats.parquet labels.csv --target diagnosis --out dx-head/\n\n"
    "  anatcl fit-head feats.parquet participants.tsv -t age --out age-head/ --oof-out oof.parquet\n\n"
    "Labels are joined on `path` when both files have it, else on `subject` (BIDS participant_id works), "
    "and on (`subject`, `session`) when both files have sessions. "
    "A features file embedded with --fold all gives one head per fold. --oof-out writes the training "
    "subjects' out-of-fold (bias-corrected, for brain age) predictions: use those, not `anatcl predict` "
    "on the same subjects, for their brain-age gaps."
)

_PREDICT_EPILOG = (
    "Examples:\n\n"
    "  anatcl predict feats.parquet --head age-head/ --labels participants.tsv --out brain_age.parquet\n\n"
    "For brain-age heads the gap columns (brain_age_gap, brain_age_gap_corrected) appear whenever the "
    "chronological age is known, from --labels or an `age` column. Regression heads add a split-conformal "
    "interval <target>_pred_lo/_hi at --coverage (and <target>_pred_fold_sd, the spread across folds)."
)


_PROVENANCE = ("target", "kind", "units", "model", "package_version")


def _write_table(df: pd.DataFrame, out: Path, provenance: dict) -> None:
    """Write a predictions table atomically: CSV for a .csv/.tsv suffix, else Parquet with ``provenance``."""
    from .._files import atomic_path
    from ..downstream.features import write_parquet_atomic

    if out.suffix in (".csv", ".tsv"):
        with atomic_path(out) as tmp:
            df.to_csv(tmp, index=False, sep="\t" if out.suffix == ".tsv" else ",")
    else:
        write_parquet_atomic(df, out, provenance)


@app.command("fit-head", epilog=_FIT_EPILOG)
def fit_head_cmd(
    features: Path = typer.Argument(..., help="Features table from `anatcl embed` (.parquet or .csv), or its folder of parts (--shard).", show_default=False),
    labels: Path = typer.Argument(..., help="Labels table (.csv, .tsv, .parquet) with `path` or `subject` and the target.", show_default=False),
    target: str = typer.Option(..., "--target", "-t", help="Label column to predict."),
    out: Path = typer.Option(..., "--out", "-o", help="Head directory to write (head.json + head.safetensors)."),
    kind: str = typer.Option("auto", "--kind", help="auto, regression (Ridge) or classification (logistic)."),
    units: Optional[str] = typer.Option(None, "--units", help="Units of the target, recorded in the head (e.g. years)."),
    brain_age: Optional[bool] = typer.Option(None, "--brain-age/--no-brain-age", help="Add brain-age gap columns at prediction (default: when the target is `age`)."),
    cv: int = typer.Option(5, "--cv", min=2, help="Cross-validation folds."),
    seed: int = typer.Option(0, "--seed", help="Seed of the CV splits."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing head directory."),
    oof_out: Optional[Path] = typer.Option(None, "--oof-out", help="Also write the training inputs' out-of-fold predictions (.parquet or .csv; bias-corrected gaps for brain age)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Fit a linear head (Ridge or logistic regression, CV-tuned) on frozen features and save it."""
    setup_logging(quiet=quiet, verbose=verbose)
    from ..errors import AnatCLError
    from ..downstream.features import read_features, read_labels
    from ..downstream.heads import HEAD_CONFIG_NAME, fit_head

    if (out / HEAD_CONFIG_NAME).exists() and not overwrite:
        raise fail(f"{out} already holds a head; pass --overwrite to replace it")
    try:
        df, meta = read_features(features)
        lab = read_labels(labels)
        head = fit_head(df, lab, target, metadata=meta, kind=kind, units=units, brain_age=brain_age, cv=cv, seed=seed)
        head.save(out)
        if oof_out is not None and head.oof_ is not None:
            _write_table(head.oof_, oof_out, {"head_dir": str(out), "out_of_fold": True, "features": str(features),
                                              "head": {k: head.config.get(k) for k in _PROVENANCE}})
    except AnatCLError as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"cannot write {exc.filename or out}: {exc.strerror or exc}") from None
    cfg = head.config
    typer.echo(f"{cfg['kind']} head for {target!r}: n={cfg['n_train']} inputs, folds {[f['fold'] for f in cfg['folds']]}")
    for entry in cfg["folds"]:
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in entry["cv_metrics"].items())
        typer.echo(f"  fold {entry['fold']}: {cv}-fold CV {metrics}")
    if "ensemble" in cfg:
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in cfg["ensemble"]["cv_metrics"].items())
        typer.echo(f"  fold ensemble: {metrics}")
    typer.echo(f"saved to {out}")
    if oof_out is not None:
        typer.echo(f"out-of-fold predictions of the {len(head.oof_)} training inputs written to {oof_out}")


@app.command("predict", epilog=_PREDICT_EPILOG)
def predict_cmd(
    features: Path = typer.Argument(..., help="Features table from `anatcl embed`, or its folder of parts (--shard).", show_default=False),
    head: Path = typer.Option(..., "--head", help="Head directory from `anatcl fit-head`."),
    out: Path = typer.Option(..., "--out", "-o", help="Predictions table (.parquet or .csv), written atomically."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Labels with chronological age (for brain-age gaps)."),
    coverage: float = typer.Option(0.9, "--coverage", min=0.5, max=0.999, help="Coverage of the prediction interval (<target>_pred_lo/_hi), e.g. 0.9 or 0.95."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Apply a head to features: one row per input with `<target>_pred` (and brain-age gaps)."""
    setup_logging(quiet=quiet, verbose=verbose)
    from ..errors import AnatCLError
    from ..downstream.features import read_features, read_labels
    from ..downstream.heads import Head

    try:
        h = Head.load(head)
        df, meta = read_features(features)
        lab = read_labels(labels) if labels is not None else None
        pred = h.predict(df, lab, metadata=meta, coverage=coverage)
        provenance = {"head": {k: h.config.get(k) for k in _PROVENANCE}, "head_dir": str(head), "features": str(features),
                      "features_metadata": meta, "coverage": coverage if h.kind == "regression" else None}
        _write_table(pred, out, provenance)
    except AnatCLError as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"cannot write {exc.filename or out}: {exc.strerror or exc}") from None
    typer.echo(f"wrote {len(pred)} predictions ({h.pred_column}) to {out}")
