"""`anatcl explain` end to end with a real (randomly initialised) ResNet-18 on a 3 mm grid."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
import torch
from anatomy import mni_gm_on_grid, save_nifti
from typer.testing import CliRunner

from anatcl_infer.cli import app
from anatcl_infer.config import ModelConfig, PreprocessConfig
from anatcl_infer.downstream.heads import HEAD_FORMAT, FoldHead, Head
from anatcl_infer.model.network import AnatCL
from anatcl_infer.weights.checkpoint import save_pretrained

runner = CliRunner()
GRID3_AFFINE = ((-3.0, 0, 0, 90.0), (0, 3.0, 0, -126.0), (0, 0, 3.0, -72.0), (0, 0, 0, 1))
PREP3 = PreprocessConfig(grid_shape=(61, 73, 61), grid_affine=GRID3_AFFINE, crop=((0, 61), (4, 68), (0, 61)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    torch.manual_seed(0)
    model_dir = save_pretrained(AnatCL(ModelConfig(name="test-model", source="unit-test", fold=0, preprocess=PREP3)), root / "m")
    scans = root / "scans"
    scans.mkdir()
    gm = np.ascontiguousarray(mni_gm_on_grid()[::2, ::2, ::2])
    for i, scale in enumerate((1.0, 0.8)):
        save_nifti(scans / f"sub-0{i + 1}_mwp1.nii.gz", scale * np.roll(gm, i, axis=0), affine=np.array(GRID3_AFFINE))
    (scans / "sub-09_mwp1.nii.gz").write_bytes(b"broken")
    rng = np.random.default_rng(0)
    fold = FoldHead(0, rng.normal(size=(1, 512)), np.array([50.0]), np.zeros(512), np.ones(512), {"fold": 0})
    config = {"format": HEAD_FORMAT, "target": "age", "kind": "regression", "feature_dim": 512, "folds": [{"fold": 0}]}
    head_dir = Head(config, [fold]).save(root / "head")
    return model_dir, scans, head_dir


def _rows(out):
    with open(out / "explain.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_explain_a_head_writes_maps_on_the_grid_and_reports_the_bad_input(setup, tmp_path):
    pytest.importorskip("matplotlib")
    model_dir, scans, head_dir = setup
    out = tmp_path / "out"
    res = runner.invoke(app, ["explain", str(scans), "--model", str(model_dir), "--head", str(head_dir), "--out", str(out),
                              "--device", "cpu", "-q"])
    assert res.exit_code == 1, res.output
    assert "sub-09_mwp1.nii.gz: failed at read" in res.output and "1 of 3 inputs failed" in res.output
    rows = _rows(out)
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    for r in rows[:2]:
        assert r["output"] == "age_pred" and np.isfinite(float(r["score"]))
        img = nib.load(out / r["relevance_nifti"])
        assert img.shape == (61, 73, 61) and np.allclose(img.affine, np.array(GRID3_AFFINE))
        data = np.asarray(img.dataobj)
        assert np.count_nonzero(data[:, 4:68]) > 1000 and not data[:, :4].any() and not data[:, 68:].any()
        assert (out / r["picture"]).is_file()
    assert float(rows[0]["score"]) != float(rows[1]["score"])


def test_without_a_head_one_input_is_a_clear_usage_error(setup, tmp_path):
    model_dir, scans, _ = setup
    res = runner.invoke(app, ["explain", str(scans / "sub-01_mwp1.nii.gz"), "--model", str(model_dir), "--out",
                              str(tmp_path / "o"), "--device", "cpu", "--no-pictures", "-q"])
    assert res.exit_code == 2
    assert "at least 2 inputs" in res.output and "--head" in res.output


@pytest.mark.slow
def test_without_a_head_the_principal_direction_is_mapped(setup, tmp_path):
    model_dir, scans, _ = setup
    out = tmp_path / "o"
    res = runner.invoke(app, ["explain", str(scans / "sub-01_mwp1.nii.gz"), str(scans / "sub-02_mwp1.nii.gz"),
                              "--model", str(model_dir), "--out", str(out), "--device", "cpu", "--no-pictures", "--smooth", "6", "-q"])
    assert res.exit_code == 0, res.output
    rows = _rows(out)
    assert [r["output"] for r in rows] == ["first principal direction of the features"] * 2
    assert not list(out.glob("*.png")) and len(list(out.glob("*_relevance.nii.gz"))) == 2
    data = np.asarray(nib.load(out / rows[0]["relevance_nifti"]).dataobj)
    scan = np.asarray(nib.load(scans / "sub-01_mwp1.nii.gz").dataobj)
    assert np.count_nonzero(data) > 1.05 * np.count_nonzero(scan[:, 4:68])  # smoothed: spread beyond the input's voxels
    assert not data[:, :4].any() and not data[:, 68:].any()


def test_help_lists_explain():
    res = runner.invoke(app, ["explain", "--help"])
    assert res.exit_code == 0 and "--head" in res.output and "gradient x input" in res.output


@pytest.mark.slow
def test_a_t1_model_explains_the_t1_images_of_a_folder_not_its_grey_matter_maps(setup, tmp_path):
    """A folder holding T1 images and an mwp1 map: a T1 model's inputs are the T1 images (as `anatcl embed` finds them)."""
    import dataclasses

    _, _, head_dir = setup
    prep = dataclasses.replace(PREP3, input_kind="t1", intensity="robust")
    torch.manual_seed(0)
    t1_model = save_pretrained(AnatCL(ModelConfig(name="t1-model", source="unit-test", fold=0, preprocess=prep)), tmp_path / "t1m")
    scans = tmp_path / "scans"
    scans.mkdir()
    gm = np.ascontiguousarray(mni_gm_on_grid()[::2, ::2, ::2])
    for name in ("sub-01_T1w.nii.gz", "sub-02_T1w.nii.gz", "mwp1sub-01_T1w.nii.gz"):
        save_nifti(scans / name, 100.0 * gm + 20.0, affine=np.array(GRID3_AFFINE))
    out = tmp_path / "out"
    res = runner.invoke(app, ["explain", str(scans), "--model", str(t1_model), "--head", str(head_dir), "--out", str(out),
                              "--device", "cpu", "--no-pictures", "-q"])
    assert res.exit_code == 0, res.output
    inputs = sorted(r["path"].rsplit("/", 1)[-1] for r in _rows(out))
    assert inputs == ["mwp1sub-01_T1w.nii.gz", "sub-01_T1w.nii.gz", "sub-02_T1w.nii.gz"]
