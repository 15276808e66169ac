"""The raw-T1 routes ([prep] extra): what runs offline is run; what cannot says what is missing."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from anatomy import (
    BOX113_AFFINE,
    BOX113_OFFSET,
    BOX113_SHAPE,
    REF_AFFINE,
    mni_gm_on_grid,
    mni_t1_1mm,
    mni_t1_on_grid,
    save_nifti,
)

from anatcl_infer.inputs import raw_t1 as prep
from anatcl_infer.config import REFERENCE_SHAPE
from anatcl_infer.errors import InputError, MissingDependencyError, OfflineError


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


needs_sitk = pytest.mark.skipif(not _has("SimpleITK"), reason="SimpleITK ([prep] extra) not installed")
needs_deepbet = pytest.mark.skipif(not _has("deepbet"), reason="deepbet ([prep] extra) not installed")
needs_deepmriprep = pytest.mark.skipif(not _has("deepmriprep"), reason="deepmriprep ([prep] extra) not installed")


def _rotation(deg: float, shift: tuple[float, float, float]) -> np.ndarray:
    th = np.deg2rad(deg)
    rot = np.eye(4)
    rot[:3, :3] = [[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]]
    rot[:3, 3] = shift
    return rot


@pytest.fixture(scope="module")
def scanner_t1(tmp_path_factory):
    """The MNI T1 at 2 mm, stored P->A flipped, rotated 10 degrees and shifted: a T1 in 'scanner space'."""
    data, affine = mni_t1_1mm()
    data = np.ascontiguousarray(data[::2, ::-2, ::2]) * 1000.0
    aff = affine.copy()
    aff[:3, :3] = aff[:3, :3] * 2.0
    aff[:3, 1] *= -1.0  # axis 1 now runs anterior -> posterior
    aff[:3, 3] = affine[:3, :3] @ np.array([0.0, (data.shape[1] - 1) * 2.0, 0.0]) + affine[:3, 3]
    aff = _rotation(10.0, (6.0, -8.0, 5.0)) @ aff
    root = tmp_path_factory.mktemp("t1")
    return save_nifti(root / "sub-01_T1w.nii.gz", data.astype(np.float32), aff), data, aff


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@needs_sitk
@pytest.mark.slow
def test_affine_registration_brings_a_moved_t1_back_onto_mni(scanner_t1, tmp_path):
    import nibabel as nib

    from anatcl_infer.config import REFERENCE_AFFINE
    from anatcl_infer.inputs.conform import conform_to_grid

    path, data, aff = scanner_t1
    out, info = prep.register_to_mni(path, tmp_path / "reg.nii.gz", threads=1)
    img = nib.load(str(out))
    assert img.shape == REFERENCE_SHAPE
    np.testing.assert_allclose(img.affine, REF_AFFINE)
    reference = mni_t1_on_grid()
    registered = _corr(np.asarray(img.get_fdata()), reference)
    unregistered = _corr(conform_to_grid(data, aff, REFERENCE_SHAPE, REFERENCE_AFFINE)[0], reference)
    assert unregistered < 0.9
    assert registered > 0.98
    # the 10-degree rotation about z is recovered (first row of the 3x3 matrix: cos, -sin... up to direction)
    matrix = np.asarray(info["transform_parameters"][:9]).reshape(3, 3)
    assert abs(abs(matrix[0, 1]) - np.sin(np.deg2rad(10))) < 0.02
    assert "MNI152" in info["template"] and info["simpleitk_version"]
    # reproducible with one thread: the metric sampling is seeded
    _, info2 = prep.register_to_mni(path, tmp_path / "reg2.nii.gz", threads=1)
    assert info2["transform_parameters"] == info["transform_parameters"]


@needs_sitk
@needs_deepbet
@pytest.mark.slow
def test_t1_to_mni_strips_a_skull_and_registers(scanner_t1, tmp_path):
    import nibabel as nib
    from scipy import ndimage

    _, data, aff = scanner_t1
    brain = data > 50
    shell = ndimage.binary_dilation(brain, iterations=6) & ~ndimage.binary_dilation(brain, iterations=3)
    with_skull = data.copy()
    with_skull[shell] = 700.0 + np.random.default_rng(0).normal(0.0, 50.0, int(shell.sum()))
    src = save_nifti(tmp_path / "sub-02_T1w.nii.gz", with_skull.astype(np.float32), aff)

    out = prep.t1_to_mni(src, tmp_path / "out")
    assert out.name == "sub-02_T1w_space-MNI152aff_T1w.nii.gz"
    result = np.asarray(nib.load(str(out)).get_fdata())
    assert _corr(result, mni_t1_on_grid()) > 0.97  # the skull is gone and the brain is on MNI
    side = json.loads(out.with_name("sub-02_T1w_space-MNI152aff_T1w.json").read_text())
    assert side["route"] == "t1_to_mni" and len(side["source_sha256"]) == 64
    assert [s["tool"] for s in side["steps"]] == ["deepbet", "SimpleITK"]
    assert side["steps"][0]["version"] and side["grid"]["shape"] == list(REFERENCE_SHAPE)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp") or p.is_dir()]


@needs_deepmriprep
def test_t1_to_gm_offline_says_what_is_missing_and_how_to_get_it(scanner_t1, tmp_path, monkeypatch):
    path = scanner_t1[0]
    monkeypatch.setattr(prep, "missing_deepmriprep_models", lambda: ["segmentation_model.pt", "warp_model.pt"])
    with pytest.raises(MissingDependencyError) as info:
        prep.t1_to_gm(path, tmp_path)
    msg = str(info.value)
    assert "segmentation_model.pt" in msg and "2 file(s) missing" in msg
    assert str(prep._deepmriprep_models_dir()) in msg
    assert "fetch_deepmriprep_models" in msg and "install_deepmriprep_models" in msg and "github.com" in msg
    assert info.value.extra == "prep"
    # allowed to download, but offline mode is on: fails at once, without touching the network
    monkeypatch.setenv("ANATCL_OFFLINE", "1")
    with pytest.raises(OfflineError, match="offline mode is on"):
        prep.t1_to_gm(path, tmp_path, allow_download=True)
    assert not list(tmp_path.glob("mwp1*"))


@needs_deepmriprep
def test_status_reports_what_is_usable():
    status = prep.prep_status()
    assert status["deepmriprep"] and isinstance(status["deepmriprep_missing_models"], list)
    assert status["t1_to_gm"] == (not status["deepmriprep_missing_models"])
    assert isinstance(status["t1_to_mni"], bool)


def _fake_deepmriprep(data: np.ndarray, affine: np.ndarray):
    def run(t1, work, device):
        return save_nifti(work / f"mwp1{prep._stem(t1)}.nii.gz", data, affine)

    return run


@needs_deepmriprep
def test_t1_to_gm_puts_deepmriprep_output_exactly_on_the_reference_grid(scanner_t1, tmp_path, monkeypatch):
    """deepmriprep itself is replaced (its weights cannot be had offline); everything around it runs."""
    import nibabel as nib

    gm = mni_gm_on_grid()
    ox, oy, oz = BOX113_OFFSET
    box = np.ascontiguousarray(gm[ox : ox + BOX113_SHAPE[0], oy : oy + BOX113_SHAPE[1], oz : oz + BOX113_SHAPE[2]])
    monkeypatch.setattr(prep, "missing_deepmriprep_models", list)
    monkeypatch.setattr(prep, "_run_deepmriprep", _fake_deepmriprep(box, BOX113_AFFINE))
    out = prep.t1_to_gm(scanner_t1[0], tmp_path)
    assert out == tmp_path / "mwp1sub-01_T1w.nii.gz"
    img = nib.load(str(out))
    np.testing.assert_allclose(img.affine, REF_AFFINE)
    result = np.asarray(img.get_fdata(dtype=np.float32))
    expected = np.zeros(REFERENCE_SHAPE, dtype=np.float32)
    expected[ox : ox + BOX113_SHAPE[0], oy : oy + BOX113_SHAPE[1], oz : oz + BOX113_SHAPE[2]] = box
    np.testing.assert_array_equal(result, expected)  # exact: zero-padding, no interpolation
    side = json.loads((tmp_path / "mwp1sub-01_T1w.json").read_text())
    assert side["route"] == "t1_to_gm"
    assert side["steps"][0]["tool"] == "deepmriprep" and side["steps"][0]["version"]
    assert "Template_4_GS" in side["steps"][0]["template"]
    assert side["steps"][1]["method"] == "reindex" and side["steps"][1]["source_grid"]["shape"] == list(BOX113_SHAPE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mwp1sub-01_T1w.json", "mwp1sub-01_T1w.nii.gz"]
    # and the result goes through the model's preprocessing as a grey-matter map, untouched
    from anatcl_infer.inputs.preprocess import prepare

    prepared = prepare(out)
    assert prepared.method == "identity" and prepared.kind.kind == "gm"


@needs_deepmriprep
def test_t1_to_gm_refuses_output_off_the_box(scanner_t1, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "missing_deepmriprep_models", list)
    shifted = BOX113_AFFINE.copy()
    shifted[:3, 3] += 0.75  # half a voxel off: would need interpolation
    box = np.ones(BOX113_SHAPE, dtype=np.float32)
    monkeypatch.setattr(prep, "_run_deepmriprep", _fake_deepmriprep(box, shifted))
    with pytest.raises(InputError, match="not on a 1.5 mm box"):
        prep.t1_to_gm(scanner_t1[0], tmp_path)

    def broken(t1, work, device):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(prep, "_run_deepmriprep", broken)
    with pytest.raises(InputError, match="deepmriprep failed: RuntimeError") as info:
        prep.t1_to_gm(scanner_t1[0], tmp_path)
    assert info.value.stage == "conform"
    assert not list(tmp_path.iterdir())  # nothing half-written


@needs_deepmriprep
def test_install_models_from_a_copied_folder(tmp_path, monkeypatch):
    target = tmp_path / "site" / "models"
    monkeypatch.setattr(prep, "_deepmriprep_models_dir", lambda: target)
    monkeypatch.setattr(prep, "_deepmriprep_model_files", lambda: ["a.pt", "b.pt"])
    source = tmp_path / "usb"
    source.mkdir()
    (source / "a.pt").write_bytes(b"A")
    with pytest.raises(InputError, match="b.pt"):
        prep.install_deepmriprep_models(source)
    (source / "b.pt").write_bytes(b"B")
    assert prep.install_deepmriprep_models(source) == target
    assert (target / "b.pt").read_bytes() == b"B" and prep.missing_deepmriprep_models() == []


def test_missing_packages_name_the_extra(tmp_path, monkeypatch):
    src = save_nifti(tmp_path / "t1.nii.gz", np.ones((8, 8, 8), dtype=np.float32))
    for module in ("deepmriprep", "deepmriprep.utils", "deepmriprep.preprocess", "SimpleITK", "deepbet", "deepbet.utils"):
        monkeypatch.setitem(sys.modules, module, None)
    for call in (
        lambda: prep.t1_to_gm(src, tmp_path),
        lambda: prep.register_to_mni(src, tmp_path / "x.nii.gz"),
        lambda: prep.skull_strip(src, tmp_path / "y.nii.gz"),
    ):
        with pytest.raises(MissingDependencyError, match=r'pip install "anatcl-infer\[prep\]"') as info:
            call()
        assert info.value.extra == "prep"
    status = prep.prep_status()
    assert status["deepmriprep"] is None and status["simpleitk"] is None
    assert status["t1_to_gm"] is False and status["t1_to_mni"] is False


def test_missing_input_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        prep.t1_to_gm(tmp_path / "nope.nii.gz", tmp_path)
