"""`anatcl bids`: the BIDS App on a small dataset with CAT12 derivatives (two subjects, one with two sessions)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from anatcl_infer._version import __version__
from anatcl_infer.cli import app
from anatcl_infer.config import ModelConfig, PreprocessConfig
from anatcl_infer.errors import ConfigError
from anatcl_infer.inputs.discovery import InputRecord
from anatcl_infer.jobs.bids import normalise_labels, output_paths, write_dataset_description
from anatcl_infer.jobs.embed import METADATA_KEY
from anatcl_infer.model.network import AnatCL
from anatcl_infer.weights.checkpoint import save_pretrained

from anatomy import mni_gm_on_grid

# The 3 mm version of the reference grid (as in test_embed): real anatomy, small forward passes.
GRID3_AFFINE = ((-3.0, 0, 0, 90.0), (0, 3.0, 0, -126.0), (0, 0, 3.0, -72.0), (0, 0, 0, 1))
PREP3 = PreprocessConfig(grid_shape=(61, 73, 61), grid_affine=GRID3_AFFINE, crop=((0, 61), (4, 68), (0, 61)))
SCANS = [("01", None), ("02", "1"), ("02", "2")]

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = AnatCL(ModelConfig(name="test-model", source="unit-test", fold=0, preprocess=PREP3))
    return save_pretrained(model, tmp_path_factory.mktemp("model") / "m")


def _save(path: Path, scale: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    gm = np.ascontiguousarray(mni_gm_on_grid()[::2, ::2, ::2]) * scale
    nib.save(nib.Nifti1Image(gm.astype(np.float32), np.array(GRID3_AFFINE)), path)
    return path


def _make_bids(root: Path) -> dict[tuple[str, str | None], Path]:
    """A raw BIDS dataset with CAT12 output under derivatives/cat12 (mwp1 plus files to ignore)."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0", "DatasetDOI": "doi:10.1/x"}))
    (root / "participants.tsv").write_text("participant_id\tage\nsub-01\t30\nsub-02\t60\n")
    maps = {}
    for i, (sub, ses) in enumerate(SCANS):
        ent = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
        anat = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        (anat / f"{ent}_T1w.nii.gz").write_bytes(b"")  # raw T1s are not read for a grey-matter model
        cat = root / "derivatives" / "cat12" / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "mri"
        maps[(sub, ses)] = _save(cat / f"mwp1{ent}_T1w.nii.gz", 1.0 - 0.05 * i)
        _save(cat / f"s6mwp1{ent}_T1w.nii.gz", 0.5)  # smoothed: must be skipped
        _save(cat / f"wm{ent}_T1w.nii.gz", 0.3)  # bias-corrected T1: must be skipped
    return maps


def _run(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _bids(bids, out, model_dir, *args):
    return _run("bids", bids, out, *args, "--model", model_dir, "--device", "cpu", "--workers", "0", "-q")


def test_output_names_and_labels():
    rec = InputRecord("/d/cat12/sub-01/ses-pre/mri/mwp1sub-01_ses-pre_acq-mprage_run-2_T1w.nii", "01", "pre", "2", "mprage")
    feats, side = output_paths("/o", rec, "anatclglobal")
    assert feats.as_posix() == "/o/sub-01/ses-pre/anat/sub-01_ses-pre_acq-mprage_run-2_desc-anatclglobal_features.parquet"
    assert side.name == "sub-01_ses-pre_acq-mprage_run-2_desc-anatclglobal_features.json"
    # deepmriprep / fMRIPrep-style names: the source's desc is replaced by ours, the session comes from the folder
    rec = InputRecord("/d/dmp/sub-7/ses-b/anat/sub-7_space-IXI549Space_desc-gm_probseg.nii.gz", "7", "b")
    assert output_paths("/o", rec, "x")[0].name == "sub-7_ses-b_space-IXI549Space_desc-x_features.parquet"
    assert normalise_labels(["sub-01", "02,sub-03", "01"], "sub") == ["01", "02", "03"]
    assert normalise_labels(None, "ses") is None
    with pytest.raises(ConfigError, match="not a BIDS sub label"):
        normalise_labels(["sub-0_1"], "sub")


@pytest.mark.slow
def test_participant_runs_then_group_equal_embed(model_dir, tmp_path):
    bids = tmp_path / "ds"
    maps = _make_bids(bids)
    out = bids / "derivatives" / "anatcl"
    # one job per subject, as in a SLURM array; labels with and without sub-
    assert _bids(bids, out, model_dir, "participant", "--participant-label", "sub-01") == (0, "", "")
    assert sorted(p.name for p in out.glob("sub-*")) == ["sub-01"]
    code, _, stderr = _bids(bids, out, model_dir, "participant", "--participant_label", "02")
    assert code == 0, stderr

    from bids import BIDSLayout

    layout = BIDSLayout(out, validate=False)
    found = layout.get(suffix="features", extension=".parquet")
    got = sorted((f.entities["subject"], f.entities.get("session"), f.entities["desc"]) for f in found)
    assert got == [("01", None, "testmodel"), ("02", "1", "testmodel"), ("02", "2", "testmodel")]
    assert all(Path(f.path).parent.name == "anat" for f in found)
    assert len(layout.get(suffix="features", extension=".json")) == 3
    assert not list(out.rglob("*s6mwp1*")) and not list(out.glob("sub-*/log"))

    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"]
    assert desc["GeneratedBy"][0]["Name"] == "anatcl-infer" and desc["GeneratedBy"][0]["Version"] == __version__
    assert desc["GeneratedBy"][0]["CodeURL"].startswith("https://")
    assert desc["SourceDatasets"] == [{"URL": bids.resolve().as_uri(), "DOI": "doi:10.1/x"}]
    assert BIDSLayout(out, is_derivative=True, validate=False).description["Name"]

    side = json.loads((out / "sub-02" / "ses-2" / "anat" / "sub-02_ses-2_desc-testmodel_features.json").read_text())
    src = maps[("02", "2")]
    assert side["SourceFile"] == str(src.resolve())
    assert side["SourceSHA256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert side["Sources"] == ["bids:raw:derivatives/cat12/sub-02/ses-2/mri/mwp1sub-02_ses-2_T1w.nii.gz"]
    assert side["Model"]["Name"] == "test-model" and side["Model"]["Folds"] == [0]
    assert len(side["Model"]["WeightsSHA256"][0]) == 64 and side["PackageVersion"] == __version__
    assert side["Preprocessing"]["grid_shape"] == [61, 73, 61]

    code, stdout, stderr = _bids(bids, out, model_dir, "group")
    assert code == 0, stderr
    group = out / "desc-testmodel_features.parquet"
    assert stdout.strip() == str(group)
    assert layout.get(suffix="features", extension=".parquet", subject="01")  # pybids still parses the tree

    embedded = tmp_path / "embed.parquet"
    code, _, stderr = _run("embed", *sorted(maps.values()), "--out", embedded, "--model", model_dir,
                           "--device", "cpu", "--workers", "0", "-q", "--batch-size", "3")
    assert code == 0, stderr
    a, b = pq.read_table(group), pq.read_table(embedded)
    assert a.column_names == b.column_names and a.num_rows == 3
    assert a.replace_schema_metadata(None).equals(b.replace_schema_metadata(None))
    ma, mb = (json.loads(t.schema.metadata[METADATA_KEY]) for t in (a, b))
    assert (ma["model"], ma["preprocess"]) == (mb["model"], mb["preprocess"])
    assert a.column("session").to_pylist() == [None, "1", "2"]


@pytest.mark.slow
def test_resume_skips_done_scans_and_redoes_changed_ones(model_dir, tmp_path):
    bids = tmp_path / "ds"
    maps = _make_bids(bids)
    out = tmp_path / "out"
    assert _bids(bids, out, model_dir, "participant")[0] == 0
    files = sorted(out.rglob("*_features.parquet"))
    assert len(files) == 3
    before = {f: f.stat().st_mtime_ns for f in files}
    code, _, stderr = _bids(bids, out, model_dir, "participant")
    assert code == 2 and "--resume" in stderr and "Traceback" not in stderr
    assert _bids(bids, out, model_dir, "participant", "--resume")[0] == 0
    assert {f: f.stat().st_mtime_ns for f in files} == before  # nothing re-embedded
    _save(maps[("02", "1")], 0.7)  # the map changed since: only it is embedded again
    assert _bids(bids, out, model_dir, "participant", "--resume")[0] == 0
    changed = [f for f in files if f.stat().st_mtime_ns != before[f]]
    assert [f.name for f in changed] == ["sub-02_ses-1_desc-testmodel_features.parquet"]
    side = json.loads(changed[0].with_suffix(".json").read_text())
    assert side["SourceSHA256"] == hashlib.sha256(maps[("02", "1")].read_bytes()).hexdigest()
    # other weights under the same name: --resume refuses instead of mixing models
    torch.manual_seed(5)
    other = save_pretrained(AnatCL(ModelConfig(name="test-model", source="unit-test", fold=0, preprocess=PREP3)), tmp_path / "other")
    code, _, stderr = _bids(bids, out, other, "participant", "--resume")
    assert code == 2 and "another model" in stderr


@pytest.mark.slow
def test_filters_and_clear_errors(model_dir, tmp_path):
    bids = tmp_path / "ds"
    _make_bids(bids)
    out = tmp_path / "out"
    assert _bids(bids, out, model_dir, "participant", "--session-label", "ses-2")[0] == 0
    assert [p.relative_to(out).as_posix() for p in sorted(out.rglob("*_features.parquet"))] == [
        "sub-02/ses-2/anat/sub-02_ses-2_desc-testmodel_features.parquet"]
    code, _, stderr = _bids(bids, out, model_dir, "participant", "--participant-label", "03")
    assert code == 2 and "sub-03" in stderr and "found: sub-01, sub-02" in stderr
    code, _, stderr = _bids(bids, out, model_dir, "participant", "--participant-label", "01", "02")
    assert code == 2 and "--participant-label 01,02" in stderr
    code, _, stderr = _bids(tmp_path, out, model_dir, "participant")
    assert code == 2 and "dataset_description.json" in stderr
    code, _, stderr = _bids(bids, bids, model_dir, "participant")
    assert code == 2 and "OUTPUT_DIR" in stderr
    code, _, stderr = _run("bids", bids, tmp_path / "empty", "group")
    assert code == 2 and "participant level first" in stderr
    code, _, _ = _run("bids", bids, out, "everything")
    assert code == 2
    # two preprocessing outputs of one scan (CAT12 and deepmriprep) would write the same file: refused up front
    _save(bids / "derivatives" / "deepmriprep" / "sub-01" / "anat" / "sub-01_desc-gm_T1w.nii.gz", 1.0)
    code, _, stderr = _bids(bids, out, model_dir, "participant", "--participant-label", "01")
    assert code == 2 and "--derivatives" in stderr and "sub-01_desc-testmodel_features.parquet" in stderr
    assert _bids(bids, out, model_dir, "participant", "--participant-label", "01",
                 "--derivatives", bids / "derivatives" / "deepmriprep")[0] == 0
    side = json.loads((out / "sub-01" / "anat" / "sub-01_desc-testmodel_features.json").read_text())
    assert side["Sources"] == ["bids:maps:sub-01/anat/sub-01_desc-gm_T1w.nii.gz"]


def test_a_broken_map_costs_only_itself(model_dir, tmp_path):
    bids = tmp_path / "ds"
    maps = _make_bids(bids)
    broken = maps[("02", "2")]
    broken.write_bytes(broken.read_bytes()[:200])
    out = tmp_path / "out"
    code, _, stderr = _bids(bids, out, model_dir, "participant", "--participant-label", "02")
    assert code == 1 and "1 scans failed" in stderr
    assert [p.name for p in out.rglob("*_features.parquet")] == ["sub-02_ses-1_desc-testmodel_features.parquet"]
    errors = out / "sub-02" / "log" / "sub-02_desc-testmodel_errors.csv"
    assert str(errors) in stderr and str(broken.resolve()) in errors.read_text()
    assert not list(out.rglob("*_work*"))


def test_dataset_description_is_idempotent_and_never_clobbers_a_dataset(tmp_path):
    bids = tmp_path / "ds"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "raw", "BIDSVersion": "1.9.0"}))
    out = tmp_path / "out"
    path = write_dataset_description(out, bids)
    first = path.read_bytes()
    stat = path.stat()
    write_dataset_description(out, bids)  # a second participant job: same bytes, file untouched
    assert path.read_bytes() == first and path.stat().st_mtime_ns == stat.st_mtime_ns
    desc = json.loads(first)
    assert {"Name", "BIDSVersion", "DatasetType", "GeneratedBy", "SourceDatasets"} <= set(desc)
    with pytest.raises(ConfigError, match="not written by anatcl-infer"):
        write_dataset_description(bids, bids)
    assert json.loads((bids / "dataset_description.json").read_text()) == {"Name": "raw", "BIDSVersion": "1.9.0"}


@pytest.mark.parametrize("content", ["[1, 2]", "{not json", ""])
def test_dataset_description_survives_an_odd_source_description(tmp_path, content):
    """A source description that is not a JSON object names the output after the folder, not a traceback."""
    bids = tmp_path / "ds"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(content)
    desc = json.loads(write_dataset_description(tmp_path / "out", bids).read_text())
    assert desc["Name"] == "AnatCL features of ds" and desc["SourceDatasets"] == [{"URL": bids.resolve().as_uri()}]
    assert desc["DatasetLinks"] == {"raw": bids.resolve().as_uri()}


def test_participant_run_hashes_the_weights_once_not_per_subject(model_dir, tmp_path, monkeypatch):
    """Two subjects, two embed jobs: the weights' SHA-256 (for the sidecars and the tables) is computed once."""
    import sys

    from anatcl_infer.jobs import embed
    from anatcl_infer.jobs.bids import run_participant
    from anatcl_infer.weights.loading import load_model

    bids = tmp_path / "ds"
    _make_bids(bids)
    model = load_model(model_dir)
    hashed = []
    real = type(model).state_dict

    def counting(self, *args, **kwargs):
        if sys._getframe(1).f_code.co_name == "weights_sha256":
            hashed.append(id(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "state_dict", counting)
    summary = run_participant(bids, bids / "derivatives" / "anatcl", [model], device="cpu", num_workers=0, progress=False)
    assert not summary.failures and len(summary.written) == len(SCANS)
    assert hashed == [id(model)]
    # outside a participant run nothing is remembered: changed weights get a new digest
    before = embed.weights_sha256(model)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert embed.weights_sha256(model) != before
