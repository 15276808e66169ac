"""4D files in `anatcl embed`, `anatcl qc` and `anatcl bids` (issue 21): one row per volume.

A 4D file of N volumes gives N rows (per fold) whose ``volume`` column is 0..N-1 (null for a
3D file), each bit for bit the row of the same volume saved as a 3D file; rows are keyed by
(path, volume, fold) for sorting, resume and dedupe; fingerprints stay the file's. Real
anatomy (the MNI grey-matter map) on the 3 mm grid keeps the model work small.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from anatcl_infer.cli import app
from anatcl_infer.config import ModelConfig, PreprocessConfig
from anatcl_infer.downstream.features import read_features
from anatcl_infer.downstream.heads import join_labels
from anatcl_infer.downstream.heads.rows import _input_keys
from anatcl_infer.inputs.discovery import discover_inputs
from anatcl_infer.jobs.embed import run_embed
from anatcl_infer.model.network import AnatCL
from anatcl_infer.weights.checkpoint import save_pretrained

from anatomy import mni_gm_on_grid

GRID3_AFFINE = ((-3.0, 0, 0, 90.0), (0, 3.0, 0, -126.0), (0, 0, 3.0, -72.0), (0, 0, 0, 1))
PREP3 = PreprocessConfig(grid_shape=(61, 73, 61), grid_affine=GRID3_AFFINE, crop=((0, 61), (4, 68), (0, 61)))
ID_COLUMNS = ["path", "volume", "subject", "session", "run", "model", "fold"]

runner = CliRunner()


def _gm3() -> np.ndarray:
    return np.ascontiguousarray(mni_gm_on_grid()[::2, ::2, ::2]).astype(np.float32)


def _volumes() -> list[np.ndarray]:
    gm = _gm3()
    return [gm, (0.93 * gm).astype(np.float32), np.roll(gm, 2, axis=0)]


def _save(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.array(GRID3_AFFINE)), path)
    return path


def _mixed(folder: Path, fourd: list[np.ndarray] | None = None) -> Path:
    """sub-01 (3D), sub-02 (4D: 3 volumes), sub-03 (3D); returns the 4D file."""
    gm = _gm3()
    _save(folder / "sub-01_mwp1.nii.gz", 0.97 * gm)
    _save(folder / "sub-03_mwp1.nii.gz", 0.9 * gm)
    return _save(folder / "sub-02_mwp1.nii.gz", np.stack(fourd or _volumes(), axis=-1))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = AnatCL(ModelConfig(name="test-model", source="unit-test", fold=0, preprocess=PREP3))
    return save_pretrained(model, tmp_path_factory.mktemp("model") / "m")


@pytest.fixture(scope="module")
def model(model_dir):
    from anatcl_infer.weights.loading import load_model

    return load_model(str(model_dir), device="cpu")


def _embed(models, folder, out, **kw):
    return run_embed(discover_inputs([str(folder)]), models, out, progress=False, num_workers=0, **kw)


def _keys(table) -> list[tuple[str, int | None, int]]:
    return [(Path(p).name, v, f) for p, v, f in zip(*(table.column(c).to_pylist() for c in ("path", "volume", "fold")))]


def _feats(table) -> np.ndarray:
    return np.stack([table.column(c).to_numpy() for c in table.column_names if c.startswith("feat_")], axis=1)


def test_cli_rows_of_a_4d_file_equal_its_volumes_saved_as_3d_files(model_dir, tmp_path):
    vols = _volumes()
    stack = _save(tmp_path / "stack" / "sub-01_mwp1.nii.gz", np.stack(vols, axis=-1))
    for i, v in enumerate(vols):
        _save(tmp_path / "split" / f"sub-0{i + 1}_mwp1.nii.gz", v)
    common = ["--model", str(model_dir), "--device", "cpu", "--quiet", "--workers", "0", "--batch-size", "2"]
    res = runner.invoke(app, ["embed", str(stack), "--out", str(tmp_path / "a.parquet"), *common])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["embed", str(tmp_path / "split"), "--out", str(tmp_path / "b.parquet"), *common])
    assert res.exit_code == 0, res.output
    a, b = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert a.column_names[:7] == ID_COLUMNS and a.column_names == b.column_names
    assert a.column("volume").to_pylist() == [0, 1, 2] and b.column("volume").null_count == 3
    assert set(a.column("path").to_pylist()) == {str(stack.resolve())}
    assert np.array_equal(_feats(a), _feats(b))  # bit for bit
    for c in a.column_names:
        if c.startswith("qc_"):
            assert a.column(c).equals(b.column(c)), c
    # the fingerprint is the file's, on every row of it
    assert set(a.column("input_sha256").to_pylist()) == {hashlib.sha256(stack.read_bytes()).hexdigest()}
    df, _ = read_features(tmp_path / "a.parquet")
    assert str(df["volume"].dtype) == "Int64" and df["volume"].tolist() == [0, 1, 2]
    assert read_features(tmp_path / "b.parquet")[0]["volume"].isna().all()


def test_mixed_folder_with_folds_and_a_failing_volume(model, tmp_path, caplog):
    torch.manual_seed(1)
    fold1 = AnatCL(ModelConfig(name="test-model", source="unit-test", fold=1, preprocess=PREP3)).eval()
    vols = _volumes()
    vols[1] = np.full_like(vols[1], 0.3)  # a constant volume: refused, the others written
    stack = _mixed(tmp_path / "in", vols)
    out = tmp_path / "feats.parquet"
    summary = _embed([model, fold1], tmp_path / "in", out, batch_size=2)
    assert summary.n_inputs == 5 and summary.n_written == 4 and len(summary.failures) == 1
    table = pq.read_table(out)
    assert table.column_names[:7] == ID_COLUMNS
    assert _keys(table) == [("sub-01_mwp1.nii.gz", None, 0), ("sub-01_mwp1.nii.gz", None, 1),
                            ("sub-02_mwp1.nii.gz", 0, 0), ("sub-02_mwp1.nii.gz", 0, 1),
                            ("sub-02_mwp1.nii.gz", 2, 0), ("sub-02_mwp1.nii.gz", 2, 1),
                            ("sub-03_mwp1.nii.gz", None, 0), ("sub-03_mwp1.nii.gz", None, 1)]
    assert table.column("subject").to_pylist() == ["01", "01", "02", "02", "02", "02", "03", "03"]
    with open(tmp_path / "feats.errors.csv", newline="") as fh:
        errors = list(csv.DictReader(fh))
    assert list(errors[0]) == ["path", "volume", "fold", "stage", "message"]
    assert [(e["path"], e["volume"], e["fold"]) for e in errors] == [(str(stack.resolve()), "1", "all")]
    assert errors[0]["stage"] == "check" and "is empty" in errors[0]["message"]
    assert any("sub-02_mwp1.nii.gz[volume 1] [check]: is empty" in r.getMessage() for r in caplog.records)


def test_resume_mid_file_embeds_only_the_missing_volumes(model, tmp_path, monkeypatch):
    _mixed(tmp_path / "in")
    full = tmp_path / "full.parquet"
    _embed([model], tmp_path / "in", full, batch_size=2)

    import anatcl_infer.encoding.encoder as encoder
    import anatcl_infer.jobs.embed as embed_mod

    original = embed_mod._Parts.write
    calls = {"n": 0}

    def crashing_write(self, table, meta):
        calls["n"] += 1
        if calls["n"] == 2:  # the first batch (sub-01, sub-02 volume 0) is kept; volumes 1 and 2 are lost
            raise KeyboardInterrupt
        return original(self, table, meta)

    out = tmp_path / "resumed.parquet"
    monkeypatch.setattr(embed_mod._Parts, "write", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        _embed([model], tmp_path / "in", out, batch_size=2)
    monkeypatch.setattr(embed_mod._Parts, "write", original)
    assert not out.exists()

    asked: list[str] = []
    real = encoder.iter_encoded

    def spy(runner_, inputs, **kw):
        asked.extend(str(i) for i in inputs)
        return real(runner_, inputs, **kw)

    monkeypatch.setattr(encoder, "iter_encoded", spy)
    summary = _embed([model], tmp_path / "in", out, batch_size=2, resume=True)
    assert summary.n_skipped == 2 and summary.n_written == 3
    assert [Path(a).name for a in asked] == ["sub-02_mwp1.nii.gz[volume 1]", "sub-02_mwp1.nii.gz[volume 2]", "sub-03_mwp1.nii.gz"]
    a, b = pq.read_table(full), pq.read_table(out)
    assert a.equals(b) and a.schema.metadata == b.schema.metadata


def test_resume_of_a_table_written_before_the_volume_column(model, tmp_path):
    gm = _gm3()
    _save(tmp_path / "in" / "sub-01_mwp1.nii.gz", gm)
    _save(tmp_path / "in" / "sub-03_mwp1.nii.gz", 0.9 * gm)
    out = tmp_path / "feats.parquet"
    _embed([model], tmp_path / "in", out)
    table = pq.read_table(out)
    legacy = table.drop_columns(["volume"]).replace_schema_metadata(table.schema.metadata)
    pq.write_table(legacy, out)  # as the previous version wrote it

    summary = _embed([model], tmp_path / "in", out, resume=True)
    assert summary.n_skipped == 2 and summary.n_written == 0
    assert pq.read_table(out).equals(table)  # the column added, null

    _save(tmp_path / "in" / "sub-02_mwp1.nii.gz", np.stack(_volumes(), axis=-1))
    pq.write_table(legacy, out)
    summary = _embed([model], tmp_path / "in", out, resume=True)
    assert summary.n_skipped == 2 and summary.n_written == 3
    fresh = tmp_path / "fresh.parquet"
    _embed([model], tmp_path / "in", fresh)
    assert pq.read_table(out).equals(pq.read_table(fresh))


def test_shards_keep_a_files_volumes_together(model, tmp_path):
    _mixed(tmp_path / "in")
    single = tmp_path / "single.parquet"
    _embed([model], tmp_path / "in", single)
    for i in range(2):
        _embed([model], tmp_path / "in", tmp_path / "parts", shard=(i, 2))
    first = pq.read_table(tmp_path / "parts" / "part-00000-of-00002.parquet")
    assert [k[:2] for k in _keys(first)] == [("sub-01_mwp1.nii.gz", None), ("sub-02_mwp1.nii.gz", 0),
                                            ("sub-02_mwp1.nii.gz", 1), ("sub-02_mwp1.nii.gz", 2)]
    merged = ds.dataset(tmp_path / "parts", format="parquet").to_table()
    assert merged.replace_schema_metadata(None).equals(pq.read_table(single).replace_schema_metadata(None))
    df, _ = read_features(tmp_path / "parts")  # no overlap: the volumes are told apart
    assert len(df) == 5


def test_qc_report_has_one_row_per_volume(model_dir, tmp_path):
    pytest.importorskip("matplotlib")
    vols = _volumes()
    _mixed(tmp_path / "in")
    _save(tmp_path / "in" / "sub-04_mwp1.nii.gz", vols[1])  # volume 1 of sub-02, as a 3D file
    out = tmp_path / "qc"
    res = runner.invoke(app, ["qc", str(tmp_path / "in"), "--model", str(model_dir), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    with open(out / "qc_metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(Path(r["path"]).name, r["volume"], r["status"]) for r in rows] == [
        ("sub-01_mwp1.nii.gz", "", "ok"), ("sub-02_mwp1.nii.gz", "0", "ok"), ("sub-02_mwp1.nii.gz", "1", "ok"),
        ("sub-02_mwp1.nii.gz", "2", "ok"), ("sub-03_mwp1.nii.gz", "", "ok"), ("sub-04_mwp1.nii.gz", "", "ok")]
    same = [c for c in rows[0] if c.startswith("qc_") and c not in ("qc_flag", "qc_reasons")]
    assert [rows[2][c] for c in same] == [rows[5][c] for c in same]
    images = [r["image"] for r in rows]
    assert len(set(images)) == 6 and all((out / i).is_file() for i in images)
    page = (out / "index.html").read_text()
    assert "sub-02_mwp1.nii.gz[volume 2]" in page


def test_heads_tell_volumes_apart_and_labels_join_on_path_and_volume():
    df = pd.DataFrame({"path": ["/d/a.nii.gz"] * 4 + ["/d/b.nii.gz"] * 2, "volume": pd.array([0, 0, 1, 1, None, None], "Int64"),
                       "fold": [0, 1, 0, 1, 0, 1]})
    keys = _input_keys(df)
    assert len(set(keys)) == 3 and keys[0] == keys[1] and keys[0] != keys[2] and keys[4] == keys[5]
    labels = pd.DataFrame({"path": ["/d/a.nii.gz", "/d/a.nii.gz", "/d/b.nii.gz"], "volume": [0, 1, None], "age": [30, 40, 50]})
    joined, key = join_labels(df, labels, columns=["age"])
    assert key == "path+volume" and joined["age"].tolist() == [30, 30, 40, 40, 50, 50]
    # labels by path only: every volume of the file gets the file's label
    joined, key = join_labels(df, labels.iloc[[0, 2]].drop(columns="volume"), columns=["age"])
    assert key == "path" and joined["age"].tolist() == [30, 30, 30, 30, 50, 50]


@pytest.mark.slow
def test_bids_scan_of_a_4d_map_has_a_row_per_volume(model_dir, tmp_path):
    bids = tmp_path / "ds"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
    gm = _gm3()
    maps = [_save(bids / "derivatives" / "cat12" / "sub-01" / "mri" / "mwp1sub-01_T1w.nii.gz", np.stack(_volumes()[:2], axis=-1)),
            _save(bids / "derivatives" / "cat12" / "sub-02" / "mri" / "mwp1sub-02_T1w.nii.gz", gm)]
    out = tmp_path / "out"
    common = ["--model", str(model_dir), "--device", "cpu", "--workers", "0", "-q"]
    for level in ("participant", "group"):
        res = runner.invoke(app, ["bids", str(bids), str(out), level, *common])
        assert res.exit_code == 0, res.output
    scan = pq.read_table(out / "sub-01" / "anat" / "sub-01_desc-testmodel_features.parquet")
    assert scan.column("volume").to_pylist() == [0, 1]
    side = json.loads((out / "sub-01" / "anat" / "sub-01_desc-testmodel_features.json").read_text())
    assert "per volume" in side["Description"]
    res = runner.invoke(app, ["embed", *map(str, maps), "--out", str(tmp_path / "e.parquet"), *common])
    assert res.exit_code == 0, res.output
    group, embedded = pq.read_table(out / "desc-testmodel_features.parquet"), pq.read_table(tmp_path / "e.parquet")
    assert group.replace_schema_metadata(None).equals(embedded.replace_schema_metadata(None))
    assert group.column("volume").to_pylist() == [0, 1, None]
