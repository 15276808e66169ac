"""Conforming onto the grid: exact copies, exact re-indexing, trilinear resampling; crop, pad, normalise."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest

from anatcl_infer.config import REFERENCE_SHAPE
from anatcl_infer.inputs.conform import conform_to_grid, crop_and_pad, normalise_intensity, voxel_map
from anatcl_infer.errors import InputError

from anatomy import BOX113_AFFINE, BOX113_OFFSET, BOX113_SHAPE, REF_AFFINE, mni_gm_1mm, mni_gm_on_grid

SMALL = (5, 7, 9)
# A small LAS grid like the reference one (x right-to-left), asymmetric so a wrong axis order shows.
SMALL_AFFINE = np.array([[-1.5, 0, 0, 3.0], [0, 1.5, 0, -4.5], [0, 0, 1.5, -6.0], [0, 0, 0, 1]])


def _arange(shape=SMALL) -> np.ndarray:
    return np.arange(1, np.prod(shape) + 1, dtype=np.float32).reshape(shape)


def _all_orientations():
    """Every axis order x flip combination (48), as nibabel orientation arrays."""
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((1, -1), repeat=3):
            yield np.array([[perm[i], flips[i]] for i in range(3)])


def test_identity_is_an_exact_copy():
    data = _arange()
    out, method = conform_to_grid(data, SMALL_AFFINE, SMALL, SMALL_AFFINE)
    assert method == "identity"
    assert out is not data and not np.shares_memory(out, data)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, data)


def test_identity_accepts_float32_header_rounding():
    noisy = SMALL_AFFINE + 1e-6
    noisy[3] = [0, 0, 0, 1]
    out, method = conform_to_grid(_arange(), noisy, SMALL, SMALL_AFFINE)
    assert method == "identity"
    np.testing.assert_array_equal(out, _arange())


@pytest.mark.parametrize("ornt", list(_all_orientations()), ids=lambda o: "".join(f"{a}{'+' if s > 0 else '-'}" for a, s in o))
def test_every_orientation_comes_back_bit_identical(ornt):
    data = _arange()
    img = nib.Nifti1Image(data, SMALL_AFFINE).as_reoriented(ornt)
    stored = np.asarray(img.dataobj)
    out, method = conform_to_grid(stored, img.affine, SMALL, SMALL_AFFINE)
    assert method == ("identity" if stored.shape == SMALL and np.allclose(img.affine, SMALL_AFFINE) else "reindex")
    np.testing.assert_array_equal(out, data)


def test_reindex_transposes_visibly():
    data = _arange()
    swapped = np.ascontiguousarray(data.transpose(2, 0, 1))  # stored z, x, y
    affine = SMALL_AFFINE[:, [2, 0, 1, 3]]
    out, method = conform_to_grid(swapped, affine, SMALL, SMALL_AFFINE)
    assert method == "reindex"
    np.testing.assert_array_equal(out, data)
    assert out[1, 2, 3] == data[1, 2, 3] == 1 + 1 * 63 + 2 * 9 + 3


def test_113_box_is_zero_padded_exactly():
    grid = mni_gm_on_grid()
    ox, oy, oz = BOX113_OFFSET
    box = grid[ox : ox + BOX113_SHAPE[0], oy : oy + BOX113_SHAPE[1], oz : oz + BOX113_SHAPE[2]]
    out, method = conform_to_grid(box, BOX113_AFFINE, REFERENCE_SHAPE, REF_AFFINE)
    assert method == "reindex"
    expected = np.zeros(REFERENCE_SHAPE, np.float32)
    expected[ox : ox + 113, oy : oy + 137, oz : oz + 113] = box
    np.testing.assert_array_equal(out, expected)
    # the brain lies inside the smaller box, so nothing of it is lost
    assert float(np.abs(out - grid).max()) < 0.05


def test_reference_grid_onto_113_box_is_an_exact_crop():
    grid = mni_gm_on_grid()
    out, method = conform_to_grid(grid, REF_AFFINE, BOX113_SHAPE, BOX113_AFFINE)
    assert method == "reindex"
    np.testing.assert_array_equal(out, grid[4:117, 4:141, 0:113])


def test_voxel_map_of_113_box():
    m = voxel_map(BOX113_AFFINE, REF_AFFINE)
    np.testing.assert_allclose(m[:3, :3], np.eye(3))
    np.testing.assert_allclose(m[:3, 3], BOX113_OFFSET)


def test_integer_shift_with_partial_overlap():
    data = _arange()
    shifted = SMALL_AFFINE.copy()
    shifted[:3, 3] += SMALL_AFFINE[:3, :3] @ np.array([2, -1, 3])  # source voxel 0 sits at target (2, -1, 3)
    out, method = conform_to_grid(data, shifted, SMALL, SMALL_AFFINE)
    assert method == "reindex"
    expected = np.zeros(SMALL, np.float32)
    expected[2:, :6, 3:] = data[:3, 1:, :6]
    np.testing.assert_array_equal(out, expected)


def test_no_overlap_gives_zeros():
    far = SMALL_AFFINE.copy()
    far[0, 3] += 1000 * 1.5
    out, method = conform_to_grid(_arange(), far, SMALL, SMALL_AFFINE)
    assert method == "reindex" and not out.any()


def test_half_voxel_shift_resamples():
    shifted = SMALL_AFFINE.copy()
    shifted[1, 3] += 0.75
    out, method = conform_to_grid(_arange(), shifted, SMALL, SMALL_AFFINE)
    assert method == "resample"
    assert out.dtype == np.float32 and out.shape == SMALL


def _world(shape, affine):
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return (affine[:3, :3] @ idx + affine[:3, 3:4]).reshape(3, *shape)


def test_trilinear_resampling_reproduces_a_linear_field():
    # A function linear in world mm is interpolated exactly by trilinear resampling.
    src_affine = np.array([[1.0, 0, 0, -20], [0, 1.0, 0, -25], [0, 0, 1.0, -15], [0, 0, 0, 1]])
    src_shape = (41, 51, 31)
    coef = np.array([0.3, -0.2, 0.5])
    w = _world(src_shape, src_affine)
    field = (np.tensordot(coef, w, axes=1) + 100.0).astype(np.float32)
    tgt_affine = np.array([[-1.5, 0, 0, 12.25], [0, 1.5, 0, -15.0], [0, 0, 1.5, -9.0], [0, 0, 0, 1]])
    tgt_shape = (15, 20, 12)
    out, method = conform_to_grid(field, src_affine, tgt_shape, tgt_affine)
    assert method == "resample"
    expected = np.tensordot(coef, _world(tgt_shape, tgt_affine), axes=1) + 100.0
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-4)


def test_resampling_is_zero_outside_the_source():
    src_affine = np.diag([1.5, 1.5, 1.5, 1.0])
    tgt_affine = src_affine.copy()
    tgt_affine[:3, 3] = [3.3, 0.7, 0.2]  # shifted by non-integer voxels
    data = np.ones((6, 6, 6), np.float32)
    out, method = conform_to_grid(data, src_affine, (8, 8, 8), tgt_affine)
    assert method == "resample"
    assert out[7, 7, 7] == 0 and out[6:, :, :].max() == 0
    assert out[0, 0, 0] == pytest.approx(1.0)


def test_oblique_image_resamples():
    angle = np.deg2rad(10)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = SMALL_AFFINE.copy()
    affine[:3, :3] = rot @ SMALL_AFFINE[:3, :3]
    _, method = conform_to_grid(_arange(), affine, SMALL, SMALL_AFFINE)
    assert method == "resample"


def test_1mm_anatomy_resamples_close_to_the_grid_map():
    data, affine = mni_gm_1mm()  # RAS, 197x233x189
    out, method = conform_to_grid(data, affine, REFERENCE_SHAPE, REF_AFFINE)
    assert method == "resample"
    ref = mni_gm_on_grid()  # made by nilearn's own resampler
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.99
    assert float(np.abs(out - ref).mean()) < 0.01


def test_conform_rejects_non_3d():
    with pytest.raises(InputError, match="3D") as info:
        conform_to_grid(np.ones((4, 4)), np.eye(4), SMALL, SMALL_AFFINE)
    assert info.value.stage == "conform"


def test_conform_rejects_singular_affine():
    with pytest.raises(InputError, match="singular"):
        conform_to_grid(_arange(), np.zeros((4, 4)), SMALL, SMALL_AFFINE)


# ---------------------------------------------------------------- crop and pad


def test_crop_is_the_raw_slice():
    grid = mni_gm_on_grid()
    out = crop_and_pad(grid, ((0, 121), (8, 136), (0, 121)))
    assert out.shape == (121, 128, 121) and out.flags.c_contiguous and out.dtype == np.float32
    np.testing.assert_array_equal(out, grid[:, 8:136, :])
    assert not np.shares_memory(out, grid)


def test_pad_splits_three_before_four_after():
    arr = _arange((121, 6, 5))
    out = crop_and_pad(arr, ((0, 121), (0, 6), (0, 5)), (128, 8, 5))
    assert out.shape == (128, 8, 5)
    np.testing.assert_array_equal(out[3:124, 1:7, :], arr)
    assert not out[:3].any() and not out[124:].any() and not out[:, 0].any() and not out[:, 7].any()


def test_crop_that_does_not_fit_raises():
    with pytest.raises(InputError, match="does not fit"):
        crop_and_pad(_arange(), ((0, 5), (0, 8), (0, 9)))
    with pytest.raises(InputError, match="cannot pad"):
        crop_and_pad(_arange(), ((0, 5), (0, 7), (0, 9)), (4, 7, 9))


# ---------------------------------------------------------------- intensity


def test_none_leaves_values_alone():
    arr = _arange()
    assert normalise_intensity(arr, "none") is arr


def test_zscore_over_the_whole_array():
    arr = _arange()
    out = normalise_intensity(arr, "zscore")
    assert out.dtype == np.float32
    assert float(out.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(out.std()) == pytest.approx(1.0, abs=1e-5)


def test_robust_uses_foreground_median_and_iqr():
    rng = np.random.default_rng(0)
    arr = np.zeros((20, 20, 20), np.float32)
    arr[5:15, 5:15, 5:15] = rng.uniform(100, 300, (10, 10, 10))
    out = normalise_intensity(arr, "robust")
    fg = out[5:15, 5:15, 5:15]
    q25, q50, q75 = np.percentile(fg, [25, 50, 75])
    assert q50 == pytest.approx(0.0, abs=1e-5)
    assert q75 - q25 == pytest.approx(1.0, abs=1e-5)
    # scale-free: a T1 at another intensity scale normalises to the same values
    np.testing.assert_allclose(normalise_intensity(arr * 7.0, "robust"), out, atol=1e-5)
    # more background does not change the foreground values
    bigger = np.zeros((30, 30, 30), np.float32)
    bigger[:20, :20, :20] = arr
    np.testing.assert_allclose(normalise_intensity(bigger, "robust")[5:15, 5:15, 5:15], fg, atol=1e-5)


def test_constant_volume_does_not_divide_by_zero():
    out = normalise_intensity(np.full((3, 3, 3), 5.0, np.float32), "zscore")
    assert np.all(np.isfinite(out)) and not out.any()


def test_unknown_mode_raises():
    with pytest.raises(InputError, match="unknown intensity"):
        normalise_intensity(_arange(), "minmax")


def test_separable_resampling_matches_scipy_on_random_axis_aligned_grids():
    """The fast path (scaling, flips, axis order) gives scipy.ndimage's trilinear values, edges included."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for _ in range(20):
        src = rng.random(tuple(rng.integers(5, 30, 3))).astype(np.float32)
        m = np.zeros((3, 3))
        m[np.arange(3), rng.permutation(3)] = rng.uniform(0.5, 2.5, 3) * rng.choice([-1, 1], 3)
        a = np.eye(4)
        a[:3, :3], a[:3, 3] = m, rng.uniform(-10, 10, 3)
        b = np.diag([*rng.uniform(0.6, 2.0, 3), 1.0])
        b[:3, 3] = rng.uniform(-10, 10, 3)
        shape = tuple(int(v) for v in rng.integers(5, 30, 3))
        out, method = conform_to_grid(src, a, shape, b)
        if method != "resample":
            continue
        back = voxel_map(b, a)
        ref = ndimage.affine_transform(src, back[:3, :3], offset=back[:3, 3], output_shape=shape, output=np.float32,
                                       order=1, mode="constant", cval=0.0, prefilter=False)
        np.testing.assert_allclose(out, ref, atol=1e-5)
