"""A corpus of hostile and wrong inputs, built on the 3 mm test grid (see test_hostile.py).

Every entry is one kind of trouble a real folder can hold: broken files, lying headers,
files that are not files, content that cannot be a grey-matter map, and images of the
wrong kind. :func:`build_corpus` writes them and says what each must become.

Example:
    >>> corpus = build_corpus(tmp_path)  # doctest: +SKIP
    >>> sorted(corpus.failing)[:2]  # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from anatomy import mni_gm_on_grid, mni_gm_smoothed_on_grid, mni_t1_on_grid

GRID3_AFFINE = np.array(((-3.0, 0, 0, 90.0), (0, 3.0, 0, -126.0), (0, 0, 3.0, -72.0), (0, 0, 0, 1)))
GRID3_SHAPE = (61, 73, 61)


def gm3() -> np.ndarray:
    return np.ascontiguousarray(mni_gm_on_grid()[::2, ::2, ::2])


def _save(path: Path, data: np.ndarray, affine: np.ndarray = GRID3_AFFINE, **header: object) -> Path:
    img = nib.Nifti1Image(np.asarray(data), affine)
    for key, value in header.items():
        img.header[key] = value
    nib.save(img, path)
    return path


def _raw_nifti(data: np.ndarray, affine: np.ndarray = GRID3_AFFINE, **fields: object) -> bytes:
    """Single-file NIfTI-1 bytes whose header fields are set after nibabel's checks (so they can lie)."""
    data = np.asarray(data, dtype=np.float32)
    img = nib.Nifti1Image(data, affine)
    img.update_header()
    header = img.header
    header.set_data_offset(352)
    for key, value in fields.items():
        header.structarr[key] = value
    return header.binaryblock + b"\0" * 4 + data.tobytes(order="F")


@dataclass
class Corpus:
    """Where the corpus lies and what each entry must become.

    Attributes:
        root: the folder holding the corpus (searched by ``anatcl embed root``).
        good: names of inputs that must be written without a warning.
        warned: names that must be written with a WARNING naming them.
        failing: name -> a fragment of the expected failure message.
        extra_specs: explicit arguments after the folder (a missing file, an empty folder),
            with the fragment expected for each.
        volumes: names of 4D files -> their number of volumes: one row (and one QC row) each.
    """

    root: Path
    good: list[str] = field(default_factory=list)
    warned: list[str] = field(default_factory=list)
    failing: dict[str, str] = field(default_factory=dict)
    extra_specs: dict[str, str] = field(default_factory=dict)
    volumes: dict[str, int] = field(default_factory=dict)


def build_corpus(base: Path) -> Corpus:
    root = base / "corpus"
    root.mkdir()
    c = Corpus(root)
    gm = gm3()

    def good(name: str, data: np.ndarray) -> Path:
        c.good.append(name)
        return _save(root / name, data.astype(np.float32))

    def fail(name: str, fragment: str) -> Path:
        c.failing[name] = fragment
        return root / name

    for i in range(3):
        good(f"sub-{i:02d}_mwp1.nii.gz", gm * (1 - 0.05 * i))
    template = (root / "sub-00_mwp1.nii.gz").read_bytes()
    plain = _raw_nifti(gm.astype(np.float32))

    # --- broken files
    fail("trunc-gz_mwp1.nii.gz", "truncated or corrupt gzip").write_bytes(template[: len(template) // 2])
    fail("trunc-nii_mwp1.nii", "truncated").write_bytes(plain[: len(plain) // 2])
    fail("trunc-header_mwp1.nii", "truncated inside its NIfTI-1 header").write_bytes(plain[:100])
    fail("text_mwp1.nii", "not a NIfTI file").write_text("subject,age\n01,34\n" * 40)
    fail("empty_mwp1.nii.gz", "empty file").write_bytes(b"")
    crc = bytearray(template)
    crc[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    fail("bad-crc_mwp1.nii.gz", "corrupt gzip").write_bytes(bytes(crc))
    size = bytearray(template)
    size[-1] ^= 0x01  # the ISIZE length field
    fail("bad-length_mwp1.nii.gz", "corrupt gzip").write_bytes(bytes(size))
    stream = bytearray(template)
    for k in range(len(stream) // 3, len(stream) // 3 + 64):
        stream[k] ^= 0x5A  # the deflate stream itself
    fail("bad-deflate_mwp1.nii.gz", "corrupt gzip").write_bytes(bytes(stream))
    fail("not-gzip_mwp1.nii.gz", "not gzip-compressed").write_bytes(plain)
    fail("gz-text_mwp1.nii.gz", "not a NIfTI file").write_bytes(gzip.compress(b"hello " * 500))
    # gzip bomb: a valid 61x73x61 float32 header, then members of zeros inflating to 4 GiB
    member = zlib.compressobj(1, zlib.DEFLATED, 31)
    chunk = member.compress(b"\0" * (64 << 20)) + member.flush()
    with open(fail("bomb_mwp1.nii.gz", "more data than its header declares"), "wb") as fh:
        fh.write(gzip.compress(plain[:352]))
        for _ in range(64):  # 4 GiB: more than the whole 3 GB address space of the test runs
            fh.write(chunk)

    # --- lying headers
    fail("nan-sform_mwp1.nii", "NaN or infinite numbers in its sform").write_bytes(_raw_nifti(gm, srow_x=[np.nan, 0, 0, 90]))
    fail("neg-dim_mwp1.nii", "dimension below 1").write_bytes(_raw_nifti(gm, dim=[3, 61, -73, 61, 1, 1, 1, 1]))
    fail("zero-dims_mwp1.nii", "number of dimensions (dim[0]) is not between 1 and 7").write_bytes(_raw_nifti(gm, dim=[0, 61, 73, 61, 1, 1, 1, 1]))
    fail("huge-dims_mwp1.nii", "more than any brain volume").write_bytes(_raw_nifti(gm, dim=[3, 3000, 3000, 3000, 1, 1, 1, 1]))
    fail("slope-inf_mwp1.nii", "infinite scale factor").write_bytes(_raw_nifti(gm, scl_slope=np.inf))
    fail("slope-denormal_mwp1.nii", "denormal scale factor").write_bytes(_raw_nifti(gm, scl_slope=1e-40))
    fail("bitpix_mwp1.nii", "bitpix 8 contradicts").write_bytes(_raw_nifti(gm, bitpix=8))
    fail("datatype_mwp1.nii", "unknown or unsupported NIfTI datatype").write_bytes(_raw_nifti(gm, datatype=255))
    _save(fail("complex_mwp1.nii", "complex64"), (gm + 0.5j * gm).astype(np.complex64))
    rgb = np.zeros(GRID3_SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    _save(fail("rgb_mwp1.nii", "RGB"), rgb)
    no_orient = np.pad(gm, ((0, 3), (0, 0), (0, 0)))  # not the reference shape
    fail("no-orientation_mwp1.nii", "no orientation in its header").write_bytes(
        _raw_nifti(no_orient, sform_code=0, qform_code=0)
    )
    shifted = GRID3_AFFINE.copy()
    shifted[0, 3] += 40.0
    img = nib.Nifti1Image(gm, None)
    img.set_qform(shifted, code=1)
    img.set_sform(None, code=0)
    nib.save(img, fail("qform-shifted_mwp1.nii", "has only a qform orientation"))

    # --- files that are not regular files
    (root / "dir_mwp1.nii.gz").mkdir()
    c.failing["dir_mwp1.nii.gz"] = "is a directory"
    os.symlink(root / "gone.nii.gz", fail("dangling_mwp1.nii.gz", "broken symbolic link"))
    os.symlink(root / "loop-b_mwp1.nii", fail("loop-a_mwp1.nii", "symbolic link loop"))
    os.symlink(root / "loop-a_mwp1.nii", fail("loop-b_mwp1.nii", "symbolic link loop"))
    os.mkfifo(fail("fifo_mwp1.nii", "named pipe"))
    os.symlink("/dev/zero", fail("zero-device_mwp1.nii", "is a device"))
    bad_name = os.fsencode(str(root)) + b"/sub-\xff\xfe_mwp1.nii.gz"
    with open(bad_name, "wb") as fh:
        fh.write(template)
    c.failing["sub-\\xff\\xfe_mwp1.nii.gz"] = "not valid UTF-8"

    # --- content that cannot be a single brain map in MNI space
    c.volumes["4d_mwp1.nii.gz"] = 3  # not a failure: one row per volume (issue 21)
    _save(root / "4d_mwp1.nii.gz", np.stack([gm, gm, gm], axis=-1))
    _save(fail("2d_mwp1.nii.gz", "3D"), gm[:, :, 30])
    nan = gm.copy()
    nan[30, 30, 30] = np.nan
    _save(fail("nan-voxels_mwp1.nii.gz", "non-finite voxels"), nan)
    _save(fail("constant_mwp1.nii.gz", "is empty"), np.full(GRID3_SHAPE, 0.3, np.float32))
    _save(fail("voxel-10mm_mwp1.nii.gz", "voxel sizes"), gm, np.diag([10.0, 10.0, 10.0, 1.0]))
    scanner = GRID3_AFFINE.copy()
    scanner[:3, 3] += 400.0
    _save(fail("scanner-space_mwp1.nii.gz", "MNI space"), gm, scanner)

    # --- wrong kind of image: written, with a warning naming it
    def warned(name: str, data: np.ndarray) -> None:
        c.warned.append(name)
        _save(root / name, data.astype(np.float32))

    warned("t1w_mwp1.nii.gz", np.ascontiguousarray(mni_t1_on_grid()[::2, ::2, ::2]))
    # 12 mm FWHM on the 3 mm grid is, in voxels, what 6 mm (s6mwp1) is on the 1.5 mm grid
    warned("smoothed6_mwp1.nii.gz", np.ascontiguousarray(mni_gm_smoothed_on_grid(12.0)[::2, ::2, ::2]))
    t1 = np.ascontiguousarray(mni_t1_on_grid()[::2, ::2, ::2])
    warned("wm-map_mwp1.nii.gz", np.where(t1 > 0.75 * t1.max(), 1.0, 0.0) * (gm < 0.2))
    warned("noise_mwp1.nii.gz", np.random.default_rng(0).random(GRID3_SHAPE, dtype=np.float32))
    one = np.zeros(GRID3_SHAPE, np.float32)
    one[30, 36, 30] = 1.0
    warned("one-voxel_mwp1.nii.gz", one)
    warned("scaled-1000_mwp1.nii.gz", gm * 1000.0)
    warned("all-negative_mwp1.nii.gz", -gm)
    hot = gm.copy()
    hot[30, 40, 30] = 3e38  # with the published weights its features overflow: then it fails at "encode"
    warned("hot-voxel_mwp1.nii.gz", hot)

    # --- explicit arguments that yield nothing
    (base / "empty-folder").mkdir()
    c.extra_specs[str(base / "empty-folder")] = "yields no input image"
    c.extra_specs[str(base / "missing_mwp1.nii.gz")] = "file not found"
    return c
