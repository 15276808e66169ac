"""`anatcl qc` end to end: pictures, CSV, one self-contained HTML page, failures reported, not fatal."""

from __future__ import annotations

import csv
import re
import struct
import subprocess
import sys

import pytest
from anatomy import mni_gm_on_grid, mni_t1_on_grid, save_nifti
from typer.testing import CliRunner

from anatcl_infer.cli import app
from anatcl_infer.config import ModelConfig, PreprocessConfig
from anatcl_infer.qc.plots import SLICES_SIZE_PX

runner = CliRunner()


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Four inputs sorted by name; the second is broken (not a NIfTI), the fourth is a T1."""
    root = tmp_path_factory.mktemp("scans")
    gm = mni_gm_on_grid()
    save_nifti(root / "sub-01_mwp1.nii.gz", gm)
    (root / "sub-02_mwp1.nii.gz").write_bytes(b"this is not a NIfTI file")
    save_nifti(root / "sub-03_mwp1.nii.gz", 0.9 * gm)
    save_nifti(root / "sub-04_mwp1.nii.gz", mni_t1_on_grid())
    return root


def _rows(out):
    with open(out / "qc_metrics.csv", newline="") as fh:
        return {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(fh)}


def test_bad_input_in_the_middle_is_reported_and_the_rest_processed(scans, tmp_path):
    out = tmp_path / "qc"
    res = runner.invoke(app, ["qc", str(scans), str(tmp_path / "missing.nii.gz"), "--out", str(out), "--quiet"])
    assert res.exit_code == 1, res.output
    assert "sub-02_mwp1.nii.gz: failed at read: " in res.output  # path, stage, message
    assert "missing.nii.gz: failed at read: file not found" in res.output  # one failed input, not an abort
    assert "2 of 5 inputs failed" in res.output
    rows = _rows(out)
    assert rows["sub-02_mwp1.nii.gz"]["status"] == "failed" and rows["sub-02_mwp1.nii.gz"]["stage"] == "read"
    assert rows["sub-02_mwp1.nii.gz"]["error"]
    assert rows["missing.nii.gz"]["status"] == "failed"
    for name in ("sub-01_mwp1.nii.gz", "sub-03_mwp1.nii.gz", "sub-04_mwp1.nii.gz"):
        assert rows[name]["status"] == "ok"
        png = out / rows[name]["image"]
        assert png.exists() and _png_size(png) == SLICES_SIZE_PX
    assert float(rows["sub-01_mwp1.nii.gz"]["qc_template_corr"]) > 0.99
    assert rows["sub-01_mwp1.nii.gz"]["qc_flag"] == "false"
    assert rows["sub-04_mwp1.nii.gz"]["qc_kind"] == "t1" and rows["sub-04_mwp1.nii.gz"]["qc_flag"] == "true"
    assert "'t1'" in rows["sub-04_mwp1.nii.gz"]["qc_reasons"]
    assert (out / "contact_sheet.png").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # atomic writes left nothing behind

    page = (out / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    # the folder is the report: pictures linked relative to the page (never inlined), nothing external
    assert not re.search(r"""(src|href)=["']?(https?:|//|/|data:)""", page)
    assert "<link" not in page and "<script" not in page
    srcs = re.findall(r'src="([^"]+)"', page)
    assert len(srcs) == 3 + 1 and all((out / s).is_file() for s in srcs)
    assert sorted(srcs) == sorted(["contact_sheet.png"] + [rows[n]["image"] for n in (
        "sub-01_mwp1.nii.gz", "sub-03_mwp1.nii.gz", "sub-04_mwp1.nii.gz")])
    assert [rows["sub-01_mwp1.nii.gz"][f"slice_{a}_mm"] for a in "xyz"] == ["0", "-18", "18"]
    # every input listed; failed ones first, then the flagged T1, then the good ones
    order = [page.index(f"<h3>{p}") for p in (
        str(scans / "sub-02_mwp1.nii.gz"), str(tmp_path / "missing.nii.gz"), str(scans / "sub-04_mwp1.nii.gz"),
        str(scans / "sub-01_mwp1.nii.gz"), str(scans / "sub-03_mwp1.nii.gz"),
    )]
    assert order == sorted(order)
    assert "T1-weighted" in page  # the kind warning is shown


def test_all_good_exits_zero_and_rerun_replaces_outputs(scans, tmp_path):
    out = tmp_path / "qc"
    args = ["qc", str(scans / "sub-01_mwp1.nii.gz"), str(scans / "sub-03_mwp1.nii.gz"), "--out", str(out), "-q"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    first = (out / "qc_metrics.csv").read_text()
    res = runner.invoke(app, args)
    assert res.exit_code == 0
    assert (out / "qc_metrics.csv").read_text() == first
    assert len(list((out / "images").glob("*.png"))) == 2


def test_strict_turns_a_wrong_kind_into_a_failure(scans, tmp_path):
    out = tmp_path / "qc"
    res = runner.invoke(app, ["qc", str(scans / "sub-04_mwp1.nii.gz"), "--out", str(out), "--strict", "-q"])
    assert res.exit_code == 1
    row = _rows(out)["sub-04_mwp1.nii.gz"]
    assert row["status"] == "failed" and row["stage"] == "check"


def test_model_directory_spec_is_used(scans, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    ModelConfig(name="padded", preprocess=PreprocessConfig(pad_to=(128, 128, 128))).save(model_dir)
    out = tmp_path / "qc"
    res = runner.invoke(app, ["qc", str(scans / "sub-01_mwp1.nii.gz"), "--out", str(out), "--model", str(model_dir), "-q"])
    assert res.exit_code == 0, res.output
    row = _rows(out)["sub-01_mwp1.nii.gz"]
    assert float(row["qc_template_corr"]) > 0.99  # the template is padded the same way as the input
    assert "(128, 128, 128)" in (out / "index.html").read_text()


def test_unknown_model_name_is_a_usage_error(scans, tmp_path):
    res = runner.invoke(app, ["qc", str(scans), "--out", str(tmp_path / "qc"), "--model", "no-such-model"])
    assert res.exit_code == 2
    assert "no-such-model" in res.output


@pytest.mark.slow
def test_workers_give_the_same_report(scans, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert runner.invoke(app, ["qc", str(scans), "--out", str(one), "-q"]).exit_code == 1
    assert runner.invoke(app, ["qc", str(scans), "--out", str(two), "-q", "--workers", "2"]).exit_code == 1
    assert (one / "qc_metrics.csv").read_text() == (two / "qc_metrics.csv").read_text()


def test_contact_sheets_are_paged(scans, tmp_path, monkeypatch):
    from anatcl_infer.qc import report as qc_report

    monkeypatch.setattr(qc_report, "SHEET_PAGE", 2)
    paths = [scans / f"sub-0{i}_mwp1.nii.gz" for i in (1, 3, 4)]
    report = qc_report.build_qc_report(paths, tmp_path / "qc")
    assert [p.name for p in report.contact_sheets] == ["contact_sheet_01.png", "contact_sheet_02.png"]
    assert all(p.exists() for p in report.contact_sheets)
    assert [it.flagged for it in report.items] == [False, False, True]
    assert report.index.read_text().count('alt="contact sheet') == 2


def test_missing_matplotlib_fails_before_any_work(scans, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    res = runner.invoke(app, ["qc", str(scans / "sub-01_mwp1.nii.gz"), "--out", str(tmp_path / "qc")])
    assert res.exit_code == 2
    assert 'pip install "anatcl-infer[qc]"' in res.output
    assert not (tmp_path / "qc" / "index.html").exists()


def test_help_lists_qc_and_stays_light():
    res = runner.invoke(app, ["qc", "--help"])
    assert res.exit_code == 0 and "--out" in res.output and "--strict" in res.output
    code = "import sys, anatcl_infer.cli; bad=[m for m in ('matplotlib','torch','pandas') if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)
