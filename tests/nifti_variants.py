"""A seeded generator of image-file variants, and the judge that compares the package's reader with nibabel.

Used by ``tests/test_nifti_reference.py`` (a few hundred variants) and
``benchmarks/nifti_differential.py`` (ten thousand). Each variant is a real file (or pair)
written from raw header bytes, so any field can lie: format (NIfTI-1/-2 single and pair,
Analyze, MGH), datatype, byte order, dimensions (4D included), scaling, ``vox_offset``,
qform/sform codes and matrices, pixdim, magic, extensions, gzip framing (members, empty
members, trailing bytes, truncation).

:func:`judge` reads it both ways and returns one outcome: ``"equal"`` (our read and
``prepare()`` are bit-for-bit nibabel's ``get_fdata(dtype=float32)`` and affine through the same
conform path), ``"refused:<reason>"`` (an ``InputError`` with its reason), or ``"MISMATCH:..."``
(anything in between: the test fails on any).

Example:
    >>> outcome, info = judge(make_variant(np.random.default_rng(0), tmp_path))  # doctest: +SKIP
"""

from __future__ import annotations

import bz2
import functools
import gzip
import logging
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from anatcl_infer.config import PreprocessConfig
from anatcl_infer.errors import InputError
from anatcl_infer.inputs.io import NiftiVolume, read_volume
from anatcl_infer.inputs.preprocess import prepare

GRID3_AFFINE = np.array(((-3.0, 0, 0, 90.0), (0, 3.0, 0, -126.0), (0, 0, 3.0, -72.0), (0, 0, 0, 1)))
GRID3_SHAPE = (61, 73, 61)
#: A small MNI grid (3 mm) so that hundreds of variants conform in seconds.
SMALL = PreprocessConfig(grid_shape=GRID3_SHAPE, grid_affine=tuple(map(tuple, GRID3_AFFINE.tolist())),
                         crop=((0, 61), (4, 68), (0, 61)))
FULL = PreprocessConfig()

_DTYPES = {  # NIfTI code -> numpy dtype and a value scale for the blob
    2: (np.uint8, 200.0, 0.0), 256: (np.int8, 100.0, -20.0), 4: (np.int16, 3000.0, -500.0),
    512: (np.uint16, 60000.0, 0.0), 8: (np.int32, 1e6, -1e5), 768: (np.uint32, 4e9, 0.0),
    1024: (np.int64, 1e12, -1e11), 1280: (np.uint64, 1e15, 0.0), 16: (np.float32, 1.0, 0.0),
    64: (np.float64, 1.0, 0.0),
}
_BAD_CODES = {32: 64, 128: 24, 1: 1, 9999: 32, 2304: 32, 1536: 128}  # complex64, RGB24, binary, unknown, RGBA, float128: bitpix
_MGH_TYPES = {0: np.uint8, 1: np.int32, 3: np.float32, 4: np.int16, 10: np.uint16}
_SLOPES = [np.nan, 0.0, 1.0, -1.0, 2.0, 0.5, 1e-3, 1e30, -1e30, 3e38, np.inf, -np.inf, 1e-40, 7.25]
_INTERS = [0.0, np.nan, 0.5, -3.0, 1e30, np.inf, -np.inf, 100.0]


@dataclass
class Variant:
    """One written file (or pair) and how it was made."""

    path: Path
    config: PreprocessConfig
    made: dict[str, Any] = field(default_factory=dict)


@functools.lru_cache(maxsize=16)
def _blob_base(shape: tuple[int, int, int]) -> np.ndarray:
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    inside = (x / 0.8) ** 2 + (y / 0.85) ** 2 + (z / 0.8) ** 2 < 1.0
    field = 0.55 + 0.3 * np.sin(7 * x) * np.cos(5 * y) + 0.1 * np.sin(9 * z)
    return np.where(inside, np.clip(field, 0.0, 1.0), 0.0).astype(np.float32)


def _blob(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """A brain-like field in [0, 1]: an ellipsoid with smooth structure, zero outside (scaled per variant)."""
    return (_blob_base(tuple(shape)) * np.float32(rng.uniform(0.7, 1.0))).astype(np.float64)


def _affine(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
    """An MNI-ish affine for a grid near GRID3 (flips, permutations, integer or half-voxel shifts, other sizes)."""
    aff = GRID3_AFFINE.copy()
    kind = rng.choice(["exact", "flip", "permute", "shift", "half", "zoom", "oblique"], p=[.35, .15, .1, .15, .1, .1, .05])
    if kind == "flip":
        axis = int(rng.integers(3))
        aff[:, axis] *= -1
        aff[:3, 3] -= aff[:3, axis] * (shape[axis] - 1)
    elif kind == "permute":
        order = rng.permutation(3)
        aff[:, :3] = aff[:, :3][:, order]
        shape = tuple(shape[i] for i in order) + tuple(shape[3:])
    elif kind == "shift":
        aff[:3, 3] += 3.0 * rng.integers(-3, 4, 3)
    elif kind == "half":
        aff[:3, 3] += 1.5
    elif kind == "zoom":
        aff[:3, :3] *= rng.choice([2.5 / 3, 3.5 / 3])
    elif kind == "oblique":
        t = np.deg2rad(rng.uniform(-6, 6))
        rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
        aff[:3, :3] = rot @ aff[:3, :3]
    return aff, shape


def _values(blob: np.ndarray, dtype: Any, scale: float, offset: float, rng: np.random.Generator) -> np.ndarray:
    values = blob * scale + offset
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.round(values), info.min, info.max).astype(dtype)
    out = values.astype(dtype)
    special = rng.random()
    if special < 0.05:
        out.flat[rng.integers(out.size)] = np.nan
    elif special < 0.08:
        out = (out * 1e-40).astype(dtype)  # denormal map
    elif special < 0.10:
        out.flat[rng.integers(out.size)] = -0.0
    return out


def _choose(rng: np.random.Generator, options: list[Any], weights: list[float] | None = None) -> Any:
    p = None if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    return options[int(rng.choice(len(options), p=p))]


def frame_gzip(payload: bytes, rng: np.random.Generator, made: dict[str, Any]) -> bytes:
    """gzip ``payload`` with random framing: members, empty members, trailing bytes, truncation."""
    cuts = sorted(int(c) for c in rng.integers(0, len(payload) + 1, int(rng.choice([0, 0, 0, 1, 2, 4]))))
    pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)])]
    members = []
    for piece in pieces:
        c = zlib.compressobj(int(rng.choice([1, 1, 1, 2, 6])), zlib.DEFLATED, 31)
        members.append(c.compress(piece) + c.flush())
    empties = int(rng.choice([0, 0, 0, 1, 3, 50]))
    for _ in range(empties):
        members.insert(int(rng.integers(0, len(members) + 1)), gzip.compress(b"", mtime=0))
    out = b"".join(members)
    tail = _choose(rng, ["none", "zeros", "garbage", "truncate"], [0.8, 0.08, 0.07, 0.05])
    if tail == "zeros":
        out += b"\0" * int(rng.integers(1, 5000))
    elif tail == "garbage":
        out += rng.bytes(int(rng.integers(1, 3000)))
    elif tail == "truncate":
        out = out[: int(rng.integers(len(out) // 2, len(out)))]
    made.update(members=len(pieces), empty_members=empties, gz_tail=tail)
    return out


def _plain_tail(payload: bytes, rng: np.random.Generator, made: dict[str, Any]) -> bytes:
    tail = _choose(rng, ["none", "garbage", "truncate"], [0.9, 0.06, 0.04])
    made["tail"] = tail
    if tail == "garbage":
        return payload + rng.bytes(int(rng.integers(1, 3000)))
    if tail == "truncate":
        return payload[: int(rng.integers(len(payload) // 2, len(payload)))]
    return payload


def _set_orientation(hdr: Any, aff: np.ndarray, rng: np.random.Generator, made: dict[str, Any]) -> None:
    codes = [0, 1, 2, 3, 4, 5, -1, 7]
    weights = [0.12, 0.3, 0.25, 0.08, 0.1, 0.05, 0.05, 0.05]
    sform, qform = _choose(rng, codes, weights), _choose(rng, codes, weights)
    hdr.set_sform(aff, code=1)
    hdr.set_qform(aff, code=1)
    s = hdr.structarr
    s["sform_code"], s["qform_code"] = sform, qform
    lie = _choose(rng, ["none", "srow-nan", "quat-nan", "quat-big", "pixdim-neg", "pixdim-zero", "qfac", "singular"],
                  [0.72, 0.04, 0.04, 0.04, 0.05, 0.03, 0.05, 0.03])
    if lie == "srow-nan":
        s["srow_y"][1] = np.nan
    elif lie == "quat-nan":
        s["quatern_c"] = np.nan
    elif lie == "quat-big":
        s["quatern_b"], s["quatern_c"] = 0.9, 0.9
    elif lie == "pixdim-neg":
        s["pixdim"][2] = -s["pixdim"][2]
    elif lie == "pixdim-zero":
        s["pixdim"][1] = 0.0
    elif lie == "qfac":
        s["pixdim"][0] = _choose(rng, [0.0, 2.0, -1.0])
    elif lie == "singular":
        s["srow_x"][:3] = 0.0
    made.update(sform_code=sform, qform_code=qform, orientation_lie=lie)


def _extension_bytes(rng: np.random.Generator, endian: str, made: dict[str, Any]) -> tuple[bytes, bytes]:
    """(the 4-byte extension flag, the extension block)."""
    kind = _choose(rng, ["none", "comment", "unaligned", "too-long", "zero-size", "flag-only"], [0.75, 0.1, 0.04, 0.04, 0.03, 0.04])
    made["extension"] = kind
    if kind == "none":
        return b"\0\0\0\0", b""
    if kind == "flag-only":
        return b"\x01\0\0\0", b""
    content = b"anatcl test extension " * int(rng.integers(1, 5))
    esize = 8 + len(content)
    esize_aligned = (esize + 15) // 16 * 16
    declared = {"comment": esize_aligned, "unaligned": esize, "too-long": esize_aligned + 4096, "zero-size": 0}[kind]
    block = np.array([declared, 6], dtype=endian + "i4").tobytes() + content.ljust(esize_aligned - 8, b"\0")
    return b"\x01\0\0\0", block


def _nifti(rng: np.random.Generator, folder: Path, made: dict[str, Any], *, reference: bool) -> Path:
    version = _choose(rng, [1, 2], [0.8, 0.2])
    pair = rng.random() < 0.1
    endian = _choose(rng, ["<", ">"], [0.7, 0.3])
    code = _choose(rng, list(_DTYPES) + list(_BAD_CODES), [6, 3, 10, 3, 4, 2, 2, 1, 14, 6] + [0.6] * len(_BAD_CODES))
    config = FULL if reference else SMALL
    base = tuple(config.grid_shape)
    shape3 = base if reference or rng.random() < 0.3 else tuple(int(n + rng.integers(-4, 5)) for n in base)
    aff, shape3 = (np.array(config.grid_affine, dtype=np.float64), shape3) if reference else _affine(rng, shape3)
    if not reference and rng.random() < 0.05:  # tiny: the data lies inside the first bytes read with the header
        shape3 = tuple(int(n) for n in rng.integers(1, 7, 3))
    n_vol = _choose(rng, [None, 1, 2, 3], [0.85, 0.05, 0.06, 0.04])
    shape = shape3 if n_vol is None else (*shape3, n_vol)
    klass = {(1, False): nib.Nifti1Header, (2, False): nib.Nifti2Header, (1, True): nib.nifti1.Nifti1PairHeader,
             (2, True): nib.nifti2.Nifti2PairHeader}[(version, pair)]
    hdr = klass(endianness=endian)
    dtype, scale, offset = _DTYPES.get(code, (np.float32, 1.0, 0.0))
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    _set_orientation(hdr, aff, rng, made)
    s = hdr.structarr
    if code in _BAD_CODES:
        s["datatype"], s["bitpix"] = code, _BAD_CODES[code]
    if rng.random() < 0.4:
        s["scl_slope"], s["scl_inter"] = _choose(rng, _SLOPES), _choose(rng, _INTERS, [5, 2, 1, 1, 0.5, 0.3, 0.3, 1])
    dims = _choose(rng, ["ok", "dim0-2", "dim0-bad", "zero", "negative", "garbage-after", "5d-singleton"], [0.88, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02])
    if dims == "dim0-2":
        s["dim"][0] = 2
    elif dims == "dim0-bad":
        s["dim"][0] = _choose(rng, [0, 8, -3])
    elif dims == "zero":
        s["dim"][2] = 0
    elif dims == "negative":
        s["dim"][1] = -s["dim"][1]
    elif dims == "garbage-after":
        s["dim"][s["dim"][0] + 1:] = 7
    elif dims == "5d-singleton":
        s["dim"][0], s["dim"][4], s["dim"][5] = 5, s["dim"][4] if s["dim"][0] >= 4 else 1, 1
    if rng.random() < 0.04:
        s["bitpix"] = _choose(rng, [8, 16, 64])
    if rng.random() < 0.03:
        s["magic"] = _choose(rng, [b"ni1", b"n+1", b"xyz"] if version == 1 else [b"ni2", b"n+2", b"n+1"])
    if rng.random() < 0.02:
        s["sizeof_hdr"] = 999
    header_size = 348 if version == 1 else 540
    flag, ext = _extension_bytes(rng, endian, made)
    natural = header_size + 4 + len(ext) if not pair else 0
    offset_kind = _choose(rng, ["natural", "zero", "inside", "unaligned", "aligned-pad", "beyond", "nan"],
                          [0.7, 0.07, 0.05, 0.06, 0.07, 0.03, 0.02])
    vox = {"natural": natural, "zero": 0, "inside": 100, "unaligned": natural + int(rng.integers(1, 15)),
           "aligned-pad": natural + 16 * int(rng.integers(1, 4096)), "beyond": 1 << 34, "nan": np.nan}[offset_kind]
    if version == 2 and offset_kind == "nan":
        vox = natural
    s["vox_offset"] = vox
    made.update(format=f"nifti{version}{'-pair' if pair else ''}", endian=endian, datatype=code, shape=shape, dims=dims,
                scl=(float(s["scl_slope"]), float(s["scl_inter"])), vox_offset=offset_kind)
    data_at = vox if offset_kind in ("natural", "unaligned", "aligned-pad") else natural
    values = _values(_blob(shape3, rng), dtype, scale, offset, rng)
    if n_vol:
        values = np.stack([values] + [values[::-1] for _ in range(n_vol - 1)], axis=-1)
    raw = values.astype(np.dtype(dtype).newbyteorder(endian)).tobytes(order="F")
    head = hdr.binaryblock + flag + ext
    codec = _choose(rng, ["none", "gz", "bz2"], [0.5, 0.45, 0.05])
    suffix = {"none": "", "gz": ".gz", "bz2": ".bz2"}[codec]
    made["codec"] = codec
    stem = folder / f"v{made['index']}"
    if pair:
        img_bytes = b"\0" * data_at + raw
        hdr_path, img_path = stem.with_suffix(".hdr" + suffix), stem.with_suffix(".img" + suffix)
        hdr_path.write_bytes(_compress(head, codec, rng, {}))
        img_path.write_bytes(_compress(img_bytes, codec, rng, made))
        missing = _choose(rng, ["none", "img", "hdr"], [0.92, 0.04, 0.04])
        made["pair_missing"] = missing
        if missing != "none":
            (img_path if missing == "img" else hdr_path).unlink()
        return _choose(rng, [hdr_path, img_path])
    body = head + b"\0" * max(data_at - len(head), 0) + raw
    path = stem.with_suffix(".nii" + suffix)
    path.write_bytes(_compress(body, codec, rng, made))
    return path


def _compress(payload: bytes, codec: str, rng: np.random.Generator, made: dict[str, Any]) -> bytes:
    """``payload`` as the file holds it: plain (maybe with a tail), gzip-framed, or bzip2 (maybe two streams)."""
    if codec == "gz":
        return frame_gzip(payload, rng, made)
    if codec == "bz2":
        cut = int(rng.integers(0, len(payload) + 1)) if rng.random() < 0.3 else len(payload)
        made["bz2_streams"] = 1 if cut == len(payload) else 2
        return bz2.compress(payload[:cut]) + (bz2.compress(payload[cut:]) if cut < len(payload) else b"")
    return _plain_tail(payload, rng, made)


def _analyze(rng: np.random.Generator, folder: Path, made: dict[str, Any], *, reference: bool) -> Path:
    endian = _choose(rng, ["<", ">"])
    config = FULL if reference else SMALL
    shape = tuple(config.grid_shape) if reference or rng.random() < 0.5 else (58, 70, 60)
    code = _choose(rng, [2, 4, 8, 16, 64])
    dtype, scale, offset = _DTYPES[code]
    hdr = nib.Spm2AnalyzeHeader(endianness=endian)
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    hdr.set_zooms((3.0, 3.0, 3.0) if not reference else (1.5, 1.5, 1.5))
    if rng.random() < 0.3:
        hdr["scl_slope"] = _choose(rng, [1.0, 2.0, 0.0, np.nan, -1.0])
    if rng.random() < 0.3:
        hdr["origin"][:3] = rng.integers(0, 60, 3)
    raw = _values(_blob(shape, rng), dtype, scale, offset, rng).astype(np.dtype(dtype).newbyteorder(endian)).tobytes(order="F")
    stem = folder / f"v{made['index']}"
    stem.with_suffix(".hdr").write_bytes(hdr.binaryblock)
    stem.with_suffix(".img").write_bytes(raw)
    made.update(format="analyze", endian=endian, datatype=code, shape=shape)
    if rng.random() < 0.1:
        stem.with_suffix(".img").unlink()
        made["pair_missing"] = "img"
    return stem.with_suffix(_choose(rng, [".hdr", ".img"]))


def _mgh(rng: np.random.Generator, folder: Path, made: dict[str, Any], *, reference: bool) -> Path:
    config = FULL if reference else SMALL
    shape3 = tuple(config.grid_shape)
    aff, shape3 = (np.array(config.grid_affine, dtype=np.float64), shape3) if reference else _affine(rng, shape3)
    code = _choose(rng, list(_MGH_TYPES))
    dtype = _MGH_TYPES[code]
    frames = _choose(rng, [1, 1, 1, 2])
    scale = {0: 200.0, 1: 1e6, 3: 1.0, 4: 3000.0, 10: 60000.0}[code]
    values = _values(_blob(shape3, rng), dtype, scale, 0.0, rng)
    if frames > 1:
        values = np.stack([values, values[::-1]], axis=-1)
    img = nib.MGHImage(values, aff)
    raw = bytearray(img.to_bytes())
    lie = _choose(rng, ["none", "version", "zero-dim", "neg-dim", "type", "huge", "no-ras", "nan-delta"],
                  [0.7, 0.04, 0.04, 0.04, 0.04, 0.04, 0.06, 0.04])
    if lie == "version":
        raw[0:4] = np.array(2, ">i4").tobytes()
    elif lie == "zero-dim":
        raw[8:12] = np.array(0, ">i4").tobytes()
    elif lie == "neg-dim":
        raw[8:12] = np.array(-5, ">i4").tobytes()
    elif lie == "type":
        raw[20:24] = np.array(7, ">i4").tobytes()
    elif lie == "huge":
        raw[4:16] = np.array([1600, 1600, 1600], ">i4").tobytes()
    elif lie == "no-ras":
        raw[28:30] = np.array(0, ">i2").tobytes()
    elif lie == "nan-delta":
        raw[30:34] = np.array(np.nan, ">f4").tobytes()
    compress = rng.random() < 0.7
    path = folder / f"v{made['index']}{'.mgz' if compress else '.mgh'}"
    path.write_bytes(frame_gzip(bytes(raw), rng, made) if compress else _plain_tail(bytes(raw), rng, made))
    made.update(format="mgh", datatype=code, frames=frames, mgh_lie=lie)
    return path


def make_variant(rng: np.random.Generator, folder: Path, index: int) -> Variant:
    """Write one random variant into ``folder``; ``index`` names its file."""
    made: dict[str, Any] = {"index": index}
    reference = rng.random() < 0.05  # the published 121x145x121 grid: slower, a few
    fmt = _choose(rng, ["nifti", "analyze", "mgh"], [0.86, 0.06, 0.08])
    maker = {"nifti": _nifti, "analyze": _analyze, "mgh": _mgh}[fmt]
    path = maker(rng, folder, made, reference=reference)
    return Variant(path, FULL if reference else SMALL, made)


def _reason(exc: InputError) -> str:
    if exc.reason:
        return exc.reason
    text = str(exc.args[0])
    text = re.split(r"[;(:]", text)[0]
    text = re.sub(r"[-+]?\d[\d.e+-]*", "#", text).strip()
    return f"{exc.stage}:{' '.join(text.split()[:6])}"


def _nibabel(path: Path) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """``nibabel.load(path).get_fdata(dtype=float32)`` and its affine, or the error's name."""
    quiet = logging.getLogger("nibabel.global")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            img = nib.load(path)
            return np.asarray(img.get_fdata(dtype=np.float32)), np.asarray(img.affine), ""
    except Exception as exc:
        return None, None, type(exc).__name__
    finally:
        quiet.setLevel(level)


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a.view(np.uint32), b.view(np.uint32)))


def judge(variant: Variant) -> tuple[str, dict[str, Any]]:
    """Read ``variant`` with the package and with nibabel; return ``(outcome, details)``.

    Outcomes: ``"equal"``; ``"refused:<reason>"`` (our reader or ``prepare`` refused it with an
    ``InputError``); ``"MISMATCH:<what>"`` for anything else.
    """
    path, config = variant.path, variant.config
    details: dict[str, Any] = {"made": variant.made, "path": str(path)}
    reads = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                reads.append(read_volume(path))
            except InputError as exc:
                if exc.reason != "volumes" or "holding " not in str(exc):
                    raise
                n = int(str(exc).split("holding ")[1].split(" ")[0])
                reads = [read_volume(path, i) for i in range(n)]
    except InputError as exc:
        details["message"] = str(exc)
        return f"refused:{_reason(exc)}", details
    except Exception as exc:  # the reader must refuse with an InputError, never crash
        details["message"] = f"{type(exc).__name__}: {exc}"
        return f"MISMATCH:crash:{type(exc).__name__}", details
    ref, ref_affine, nib_error = _nibabel(path)
    if ref is None:
        details["nibabel"] = nib_error
        return "MISMATCH:read-but-nibabel-fails", details
    expected = []
    for i, read in enumerate(reads):
        vol = ref if ref.ndim == 3 else ref.reshape(ref.shape[:3] + (-1,), order="F")[..., i]
        expected.append(vol)
        if not _bits_equal(np.ascontiguousarray(read.data), np.ascontiguousarray(vol)):
            return "MISMATCH:data", details
        if not np.array_equal(read.affine, ref_affine, equal_nan=True):
            return "MISMATCH:affine", details
    for i, read in enumerate(reads):
        item = path if len(reads) == 1 else NiftiVolume(str(path), i, len(reads))
        affine = ref_affine if read.orientation != "none" else np.array(config.grid_affine, dtype=np.float64)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ours = prepare(item, config, emit_warnings=False).array
        except InputError as exc:
            details["message"] = str(exc)
            return f"refused:{_reason(exc)}", details
        except Exception as exc:
            details["message"] = f"{type(exc).__name__}: {exc}"
            return f"MISMATCH:crash-prepare:{type(exc).__name__}", details
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs = prepare((np.array(expected[i]), affine), config, emit_warnings=False).array
        except InputError as exc:
            details["message"] = str(exc)
            return "MISMATCH:prepare-refuses-nibabel-only", details
        if not _bits_equal(ours, theirs):
            return "MISMATCH:prepare", details
    return "equal", details
