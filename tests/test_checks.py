"""Input checks (fatal and soft) and the input-kind guess, on real anatomy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from anatcl_infer.inputs.checks import KindGuess, check_kind, check_volume, guess_input_kind
from anatcl_infer.config import REFERENCE_SHAPE
from anatcl_infer.errors import InputError, InputKindError
from anatcl_infer.inputs.io import load_volume

from anatomy import (
    BOX113_AFFINE,
    REF_AFFINE,
    mni_gm_1mm,
    mni_gm_on_grid,
    mni_gm_smoothed_on_grid,
    mni_t1_on_grid,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def _check_error(data, affine=REF_AFFINE, **kwargs) -> InputError:
    with pytest.raises(InputError) as info:
        check_volume(data, affine, path="sub-x.nii.gz", **kwargs)
    assert info.value.stage == "check" and info.value.path == "sub-x.nii.gz"
    return info.value


# ---------------------------------------------------------------- check_volume


def test_real_maps_pass_without_warnings():
    assert check_volume(mni_gm_on_grid(), REF_AFFINE) == []
    assert check_volume(mni_t1_on_grid(), REF_AFFINE, grid_shape=REFERENCE_SHAPE, grid_affine=REF_AFFINE) == []
    data, affine = mni_gm_1mm()
    assert check_volume(data, affine) == []
    assert check_volume(mni_gm_on_grid()[4:117, 4:141, 0:113], BOX113_AFFINE) == []


@pytest.mark.parametrize("shape", [(40, 50), (40, 50, 30, 2), (121,)])
def test_not_3d(shape):
    err = _check_error(np.ones(shape, np.float32))
    assert "dimensions" in str(err) and "3D" in str(err)


def test_single_slice():
    assert "single slice" in str(_check_error(np.ones((121, 145, 1), np.float32)))


def test_non_finite_values_are_counted():
    data = mni_gm_on_grid()
    data[0, 0, :5] = np.nan
    data[1, 1, :2] = np.inf
    err = _check_error(data)
    assert "7 non-finite voxels (5 NaN, 2 infinite)" in str(err)


def test_all_nan():
    err = _check_error(np.full((20, 30, 40), np.nan, np.float32), np.diag([4.0, 4, 4, 1]))
    assert "24000 non-finite voxels (24000 NaN, 0 infinite)" in str(err)


@pytest.mark.parametrize("value", [0.0, 0.7])
def test_empty_or_constant(value):
    err = _check_error(np.full(REFERENCE_SHAPE, value, np.float32))
    assert "empty" in str(err) and f"{value:g}" in str(err)


@pytest.mark.parametrize("size", [0.2, 8.0])
def test_voxel_size_that_cannot_be_mni(size):
    data = np.zeros((60, 60, 60), np.float32)
    data[20:40, 20:40, 20:40] = 1
    affine = np.diag([size, size, size, 1.0])
    affine[:3, 3] = -30 * size
    err = _check_error(data, affine)
    assert "voxel sizes" in str(err) and "MNI" in str(err)


def test_field_of_view_too_small():
    data = np.zeros((30, 30, 30), np.float32)
    data[10:20, 10:20, 10:20] = 1
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = -22
    assert "too small a field of view" in str(_check_error(data, affine))


def test_image_in_scanner_space_is_rejected():
    # the same anatomy with the voxel-to-world origin at the corner, as raw scanner images often have
    data = mni_gm_on_grid()
    scanner = np.diag([1.5, 1.5, 1.5, 1.0])
    err = _check_error(data, scanner)
    assert "scanner space" in str(err) and "normalise it" in str(err)


def test_partly_outside_warns():
    shifted = REF_AFFINE.copy()
    shifted[2, 3] -= 40.0  # 40 mm down: the top of the brain leaves the field of view
    warnings = check_volume(mni_gm_on_grid(), shifted)
    assert any("parts of the brain outside its field of view" in w for w in warnings)
    assert any("mm from the centre of the MNI brain" in w for w in warnings)


def test_no_overlap_with_a_custom_grid():
    far_grid = REF_AFFINE.copy()
    far_grid[:3, 3] += 500.0
    err = _check_error(mni_gm_on_grid(), REF_AFFINE, grid_shape=REFERENCE_SHAPE, grid_affine=far_grid)
    assert "does not overlap the model's grid" in str(err)


def test_invalid_affine():
    assert "singular" in str(_check_error(mni_gm_on_grid(), np.zeros((4, 4))))


def test_oblique_and_negative_values_warn():
    angle = np.deg2rad(12)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = REF_AFFINE.copy()
    affine[:3, :3] = rot @ REF_AFFINE[:3, :3]
    data = mni_gm_on_grid() - 0.05
    warnings = check_volume(data, affine)
    assert any("oblique" in w for w in warnings)
    assert any("negative values" in w for w in warnings)
    # tiny interpolation undershoots, as real mwp1 maps have, are not worth a warning
    data = mni_gm_on_grid()
    data[60, 70, 60] = -0.002
    assert check_volume(data, REF_AFFINE) == []


# ---------------------------------------------------------------- guess_input_kind


def test_gm_map_is_gm():
    guess = guess_input_kind(mni_gm_on_grid())
    assert guess.kind == "gm" and guess.confidence > 0.8
    assert set(guess.evidence) >= {"p99", "max", "min", "background_fraction", "wm_ratio", "roughness"}
    assert guess.evidence["wm_ratio"] < 0.1


@pytest.mark.parametrize("fwhm", [4.0, 6.0, 8.0])
def test_smoothed_gm_is_smoothed(fwhm):
    guess = guess_input_kind(mni_gm_smoothed_on_grid(fwhm))
    assert guess.kind == "smoothed-gm" and guess.confidence > 0.8


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_t1_is_t1_at_any_intensity_scale(scale):
    guess = guess_input_kind(mni_t1_on_grid() * scale)
    assert guess.kind == "t1" and guess.confidence > 0.9
    assert guess.evidence["wm_ratio"] > 0.8


def test_zscored_t1_is_other():
    t1 = mni_t1_on_grid()
    guess = guess_input_kind((t1 - t1.mean()) / t1.std())
    assert guess.kind == "other"


def test_unscaled_uint8_gm_is_other():
    guess = guess_input_kind(mni_gm_on_grid() * 255)
    assert guess.kind == "other"
    assert guess.evidence["p99"] > 200


def test_empty_is_other():
    assert guess_input_kind(np.zeros(REFERENCE_SHAPE, np.float32)).kind == "other"


def test_modulated_values_above_one_stay_gm():
    assert guess_input_kind(mni_gm_on_grid() * 1.4).kind == "gm"


def test_example_data_is_gm():
    files = sorted(EXAMPLES.glob("*.nii.gz"))
    assert len(files) == 3
    for path in files:
        data, affine = load_volume(path)
        np.testing.assert_array_equal(affine, REF_AFFINE)
        guess = guess_input_kind(data)
        assert guess.kind == "gm", (path.name, guess)


# ---------------------------------------------------------------- check_kind


def test_matching_kind_gives_no_warning():
    assert check_kind(KindGuess("gm", 0.95, {}), "gm") is None
    assert check_kind(KindGuess("t1", 0.95, {}), "t1") is None


def test_t1_given_to_gm_model_names_the_problem():
    message = check_kind(guess_input_kind(mni_t1_on_grid()), "gm", model_name="anatcl-global")
    assert message is not None
    assert "looks like a T1-weighted image" in message
    assert "anatcl-global expects a CAT12 mwp1 grey-matter map" in message
    assert "run CAT12 or deepmriprep first" in message


def test_smoothed_map_given_to_gm_model():
    message = check_kind(KindGuess("smoothed-gm", 0.9, {}), "gm")
    assert "smoothed grey-matter map" in message and "unsmoothed mwp1" in message


def test_gm_given_to_t1_model():
    message = check_kind(KindGuess("gm", 0.9, {}), "t1")
    assert "expects a skull-stripped T1-weighted image" in message


def test_strict_raises_input_kind_error():
    with pytest.raises(InputKindError) as info:
        check_kind(KindGuess("t1", 0.97, {}), "gm", strict=True, path="sub-01_T1w.nii.gz")
    err = info.value
    assert isinstance(err, InputError)
    assert err.stage == "check" and err.path == "sub-01_T1w.nii.gz"
    assert "T1-weighted" in str(err) and "--strict" in str(err)


def test_unknown_expected_kind():
    with pytest.raises(InputError, match="unknown expected input kind"):
        check_kind(KindGuess("gm", 0.9, {}), "flair")


# ---------------------------------------------------------------- content that cannot be a grey-matter map


def _other_cases() -> dict[str, tuple[np.ndarray, str]]:
    from anatomy import mni_gm_on_grid

    gm = mni_gm_on_grid()
    one = np.zeros_like(gm)
    one[60, 70, 60] = 1.0
    hot = gm.copy()
    hot[60, 80, 60] = 3e38
    return {
        "noise": (np.random.default_rng(0).random(gm.shape, dtype=np.float32), "no spatial structure"),
        "one voxel": (one, "only 1 voxels are above zero"),
        "all negative": (-gm, "only 0 voxels are above zero"),
        "values far out": (gm * 1000.0, "far above a grey-matter density"),
        "one hot voxel": (hot, "far outside the range of a grey-matter density"),
        "normalised (z-scored)": ((gm - gm.mean()) / gm.std(), "clearly negative values"),
    }


@pytest.mark.parametrize("case", list(_other_cases()))
def test_content_that_cannot_be_a_gm_map_is_kind_other_with_a_reason(case):
    data, reason = _other_cases()[case]
    guess = guess_input_kind(data)
    assert guess.kind == "other" and reason in guess.reason
    message = check_kind(guess, "gm", path="x.nii")
    assert message is not None and reason in message
    with pytest.raises(InputKindError, match=r"strict=True, --strict on the command line; without it, only a warning"):
        check_kind(guess, "gm", strict=True, path="x.nii")


def test_real_maps_are_not_taken_for_noise():
    from anatomy import mni_gm_on_grid

    assert guess_input_kind(mni_gm_on_grid()).kind == "gm"
    grid3 = np.array([[-3.0, 0, 0, 90], [0, 3.0, 0, -126], [0, 0, 3.0, -72], [0, 0, 0, 1]])
    assert guess_input_kind(mni_gm_on_grid()[::2, ::2, ::2], grid3).kind == "gm"  # rougher on a coarse grid
