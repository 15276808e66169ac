"""QC metrics, outlier flags, the packaged template and the pictures, on real MNI152 anatomy."""

from __future__ import annotations

import struct
import subprocess
import sys
from importlib import resources

import numpy as np
import pytest
from anatomy import REF_AFFINE, mni_gm_on_grid, mni_gm_smoothed_on_grid, mni_t1_on_grid

from anatcl_infer.config import REFERENCE_AFFINE, REFERENCE_SHAPE, PreprocessConfig
from anatcl_infer.errors import ConfigError, MissingDependencyError
from anatcl_infer.inputs.preprocess import prepare
from anatcl_infer.qc.metrics import (
    QC_COLUMNS,
    flag_outliers,
    outlier_reasons,
    qc_metrics,
    robust_z,
)
from anatcl_infer.inputs.template import TEMPLATE_FILE, load_gm_template, to_model_space

CFG = PreprocessConfig()


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def cohort() -> dict[str, object]:
    """Prepared inputs: the MNI GM map, a smoothed copy, the T1, a map shifted 15 mm forward, one flipped A/P."""
    gm = mni_gm_on_grid()
    vols = {
        "gm": gm,
        "smoothed": mni_gm_smoothed_on_grid(6.0),
        "t1": mni_t1_on_grid(),
        "shifted": np.roll(gm, 10, axis=1),
        "flipped": np.ascontiguousarray(gm[:, ::-1, :]),
    }
    return {k: prepare((v, REF_AFFINE), CFG, keep_grid=True) for k, v in vols.items()}


@pytest.fixture(scope="module")
def metrics(cohort) -> dict[str, dict]:
    return {k: qc_metrics(p, config=CFG) for k, p in cohort.items()}


# --- the packaged template -----------------------------------------------------------------------


def test_template_is_small_on_the_reference_grid_and_matches_nilearn():
    with resources.as_file(resources.files("anatcl_infer.inputs").joinpath("data", TEMPLATE_FILE)) as path:
        assert path.stat().st_size < 1_000_000
    tpl = load_gm_template()
    assert tpl.gm.shape == REFERENCE_SHAPE
    np.testing.assert_allclose(tpl.affine, np.asarray(REFERENCE_AFFINE))
    assert tpl.gm.dtype == np.float32 and 0.0 <= tpl.gm.min() and tpl.gm.max() <= 1.0
    # independent resampling (nilearn's resample_img) of the same source agrees
    other = mni_gm_on_grid()
    other = other / other.max()
    assert np.corrcoef(tpl.gm.ravel(), other.ravel())[0, 1] > 0.995
    assert np.abs(tpl.gm - other).max() < 0.05
    assert load_gm_template() is tpl  # cached
    with pytest.raises(ValueError):
        tpl.gm[0, 0, 0] = 1.0  # read-only


def test_brain_mask_is_one_brain_inside_the_crop_box():
    from scipy import ndimage

    mask = load_gm_template().brain_mask
    litres = mask.sum() * 1.5**3 / 1e6
    assert 1.5 < litres < 2.1
    assert ndimage.label(mask)[1] == 1
    ys = np.where(mask.any(axis=(0, 2)))[0]
    assert CFG.crop[1][0] <= ys.min() and ys.max() < CFG.crop[1][1]  # the crop keeps the whole brain
    # the mask encloses the deep white matter (filled), not just the GM ribbon
    centre = mask[60, 72 - 5 : 72 + 5, 60 - 5 : 60 + 5]
    assert centre.all()


def test_template_loader_does_not_import_nilearn_or_matplotlib():
    code = (
        "import sys; from anatcl_infer.inputs.template import load_gm_template; import anatcl_infer.qc.metrics; "
        "load_gm_template(); "
        "bad = [m for m in ('nilearn', 'matplotlib', 'pandas') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_to_model_space_crops_and_pads_like_the_preprocessing():
    vol = np.arange(np.prod(REFERENCE_SHAPE), dtype=np.float32).reshape(REFERENCE_SHAPE)
    np.testing.assert_array_equal(to_model_space(vol, CFG), vol[:, 8:136, :])
    padded = PreprocessConfig(pad_to=(128, 128, 128))
    got = to_model_space(vol, padded)
    assert got.shape == (128, 128, 128)
    # same placement as prepare(): (pad - size) // 2 zeros before
    np.testing.assert_array_equal(got[3:124, :, 3:124], vol[:, 8:136, :])
    prepared = prepare((vol, REF_AFFINE), padded)
    np.testing.assert_array_equal(prepared.array[0], got)


# --- metrics on real anatomy ---------------------------------------------------------------------


def test_metrics_columns_and_types(metrics):
    m = metrics["gm"]
    assert list(m) == list(QC_COLUMNS)
    for key, value in m.items():
        assert isinstance(value, (float, str)), key
    assert m["qc_method"] == "identity"
    assert m["qc_kind"] == "gm" and m["qc_kind_confidence"] > 0.5
    assert m["qc_n_warnings"] == 0.0 and m["qc_warnings"] == ""


def test_mni_gm_map_matches_the_template(metrics):
    m = metrics["gm"]
    assert m["qc_template_corr"] > 0.99
    assert m["qc_brain_coverage"] > 0.99
    assert m["qc_signal_outside_brain"] < 0.03
    assert m["qc_signal_outside_crop"] == 0.0
    assert m["qc_min"] == 0.0 and 0.9 < m["qc_max"] <= 1.0
    assert m["qc_p1"] <= m["qc_p50"] <= m["qc_p99"] <= m["qc_max"]
    assert 0.5 < m["qc_zero_fraction"] < 0.8


def test_smoothed_map_is_less_sparse_and_less_correlated(metrics):
    gm, sm = metrics["gm"], metrics["smoothed"]
    assert sm["qc_template_corr"] < gm["qc_template_corr"]
    assert sm["qc_zero_fraction"] < gm["qc_zero_fraction"] - 0.1  # smoothing spreads signal into the background
    assert sm["qc_signal_outside_brain"] > 2 * gm["qc_signal_outside_brain"]
    assert sm["qc_kind"] == "smoothed-gm"


def test_t1_is_recognised_and_less_correlated(metrics):
    t1 = metrics["t1"]
    assert t1["qc_kind"] == "t1"
    assert t1["qc_n_warnings"] >= 1 and "T1" in t1["qc_warnings"]
    assert t1["qc_template_corr"] < 0.8
    assert t1["qc_p1"] > metrics["gm"]["qc_p1"]  # white matter is bright in a T1: no dark voxels in the brain


def test_misregistered_maps_lose_correlation_and_coverage(metrics):
    gm, sh, fl = metrics["gm"], metrics["shifted"], metrics["flipped"]
    assert sh["qc_template_corr"] < 0.7
    assert sh["qc_brain_coverage"] < 0.85
    assert sh["qc_signal_outside_brain"] > 5 * gm["qc_signal_outside_brain"]
    assert sh["qc_signal_outside_crop"] > 0.005  # the frontal pole was pushed past y index 136
    assert fl["qc_template_corr"] < 0.6
    assert fl["qc_orientation"] == "flipped A/P" and sh["qc_orientation"] == "ok" and gm["qc_orientation"] == "ok"
    assert fl["qc_brain_coverage"] < gm["qc_brain_coverage"]


def test_outside_crop_is_nan_without_the_grid(cohort):
    gm = cohort["gm"]
    prepared = prepare((mni_gm_on_grid(), REF_AFFINE), CFG, keep_grid=False)
    m = qc_metrics(prepared, config=CFG)
    assert np.isnan(m["qc_signal_outside_crop"])
    assert m["qc_template_corr"] == pytest.approx(qc_metrics(gm, config=CFG)["qc_template_corr"])


def test_template_metrics_are_nan_on_another_grid():
    affine = [[-3.0, 0, 0, 90], [0, 3.0, 0, -126], [0, 0, 3.0, -72], [0, 0, 0, 1]]
    cfg = PreprocessConfig(grid_shape=(61, 73, 61), crop=((0, 61), (4, 68), (0, 61)), grid_affine=affine)
    data = np.ascontiguousarray(mni_gm_on_grid()[::2, ::2, ::2])
    m = qc_metrics(prepare(data, cfg, assume_reference_grid=True), config=cfg)
    assert np.isnan(m["qc_template_corr"]) and np.isnan(m["qc_brain_coverage"])
    assert m["qc_orientation"] == "unknown"
    assert m["qc_min"] == 0.0 and 0.9 < m["qc_max"] <= 1.0


def test_wrong_shape_for_the_config_is_an_error(cohort):
    with pytest.raises(ConfigError, match="pass config="):
        qc_metrics(cohort["gm"], config=PreprocessConfig(pad_to=(128, 128, 128)))


# --- cohort flags --------------------------------------------------------------------------------


def _subjects(n: int, seed: int = 0) -> list[np.ndarray]:
    """Plausible individual maps: the MNI map scaled, shifted by <= 1 voxel, with smooth multiplicative noise."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    gm = mni_gm_on_grid()
    out = []
    for _ in range(n):
        field = ndimage.zoom(rng.normal(0.0, 0.15, size=(8, 10, 8)), np.array(REFERENCE_SHAPE) / (8, 10, 8), order=1)
        vol = gm * rng.uniform(0.8, 1.2) * (1.0 + field)
        vol = np.roll(vol, tuple(rng.integers(-1, 2, size=3)), axis=(0, 1, 2))
        out.append(np.clip(vol, 0.0, None).astype(np.float32))
    return out


@pytest.mark.slow
def test_flags_pick_the_odd_inputs_of_a_cohort(cohort):
    rows = [qc_metrics(prepare((v, REF_AFFINE), CFG, keep_grid=True), config=CFG) for v in _subjects(8)]
    names = [f"s{i}" for i in range(8)]
    for k in ("shifted", "t1", "smoothed"):
        rows.append(qc_metrics(cohort[k], config=CFG))
        names.append(k)
    flags = dict(zip(names, flag_outliers(rows)))
    assert not any(flags[f"s{i}"] for i in range(8)), flags
    assert flags["shifted"] and flags["t1"] and flags["smoothed"]
    # without the kind rule, correlation ranking alone still catches the shifted and the T1 map
    reasons = dict(zip(names, outlier_reasons(rows, expected_kind=None)))
    assert "robust z" in reasons["shifted"] and "robust z" in reasons["t1"]
    assert all(reasons[f"s{i}"] == "" for i in range(8))


def test_flag_outliers_accepts_frames_lists_and_dicts():
    pd = pytest.importorskip("pandas")
    corr = [0.9, 0.91, 0.89, 0.9, 0.92, 0.3]
    rows = [{"qc_template_corr": c, "qc_kind": "gm"} for c in corr]
    expected = [False] * 5 + [True]
    assert flag_outliers(rows).tolist() == expected
    assert flag_outliers({"qc_template_corr": corr}).tolist() == expected
    frame = pd.DataFrame(rows, index=[f"sub-{i}" for i in range(6)])
    series = flag_outliers(frame)
    assert series.name == "qc_flag" and list(series.index) == list(frame.index)
    assert series.tolist() == expected
    # kind rule and the expected kind of a T1 model
    rows[0]["qc_kind"] = "t1"
    assert flag_outliers(rows)[0]
    assert not flag_outliers(rows, expected_kind=None)[0]
    assert flag_outliers(rows, expected_kind="t1").tolist() == [False] + [True] * 5
    assert "'t1'" in outlier_reasons(rows)[0]


def test_robust_z_needs_a_cohort_and_floors_the_mad():
    assert np.isnan(robust_z([0.9, 0.8, 0.1])).all()
    z = robust_z([0.95] * 9 + [0.94])
    assert z[-1] == pytest.approx(-0.01 / (1.4826 * 0.01))  # MAD 0 floored at 0.01: no flag for a 0.01 dip
    assert not flag_outliers([{"qc_template_corr": v} for v in [0.95] * 9 + [0.94]]).any()
    z = robust_z([1.0, 2.0, np.nan, 3.0, 4.0, 5.0])
    assert np.isnan(z[2]) and z[2 - 2] < 0 < z[-1]


# --- pictures ------------------------------------------------------------------------------------


def test_slices_png_has_the_expected_size_with_and_without_grid(cohort, tmp_path):
    from anatcl_infer.qc.plots import SLICES_SIZE_PX, render_slices

    with_grid = render_slices(cohort["gm"], tmp_path / "a.png", config=CFG, subtitle="x")
    assert (tmp_path / "a.png").read_bytes() == with_grid
    assert _png_size(with_grid) == SLICES_SIZE_PX
    no_grid = prepare((mni_gm_on_grid(), REF_AFFINE), CFG)
    png = render_slices(no_grid, None, config=CFG, orientation="radiological")
    assert _png_size(png) == SLICES_SIZE_PX
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left nothing behind


def test_orientation_puts_the_left_hemisphere_on_the_labelled_side():
    from anatcl_infer.qc.plots import _to_ras, _views

    vol = np.zeros(REFERENCE_SHAPE, dtype=np.float32)
    i_left = round((90 - (-60)) / 1.5)  # world x = -60 mm (left) is array index 100 on the LAS grid
    vol[i_left, 60:80, 50:70] = 1.0
    ras = _to_ras(vol, np.asarray(REFERENCE_AFFINE))
    assert ras[20, 60:80, 50:70].all()  # RAS index of x = -60 mm is (-60 + 90) / 1.5
    centre = [n // 2 for n in ras.shape]
    centre[1], centre[2] = 70, 60
    neuro = _views(ras, None, None, centre, "neurological")
    radio = _views(ras, None, None, centre, "radiological")
    for views, side in ((neuro, "left"), (radio, "right")):
        coronal, axial = views[1], views[2]
        cols = np.where(coronal.image.any(axis=0))[0]
        assert (cols.mean() < coronal.image.shape[1] / 2) == (side == "left")
        assert (coronal.left == "L") == (side == "left")
        cols = np.where(axial.image.any(axis=0))[0]
        assert (cols.mean() < axial.image.shape[1] / 2) == (side == "left")
    # superior is up (last row) in coronal views and anterior is up in axial views
    vol2 = np.zeros(REFERENCE_SHAPE, dtype=np.float32)
    vol2[:, 100:110, 100:110] = 1.0  # anterior and superior on the grid (y, z increase towards A, S)
    ras2 = _to_ras(vol2, np.asarray(REFERENCE_AFFINE))
    v = _views(ras2, None, None, [60, 105, 105], "neurological")
    assert np.where(v[1].image.any(axis=1))[0].mean() > v[1].image.shape[0] / 2
    assert v[2].top == "A" and np.where(v[2].image.any(axis=1))[0].mean() > v[2].image.shape[0] / 2


@pytest.mark.parametrize(
    "affine",
    [
        np.asarray(REFERENCE_AFFINE),  # LAS, the published grid
        np.diag([1.5, 2.0, -1.0, 1.0]),  # RAS but z stored top to bottom
        np.array([[0, -1.5, 0, 9], [2.0, 0, 0, -4], [0, 0, 1.0, 3], [0, 0, 0, 1]]),  # array axes (y, x, z), x flipped
    ],
    ids=["las", "flip-z", "permuted"],
)
def test_ras_view_box_and_world_positions_agree_on_any_axis_order(affine):
    from anatcl_infer.qc.plots import _box_to_ras, _ras_to_world, _to_ras

    shape = (4, 5, 6)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    world = (ijk @ affine[:3, :3].T + affine[:3, 3]).reshape(*shape, 3)  # each voxel's MNI mm
    ras = np.stack([_to_ras(world[..., w], affine) for w in range(3)], axis=-1)
    for w in range(3):  # world x, y, z increase along RAS axes 0, 1, 2 and are constant across the others
        assert (np.diff(ras[..., w], axis=w) > 0).all()
        assert np.ptp(ras[..., w], axis=tuple(a for a in range(3) if a != w)).max() == 0
    centre = (1, 2, 3)
    assert np.allclose(_ras_to_world(centre, shape, affine), ras[centre])
    box = [(1, 3), (0, 2), (2, 5)]
    inside = np.zeros(shape, dtype=bool)
    inside[tuple(slice(a, b) for a, b in box)] = True
    ras_box = _box_to_ras(box, shape, affine)
    expected = np.zeros(_to_ras(inside, affine).shape, dtype=bool)
    expected[tuple(slice(a, b) for a, b in ras_box)] = True
    np.testing.assert_array_equal(_to_ras(inside, affine), expected)


def test_pictures_refuse_a_grid_without_three_axes():
    from anatcl_infer.qc.plots import _to_ras

    with pytest.raises(ConfigError, match="axes follow x, y and z"):
        _to_ras(np.zeros((3, 3, 3)), np.diag([1.5, 0.0, 1.5, 1.0]))


def test_contact_sheet_and_thumbnails(cohort, tmp_path):
    from anatcl_infer.qc.plots import make_thumbnail, render_contact_sheet

    thumbs = [make_thumbnail(cohort[k], k, config=CFG) for k in ("gm", "t1", "shifted")]
    assert thumbs[0].image.dtype == np.float16 and thumbs[0].image.shape == (128, 121)
    thumbs[2].flagged = True
    png = render_contact_sheet(thumbs, tmp_path / "sheet.png", columns=2, title="t")
    w, h = _png_size(png)
    assert w == 2 * 170 and h > 2 * 170
    with pytest.raises(ValueError):
        render_contact_sheet([])


def test_slices_are_named_and_tagged_in_mni_millimetres(cohort):
    import io as _io

    from PIL import Image

    from anatcl_infer.qc.plots import model_input_affine, render_slices, slice_positions_mm

    # the crop centre of the published spec: voxel (60, 72, 60) of the grid, MNI (0, -18, 18) mm
    assert slice_positions_mm(cohort["gm"], config=CFG) == (0.0, -18.0, 18.0)
    # a spec cropping elsewhere moves the slices by whole voxels of 1.5 mm, with or without the grid
    shifted = PreprocessConfig(crop=((0, 121), (16, 144), (0, 121)))
    grid_kept = prepare((mni_gm_on_grid(), REF_AFFINE), shifted, keep_grid=True)
    input_only = prepare((mni_gm_on_grid(), REF_AFFINE), shifted)
    assert slice_positions_mm(grid_kept, config=shifted) == slice_positions_mm(input_only, config=shifted) == (0.0, -6.0, 18.0)
    assert np.allclose(model_input_affine(shifted) @ [0, 0, 0, 1], [90, -126 + 16 * 1.5, -72, 1])
    text = Image.open(_io.BytesIO(render_slices(grid_kept, None, config=shifted))).text
    assert text["Description"] == "slices at MNI x=0.0 mm, y=-6.0 mm, z=18.0 mm"


def test_missing_matplotlib_says_how_to_install(cohort, monkeypatch):
    from anatcl_infer.qc.plots import render_slices

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "anatcl-infer\[qc\]"') as info:
        render_slices(cohort["gm"], None, config=CFG)
    assert info.value.extra == "qc" and isinstance(info.value, ImportError)


@pytest.mark.parametrize("module", ["inputs.template", "qc.metrics", "qc.plots", "qc.report", "qc.explain"])
def test_docstring_examples_run(module, monkeypatch):
    import doctest
    import importlib
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # examples use examples/data/ relative to the repository
    mod = importlib.import_module(f"anatcl_infer.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_another_grid_is_said_once_not_per_input(caplog):
    affine = [[-3.0, 0, 0, 90], [0, 3.0, 0, -126], [0, 0, 3.0, -72], [0, 0, 0, 1]]
    cfg = PreprocessConfig(grid_shape=(61, 73, 61), crop=((0, 61), (3, 67), (0, 61)), grid_affine=affine)
    data = np.ascontiguousarray(mni_gm_on_grid()[::2, ::2, ::2])
    from anatcl_infer.qc import metrics

    if hasattr(metrics, "_warn_off_template"):
        metrics._warn_off_template.cache_clear()  # an earlier test may have used this grid in this process
    with caplog.at_level("WARNING", logger="anatcl_infer"):
        for scale in (1.0, 0.9, 0.8):
            qc_metrics(prepare(data * scale, cfg, assume_reference_grid=True), config=cfg)
    assert caplog.text.count("not on this config's grid") == 1
