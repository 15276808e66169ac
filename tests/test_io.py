"""Reading NIfTI files: the fast in-memory path, formats, scaling, and hostile files."""

from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anatcl_infer.errors import AnatCLError, InputError
from anatcl_infer.inputs.io import load_volume, read_nifti

from anatomy import REF_AFFINE, save_nifti

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
SHAPE = (5, 7, 9)


def _arange(shape=SHAPE) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("version", [1, 2])
def test_roundtrip_float32(tmp_path, suffix, version):
    data = _arange()
    path = save_nifti(tmp_path / f"vol{suffix}", data, REF_AFFINE, version=version)
    img = read_nifti(path)
    assert isinstance(img, nib.Nifti1Image if version == 1 else nib.Nifti2Image)
    out, affine = load_volume(path)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, data)
    np.testing.assert_array_equal(affine, REF_AFFINE)


def test_fast_path_matches_nibabel_on_its_own_test_files():
    files = sorted(p for p in NIBABEL_DATA.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    assert len(files) >= 5
    for path in files:
        ours = read_nifti(path)
        ref = nib.load(path)
        if not isinstance(ref, (nib.Nifti1Image, nib.Nifti2Image)):  # CIFTI-2 is not a volume
            continue
        assert type(ours) is type(ref), path.name
        np.testing.assert_array_equal(ours.get_fdata(), ref.get_fdata(), err_msg=path.name)
        np.testing.assert_array_equal(ours.affine, ref.affine, err_msg=path.name)


def test_big_endian_file_reads_right():
    data, affine = load_volume(NIBABEL_DATA / "anatomical.nii")  # stored as >i2
    ref = nib.load(NIBABEL_DATA / "anatomical.nii")
    np.testing.assert_array_equal(data, ref.get_fdata(dtype=np.float32))
    assert data.dtype == np.float32


def test_scaled_int16_is_unscaled(tmp_path):
    ints = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    path = save_nifti(tmp_path / "scaled.nii.gz", ints, REF_AFFINE, dtype=np.int16, slope=0.25, inter=-3.0)
    proxy = nib.load(path).dataobj
    assert (proxy.slope, proxy.inter) == (0.25, -3.0)
    data, _ = load_volume(path)
    np.testing.assert_allclose(data, ints.astype(np.float32) * 0.25 - 3.0)


def test_scaled_uint8_gm_map(tmp_path):
    gm = np.linspace(0, 1, np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    path = save_nifti(tmp_path / "gm.nii.gz", gm, REF_AFFINE, dtype=np.uint8)
    data, _ = load_volume(path)
    np.testing.assert_allclose(data, gm, atol=1 / 255)


def test_4d_with_one_volume_is_squeezed(tmp_path):
    data = _arange()[..., None]
    path = save_nifti(tmp_path / "one.nii.gz", data)
    out, _ = load_volume(path)
    assert out.shape == SHAPE
    np.testing.assert_array_equal(out, data[..., 0])


def test_4d_with_two_volumes_is_refused(tmp_path):
    path = save_nifti(tmp_path / "two.nii.gz", np.stack([_arange(), _arange()], axis=-1))
    with pytest.raises(InputError, match="2 volumes") as info:
        load_volume(path)
    assert info.value.stage == "check" and info.value.path == path
    assert "split it" in str(info.value)


def test_2d_image_is_refused(tmp_path):
    path = save_nifti(tmp_path / "slice.nii", np.ones((10, 12), np.float32))
    with pytest.raises(InputError, match="2D") as info:
        load_volume(path)
    assert info.value.stage == "check"


def test_in_memory_image(tmp_path):
    img = nib.Nifti1Image(_arange(), REF_AFFINE)
    data, affine = load_volume(img)
    np.testing.assert_array_equal(data, _arange())
    np.testing.assert_array_equal(affine, REF_AFFINE)


def test_reads_without_isal(tmp_path, monkeypatch):
    path = save_nifti(tmp_path / "vol.nii.gz", _arange())
    monkeypatch.setitem(sys.modules, "isal", None)  # `from isal import igzip` now raises ImportError
    data, _ = load_volume(path)
    np.testing.assert_array_equal(data, _arange())


def test_never_imports_indexed_gzip(tmp_path):
    path = save_nifti(tmp_path / "vol.nii.gz", _arange())
    read_nifti(path).get_fdata()
    assert "indexed_gzip" not in sys.modules


# ---------------------------------------------------------------- hostile files


def _read_error(path) -> InputError:
    with pytest.raises(InputError) as info:
        load_volume(path)
    err = info.value
    assert err.stage == "read"
    assert err.path == os.fspath(path)
    assert isinstance(err, AnatCLError) and isinstance(err, ValueError)
    assert "Traceback" not in str(err)
    return err


def test_missing_file(tmp_path):
    assert "not found" in str(_read_error(tmp_path / "nope.nii.gz"))


def test_directory(tmp_path):
    (tmp_path / "dir.nii").mkdir()
    assert "directory" in str(_read_error(tmp_path / "dir.nii"))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.write_bytes(b"")
    assert "empty" in str(_read_error(path))


def test_truncated_gzip(tmp_path):
    good = Path(save_nifti(tmp_path / "good.nii.gz", np.random.default_rng(0).random((20, 22, 24), dtype=np.float32)))
    raw = good.read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(raw[: len(raw) // 2])
    assert "truncated or corrupt gzip" in str(_read_error(path))


def test_truncated_uncompressed_nifti(tmp_path):
    good = Path(save_nifti(tmp_path / "good.nii", _arange((20, 22, 24))))
    raw = good.read_bytes()
    path = tmp_path / "cut.nii"
    path.write_bytes(raw[:1000])
    err = _read_error(path)
    assert "truncated" in str(err) and "copy it again" in str(err)


def test_gzip_holding_a_cut_nifti(tmp_path):
    good = Path(save_nifti(tmp_path / "good.nii", _arange((20, 22, 24))))
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(gzip.compress(good.read_bytes()[:5000]))
    assert "truncated" in str(_read_error(path))


def test_text_named_nii(tmp_path):
    path = tmp_path / "notes.nii"
    path.write_text("this is not an image\n" * 30)
    assert "not a NIfTI file" in str(_read_error(path))


def test_text_named_nii_gz(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("hello\n" * 100)
    assert "not gzip-compressed" in str(_read_error(path))


def test_gzipped_text_named_nii_gz(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_bytes(gzip.compress(b"hello world\n" * 100))
    assert "not a NIfTI file" in str(_read_error(path))


def test_unknown_format(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    assert "cannot be read" in str(_read_error(path))


def test_error_message_names_the_file(tmp_path):
    path = tmp_path / "empty.nii"
    path.write_bytes(b"")
    assert str(path) in str(_read_error(path))


def test_multi_member_gzip(tmp_path):
    # pigz -i / bgzip write several gzip members; all of them hold image data
    plain = Path(save_nifti(tmp_path / "vol.nii", _arange((20, 22, 24)))).read_bytes()
    half = len(plain) // 2
    path = tmp_path / "multi.nii.gz"
    path.write_bytes(gzip.compress(plain[:half]) + gzip.compress(plain[half:]))
    data, _ = load_volume(path)
    np.testing.assert_array_equal(data, _arange((20, 22, 24)))


def test_truncated_gzip_without_isal(tmp_path, monkeypatch):
    raw = Path(save_nifti(tmp_path / "good.nii.gz", _arange((20, 22, 24)))).read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(raw[: len(raw) - 10])  # only the trailer is missing
    monkeypatch.setitem(sys.modules, "isal", None)
    assert "truncated or corrupt gzip" in str(_read_error(path))


# ---------------------------------------------------------------- validation before allocation


def _nifti_bytes(data: np.ndarray, **fields) -> bytes:
    img = nib.Nifti1Image(data, np.diag([1.5, 1.5, 1.5, 1.0]))
    img.update_header()
    header = img.header
    header.set_data_offset(352)
    for key, value in fields.items():
        header.structarr[key] = value
    return header.binaryblock + b"\0" * 4 + data.tobytes(order="F")


def test_gzip_bomb_costs_at_most_one_volume(tmp_path):
    import tracemalloc
    import zlib

    head = _nifti_bytes(_arange())[:352]  # declares 5x7x9 float32 = 1260 bytes of data
    member = zlib.compressobj(1, zlib.DEFLATED, 31)
    zeros = member.compress(b"\0" * (32 << 20)) + member.flush()
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(head) + zeros * 8)  # inflates to 256 MiB
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="decompresses to more data than its header declares") as info:
            read_nifti(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.stage == "read"
    assert peak < 4 * path.stat().st_size + (2 << 20), peak  # the file and a header's worth, never the 256 MiB


def test_scl_slope_nan_or_zero_means_unscaled_as_nibabel_writes_it(tmp_path):
    data = _arange()
    for slope in (np.nan, 0.0):
        path = tmp_path / f"slope-{slope}.nii"
        path.write_bytes(_nifti_bytes(data, scl_slope=slope, scl_inter=np.nan))
        np.testing.assert_array_equal(load_volume(path)[0], data)
    assert np.isnan(nib.Nifti1Image(data, np.eye(4)).header["scl_slope"])  # nibabel's own convention


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"scl_slope": np.inf}, "infinite scale factor"),
        ({"scl_slope": 1e-42}, "denormal scale factor"),
        ({"scl_slope": 2.0, "scl_inter": np.inf}, "non-finite intercept"),
        ({"bitpix": 16}, "bitpix 16 contradicts its datatype float32"),
        ({"datatype": 32, "bitpix": 64}, "complex64"),
        ({"datatype": 128, "bitpix": 24}, "RGB"),
        ({"datatype": 1, "bitpix": 1}, "unknown or unsupported"),
        ({"dim": [3, 5, 0, 9, 1, 1, 1, 1]}, "dimension below 1"),
        ({"dim": [9, 5, 7, 9, 1, 1, 1, 1]}, "number of dimensions \\(dim\\[0\\]\\) is not between 1 and 7"),
        ({"dim": [3, 5000, 5000, 5000, 1, 1, 1, 1]}, "more than any brain volume"),
        ({"srow_y": [0, np.nan, 0, 0]}, "NaN or infinite numbers in its sform"),
        ({"sform_code": 0, "qform_code": 1, "quatern_b": np.nan}, "NaN or infinite numbers in its qform"),
    ],
)
def test_lying_headers_are_refused_before_reading_data(tmp_path, fields, message):
    path = tmp_path / "liar.nii"
    path.write_bytes(_nifti_bytes(_arange(), **fields))
    with pytest.raises(InputError, match=message) as info:
        read_nifti(path)
    assert info.value.stage == "read" and info.value.path == str(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_special_files_are_refused_without_blocking(tmp_path):
    import signal

    fifo = tmp_path / "pipe.nii"
    os.mkfifo(fifo)
    (tmp_path / "zero.nii").symlink_to("/dev/zero")
    (tmp_path / "dangling.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    (tmp_path / "a.nii").symlink_to(tmp_path / "b.nii")
    (tmp_path / "b.nii").symlink_to(tmp_path / "a.nii")
    (tmp_path / "folder.nii.gz").mkdir()
    signal.alarm(20)  # a blocking open would hang the test: fail it instead
    try:
        for name, message in (
            ("pipe.nii", "named pipe"),
            ("zero.nii", "is a device"),
            ("dangling.nii.gz", "broken symbolic link"),
            ("a.nii", "symbolic link loop"),
            ("folder.nii.gz", "is a directory"),
        ):
            with pytest.raises(InputError, match=message):
                read_nifti(tmp_path / name)
    finally:
        signal.alarm(0)


def test_undecodable_file_name_is_one_clear_failure(tmp_path):
    good = save_nifti(tmp_path / "good.nii.gz", _arange(), REF_AFFINE)
    bad = os.fsencode(str(tmp_path)) + b"/sub-\xff.nii.gz"
    with open(bad, "wb") as fh:
        fh.write(Path(good).read_bytes())
    with pytest.raises(InputError, match="not valid UTF-8") as info:
        read_nifti(os.fsdecode(bad))
    assert info.value.path.endswith("sub-\\xff.nii.gz")
    str(info.value).encode("utf-8")  # printable and storable


def test_permission_denied_and_deleted_files(tmp_path, monkeypatch):
    path = Path(save_nifti(tmp_path / "x.nii.gz", _arange(), REF_AFFINE))
    real_open = os.open

    def denied(p, *args, **kwargs):
        if os.fspath(p) == str(path):
            raise PermissionError(13, "Permission denied", os.fspath(p))
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)  # root reads everything: simulate a protected file
    with pytest.raises(InputError, match="cannot be opened \\(Permission denied\\)"):
        read_nifti(path)
    monkeypatch.undo()
    path.unlink()  # deleted after it was listed
    with pytest.raises(InputError, match="file not found"):
        read_nifti(path)
