"""The QC page: a jinja2 template, escaped text, linked pictures, a small page per input, readable numbers."""

from __future__ import annotations

import os
import re
import stat

import pytest
from anatomy import mni_gm_on_grid, save_nifti

from anatcl_infer.config import PreprocessConfig
from anatcl_infer.qc.metrics import QC_COLUMNS
from anatcl_infer.qc.report import QCItem, build_qc_report, readable, write_html

CFG = PreprocessConfig()
HOSTILE = '<img src=x onerror="alert(1)">&amp;'


def _metrics(**over: object) -> dict[str, object]:
    m: dict[str, object] = {
        "qc_template_corr": 0.9731234, "qc_brain_coverage": 0.99412, "qc_signal_outside_brain": 0.0123456,
        "qc_signal_outside_crop": 0.0, "qc_orientation": "ok", "qc_min": 0.0, "qc_p1": 0.01234, "qc_p50": 0.4567,
        "qc_p99": 0.912345, "qc_max": 1.0123456, "qc_zero_fraction": 0.5123456, "qc_kind": "gm",
        "qc_kind_confidence": 0.95, "qc_method": "identity", "qc_n_warnings": 0.0, "qc_warnings": "",
    }
    m.update(over)
    assert set(m) == set(QC_COLUMNS)
    return m


def test_hostile_names_warnings_and_errors_are_text_not_markup(tmp_path):
    items = [
        QCItem(path=f"/data/{HOSTILE}.nii.gz", metrics=_metrics(qc_kind=HOSTILE), image_name="0000_x.png",
               warnings=[f"warning {HOSTILE}"], flagged=True, reasons=f"reason {HOSTILE}"),
        QCItem(path=f"/data/b{HOSTILE}.nii.gz", ok=False, stage="read", error=f"error {HOSTILE}"),
    ]
    page = write_html(items, tmp_path / "index.html", config=CFG, model=HOSTILE).read_text()
    assert "<img src=x" not in page and 'onerror="' not in page
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;&amp;amp;" in page
    for text in ("warning ", "reason ", "error ", "/data/b", "Preprocessing spec of "):
        assert f"{text}&lt;img src=x" in page, text
    # the only <img> tags are the page's own (one per input that has a picture)
    assert re.findall(r"<img [^>]*>", page) == [
        '<img alt="&lt;img src=x onerror=&#34;alert(1)&#34;&gt;&amp;amp;.nii.gz" src="images/0000_x.png" '
        'loading="lazy" width="1050" height="420">'
    ]


def test_hostile_file_name_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    scan = tmp_path / "in" / f"sub-01{HOSTILE}_mwp1.nii.gz"
    scan.parent.mkdir()
    save_nifti(scan, mni_gm_on_grid())
    report = build_qc_report([str(scan)], tmp_path / "qc")
    page = report.index.read_text()
    assert "<img src=x" not in page and "sub-01&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in page
    (image,) = re.findall(r'src="(images/[^"]+)"', page)
    assert re.fullmatch(r"images/0000_[A-Za-z0-9._-]+\.png", image) and (report.out_dir / image).is_file()


def test_page_stays_small_per_input_for_a_large_cohort(tmp_path):
    """10,000 inputs must give one page of tens of MB, not the 1.7 GB of inlined pictures."""
    n = 500
    items = []
    for i in range(n):
        path = f"/cluster/projects/cohort/derivatives/cat12/sub-{i:05d}/ses-01/anat/mri/mwp1sub-{i:05d}_ses-01_T1w.nii"
        item = QCItem(path=path, metrics=_metrics(), image_name=f"{i:04d}_mwp1sub-{i:05d}_ses-01_T1w.png",
                      slices_mm=(0.0, -18.0, 18.0))
        if i % 10 == 0:
            item.warnings = ["3.2% of the image's signal lies outside the model's field of view and is cut off"]
            item.flagged, item.reasons = True, "template correlation 0.41 < 0.5; template correlation robust z -8.1"
        items.append(item)
    items.append(QCItem(path="/cluster/missing.nii.gz", ok=False, stage="read", error="does not exist"))
    page = write_html(items, tmp_path / "index.html", config=CFG, contact_sheets=["contact_sheet_01.png"])
    size = page.stat().st_size
    assert size / len(items) < 2000, size / len(items)
    text = page.read_text()
    assert "base64" not in text and text.count('loading="lazy"') == n + 1
    assert text.count("<tr class=") == len(items)


def test_numbers_are_printed_readably():
    assert readable(4.440892098500626e-16) == "4.4e-16"
    assert readable(0.9731234) == "0.9731" and readable(0.0123456) == "0.01235" and readable(1.0) == "1"
    assert readable(0.99963) == "0.9996"  # a template correlation near 1 keeps the digits that matter
    assert readable(123456.0) == "1.2e+05" and readable(-2.5e-7) == "-2.5e-07"
    assert readable(float("nan")) == "" and readable(None) == "" and readable("ok") == "ok"


def test_tiny_values_in_the_page_are_not_truncated(tmp_path):
    items = [QCItem(path="a.nii", metrics=_metrics(qc_min=4.440892098500626e-16, qc_signal_outside_crop=2.2e-9),
                    image_name="0000_a.png")]
    page = write_html(items, tmp_path / "index.html", config=CFG).read_text()
    assert "4.4e-16 .. 1.012" in page and "<td>2.2e-09</td>" in page
    assert "4.4408" not in page


def test_report_files_follow_the_umask(tmp_path):
    pytest.importorskip("matplotlib")
    scan = tmp_path / "sub-01_mwp1.nii.gz"
    save_nifti(scan, mni_gm_on_grid())
    old = os.umask(0o022)
    try:
        report = build_qc_report([str(scan)], tmp_path / "qc")
    finally:
        os.umask(old)
    files = [p for p in report.out_dir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"index.html", "qc_metrics.csv", "contact_sheet.png", "0000_sub-01_mwp1.png"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    assert not [p for p in report.out_dir.rglob(".*")]  # no temporary file left behind
    assert report.items[0].png == b""  # written to the folder, not kept in memory
