"""prepare(): from any supported input to exactly what the model receives."""

from __future__ import annotations

import gzip
import multiprocessing
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anatcl_infer.config import PreprocessConfig, REFERENCE_SHAPE
from anatcl_infer.errors import InputError, InputKindError
from anatcl_infer.inputs.io import load_volume
from anatcl_infer.inputs.preprocess import Prepared, prepare

from anatomy import (
    BOX113_AFFINE,
    BOX113_OFFSET,
    REF_AFFINE,
    mni_gm_1mm,
    mni_gm_on_grid,
    mni_gm_smoothed_on_grid,
    mni_t1_on_grid,
    save_nifti,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
CROP = (slice(None), slice(8, 136), slice(None))


@pytest.fixture(scope="module")
def gm_file(tmp_path_factory) -> str:
    return save_nifti(tmp_path_factory.mktemp("gm") / "mwp1sub-01_T1w.nii.gz", mni_gm_on_grid())


@pytest.fixture(scope="module")
def reference(gm_file) -> np.ndarray:
    return prepare(gm_file).array


def test_reference_grid_input_is_exactly_the_raw_crop(gm_file):
    data = mni_gm_on_grid()
    prepared = prepare(gm_file)
    assert isinstance(prepared, Prepared)
    assert prepared.array.shape == (1, 121, 128, 121)
    assert prepared.array.dtype == np.float32 and prepared.array.flags.c_contiguous
    np.testing.assert_array_equal(prepared.array[0], data[CROP])
    assert prepared.method == "identity"
    assert prepared.warnings == []
    assert prepared.kind.kind == "gm"
    assert prepared.source == gm_file
    assert prepared.grid is None


def test_scaled_uint8_file_is_its_stored_values_cropped():
    path = EXAMPLES / "mwp1sub-mni02_T1w.nii.gz"
    data, _ = load_volume(path)
    prepared = prepare(path)
    np.testing.assert_array_equal(prepared.array[0], data[CROP])
    assert prepared.method == "identity" and prepared.warnings == []


def test_keep_grid(gm_file):
    prepared = prepare(gm_file, keep_grid=True)
    np.testing.assert_array_equal(prepared.grid, mni_gm_on_grid())
    assert prepared.grid.shape == REFERENCE_SHAPE


@pytest.mark.parametrize(
    "ornt",
    [
        [[0, -1], [1, 1], [2, 1]],  # RAS, as nilearn/FSL write
        [[0, 1], [1, -1], [2, -1]],  # LPI
        [[2, 1], [0, -1], [1, 1]],  # axes stored z, x, y
        [[1, -1], [2, 1], [0, 1]],  # axes stored y, z, x with a flip
    ],
    ids=["RAS", "LPI", "zxy", "yzx"],
)
def test_any_storage_order_reaches_the_model_identically(tmp_path, reference, ornt):
    img = nib.Nifti1Image(mni_gm_on_grid(), REF_AFFINE).as_reoriented(np.array(ornt))
    path = save_nifti(tmp_path / "reoriented.nii.gz", np.asarray(img.dataobj), img.affine)
    prepared = prepare(path)
    assert prepared.method == "reindex"
    np.testing.assert_array_equal(prepared.array, reference)
    assert prepared.warnings == []


def test_nifti2_input(tmp_path, reference):
    path = save_nifti(tmp_path / "gm.nii", mni_gm_on_grid(), version=2)
    np.testing.assert_array_equal(prepare(path).array, reference)


def test_113_box_file_is_padded_exactly(tmp_path):
    grid = mni_gm_on_grid()
    ox, oy, oz = BOX113_OFFSET
    box = grid[ox : ox + 113, oy : oy + 137, oz : oz + 113]
    path = save_nifti(tmp_path / "mwp1sub-02.nii", box, BOX113_AFFINE)
    prepared = prepare(path, keep_grid=True)
    assert prepared.method == "reindex" and prepared.warnings == []
    expected = np.zeros(REFERENCE_SHAPE, np.float32)
    expected[ox : ox + 113, oy : oy + 137, oz : oz + 113] = box
    np.testing.assert_array_equal(prepared.grid, expected)
    np.testing.assert_array_equal(prepared.array[0], expected[CROP])


def test_1mm_input_is_resampled_close_to_the_grid_map(tmp_path, reference):
    data, affine = mni_gm_1mm()
    path = save_nifti(tmp_path / "gm_1mm.nii.gz", data, affine)
    prepared = prepare(path)
    assert prepared.method == "resample"
    assert prepared.kind.kind == "gm"
    assert np.corrcoef(prepared.array.ravel(), reference.ravel())[0, 1] > 0.99


def test_in_memory_inputs_agree(reference):
    grid = mni_gm_on_grid()
    assert prepare(grid, assume_reference_grid=True).method == "identity"
    np.testing.assert_array_equal(prepare(grid, assume_reference_grid=True).array, reference)
    np.testing.assert_array_equal(prepare((grid, REF_AFFINE)).array, reference)
    np.testing.assert_array_equal(prepare(nib.Nifti1Image(grid, REF_AFFINE)).array, reference)
    np.testing.assert_array_equal(prepare(grid[None], assume_reference_grid=True).array, reference)  # OpenBHB (1, 121, 145, 121)
    cropped = prepare(grid[CROP], assume_reference_grid=True)
    assert cropped.method == "cropped" and cropped.kind.kind == "gm"
    np.testing.assert_array_equal(cropped.array, reference)
    assert prepare(grid, assume_reference_grid=True).source.startswith("<array")


def test_npy_file_like_openbhb(tmp_path, reference):
    path = tmp_path / "sub-1_preproc-cat12vbm_desc-gm_T1w.npy"
    np.save(path, mni_gm_on_grid()[None])
    prepared = prepare(path, assume_reference_grid=True)
    np.testing.assert_array_equal(prepared.array, reference)
    assert prepared.source == str(path)


def test_array_of_another_shape_needs_an_affine():
    with pytest.raises(InputError, match=r"pass \(array, affine\)") as info:
        prepare(np.ones((100, 100, 100), np.float32))
    assert info.value.stage == "check"


def test_pad_and_zscore_config(gm_file):
    config = PreprocessConfig(pad_to=(128, 128, 128), intensity="zscore")
    prepared = prepare(gm_file, config)
    assert prepared.array.shape == (1, 128, 128, 128)
    assert float(prepared.array.mean()) == pytest.approx(0.0, abs=1e-4)
    # already-cropped-and-padded arrays are accepted as such
    padded = prepare(gm_file, PreprocessConfig(pad_to=(128, 128, 128))).array[0]
    again = prepare(padded, PreprocessConfig(pad_to=(128, 128, 128)), assume_reference_grid=True)
    assert again.method == "cropped" and again.kind.kind == "gm"
    np.testing.assert_array_equal(again.array[0], padded)


def test_t1_warns_and_strict_raises(tmp_path):
    path = save_nifti(tmp_path / "sub-03_T1w.nii.gz", mni_t1_on_grid())
    prepared = prepare(path, model_name="anatcl-global")
    assert prepared.kind.kind == "t1"
    assert len(prepared.warnings) == 1 and "anatcl-global expects a CAT12 mwp1" in prepared.warnings[0]
    with pytest.raises(InputKindError) as info:
        prepare(path, strict=True)
    assert info.value.path == path and info.value.stage == "check"
    assert prepare(path, PreprocessConfig(input_kind="t1", intensity="robust")).warnings == []


def test_brain_shifted_out_of_the_crop_warns():
    shifted = REF_AFFINE.copy()
    shifted[1, 3] += 15 * 1.5  # the brain moves 15 voxels towards +y: its front leaves the y 8:136 crop
    prepared = prepare((mni_gm_on_grid(), shifted))
    assert prepared.method == "reindex"
    assert any("outside the model's field of view" in w for w in prepared.warnings)


def test_smoothed_map_warns():
    prepared = prepare(mni_gm_smoothed_on_grid(6.0), assume_reference_grid=True)
    assert prepared.kind.kind == "smoothed-gm"
    assert any("smoothed grey-matter map" in w for w in prepared.warnings)


# ---------------------------------------------------------------- hostile inputs


def _hostile(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (path, expected stage)."""
    out: dict[str, tuple[str, str]] = {}
    good = Path(save_nifti(tmp_path / "good.nii.gz", np.random.default_rng(0).random((40, 40, 40), dtype=np.float32)))
    cut = tmp_path / "truncated.nii.gz"
    cut.write_bytes(good.read_bytes()[:2000])
    out["truncated gzip"] = (str(cut), "read")
    text = tmp_path / "text.nii"
    text.write_text("not an image\n" * 50)
    out["text named .nii"] = (str(text), "read")
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    out["empty file"] = (str(empty), "read")
    gz_text = tmp_path / "gz_text.nii.gz"
    gz_text.write_bytes(gzip.compress(b"x" * 1000))
    out["gzipped text"] = (str(gz_text), "read")
    out["missing"] = (str(tmp_path / "missing.nii"), "read")
    out["4D with 2 volumes"] = (save_nifti(tmp_path / "two.nii.gz", np.ones((20, 20, 20, 2), np.float32)), "check")
    out["all NaN"] = (save_nifti(tmp_path / "nan.nii.gz", np.full((121, 145, 121), np.nan, np.float32)), "check")
    out["2D"] = (save_nifti(tmp_path / "flat.nii", np.ones((121, 145), np.float32)), "check")
    out["far from MNI"] = (save_nifti(tmp_path / "scanner.nii.gz", mni_gm_on_grid(), np.diag([1.5, 1.5, 1.5, 1.0])), "check")
    out["all zero"] = (save_nifti(tmp_path / "zero.nii.gz", np.zeros((121, 145, 121), np.float32)), "check")
    return out


def test_hostile_files_raise_input_error_with_path_and_stage(tmp_path):
    for name, (path, stage) in _hostile(tmp_path).items():
        with pytest.raises(InputError) as info:
            prepare(path)
        err = info.value
        assert err.path == path, name
        assert err.stage == stage, (name, err.stage, str(err))
        assert path in str(err), name


# ---------------------------------------------------------------- worker processes


def _prepare_in_worker(path: str) -> np.ndarray:
    return prepare(path).array


def test_prepare_and_its_result_pickle(gm_file):
    prepared = prepare(gm_file)
    again = pickle.loads(pickle.dumps(prepared))
    np.testing.assert_array_equal(again.array, prepared.array)
    assert again.kind == prepared.kind
    assert pickle.loads(pickle.dumps(prepare)) is prepare


def test_prepare_runs_in_spawned_workers(gm_file, reference):
    # a fresh interpreter needs no initialisation: what DataLoader workers rely on
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        arrays = pool.map(_prepare_in_worker, [gm_file, str(EXAMPLES / "mwp1sub-mni01_T1w.nii.gz")])
    np.testing.assert_array_equal(arrays[0], reference)
    np.testing.assert_array_equal(arrays[1], prepare(EXAMPLES / "mwp1sub-mni01_T1w.nii.gz").array)


# ---------------------------------------------------------------- documentation examples


@pytest.mark.parametrize("module", ["inputs.io", "inputs.conform", "inputs.checks", "inputs.preprocess", "inputs.discovery"])
def test_docstring_examples_run(module, monkeypatch):
    import doctest
    import importlib

    monkeypatch.chdir(EXAMPLES.parents[1])  # the examples use examples/data/ relative to the repository
    mod = importlib.import_module(f"anatcl_infer.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
