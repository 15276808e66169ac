"""`anatcl embed --qc` gives the same `qc_*` columns, `qc_flag` and `qc_reasons` as `anatcl qc`."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from anatomy import mni_gm_on_grid, mni_t1_on_grid, save_nifti

from anatcl_infer.config import ModelConfig
from anatcl_infer.inputs.discovery import discover_inputs
from anatcl_infer.jobs.embed import run_embed
from anatcl_infer.model.network import AnatCL
from anatcl_infer.qc.metrics import QC_COLUMNS
from anatcl_infer.qc.report import build_qc_report

pytestmark = pytest.mark.slow  # four full-size forward passes and four QC pictures


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    root = tmp_path_factory.mktemp("scans")
    gm = mni_gm_on_grid()
    save_nifti(root / "sub-01_mwp1.nii.gz", gm)
    save_nifti(root / "sub-02_mwp1.nii.gz", 0.9 * gm)
    save_nifti(root / "sub-03_mwp1.nii.gz", np.roll(gm, 12, axis=1))  # 18 mm forward: the crop cuts the front
    save_nifti(root / "sub-04_mwp1.nii.gz", mni_t1_on_grid())
    return root


def test_embed_qc_columns_equal_the_qc_report(scans, tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    model = AnatCL(ModelConfig(name="test-full", source="unit-test", fold=0))
    records = discover_inputs([str(scans)])
    out = tmp_path / "feats.parquet"
    summary = run_embed(records, [model], out, progress=False, num_workers=0, qc=True, batch_size=2)
    assert summary.ok
    df = pq.read_table(out).to_pandas().set_index("path")
    report = build_qc_report([r.path for r in records], tmp_path / "qc")
    assert not report.failed

    for item in report.items:
        row = df.loc[item.path]
        for col in QC_COLUMNS:
            want, got = item.metrics[col], row[col]
            if isinstance(want, str):
                assert got == want, (item.path, col)
            elif math.isnan(want):
                assert math.isnan(got), (item.path, col)
            else:
                assert got == pytest.approx(want, rel=1e-6, abs=1e-12), (item.path, col)
        assert bool(row["qc_flag"]) == item.flagged and row["qc_reasons"] == item.reasons
    assert df["qc_flag"].dtype == bool

    # the column that was always NaN under embed --qc is measured, and flags the shifted map
    shifted = df.loc[str(scans / "sub-03_mwp1.nii.gz")]
    assert np.isfinite(df["qc_signal_outside_crop"]).all()
    assert shifted["qc_signal_outside_crop"] > 0.01 and "outside the crop box" in shifted["qc_reasons"]
    assert df.loc[str(scans / "sub-01_mwp1.nii.gz"), "qc_signal_outside_crop"] == 0.0
    assert df["qc_flag"].tolist() == [False, False, True, True]
