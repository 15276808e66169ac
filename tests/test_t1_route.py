"""The raw-T1 route of T1 models, run for real: deepbet and SimpleITK on real anatomy.

Inputs: nilearn's skull-stripped MNI152 T1 displaced by a 10 degree rotation and an
(8, -12, 5) mm shift (stored at 2 mm to keep the suite quick), and a whole head with skull
built around it (tests/synthetic_head.py). Tests that need the ``[prep]`` tools skip only
when they cannot be imported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from anatomy import REF_AFFINE, mni_t1_1mm, mni_t1_on_grid, save_nifti
from synthetic_head import mni_head

from anatcl_infer.config import REFERENCE_SHAPE, ModelConfig, PreprocessConfig
from anatcl_infer.errors import ConfigError, InputError, InputFailureWarning, MissingDependencyError
from anatcl_infer.inputs import t1_route
from anatcl_infer.inputs.registration import normalised_cross_correlation
from anatcl_infer.inputs.t1_route import T1Route, as_t1_route, looks_skull_stripped, prep_names, prepare_t1


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


needs_sitk = pytest.mark.skipif(not _has("SimpleITK"), reason="SimpleITK ([prep] extra) not installed")
needs_deepbet = pytest.mark.skipif(not _has("deepbet"), reason="deepbet ([prep] extra) not installed")

T1_SPEC = PreprocessConfig(input_kind="t1")
GRID3_AFFINE = ((-3.0, 0, 0, 90.0), (0, 3.0, 0, -126.0), (0, 0, 3.0, -72.0), (0, 0, 0, 1))
T1_SPEC3 = PreprocessConfig(
    input_kind="t1", intensity="robust", grid_shape=(61, 73, 61), grid_affine=GRID3_AFFINE, crop=((0, 61), (4, 68), (0, 61))
)


def _displacement(degrees: float = 10.0, shift: tuple[float, float, float] = (8.0, -12.0, 5.0)) -> np.ndarray:
    """A rigid world motion: ``degrees`` about an oblique axis, then ``shift`` mm."""
    axis = np.array([1.0, 0.6, 0.3]) / np.linalg.norm([1.0, 0.6, 0.3])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    th = np.deg2rad(degrees)
    out = np.eye(4)
    out[:3, :3] = np.eye(3) + np.sin(th) * k + (1 - np.cos(th)) * (k @ k)  # Rodrigues
    out[:3, 3] = shift
    return out


def _brain_2mm() -> tuple[np.ndarray, np.ndarray]:
    data, affine = mni_t1_1mm()
    affine = affine.copy()
    affine[:3, :3] *= 2.0
    return np.ascontiguousarray(data[::2, ::2, ::2]) * 800.0, affine


def _placement_rms(matrix: np.ndarray, moved: np.ndarray) -> float:
    """RMS distance (mm) between where the registration puts the MNI brain and where it was moved to."""
    data, affine = mni_t1_1mm()
    ijk = np.argwhere(data > 0.2)[::20].T  # nilearn's brain mask, every 20th voxel
    points = np.vstack([affine[:3, :3] @ ijk + affine[:3, 3:4], np.ones(ijk.shape[1])])
    return float(np.sqrt((((matrix @ points) - (moved @ points))[:3] ** 2).sum(axis=0).mean()))


@pytest.fixture(scope="module")
def displaced(tmp_path_factory):
    """nilearn's MNI152 brain, moved by 10 degrees and (8, -12, 5) mm, at 2 mm: ``(path, motion)``."""
    data, affine = _brain_2mm()
    motion = _displacement()
    path = save_nifti(tmp_path_factory.mktemp("native") / "sub-01_T1w.nii.gz", data.astype(np.float32), motion @ affine)
    return path, motion


@pytest.fixture(scope="module")
def registered(displaced, tmp_path_factory):
    """The displaced brain through the T1 route onto the reference grid (auto skull-strip decision)."""
    prep = tmp_path_factory.mktemp("prep")
    out, side = prepare_t1(displaced[0], spec=T1_SPEC, prep_dir=prep)
    return out, side, prep


# --- registration ----------------------------------------------------------------------------------


@needs_sitk
@pytest.mark.slow
def test_a_displaced_brain_is_registered_back_within_2_mm(displaced, registered):
    path, motion = displaced
    out, side, prep = registered
    assert out == prep / "sub-01_T1w_space-MNI152aff_T1w.nii.gz"
    # already skull-stripped: detected, not stripped again, and said why
    assert side["skull_strip"]["decision"] == "auto" and side["skull_strip"]["done"] is False
    assert side["skull_strip"]["reason"].startswith("already skull-stripped")
    assert [s["tool"] for s in side["steps"]] == ["SimpleITK"]
    # similar to the template, and the brain is where it was moved to
    assert side["registration_ncc"] >= 0.98
    matrix = np.asarray(side["steps"][-1]["transform_matrix_ras"])
    assert _placement_rms(np.eye(4), motion) > 15.0  # the motion is large ...
    assert _placement_rms(matrix, motion) <= 2.0  # ... and recovered
    # independently of the package's own measure: the result on the grid against nilearn's T1 there
    img = nib.load(str(out))
    assert img.shape == REFERENCE_SHAPE and np.allclose(img.affine, REF_AFFINE)
    assert normalised_cross_correlation(np.asarray(img.dataobj), mni_t1_on_grid()) > 0.97
    # the sidecar on disk: source hash, tools, grid
    on_disk = json.loads(out.with_name("sub-01_T1w_space-MNI152aff_T1w.json").read_text())
    assert on_disk == side
    assert side["source_sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert side["tool_versions"]["SimpleITK"] and side["grid"]["shape"] == list(REFERENCE_SHAPE)
    assert side["route"] == "t1_to_mni" and side["min_ncc"] == 0.7
    assert sorted(p.name for p in prep.iterdir()) == sorted([out.name, "sub-01_T1w_space-MNI152aff_T1w.json"])


class _Called(Exception):
    pass


@needs_sitk
@pytest.mark.slow
def test_registered_images_are_reused_while_the_source_is_unchanged(displaced, registered, tmp_path, monkeypatch, caplog):
    out, side, prep = registered

    def no_registration(*args, **kwargs):
        raise _Called

    monkeypatch.setattr(t1_route, "register_volume", no_registration)
    again, side2 = prepare_t1(displaced[0], spec=T1_SPEC, prep_dir=prep)
    assert (again, side2) == (out, side)  # reused: not registered again
    with pytest.raises(_Called):  # resume=False makes it again
        prepare_t1(displaced[0], spec=T1_SPEC, prep_dir=prep, resume=False)
    with pytest.raises(_Called):  # another grid
        prepare_t1(displaced[0], spec=T1_SPEC3, prep_dir=prep)
    # skull-stripping turned off explicitly: the same as the recorded decision, so reused;
    # turned on: not what was made, so made again (deepbet first)
    assert prepare_t1(displaced[0], spec=T1_SPEC, prep_dir=prep, skull_strip=False)[0] == out
    monkeypatch.setattr(t1_route, "_strip", no_registration)
    with pytest.raises(_Called):
        prepare_t1(displaced[0], spec=T1_SPEC, prep_dir=prep, skull_strip=True)
    # the same name, other content: the SHA-256 differs, so it is registered again
    changed = tmp_path / "sub-01_T1w.nii.gz"
    data = np.asarray(nib.load(displaced[0]).dataobj) * 1.01
    save_nifti(changed, data.astype(np.float32), nib.load(displaced[0]).affine)
    with caplog.at_level(logging.INFO, logger="anatcl_infer"), pytest.raises(_Called):
        prepare_t1(changed, spec=T1_SPEC, prep_dir=prep)
    assert "the source changed" in caplog.text
    # a higher similarity floor than the recorded similarity fails the input, from the sidecar alone
    with pytest.raises(InputError, match="NCC 0.9[0-9]+ < 0.999") as info:
        prepare_t1(displaced[0], spec=T1_SPEC, prep_dir=prep, min_ncc=0.999)
    assert info.value.stage == "register"


# --- skull-stripping (deepbet) ---------------------------------------------------------------------


@needs_sitk
@needs_deepbet
@pytest.mark.slow
def test_deepbet_strips_a_head_with_skull_and_the_brain_is_registered(tmp_path, monkeypatch, caplog):
    head, brain_mask, affine = mni_head(2)
    motion = _displacement(6.0, (4.0, 6.0, -3.0))
    src = save_nifti(tmp_path / "sub-02_T1w.nii.gz", (head * 1000.0).astype(np.float32), motion @ affine)
    masks = []
    real_strip = t1_route._strip

    def spy(*args, **kwargs):
        brain, mask, info = real_strip(*args, **kwargs)
        masks.append(mask)
        return brain, mask, info

    monkeypatch.setattr(t1_route, "_strip", spy)
    with caplog.at_level(logging.INFO, logger="anatcl_infer"):
        out, side = prepare_t1(src, spec=T1_SPEC, prep_dir=tmp_path / "prep")
    # auto: a head is not skull-stripped, so deepbet ran; the log and the sidecar say so
    assert side["skull_strip"]["done"] is True and side["skull_strip"]["decision"] == "auto"
    assert side["skull_strip"]["reason"].startswith("not skull-stripped")
    assert "deepbet skull-stripping (auto: not skull-stripped" in caplog.text
    assert [s["tool"] for s in side["steps"]] == ["deepbet", "SimpleITK"]
    assert side["tool_versions"]["deepbet"] and 1500 < side["steps"][0]["brain_volume_ml"] < 2300
    # deepbet's brain mask against nilearn's brain mask (the truth, by construction)
    (mask,) = masks
    assert mask.shape == brain_mask.shape
    dice = 2.0 * np.count_nonzero(mask & brain_mask) / (np.count_nonzero(mask) + np.count_nonzero(brain_mask))
    assert dice >= 0.90, dice
    # and the stripped brain lands on MNI152
    assert side["registration_ncc"] >= 0.95
    matrix = np.asarray(side["steps"][-1]["transform_matrix_ras"])
    assert _placement_rms(matrix, motion) <= 2.0


# --- failures and the encode path ------------------------------------------------------------------


@needs_sitk
@pytest.mark.slow
def test_encode_from_t1_embeds_registered_t1s_and_a_failed_registration_is_that_inputs_failure(displaced, tmp_path):
    from anatcl_infer.model.network import AnatCL

    noise = np.random.default_rng(0).random((48, 56, 48)).astype(np.float32) * 800.0
    bad = save_nifti(tmp_path / "sub-03_T1w.nii.gz", noise, np.diag([4.0, 4.0, 4.0, 1.0]) @ np.eye(4))
    torch.manual_seed(0)
    model = AnatCL(ModelConfig(name="t1-test", source="unit-test", fold=0, preprocess=T1_SPEC3)).eval()
    prep = tmp_path / "prep"
    route = T1Route(prep_dir=str(prep), skull_strip=False, iterations=60)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        feats = model.encode([displaced[0], bad], from_t1=route, on_error="warn", num_workers=0, progress=False)
    assert feats.shape == (2, 512)
    assert np.isfinite(feats[0]).all() and np.isnan(feats[1]).all()
    (failure,) = [w for w in caught if issubclass(w.category, InputFailureWarning)]
    text = str(failure.message)
    assert "sub-03_T1w.nii.gz (register)" in text and "similarity to the template NCC" in text and "< 0.7" in text
    # the failed input left nothing in prep_dir; the good one is there, on the model's grid
    assert sorted(p.name for p in prep.iterdir()) == ["sub-01_T1w_space-MNI152aff_T1w.json", "sub-01_T1w_space-MNI152aff_T1w.nii.gz"]
    assert nib.load(str(prep / "sub-01_T1w_space-MNI152aff_T1w.nii.gz")).shape == (61, 73, 61)
    # the same features from the registered image embedded directly: the route adds nothing else
    direct = model.encode([str(prep / "sub-01_T1w_space-MNI152aff_T1w.nii.gz")], num_workers=0, progress=False)
    np.testing.assert_allclose(feats[:1], direct, rtol=1e-5, atol=1e-6)
    # with on_error="raise" the failure names the input, its stage and the reason
    with pytest.raises(InputError, match=r"\(register\): affine registration to MNI152 failed: similarity"):
        model.encode([bad], from_t1=route, num_workers=0, progress=False)


def test_a_missing_route_tool_fails_once_before_any_input(tmp_path, monkeypatch):
    import sys

    from anatcl_infer.model.network import AnatCL

    model = AnatCL(ModelConfig(name="t1-test", source="unit-test", fold=0, preprocess=T1_SPEC3)).eval()
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    with pytest.raises(MissingDependencyError, match=r'anatcl-infer\[prep\]'):
        model.encode([tmp_path / "missing.nii.gz"], from_t1=True, num_workers=0, progress=False)
    # the grey-matter route, offline: deepmriprep's weights are missing, said once, with how to get them
    gm = AnatCL(ModelConfig(name="gm-test", source="unit-test", fold=0, preprocess=PreprocessConfig())).eval()
    monkeypatch.setitem(sys.modules, "deepmriprep", None)
    with pytest.raises(MissingDependencyError, match="deepmriprep"):
        gm.encode([tmp_path / "missing.nii.gz"], from_t1=True, num_workers=0, progress=False)


# --- small parts, no tools needed ------------------------------------------------------------------


def test_the_obvious_skull_stripped_case_is_detected():
    brain, affine = _brain_2mm()
    stripped, reason = looks_skull_stripped(brain, affine)
    assert stripped and "1.89 l" in reason
    head, _, head_affine = mni_head(2)
    stripped, reason = looks_skull_stripped(head, head_affine)
    assert not stripped and "background" in reason  # noise everywhere: no masked background
    zeroed = np.where(head > 0.1, head, 0.0)  # a head whose background was zeroed: still too large for a brain
    stripped, reason = looks_skull_stripped(zeroed, head_affine)
    assert not stripped and "a brain: 0.4-2.6 l" in reason
    z_scored = (brain - brain.mean()) / brain.std()  # a masked background at a negative constant counts too
    assert looks_skull_stripped(z_scored, affine)[0]


def test_prep_names_are_unique_and_stable():
    names = prep_names(["a/sub-01_T1w.nii.gz", "b/sub-01_T1w.nii.gz", "c/sub 02 (copy).nii", ("array", None)])
    assert names[0] != names[1] and names[0].startswith("sub-01_T1w_") and len(names[0]) == len("sub-01_T1w_") + 8
    assert names == prep_names(["a/sub-01_T1w.nii.gz", "b/sub-01_T1w.nii.gz", "c/sub 02 (copy).nii", ("array", None)])
    assert names[2] == "sub_02_copy_" and names[3] is None


def test_route_options_are_checked():
    assert as_t1_route(False) is None and as_t1_route(True) == T1Route()
    for bad in ({"min_ncc": 2.0}, {"iterations": 0}, {"seed": 0}, {"skull_strip": "auto"}, {"threads": 0}):
        with pytest.raises(ConfigError):
            T1Route(**bad)
    with pytest.raises(ConfigError, match="from_t1"):
        as_t1_route("yes")
    with pytest.raises(TypeError, match="unexpected"):
        prepare_t1("x.nii.gz", spec=T1_SPEC, colour="red")


def test_arrays_without_a_header_are_refused_by_the_t1_route():
    with pytest.raises(InputError, match="NIfTI paths or nibabel images"):
        prepare_t1(np.zeros((4, 4, 4)), spec=T1_SPEC)


# --- QC --------------------------------------------------------------------------------------------


def test_a_low_registration_similarity_is_flagged():
    from anatcl_infer.qc.metrics import add_qc_flags, outlier_reasons

    rows = [{"qc_registration_ncc": v} for v in (0.95, 0.94, 0.96, 0.95, 0.95, 0.75, 0.86)]
    reasons = outlier_reasons(rows, expected_kind=None)
    assert reasons[:5] == [""] * 5
    assert reasons[5] == "registration to MNI152: NCC 0.750 < 0.8"
    assert reasons[6].startswith("registration to MNI152: NCC 0.860 (robust z")  # fine alone, odd in its cohort
    assert outlier_reasons([{"qc_template_corr": 0.9}], expected_kind=None) == [""]  # no route column: no rule
    import pyarrow as pa

    table = add_qc_flags(pa.table({"qc_registration_ncc": [0.9, 0.6]}), expected_kind="t1")
    assert table.column("qc_flag").to_pylist() == [False, True]


@needs_sitk
@pytest.mark.slow
def test_qc_shows_the_registered_image_and_its_similarity(displaced, registered, tmp_path):
    pytest.importorskip("matplotlib")
    import csv
    import shutil

    from anatcl_infer.qc.report import build_qc_report

    out, side, prep = registered
    # a second registered image whose sidecar records a doubtful registration
    low = tmp_path / "sub-09_T1w_space-MNI152aff_T1w.nii.gz"
    shutil.copyfile(out, low)
    low.with_name("sub-09_T1w_space-MNI152aff_T1w.json").write_text(json.dumps({**side, "registration_ncc": 0.75}))
    report = build_qc_report([str(out), str(low)], tmp_path / "qc", config=T1_SPEC)
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(report.metrics_csv))}
    good, bad = rows[out.name], rows[low.name]
    assert float(good["qc_registration_ncc"]) >= 0.98 and good["qc_flag"] == "false"
    assert good["qc_skull_strip"] == "none (auto: already skull-stripped)"
    assert bad["qc_flag"] == "true" and "registration to MNI152: NCC 0.750 < 0.8" in bad["qc_reasons"]
    page = report.index.read_text()
    assert "<th>registration NCC</th>" in page and '<td class="r">0.75</td>' in page
    assert (report.out_dir / good["image"]).stat().st_size > 10_000
    # straight from the raw T1 (the route's result in prep_dir is reused), the same columns
    route_report = build_qc_report([displaced[0]], tmp_path / "qc2", config=T1_SPEC, from_t1=T1Route(prep_dir=str(prep)))
    (item,) = route_report.items
    assert item.ok and item.path == displaced[0] and item.metrics["qc_registration_ncc"] == side["registration_ncc"]
    assert item.metrics["qc_prep_output"] == str(out)


def test_in_memory_images_are_registered_but_never_written_or_reused(tmp_path, monkeypatch):
    """The route's bookkeeping around the registration (a stand-in here; the real one is tested above)."""
    from anatcl_infer.inputs.registration import Registration

    calls = []

    def fake_register(data, affine, *, grid_shape, grid_affine, threads, path, **kwargs):
        calls.append((path, threads))
        return Registration(np.ones(grid_shape, np.float32), np.asarray(grid_affine), 0.93, np.eye(4), {"seed": kwargs["seed"]})

    monkeypatch.setattr(t1_route, "register_volume", fake_register)
    brain, affine = _brain_2mm()
    img = nib.Nifti1Image(brain.astype(np.float32), affine)
    made, side = prepare_t1(img, spec=T1_SPEC3, prep_dir=tmp_path / "prep")
    assert isinstance(made, nib.Nifti1Image) and made.shape == (61, 73, 61) and side["output"] is None
    assert side["source_sha256"] is None and side["registration_ncc"] == 0.93
    assert not list((tmp_path / "prep").iterdir())  # nothing written: an in-memory image has no name of its own
    # a path input is written under a name that stays inside prep_dir, whatever name is asked for
    src = save_nifti(tmp_path / "sub-05_T1w.nii.gz", brain.astype(np.float32), affine)
    out, _ = prepare_t1(src, spec=T1_SPEC3, prep_dir=tmp_path / "prep", name="../../escape")
    assert out.parent == tmp_path / "prep" and out.name == ".._.._escape_space-MNI152aff_T1w.nii.gz"
    assert calls[0][1] is None  # in the main process ITK keeps its own thread count


@needs_sitk
@pytest.mark.slow
def test_anatcl_embed_from_t1_follows_a_t1_model_and_keeps_its_registered_images(displaced, tmp_path):
    """`anatcl embed native/ --from-t1 --model <T1 model>`: the T1 route (not deepmriprep), offline,
    registered images in --prep-dir with sidecars, reused by --resume."""
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from anatcl_infer.cli import app
    from anatcl_infer.model.network import AnatCL
    from anatcl_infer.weights.checkpoint import save_pretrained

    torch.manual_seed(0)
    mdir = save_pretrained(AnatCL(ModelConfig(name="t1-cli", source="unit-test", fold=0, preprocess=T1_SPEC3)), tmp_path / "t1m")
    native = tmp_path / "native"
    native.mkdir()
    (native / "sub-01_T1w.nii.gz").write_bytes(Path(displaced[0]).read_bytes())
    args = ["embed", str(native), "--from-t1", "--model", str(mdir), "--out", str(tmp_path / "feats.parquet"),
            "--prep-dir", str(tmp_path / "prep"), "--skull-strip", "no", "--device", "cpu", "--workers", "0", "-q"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "deepmriprep" not in res.output
    prep = sorted(p.name for p in (tmp_path / "prep").iterdir())
    assert prep == ["sub-01_T1w_space-MNI152aff_T1w.json", "sub-01_T1w_space-MNI152aff_T1w.nii.gz"]
    side = json.loads((tmp_path / "prep" / prep[0]).read_text())
    assert side["registration_ncc"] >= 0.98 and side["route"] == "t1_to_mni"
    table = pq.read_table(tmp_path / "feats.parquet").to_pandas()
    assert len(table) == 1 and table["path"].iloc[0].endswith("sub-01_T1w.nii.gz")
    assert table["qc_registration_ncc"].iloc[0] >= 0.98
    meta = json.loads(pq.read_schema(tmp_path / "feats.parquet").metadata[b"anatcl_infer"])
    assert meta["t1_route"]["skull_strip"] is False
    before = (tmp_path / "prep" / prep[1]).stat().st_mtime_ns
    res = CliRunner().invoke(app, [*args, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "prep" / prep[1]).stat().st_mtime_ns == before  # reused, not registered again
