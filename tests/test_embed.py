"""The encoder and the `anatcl embed` job: order, batching, bad inputs, atomic output, resume, shards."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from anatcl_infer.weights.checkpoint import save_pretrained
from anatcl_infer.cli import app
from anatcl_infer.config import ModelConfig, PreprocessConfig
from anatcl_infer.inputs.discovery import discover_inputs
from anatcl_infer.jobs.embed import METADATA_KEY, run_embed, shard_records
from anatcl_infer.encoding.encoder import encode, extract_features
from anatcl_infer.errors import InputError
from anatcl_infer.model.network import AnatCL

from anatomy import mni_gm_on_grid

# A 3 mm version of the reference grid: same origin and orientation, every second voxel,
# so the model work stays small while the inputs are real anatomy.
GRID3_AFFINE = ((-3.0, 0, 0, 90.0), (0, 3.0, 0, -126.0), (0, 0, 3.0, -72.0), (0, 0, 0, 1))
PREP3 = PreprocessConfig(grid_shape=(61, 73, 61), grid_affine=GRID3_AFFINE, crop=((0, 61), (4, 68), (0, 61)))


def _gm3() -> np.ndarray:
    return np.ascontiguousarray(mni_gm_on_grid()[::2, ::2, ::2])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = AnatCL(ModelConfig(name="test-model", source="unit-test", fold=0, preprocess=PREP3))
    return save_pretrained(model, tmp_path_factory.mktemp("model") / "m")


@pytest.fixture(scope="module")
def model(model_dir):
    from anatcl_infer.weights.loading import load_model

    return load_model(str(model_dir), device="cpu")


def _write_scans(directory: Path, n: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    gm = _gm3()
    paths = []
    for i in range(n):
        scale = 1.0 - 0.04 * i  # a little "atrophy" per subject so features differ
        img = nib.Nifti1Image((gm * scale).astype(np.float32), np.array(GRID3_AFFINE))
        p = directory / f"sub-{i:02d}_mwp1.nii.gz"
        nib.save(img, p)
        paths.append(p)
    return paths


def _bad_inputs(directory: Path) -> list[Path]:
    good = directory / "sub-90_mwp1.nii.gz"
    nib.save(nib.Nifti1Image(_gm3(), np.array(GRID3_AFFINE)), good)
    truncated = directory / "sub-91_mwp1.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = directory / "sub-92_mwp1.nii"
    text.write_text("this is not an image\n")
    flat = directory / "sub-93_mwp1.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((10, 10), np.float32), np.eye(4)), flat)
    good.unlink()
    return [truncated, text, flat]


def test_encode_matches_per_item_and_ignores_batch_size(model):
    gm = _gm3()
    vols = [gm, gm * 0.9, gm * 0.8]
    one = np.concatenate([encode(model, v, batch_size=1, progress=False, num_workers=0, assume_reference_grid=True) for v in vols])
    three = encode(model, vols, batch_size=3, progress=False, num_workers=0, assume_reference_grid=True)
    assert one.shape == (3, 512) and one.dtype == np.float32
    np.testing.assert_array_equal(three, one)  # bit-identical on CPU
    # the model sees exactly the crop of the on-grid array
    with torch.inference_mode():
        direct = model(torch.from_numpy(np.ascontiguousarray(gm[None, None, :, 4:68, :]))).numpy()
    np.testing.assert_allclose(one[:1], direct, rtol=1e-5, atol=1e-6)
    # features differ between subjects (the model is not collapsing them)
    assert np.abs(one[0] - one[2]).max() > 1e-4


def test_encode_mixed_inputs_in_order_with_workers(model, tmp_path):
    paths = _write_scans(tmp_path, 3)
    img = nib.load(paths[1])
    items = [str(paths[0]), img, (np.asarray(nib.load(paths[2]).dataobj), nib.load(paths[2]).affine)]
    a = encode(model, items, batch_size=2, num_workers=0, progress=False)
    b = encode(model, [str(p) for p in paths], batch_size=2, num_workers=2, progress=False)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_extract_features_accepts_model_instance_and_rejects_unknown_kwargs(model):
    feats = extract_features(_gm3(), model=model, progress=False, assume_reference_grid=True)
    assert feats.shape == (1, 512)
    with pytest.raises(TypeError, match="valid ones"):
        extract_features(_gm3(), model=model, batchsize=2)


def test_encode_bad_input_raises_with_path(model, tmp_path):
    bad = _bad_inputs(tmp_path)[0]
    with pytest.raises(InputError) as info:
        encode(model, [_gm3(), str(bad)], progress=False, num_workers=0, assume_reference_grid=True)
    assert str(bad) in str(info.value)


def _embed(model, paths, out, **kw):
    records = discover_inputs([str(p) for p in paths])
    return run_embed(records, [model], out, progress=False, num_workers=0, **kw)


def test_embed_writes_parquet_with_ids_features_metadata(model, tmp_path):
    paths = _write_scans(tmp_path / "in", 4)
    out = tmp_path / "feats.parquet"
    summary = _embed(model, [tmp_path / "in"], out, batch_size=3)
    assert summary.ok and summary.n_written == 4
    table = pq.read_table(out)
    df = table.to_pandas()
    assert list(df.columns[:7]) == ["path", "volume", "subject", "session", "run", "model", "fold"]
    assert df["volume"].isna().all()  # 3D files: no volume
    feats = [c for c in df.columns if c.startswith("feat_")]
    assert feats[0] == "feat_000" and feats[-1] == "feat_511" and len(feats) == 512
    assert df[feats].dtypes.unique().tolist() == [np.dtype("float32")]
    assert df["path"].tolist() == sorted(str(p.resolve()) for p in paths)
    assert df["subject"].tolist() == ["00", "01", "02", "03"]
    assert (df["fold"] == 0).all() and (df["qc_kind"] == "gm").all()
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    assert meta["model"]["name"] == "test-model" and meta["device"] == "cpu"
    assert meta["preprocess"]["grid_shape"] == [61, 73, 61]
    expected = encode(model, [str(p) for p in sorted(paths)], progress=False, num_workers=0)
    np.testing.assert_allclose(df[feats].to_numpy(), expected, rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "feats.parquet.partial").exists()


def test_embed_bad_inputs_never_stop_the_run(model, model_dir, tmp_path):
    _write_scans(tmp_path / "in", 3)
    bad = _bad_inputs(tmp_path / "in")
    out = tmp_path / "feats.parquet"
    runner = CliRunner()
    result = runner.invoke(app, ["embed", str(tmp_path / "in"), "--out", str(out), "--model", str(model_dir), "--device", "cpu", "--quiet", "--workers", "0"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    df = pq.read_table(out).to_pandas()
    assert len(df) == 3  # every good input written
    errors = (tmp_path / "feats.errors.csv").read_text().splitlines()
    assert len(errors) == 1 + len(bad)
    text = "\n".join(errors)
    for p in bad:
        assert str(p.resolve()) in text
    assert "3 of 6 inputs failed" in result.output


def test_embed_refuses_to_clobber_and_resume_matches_uninterrupted(model, tmp_path, monkeypatch):
    _write_scans(tmp_path / "in", 5)
    full = tmp_path / "full.parquet"
    _embed(model, [tmp_path / "in"], full, batch_size=2)
    with pytest.raises(Exception, match="--resume"):
        _embed(model, [tmp_path / "in"], full, batch_size=2)

    # crash after the first batch is written
    import anatcl_infer.jobs.embed as embed_mod

    original = embed_mod._Parts.write
    calls = {"n": 0}

    def crashing_write(self, table, meta):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, table, meta)

    out = tmp_path / "resumed.parquet"
    monkeypatch.setattr(embed_mod._Parts, "write", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        _embed(model, [tmp_path / "in"], out, batch_size=2)
    monkeypatch.setattr(embed_mod._Parts, "write", original)
    assert not out.exists()
    assert len(list((tmp_path / "resumed.parquet.partial").glob("part-*.parquet"))) == 1
    with pytest.raises(Exception, match="interrupted run"):
        _embed(model, [tmp_path / "in"], out, batch_size=2)
    summary = _embed(model, [tmp_path / "in"], out, batch_size=2, resume=True)
    assert summary.n_skipped == 2 and summary.n_written == 3
    a, b = pq.read_table(full), pq.read_table(out)
    assert a.equals(b) and a.schema.metadata == b.schema.metadata


@pytest.mark.slow
def test_embed_killed_midway_then_resumed(model, model_dir, tmp_path):
    """A real SIGKILL of the CLI process, then --resume: same file as an uninterrupted run."""
    _write_scans(tmp_path / "in", 6)
    cmd = [sys.executable, "-m", "anatcl_infer", "embed", str(tmp_path / "in"), "--model", str(model_dir),
           "--device", "cpu", "--quiet", "--batch-size", "1", "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*cmd, "--out", str(tmp_path / "full.parquet")], check=True, env=env)
    out = tmp_path / "killed.parquet"
    proc = subprocess.Popen([*cmd, "--out", str(out)], env=env)
    partial = tmp_path / "killed.parquet.partial"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(partial.glob("part-*.parquet"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = len(list(partial.glob("part-*.parquet")))
    assert 2 <= done < 6
    subprocess.run([*cmd, "--out", str(out), "--resume"], check=True, env=env)
    assert pq.read_table(out).equals(pq.read_table(tmp_path / "full.parquet"))
    assert not partial.exists()


def test_shards_read_as_one_dataset_equal_single_process(model, model_dir, tmp_path):
    _write_scans(tmp_path / "in", 5)
    single = tmp_path / "single.parquet"
    _embed(model, [tmp_path / "in"], single)
    records = discover_inputs([str(tmp_path / "in")])
    blocks = [shard_records(records, i, 3) for i in range(3)]
    assert sum(blocks, []) == records
    runner = CliRunner()
    for i in range(3):
        result = runner.invoke(app, ["embed", str(tmp_path / "in"), "--out", str(tmp_path / "parts"), "--shard", f"{i}/3",
                                     "--model", str(model_dir), "--device", "cpu", "--quiet", "--workers", "0"])
        assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "parts").iterdir())
    assert names == [f"part-{i:05d}-of-00003.parquet" for i in range(3)]
    merged = ds.dataset(tmp_path / "parts", format="parquet").to_table()
    assert merged.replace_schema_metadata(None).equals(pq.read_table(single).replace_schema_metadata(None))


def test_torchrun_environment_selects_the_part(model, model_dir, tmp_path, monkeypatch):
    _write_scans(tmp_path / "in", 4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "in"), "--out", str(tmp_path / "parts"),
                                      "--model", str(model_dir), "--device", "cpu", "--quiet", "--workers", "0"])
    assert result.exit_code == 0, result.output
    df = pq.read_table(tmp_path / "parts" / "part-00001-of-00002.parquet").to_pandas()
    assert df["subject"].tolist() == ["02", "03"]


def test_csv_format_and_metadata_sidecar(model, tmp_path):
    _write_scans(tmp_path / "in", 2)
    out = tmp_path / "feats.csv"
    _embed(model, [tmp_path / "in"], out, fmt="csv")
    import pandas as pd

    df = pd.read_csv(out)
    assert len(df) == 2 and "feat_511" in df.columns
    meta = json.loads((tmp_path / "feats.csv.meta.json").read_text())
    assert meta["model"]["source"] == "unit-test"


def test_embed_qc_columns_on_real_anatomy(tmp_path):
    """--qc adds the QC metrics; on the published grid with the example maps they look healthy."""
    torch.manual_seed(0)
    model = AnatCL(ModelConfig(name="test-full", source="unit-test", fold=0))
    records = discover_inputs([str(Path(__file__).parents[1] / "examples" / "data")])[:1]
    out = tmp_path / "qc.parquet"
    summary = run_embed(records, [model], out, progress=False, num_workers=0, qc=True)
    assert summary.ok
    df = pq.read_table(out).to_pandas()
    assert df.loc[0, "qc_template_corr"] > 0.9
    assert df.loc[0, "qc_kind"] == "gm"


def test_embed_from_t1_runs_the_prep_route_and_reports_its_failures(model_dir, tmp_path, monkeypatch):
    """--from-t1: each T1 goes through t1_to_gm (deepmriprep stands in here: its weights cannot be
    downloaded in CI), the maps are embedded, a failing T1 is reported and the rest still embedded."""
    import json as _json

    import anatcl_infer.inputs.raw_t1 as prep

    bids = tmp_path / "bids"
    (bids / "dataset_description.json").parent.mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.8.0"}')
    for sub in ("01", "02", "03"):
        anat = bids / f"sub-{sub}" / "anat"
        anat.mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), anat / f"sub-{sub}_T1w.nii.gz")
    calls = []

    def fake_t1_to_gm(t1, out_dir, *, device="cpu", allow_download=False):
        calls.append(str(t1))
        if "sub-02" in str(t1):
            raise InputError("deepmriprep failed: segmentation did not converge", path=str(t1), stage="prep")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = Path(t1).name.replace(".nii.gz", "")
        gm = out_dir / f"mwp1{stem}.nii.gz"
        nib.save(nib.Nifti1Image(_gm3(), np.array(GRID3_AFFINE)), gm)
        (out_dir / f"mwp1{stem}.json").write_text(_json.dumps({"tool": "stand-in"}))
        return gm

    monkeypatch.setattr(prep, "t1_to_gm", fake_t1_to_gm)
    out = tmp_path / "feats.parquet"
    args = ["embed", str(bids), "--from-t1", "--out", str(out), "--model", str(model_dir), "--device", "cpu", "--quiet", "--workers", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    df = pq.read_table(out).to_pandas()
    assert df["subject"].tolist() == ["01", "03"]
    assert all(Path(p).name.startswith("mwp1sub-") for p in df["path"])
    errors = (tmp_path / "feats.errors.csv").read_text()
    assert "sub-02_T1w" in errors and "prep" in errors and "did not converge" in errors
    # a rerun reuses the maps already made and only retries the failed T1
    calls.clear()
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert calls == [str((bids / "sub-02" / "anat" / "sub-02_T1w.nii.gz").resolve())]
