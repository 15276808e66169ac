"""One reading of every file (issue 21): nibabel's meaning bit for bit, or a refusal with its reason.

Every case of the issue is a real file written to ``tmp_path`` (no monkeypatching of the reader):
scaling on float data, offsets inside the header, images without orientation (NIfTI codes 0,
Analyze pairs, a ``.hdr`` alone), bounded cost (trailing bytes, huge ``vox_offset``, empty gzip
members, a deadline), denormal maps, MGH headers, nibabel's stderr lines, 4D files. Then the
differential test: seeded header/framing variants, each read exactly as nibabel reads it or
refused with a named reason, nothing in between (``tests/nifti_variants.py``).
"""

from __future__ import annotations

import collections
import gzip
import logging
import time
import tracemalloc
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from anatcl_infer.config import ModelConfig
from anatcl_infer.encoding.encoder import encode
from anatcl_infer.errors import InputError, InputWarning
from anatcl_infer.inputs.io import NiftiVolume, count_volumes, load_volume, read_nifti, read_volume
from anatcl_infer.inputs.preprocess import prepare, split_volumes
from anatcl_infer.model.network import AnatCL

from nifti_variants import FULL, GRID3_AFFINE, GRID3_SHAPE, SMALL, judge, make_variant

SHAPE = GRID3_SHAPE


def _gm(shape=SHAPE, seed=0) -> np.ndarray:
    """A brain-like float32 map on the 3 mm grid (an ellipsoid with structure)."""
    axes = [np.linspace(-1, 1, n) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    inside = (x / 0.8) ** 2 + (y / 0.85) ** 2 + (z / 0.8) ** 2 < 1
    rng = np.random.default_rng(seed)
    field = 0.5 + 0.3 * np.sin(7 * x + rng.uniform(0, 3)) * np.cos(5 * y) + 0.1 * np.sin(9 * z)
    return np.where(inside, field, 0.0).astype(np.float32)


def _nifti_bytes(data: np.ndarray, affine=GRID3_AFFINE, *, version: int = 1, gap: int = 0, **fields) -> bytes:
    """Single-file NIfTI bytes whose header fields are set after nibabel's checks (so they can lie).

    The data is written right after the header (+ ``gap`` zero bytes), wherever ``vox_offset`` points.
    """
    klass = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    img = klass(data, affine)
    img.update_header()
    header = img.header
    size = 348 if version == 1 else 540
    header.set_data_offset(size + 4 + gap)
    for key, value in fields.items():
        header.structarr[key] = value
    return header.binaryblock + b"\0" * (4 + gap) + data.tobytes(order="F")


def _nibabel(path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asarray(img.get_fdata(dtype=np.float32)), np.asarray(img.affine)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _assert_read_as_nibabel(path, config=SMALL) -> np.ndarray:
    """Our read and prepare() equal nibabel's get_fdata(float32)/affine through the same conform path."""
    read = read_volume(path)
    ref, ref_affine = _nibabel(path)
    assert _same_bits(read.data, ref), path
    np.testing.assert_array_equal(read.affine, ref_affine)
    ours = prepare(path, config, emit_warnings=False).array
    theirs = prepare((ref, ref_affine), config, emit_warnings=False).array
    assert _same_bits(ours, theirs)
    return read.data


def _refused(path, reason: str, *, how=read_volume, stage: str = "read") -> InputError:
    with pytest.raises(InputError) as info:
        how(path)
    assert info.value.reason == reason, (info.value.reason, str(info.value))
    assert info.value.stage == stage
    assert str(path) in str(info.value)
    return info.value


# ---------------------------------------------------------------- scaling on float data


@pytest.mark.parametrize(("slope", "inter"), [(-1.0, 0.0), (2.0, 0.5), (1.0, 1e30), (0.5, -3.0)])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_scaling_applies_to_float_data_as_nibabel_applies_it(tmp_path, slope, inter, suffix):
    gm = _gm()
    raw = _nifti_bytes(gm, scl_slope=slope, scl_inter=inter)
    path = tmp_path / f"scaled{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else raw)
    read = read_volume(path)
    ref, _ = _nibabel(path)
    assert _same_bits(read.data, ref)
    assert not _same_bits(read.data, gm)  # the unscaled map is NOT what is read
    if inter == 1e30:  # every voxel becomes 1e30 in float32: refused as empty, by both routes
        with pytest.raises(InputError, match="is empty"):
            prepare(path, SMALL, emit_warnings=False)
        with pytest.raises(InputError, match="is empty"):
            prepare((ref, GRID3_AFFINE), SMALL, emit_warnings=False)
    else:
        _assert_read_as_nibabel(path)


def test_scaling_that_makes_finite_data_infinite_is_refused(tmp_path):
    path = tmp_path / "overflow.nii"
    path.write_bytes(_nifti_bytes(_gm() * 1000, scl_slope=3e38, scl_inter=0.0))
    assert np.isinf(_nibabel(path)[0]).any()  # nibabel reads infinities
    assert "turns" in str(_refused(path, "scaling-non-finite"))


@pytest.mark.parametrize(("fields", "reason"), [
    ({"scl_slope": np.inf, "scl_inter": 0.0}, "scaling"), ({"scl_slope": 1e-42, "scl_inter": 0.0}, "scaling"), ({"scl_slope": 2.0, "scl_inter": np.nan}, "scaling"),
])
def test_non_finite_or_denormal_scale_factors_are_refused(tmp_path, fields, reason):
    path = tmp_path / "bad-scale.nii"
    path.write_bytes(_nifti_bytes(_gm(), **fields))
    _refused(path, reason)


def test_nan_or_zero_slope_means_unscaled(tmp_path):
    for slope in (np.nan, 0.0):
        path = tmp_path / f"slope-{slope}.nii"
        path.write_bytes(_nifti_bytes(_gm(), scl_slope=slope, scl_inter=5.0))
        assert _same_bits(_assert_read_as_nibabel(path), _gm())


def test_nibabel_own_test_files_read_as_nibabel_reads_them():
    folder = Path(nib.__file__).parent / "tests" / "data"
    names = ["test.mgz", "example4d.nii.gz", "example_nifti2.nii.gz",
             "functional.nii", "anatomical.nii", "standard.nii.gz", "reoriented_anat_moved.nii"]
    for name in names:
        ref, affine = _nibabel(folder / name)
        volumes = ref.reshape(ref.shape[:3] + (-1,), order="F")
        n = volumes.shape[-1]
        for i in range(n):
            read = read_volume(folder / name, i if n > 1 else None)
            assert _same_bits(read.data, volumes[..., i]), (name, i)
            np.testing.assert_array_equal(read.affine, affine, err_msg=name)
    assert read_volume(folder / "test.mgz", 0).orientation == "mgh"
    for name in ("analyze.hdr", "nifti1.hdr", "nifti2.hdr"):  # shipped without their .img
        assert name.replace(".hdr", ".img is missing") in str(_refused(folder / name, "pair-missing"))


# ---------------------------------------------------------------- offsets


@pytest.mark.parametrize("vox_offset", [0, 100, 351])
@pytest.mark.parametrize("version", [1, 2])
def test_offset_inside_the_header_is_refused(tmp_path, vox_offset, version):
    path = tmp_path / "offset.nii"
    path.write_bytes(_nifti_bytes(_gm(), version=version, vox_offset=vox_offset))
    err = _refused(path, "offset-in-header")
    assert "inside its" in str(err) and "header" in str(err)


def test_offset_zero_was_read_shifted_by_nibabel(tmp_path):
    """Why it is refused: nibabel reads the header itself as data (the volume shifted by 88 voxels)."""
    gm = _gm()
    path = tmp_path / "zero.nii"
    path.write_bytes(_nifti_bytes(gm, vox_offset=0))
    ref, _ = _nibabel(path)
    assert not np.array_equal(ref, gm)
    np.testing.assert_array_equal(ref.ravel(order="F")[88:1000], gm.ravel(order="F")[:912])
    _refused(path, "offset-in-header")


@pytest.mark.parametrize("gap", [1, 12, 16, 4096])
def test_unaligned_or_padded_offsets_read_as_nibabel(tmp_path, gap, capfd, caplog):
    path = tmp_path / "gap.nii.gz"
    path.write_bytes(gzip.compress(_nifti_bytes(_gm(), gap=gap)))
    with caplog.at_level(logging.INFO, logger="anatcl_infer"):
        _assert_read_as_nibabel(path)
    assert capfd.readouterr().err == ""  # nibabel's "not divisible by 16" goes to our logger, named
    if gap % 16:
        assert any(str(path) in r.getMessage() and "divisible by 16" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- orientation


def test_no_orientation_and_not_the_reference_shape_is_refused(tmp_path):
    path = tmp_path / "no-orientation.nii"
    gm = np.pad(_gm(), ((0, 3), (0, 0), (0, 0)))
    path.write_bytes(_nifti_bytes(gm, sform_code=0, qform_code=0))
    assert read_volume(path).orientation == "none"
    err = _refused(path, "no-orientation", how=lambda p: prepare(p, SMALL, emit_warnings=False), stage="check")
    assert "qform_code and sform_code are both 0" in str(err)


def test_no_orientation_at_the_reference_shape_is_taken_on_the_grid(tmp_path):
    path = tmp_path / "on-grid.nii"
    path.write_bytes(_nifti_bytes(_gm(), sform_code=0, qform_code=0))
    prepared = prepare(path, SMALL, emit_warnings=False)
    theirs = prepare((_nibabel(path)[0], GRID3_AFFINE), SMALL, emit_warnings=False)
    assert _same_bits(prepared.array, theirs.array)
    assert any("no orientation" in w for w in prepared.warnings)


def _analyze_pair(folder: Path, data: np.ndarray, zooms=(3.0, 3.0, 3.0)) -> tuple[Path, Path]:
    img = nib.AnalyzeImage(data, np.diag([*zooms, 1.0]))
    hdr, im = folder / "analyze.hdr", folder / "analyze.img"
    nib.save(img, hdr)
    assert hdr.exists() and im.exists()
    return hdr, im


def test_analyze_pair_has_no_orientation(tmp_path):
    hdr, img = _analyze_pair(tmp_path, np.pad(_gm(), ((0, 2), (0, 0), (0, 0))))
    for given in (hdr, img):
        assert read_volume(given).format == "Analyze"
        err = _refused(given, "no-orientation", how=lambda p: prepare(p, SMALL, emit_warnings=False), stage="check")
        assert "Analyze" in str(err)


def test_analyze_pair_at_the_reference_shape_is_read_on_the_grid(tmp_path):
    hdr, _ = _analyze_pair(tmp_path, _gm())
    ref, _ = _nibabel(hdr)  # nibabel's guessed affine is not used: the reference grid is
    assert _same_bits(read_volume(hdr).data, ref)
    ours = prepare(hdr, SMALL, emit_warnings=False)
    assert _same_bits(ours.array, prepare((ref, GRID3_AFFINE), SMALL, emit_warnings=False).array)
    assert any("Analyze" in w for w in ours.warnings)


def test_hdr_given_alone_is_refused_for_the_right_reason(tmp_path):
    hdr, img = _analyze_pair(tmp_path, _gm())
    img.unlink()
    err = _refused(hdr, "pair-missing")
    assert "analyze.img is missing" in str(err) and "corrupt" not in str(err)
    other = tmp_path / "other"
    other.mkdir()
    hdr2, img2 = _analyze_pair(other, _gm())
    hdr2.unlink()
    assert "analyze.hdr is missing" in str(_refused(img2, "pair-missing"))


def test_nifti_pair_reads_as_nibabel(tmp_path):
    img = nib.Nifti1Pair(_gm(), GRID3_AFFINE)
    nib.save(img, tmp_path / "pair.img")
    for name in ("pair.hdr", "pair.img"):
        _assert_read_as_nibabel(tmp_path / name)


def test_qform_only_far_from_mni_is_refused_but_read_as_nibabel(tmp_path):
    shifted = GRID3_AFFINE.copy()
    shifted[0, 3] += 40
    img = nib.Nifti1Image(_gm(), None)
    img.set_qform(shifted, code=1)
    img.set_sform(None, code=0)
    nib.save(img, tmp_path / "q.nii")
    read = read_volume(tmp_path / "q.nii")
    np.testing.assert_array_equal(read.affine, _nibabel(tmp_path / "q.nii")[1])
    assert read.orientation == "qform"
    with pytest.raises(InputError, match="only a qform orientation"):
        prepare(tmp_path / "q.nii", SMALL, emit_warnings=False)


# ---------------------------------------------------------------- bounded cost


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_trailing_tail_costs_nothing(tmp_path):
    gm = _gm()
    path = tmp_path / "tail.nii.gz"
    path.write_bytes(gzip.compress(_nifti_bytes(gm)))
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size + (256 << 20))  # a 256 MiB sparse tail of zeros
    _assert_read_as_nibabel(path)
    peak = _peak(lambda: read_volume(path))
    assert peak < 3 * gm.nbytes + (4 << 20), peak  # the volume (+ its float32 view), never the tail


def test_huge_vox_offset_never_raises_the_cap(tmp_path):
    import zlib

    gm = _gm()
    header = nib.Nifti1Header(_nifti_bytes(gm)[:348])
    header["vox_offset"] = 64 << 20  # the data lies 64 MiB into the decompressed stream
    path = tmp_path / "far.nii.gz"
    with open(path, "wb") as fh:
        c = zlib.compressobj(1, zlib.DEFLATED, 31)
        fh.write(c.compress(header.binaryblock + b"\0" * 4))
        for k in range(64):
            fh.write(c.compress(b"\0" * ((1 << 20) - (352 if k == 0 else 0))))
        fh.write(c.compress(gm.tobytes(order="F")) + c.flush())
    assert _same_bits(read_volume(path).data, _nibabel(path)[0])
    peak = _peak(lambda: read_volume(path))
    assert peak < 3 * gm.nbytes + (4 << 20), peak
    plain = tmp_path / "far.nii"  # a sparse uncompressed file with vox_offset 2**30
    header["vox_offset"] = 1 << 30
    with open(plain, "wb") as fh:
        fh.write(header.binaryblock)
        fh.seek(1 << 30)
        fh.write(gm.tobytes(order="F"))
    assert _same_bits(read_volume(plain).data, gm)
    assert _same_bits(read_volume(plain).data, _nibabel(plain)[0])


def test_empty_gzip_members_cost_linear_time(tmp_path):
    gm = _gm()
    path = tmp_path / "members.nii.gz"
    empty = gzip.compress(b"", mtime=0)
    path.write_bytes(empty * 30_000 + gzip.compress(_nifti_bytes(gm)) + empty * 1000)
    start = time.perf_counter()
    data = read_volume(path).data
    assert time.perf_counter() - start < 5.0
    assert _same_bits(data, gm)


def test_each_input_has_a_deadline(tmp_path, monkeypatch):
    path = tmp_path / "slow.nii.gz"
    path.write_bytes(gzip.compress(b"", mtime=0) * 200_000 + gzip.compress(_nifti_bytes(_gm())))
    err = _refused(path, "deadline", how=lambda p: read_volume(p, timeout=0.05))
    assert "deadline" in str(err)
    monkeypatch.setenv("ANATCL_READ_TIMEOUT", "0.05")
    _refused(path, "deadline")
    good = tmp_path / "good.nii"
    good.write_bytes(_nifti_bytes(_gm()))
    assert read_volume(good).data.shape == SHAPE  # the others are unaffected


def test_trailing_bytes_after_the_gzip_stream(tmp_path):
    member = gzip.compress(_nifti_bytes(_gm()))
    padded = tmp_path / "padded.nii.gz"
    padded.write_bytes(member + b"\0" * 5000)  # zero padding: ignored, as Python's gzip module ignores it
    _assert_read_as_nibabel(padded)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(member + b"not a gzip member")
    assert "neither padding nor another gzip member" in str(_refused(garbage, "corrupt-stream"))


def test_gzip_bomb_after_the_data_is_refused(tmp_path):
    path = tmp_path / "bomb.nii.gz"
    zeros = gzip.compress(b"\0" * (32 << 20), compresslevel=1)
    path.write_bytes(gzip.compress(_nifti_bytes(_gm())) + zeros)
    _refused(path, "bomb")


# ---------------------------------------------------------------- smaller items


def test_denormal_map_warns(tmp_path):
    path = tmp_path / "denormal.nii"
    path.write_bytes(_nifti_bytes((_gm() * np.float32(1e-40)).astype(np.float32)))
    with pytest.warns(InputWarning, match="denormal"):
        prepare(path, SMALL)


def _mgh_bytes(data: np.ndarray, **fields) -> bytes:
    raw = bytearray(nib.MGHImage(data, GRID3_AFFINE).to_bytes())
    offsets = {"version": (0, ">i4"), "dims": (4, ">i4"), "type": (20, ">i4"), "goodRASFlag": (28, ">i2")}
    for key, value in fields.items():
        at, dt = offsets[key]
        block = np.asarray(value, dtype=dt).tobytes()
        raw[at: at + len(block)] = block
    return bytes(raw)


def test_mgz_reads_as_nibabel_and_its_header_is_validated_first(tmp_path):
    good = tmp_path / "good.mgz"
    good.write_bytes(gzip.compress(_mgh_bytes(_gm())))
    _assert_read_as_nibabel(good)
    huge = tmp_path / "huge.mgz"
    huge.write_bytes(gzip.compress(_mgh_bytes(_gm(), dims=[1600, 1600, 1600, 1])))
    start = time.perf_counter()
    _refused(huge, "too-large")
    assert time.perf_counter() - start < 1.0
    for name, fields, reason in (("neg.mgz", {"dims": [-5, 73, 61, 1]}, "dimensions"), ("type.mgz", {"type": 7}, "datatype"),
                                 ("version.mgz", {"version": 3}, "not-an-image")):
        (tmp_path / name).write_bytes(gzip.compress(_mgh_bytes(_gm(), **fields)))
        _refused(tmp_path / name, reason)
    no_ras = tmp_path / "no-ras.mgz"
    no_ras.write_bytes(gzip.compress(_mgh_bytes(np.pad(_gm(), ((0, 1), (0, 0), (0, 0))), goodRASFlag=0)))
    _refused(no_ras, "no-orientation", how=lambda p: prepare(p, SMALL, emit_warnings=False), stage="check")


def test_nibabel_says_nothing_on_stderr(tmp_path, capfd, caplog):
    path = tmp_path / "odd.nii"
    gm = _gm()
    raw = bytearray(_nifti_bytes(gm, gap=4, qform_code=7))  # unaligned offset, invalid qform code: nibabel logs both
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.INFO, logger="anatcl_infer"):
        read_volume(path)
        with pytest.raises(InputError):
            prepare(tmp_path / "missing.nii", SMALL)
    assert capfd.readouterr().err == ""
    lines = [r.getMessage() for r in caplog.records if "nibabel" in r.getMessage()]
    assert lines and all(line.startswith(str(path)) for line in lines)


# ---------------------------------------------------------------- 4D files


def test_4d_file_is_n_volumes(tmp_path):
    vols = [_gm(seed=i) for i in range(3)]
    path = tmp_path / "stack.nii.gz"
    nib.save(nib.Nifti1Image(np.stack(vols, axis=-1), GRID3_AFFINE), path)
    assert count_volumes(path) == 3
    items = split_volumes(str(path))
    assert items == [NiftiVolume(str(path), i, 3) for i in range(3)]
    ref, _ = _nibabel(path)
    for i in (0, 2, 1):  # out of order: the open stream restarts
        assert _same_bits(read_volume(path, i).data, ref[..., i])
        assert prepare(items[i], SMALL, emit_warnings=False).volume == i
    err = _refused(path, "volumes", how=lambda p: prepare(p, SMALL, emit_warnings=False), stage="check")
    assert "holding 3 volumes" in str(err)
    assert read_nifti(path).shape == (*SHAPE, 3)
    assert _same_bits(load_volume(path, 1)[0], ref[..., 1])
    with pytest.raises(InputError, match="volume 3 does not exist"):
        read_volume(path, 3)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return AnatCL(ModelConfig(name="nifti-test", source="unit-test", fold=0, preprocess=SMALL)).eval()


@pytest.mark.slow
def test_encode_gives_one_row_per_volume_of_a_4d_file(tmp_path, small_model):
    vols = [_gm(seed=i) for i in range(3)]
    stack = tmp_path / "stack.nii.gz"
    nib.save(nib.Nifti1Image(np.stack(vols, axis=-1), GRID3_AFFINE), stack)
    singles = []
    for i, v in enumerate(vols):
        singles.append(tmp_path / f"v{i}.nii.gz")
        nib.save(nib.Nifti1Image(v, GRID3_AFFINE), singles[-1])
    expected = encode(small_model, [str(p) for p in singles], num_workers=0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        got = encode(small_model, str(stack), num_workers=0, progress=False)
        mixed = encode(small_model, [str(singles[0]), str(stack)], num_workers=2, batch_size=1, progress=False)
    np.testing.assert_array_equal(got, expected)
    assert mixed.shape == (4, 512)
    np.testing.assert_array_equal(mixed[1:], expected)


# ---------------------------------------------------------------- the differential test against nibabel


N_VARIANTS = 240


def test_every_variant_is_read_as_nibabel_reads_it_or_refused_with_a_reason(tmp_path):
    counts: collections.Counter[str] = collections.Counter()
    formats: collections.Counter[str] = collections.Counter()
    mismatches = []
    for i in range(N_VARIANTS):
        folder = tmp_path / str(i)
        folder.mkdir()
        variant = make_variant(np.random.default_rng([21, i]), folder, i)
        outcome, details = judge(variant)
        counts[outcome] += 1
        if outcome == "equal":
            formats[variant.made["format"]] += 1
        if outcome.startswith("MISMATCH"):
            mismatches.append((outcome, details))
        for f in folder.iterdir():
            f.unlink()
    summary = ", ".join(f"{k} {v}" for k, v in counts.most_common())
    assert not mismatches, (summary, mismatches[:3])
    assert counts["equal"] >= N_VARIANTS // 3, summary
    for reason in ("offset-in-header", "scaling", "datatype", "dimensions"):
        assert counts[f"refused:{reason}"] > 0, summary
    assert formats["nifti1"] and formats["nifti2"] and formats["mgh"], formats
    assert all(k == "equal" or k.startswith("refused:") for k in counts)
    assert FULL.grid_shape == (121, 145, 121)
