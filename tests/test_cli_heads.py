"""`anatcl fit-head` and `anatcl predict` end to end on Parquet files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from anatcl_infer.cli import app
from anatcl_infer.downstream.features import METADATA_KEY, feature_names, read_features

N, D = 60, 32


def _write_features(path, *, folds=(0, 1), model="anatcl-global", shas=("a" * 64, "b" * 64), seed=0):
    rng = np.random.default_rng(seed)
    age = np.round(rng.uniform(20, 80, N), 1)
    frames = []
    for k, fold in enumerate(folds):
        X = rng.normal(size=(N, D))
        X[:, k] += (age - 50) / 5
        df = pd.DataFrame(X.astype(np.float32), columns=feature_names(D))
        df.insert(0, "path", [f"/data/sub-{i:02d}_mwp1.nii.gz" for i in range(N)])
        df.insert(1, "subject", [f"{i:02d}" for i in range(N)])
        df.insert(2, "session", pd.array([None] * N, dtype="string"))
        df.insert(3, "run", pd.array([None] * N, dtype="string"))
        df.insert(4, "model", model)
        df.insert(5, "fold", pd.array([fold] * N, dtype="Int64"))
        df["qc_corr"] = 0.9
        frames.append(df)
    table = pa.Table.from_pandas(pd.concat(frames, ignore_index=True), preserve_index=False)
    meta = {"package_version": "0", "model": {"name": model, "source": "https://example.org/w.pth",
            "source_sha256": list(shas[: len(folds)]) if len(folds) > 1 else shas[0],
            "architecture": "resnet18", "variant": "global", "folds": list(folds)}, "preprocess": {}}
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta)}), path)
    return age


def _labels(path, age, **extra):
    df = pd.DataFrame({"participant_id": [f"sub-{i:02d}" for i in range(N)], "age": age, **extra})
    df.to_csv(path, sep="\t", index=False)


@pytest.fixture()
def runner():
    return CliRunner()


def test_fit_head_then_predict_brain_age(tmp_path, runner):
    age = _write_features(tmp_path / "feats.parquet")
    _labels(tmp_path / "participants.tsv", age)
    res = runner.invoke(app, ["fit-head", str(tmp_path / "feats.parquet"), str(tmp_path / "participants.tsv"),
                              "--target", "age", "--units", "years", "--out", str(tmp_path / "head")])
    assert res.exit_code == 0, res.output
    assert "fold 0" in res.output and "fold ensemble" in res.output
    cfg = json.loads((tmp_path / "head" / "head.json").read_text())
    assert cfg["brain_age"] and cfg["units"] == "years" and [f["fold"] for f in cfg["folds"]] == [0, 1]
    assert cfg["folds"][1]["model_sha256"] == "b" * 64

    res = runner.invoke(app, ["predict", str(tmp_path / "feats.parquet"), "--head", str(tmp_path / "head"),
                              "--labels", str(tmp_path / "participants.tsv"), "--out", str(tmp_path / "pred.parquet")])
    assert res.exit_code == 0, res.output
    pred, meta = read_features_or_table(tmp_path / "pred.parquet")
    assert len(pred) == N
    assert {"path", "subject", "age_pred_fold0", "age_pred_fold1", "age_pred", "brain_age_gap",
            "brain_age_gap_corrected"} <= set(pred.columns)
    np.testing.assert_allclose(pred["age_pred"], (pred["age_pred_fold0"] + pred["age_pred_fold1"]) / 2)
    np.testing.assert_allclose(pred["brain_age_gap"], pred["age_pred"] - age, atol=1e-9)
    assert meta["head"]["target"] == "age"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left

    # without labels (and no age column) there is no gap
    res = runner.invoke(app, ["predict", str(tmp_path / "feats.parquet"), "--head", str(tmp_path / "head"),
                              "--out", str(tmp_path / "pred2.csv")])
    assert res.exit_code == 0, res.output
    assert "brain_age_gap" not in pd.read_csv(tmp_path / "pred2.csv").columns


def read_features_or_table(path):
    table = pq.read_table(path)
    return table.to_pandas(), json.loads(table.schema.metadata[METADATA_KEY])


def test_predict_refuses_features_of_another_model(tmp_path, runner):
    age = _write_features(tmp_path / "feats.parquet")
    _labels(tmp_path / "labels.tsv", age)
    assert runner.invoke(app, ["fit-head", str(tmp_path / "feats.parquet"), str(tmp_path / "labels.tsv"),
                               "-t", "age", "-o", str(tmp_path / "head")]).exit_code == 0
    _write_features(tmp_path / "local.parquet", model="anatcl-local", shas=("c" * 64, "d" * 64))
    res = runner.invoke(app, ["predict", str(tmp_path / "local.parquet"), "--head", str(tmp_path / "head"),
                              "--out", str(tmp_path / "p.parquet")])
    assert res.exit_code == 1
    assert "anatcl-local" in res.output and "anatcl-global" in res.output
    _write_features(tmp_path / "fold3.parquet", folds=(3,))
    res = runner.invoke(app, ["predict", str(tmp_path / "fold3.parquet"), "--head", str(tmp_path / "head"),
                              "--out", str(tmp_path / "p.parquet")])
    assert res.exit_code == 1 and "fold 3" in res.output
    assert not (tmp_path / "p.parquet").exists()


def test_fit_head_classification_and_errors(tmp_path, runner):
    age = _write_features(tmp_path / "feats.parquet", folds=(0,))
    dx = np.where(age > 50, "old", "young")
    _labels(tmp_path / "labels.tsv", age, dx=dx)
    res = runner.invoke(app, ["fit-head", str(tmp_path / "feats.parquet"), str(tmp_path / "labels.tsv"),
                              "-t", "dx", "-o", str(tmp_path / "dx")])
    assert res.exit_code == 0, res.output
    assert "balanced_accuracy" in res.output
    res = runner.invoke(app, ["predict", str(tmp_path / "feats.parquet"), "--head", str(tmp_path / "dx"),
                              "--out", str(tmp_path / "dx.parquet")])
    pred = pd.read_parquet(tmp_path / "dx.parquet")
    assert (pred["dx_pred"] == dx).mean() > 0.8
    assert {"dx_proba_old", "dx_proba_young"} <= set(pred.columns)

    # an existing head is not overwritten silently
    res = runner.invoke(app, ["fit-head", str(tmp_path / "feats.parquet"), str(tmp_path / "labels.tsv"),
                              "-t", "dx", "-o", str(tmp_path / "dx")])
    assert res.exit_code == 1 and "--overwrite" in res.output
    # missing target, no join key
    res = runner.invoke(app, ["fit-head", str(tmp_path / "feats.parquet"), str(tmp_path / "labels.tsv"),
                              "-t", "mmse", "-o", str(tmp_path / "x")])
    assert res.exit_code == 1 and "'mmse' is not in the labels" in res.output
    pd.DataFrame({"id": range(N), "age": age}).to_csv(tmp_path / "nokey.csv", index=False)
    res = runner.invoke(app, ["fit-head", str(tmp_path / "feats.parquet"), str(tmp_path / "nokey.csv"),
                              "-t", "age", "-o", str(tmp_path / "x")])
    assert res.exit_code == 1 and "no join key" in res.output
    assert "Traceback" not in res.output


def test_read_features_returns_metadata(tmp_path):
    _write_features(tmp_path / "feats.parquet", folds=(0,))
    df, meta = read_features(tmp_path / "feats.parquet")
    assert meta["model"]["name"] == "anatcl-global" and len(df) == N


def test_embed_with_head_adds_the_prediction_columns(tmp_path, runner):
    """`anatcl embed --head` gives the same columns as `anatcl predict` on the embedded features."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "_anatcl_examples_synthetic_cli", Path(__file__).resolve().parents[1] / "examples" / "_synthetic.py")
    syn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(syn)
    model_dir = syn.make_demo_model(tmp_path / "model")
    syn.make_cohort(tmp_path / "maps", 2, seed=3)
    # a head fitted on synthetic 512-d features labelled as coming from the demo model
    rng = np.random.default_rng(0)
    age = rng.uniform(20, 80, 40)
    feats = pd.DataFrame(rng.normal(size=(40, 512)).astype(np.float32), columns=feature_names(512))
    feats.insert(0, "subject", [f"{i}" for i in range(40)])
    feats.insert(1, "model", "demo-untrained")
    from anatcl_infer.downstream.heads import fit_head

    fit_head(feats, pd.DataFrame({"subject": feats["subject"], "age": age}), "age").save(tmp_path / "head")

    res = runner.invoke(app, ["embed", str(tmp_path / "maps"), "--model", str(model_dir), "--device", "cpu",
                              "--out", str(tmp_path / "f.parquet"), "--head", str(tmp_path / "head"), "-q"])
    assert res.exit_code == 0, res.output
    embedded = pd.read_parquet(tmp_path / "f.parquet")
    assert {"age_pred", "age_pred_corrected"} <= set(embedded.columns)
    res = runner.invoke(app, ["predict", str(tmp_path / "f.parquet"), "--head", str(tmp_path / "head"),
                              "--out", str(tmp_path / "p.parquet")])
    assert res.exit_code == 0, res.output
    pred = pd.read_parquet(tmp_path / "p.parquet")
    np.testing.assert_allclose(embedded["age_pred"], pred["age_pred"], rtol=1e-6)


def test_brain_age_cli_out_of_fold_gaps_and_intervals(tmp_path, runner):
    """fit-head --oof-out gives honest training-set gaps; predict on the same subjects warns; --coverage works."""
    rng = np.random.default_rng(11)
    n, w = 300, rng.normal(size=D)
    age = rng.uniform(20, 85, n)
    X = np.outer(age - 50, w) / 20 + rng.normal(size=(n, D)) * 2
    df = pd.DataFrame(X.astype(np.float32), columns=feature_names(D))
    df.insert(0, "path", [f"/data/sub-{i:03d}_mwp1.nii.gz" for i in range(n)])
    df.insert(1, "subject", [f"{i:03d}" for i in range(n)])
    df.insert(2, "model", "anatcl-global")
    df.insert(3, "fold", pd.array([0] * n, dtype="Int64"))
    meta = {"model": {"name": "anatcl-global", "source_sha256": "a" * 64, "folds": [0]}, "preprocess": {}}
    table = pa.Table.from_pandas(df, preserve_index=False)
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta)}), tmp_path / "feats.parquet")
    pd.DataFrame({"participant_id": [f"sub-{i:03d}" for i in range(n)], "age": age}).to_csv(
        tmp_path / "participants.tsv", sep="\t", index=False)

    res = runner.invoke(app, ["fit-head", str(tmp_path / "feats.parquet"), str(tmp_path / "participants.tsv"),
                              "-t", "age", "-o", str(tmp_path / "head"), "--oof-out", str(tmp_path / "oof.parquet")])
    assert res.exit_code == 0, res.output
    assert "out-of-fold predictions of the 300 training inputs" in res.output
    oof = pd.read_parquet(tmp_path / "oof.parquet")
    assert len(oof) == n and {"age", "age_pred", "age_pred_corrected", "brain_age_gap_corrected"} <= set(oof.columns)
    assert abs(np.corrcoef(oof["brain_age_gap_corrected"], oof["age"])[0, 1]) < 0.1
    assert np.corrcoef(oof["brain_age_gap"], oof["age"])[0, 1] < -0.2  # the raw gap carries the age bias

    res = runner.invoke(app, ["predict", str(tmp_path / "feats.parquet"), "--head", str(tmp_path / "head"),
                              "--out", str(tmp_path / "p80.csv"), "--coverage", "0.8"])
    assert res.exit_code == 0, res.output
    assert "300 of 300 subjects here are ones this head was fitted on" in res.output
    p80 = pd.read_csv(tmp_path / "p80.csv")
    assert runner.invoke(app, ["predict", str(tmp_path / "feats.parquet"), "--head", str(tmp_path / "head"),
                               "--out", str(tmp_path / "p95.parquet"), "--coverage", "0.95", "-q"]).exit_code == 0
    p95 = pd.read_parquet(tmp_path / "p95.parquet")
    assert ((p95["age_pred_hi"] - p95["age_pred_lo"]) > (p80["age_pred_hi"] - p80["age_pred_lo"])).all()
    res = runner.invoke(app, ["predict", str(tmp_path / "feats.parquet"), "--head", str(tmp_path / "head"),
                              "--out", str(tmp_path / "x.csv"), "--coverage", "1.2"])
    assert res.exit_code == 2


def test_embed_with_a_mismatched_head_fails_before_embedding(tmp_path, runner, monkeypatch):
    import importlib.util
    from pathlib import Path

    import anatcl_infer.encoding.encoder as encoder

    spec = importlib.util.spec_from_file_location(
        "_anatcl_examples_synthetic_cli2", Path(__file__).resolve().parents[1] / "examples" / "_synthetic.py")
    syn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(syn)
    model_dir = syn.make_demo_model(tmp_path / "model")
    syn.make_cohort(tmp_path / "maps", 2, seed=3)
    rng = np.random.default_rng(0)
    feats = pd.DataFrame(rng.normal(size=(40, 512)).astype(np.float32), columns=feature_names(512))
    feats.insert(0, "subject", [f"{i}" for i in range(40)])
    from anatcl_infer.downstream.heads import fit_head

    meta = {"model": {"name": "anatcl-local", "source_sha256": "c" * 64, "folds": [None]}}
    fit_head(feats, pd.DataFrame({"subject": feats["subject"], "age": rng.uniform(20, 80, 40)}), "age",
             metadata=meta).save(tmp_path / "head")

    def never(*args, **kwargs):
        raise AssertionError("embedding started before the head was checked")

    monkeypatch.setattr(encoder, "iter_encoded", never)
    res = runner.invoke(app, ["embed", str(tmp_path / "maps"), "--model", str(model_dir), "--device", "cpu",
                              "--out", str(tmp_path / "f.parquet"), "--head", str(tmp_path / "head"), "-q"])
    assert res.exit_code == 2, res.output
    assert "anatcl-local" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "f.parquet").exists()
