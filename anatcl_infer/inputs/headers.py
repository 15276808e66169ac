"""What an image header means, as nibabel (the reader of record) reads it, and which headers are refused.

nibabel decides: which image class a file is (its extension, then its header's own
``may_contain_header`` test, in ``nibabel.imageclasses`` order), the header's meaning after
nibabel's own checks and fixes (``check_fix``, whose messages go to this package's logger with
the file's name instead of nibabel's stderr handler), the data shape, on-disk dtype and offset
(``get_data_shape``, ``get_data_dtype``, ``get_data_offset``), the scaling (``get_slope_inter``),
and the affine (``get_best_affine``; MGH: ``get_affine``).

On top of that, a few headers that nibabel would read are refused, each with its reason
(:data:`REFUSALS`): complex/RGB/unknown datatypes, a ``bitpix`` that contradicts the datatype
(nibabel silently trusts the datatype), an infinite or denormal scale factor, a NaN/infinite
intercept with a real slope, NaN/infinite numbers in the sform or qform in use, a single-file
``vox_offset`` inside the header (nibabel reads an offset of 0 from byte 0), more data per volume
than :data:`MAX_DATA_BYTES`, more volumes than :data:`MAX_VOLUMES`, header extensions over
:data:`MAX_HEADER_BYTES`. Whether a header has an orientation is reported (``orientation``);
the rule for images without one is applied by :func:`anatcl_infer.inputs.preprocess.prepare`.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = [
    "HeaderInfo",
    "MAX_DATA_BYTES",
    "MAX_VOLUMES",
    "MAX_HEADER_BYTES",
    "REFUSALS",
    "image_class_for",
    "parse_header",
    "nibabel_messages",
]

logger = logging.getLogger(__name__)

#: The most image data one volume may declare: a 0.5 mm whole-head float64 volume is ~0.6 GB.
MAX_DATA_BYTES = 1 << 30
#: The most volumes one 4D file may declare.
MAX_VOLUMES = 100_000
#: The most bytes a header with its extensions (or a separate ``.hdr`` file) may take.
MAX_HEADER_BYTES = 16 << 20

#: Short names of the reasons a header is refused (``InputError.reason``), with what each means.
REFUSALS: dict[str, str] = {
    "not-an-image": "no NIfTI-1/2, Analyze or MGH header where one must be",
    "truncated-header": "the file ends inside its header",
    "corrupt-header": "nibabel refuses the header, or a field no image can have",
    "datatype": "complex, RGB, binary or unknown datatype",
    "bitpix": "bitpix contradicts the datatype",
    "dimensions": "dim[0] outside 1-7 or a dimension below 1",
    "too-large": "more data per volume, or more volumes, than any brain image has",
    "offset-in-header": "a single-file vox_offset inside the header, or negative",
    "scaling": "an infinite or denormal scale factor, or a NaN/infinite intercept with a real slope",
    "orientation": "NaN/infinite numbers (or an impossible quaternion) in the sform/qform in use",
    "extensions": "header extensions that cannot be read, or too large",
}

_COMPLEX_OR_RGB = {32: "complex64", 1792: "complex128", 2048: "complex256", 128: "RGB", 2304: "RGBA"}


def _refuse(message: str, name: str | None, reason: str) -> InputError:
    return InputError(message, path=name, stage="read", reason=reason)


class _NamedLog(logging.LoggerAdapter):
    """nibabel's header messages, on this package's logger, prefixed with the file's name."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"{self.extra['name']}: nibabel: {msg}", kwargs

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        """nibabel logs every check, most at level 0 with no message; what it would print (30+) -> INFO."""
        if msg:
            super().log(logging.INFO if level >= logging.WARNING else logging.DEBUG, msg, *args, **kwargs)


@contextmanager
def nibabel_messages(name: str | None) -> Iterator[logging.LoggerAdapter]:
    """Route what nibabel says while a file is read through this package's logger, with the name.

    Yields the logger to give nibabel's ``check_fix``; Python warnings raised meanwhile (nibabel's
    and numpy's) are logged (INFO) with the file's name instead of being printed without it.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield _NamedLog(logger, {"name": name or "<image>"})
    for w in caught:
        logger.info("%s: %s: %s", name or "<image>", w.category.__name__, w.message)


@dataclass(frozen=True)
class HeaderInfo:
    """What a header means, from nibabel, once it passed the refusal rules.

    Attributes:
        format: ``"NIfTI-1"``, ``"NIfTI-2"``, ``"NIfTI-1 pair"``, ``"NIfTI-2 pair"``, ``"Analyze"`` or ``"MGH"``.
        image_class: the nibabel image class ``nibabel.load`` would return.
        header: the nibabel header, checked and fixed as ``nibabel.load`` holds it.
        shape: the data shape (``header.get_data_shape()``).
        dtype: the on-disk dtype, byte order included.
        offset: where the data starts in the (decompressed) data file.
        slope: the scale factor the array proxy applies (1.0 for none).
        inter: the intercept the array proxy applies (0.0 for none).
        affine: nibabel's affine (for ``orientation == "none"``, its guess).
        orientation: ``"sform"``, ``"qform"``, ``"mgh"`` (an MGH header with valid direction
            cosines) or ``"none"`` (NIfTI codes both 0, Analyze, MGH without ``goodRASFlag``).
        version: 1 or 2 for NIfTI, 0 otherwise.
    """

    format: str
    image_class: type
    header: Any
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int
    slope: float
    inter: float
    affine: np.ndarray
    orientation: str
    version: int = 0

    @property
    def n_volumes(self) -> int:
        """Volumes along the 4th axis (1 for 3D and below; the product of axes 4+ otherwise)."""
        return int(np.prod(self.shape[3:], dtype=np.int64)) if len(self.shape) > 3 else 1

    @property
    def volume_bytes(self) -> int:
        """Bytes of one 3D volume (the whole array below 4D)."""
        return int(np.prod(self.shape[:3], dtype=np.int64)) * self.dtype.itemsize

    @property
    def data_bytes(self) -> int:
        """Bytes of the whole data array."""
        return self.volume_bytes * self.n_volumes


_COMPRESSED = (".gz", ".bz2", ".zst")


def _candidates() -> list[type]:
    import nibabel as nib

    # nibabel.imageclasses.all_image_classes order, for the formats read here (CIFTI-2 files are
    # read as the NIfTI-2 images they are; Spm99/Analyze never come after Spm2, which sniffs alike)
    return [nib.Nifti1Pair, nib.Nifti1Image, nib.Nifti2Pair, nib.Nifti2Image, nib.Spm2AnalyzeImage, nib.MGHImage]


def image_class_for(name: str, head: bytes) -> type | None:
    """The nibabel image class ``nibabel.load(name)`` picks, from the name and the header's first bytes.

    Args:
        name: the file name (its extensions decide which classes are tried).
        head: the first bytes of the (decompressed) header file, at least 540 when there are.

    Returns:
        The class, or None when nibabel would not recognise the file as one of the formats read here.
    """
    from nibabel.filename_parser import splitext_addext

    for klass in _candidates():
        _root, ext, _trailing = splitext_addext(name, klass._compressed_suffixes)
        if ext.lower() not in klass.valid_exts:
            continue
        header_class = klass.header_class
        if not hasattr(header_class, "may_contain_header"):
            return klass
        if len(head) >= klass._meta_sniff_len and header_class.may_contain_header(head[: max(klass._meta_sniff_len, 1024)]):
            return klass
    return None


def is_pair_name(name: str) -> bool:
    """Whether ``name`` is one file of a header/image pair (``.hdr``/``.img``, possibly compressed)."""
    from nibabel.filename_parser import splitext_addext

    return splitext_addext(name, _COMPRESSED)[1].lower() in (".hdr", ".img")


def header_bytes_needed(klass: type, head: bytes) -> int:
    """How many leading bytes :func:`parse_header` needs: the fixed header, plus the extensions
    of a single-file NIfTI (up to its ``vox_offset``) when its extension flag is set."""
    import nibabel as nib

    if klass is nib.MGHImage:
        return 284
    size = int(klass.header_class.sizeof_hdr)
    if not getattr(klass.header_class, "is_single", False) or len(head) < size + 4 or head[size: size + 1] == b"\0":
        return size + 4
    try:
        offset = int(klass.header_class(head[:size], check=False).get_data_offset())
    except Exception:  # a header nibabel cannot even hold: parse_header says why
        return size + 4
    return max(offset, size + 4)


def parse_header(klass: type, head: bytes, name: str | None, *, single: bool) -> HeaderInfo:
    """Read a header as ``nibabel.load`` does, and apply the refusal rules (:data:`REFUSALS`).

    Args:
        klass: the image class from :func:`image_class_for`.
        head: the header's bytes: for a single file its first :func:`header_bytes_needed`
            bytes, for a pair the whole ``.hdr`` file.
        name: the input's name, used in messages and log lines.
        single: whether data follows the header in the same file (then an offset inside the
            header is refused).

    Returns:
        A :class:`HeaderInfo`.

    Raises:
        InputError: (``stage="read"``, ``reason`` one of :data:`REFUSALS`) with the reason.
    """
    import nibabel as nib

    with nibabel_messages(name) as log:
        if klass is nib.MGHImage:
            return _parse_mgh(head, name, log)
        return _parse_analyze_family(klass, head, name, log, single)


def _format_name(klass: type) -> tuple[str, int]:
    import nibabel as nib

    names = {nib.Nifti1Image: ("NIfTI-1", 1), nib.Nifti2Image: ("NIfTI-2", 2), nib.Nifti1Pair: ("NIfTI-1 pair", 1),
             nib.Nifti2Pair: ("NIfTI-2 pair", 2)}
    return names.get(klass, ("Analyze", 0))


def _check_raw_fields(raw: Any, fmt: str, name: str | None) -> None:
    """The refusal rules on fields nibabel would silently fix or trust (before its ``check_fix``)."""
    family = fmt.split("-")[0].split()[0]  # "NIfTI" or "Analyze"
    dim = [int(d) for d in np.asarray(raw["dim"]).tolist()]
    if not 1 <= dim[0] <= 7:
        raise _refuse("has a corrupt header: its number of dimensions (dim[0]) is not between 1 and 7; re-export the "
                      "image", name, "dimensions")
    shape = tuple(dim[1: dim[0] + 1])
    if any(d < 1 for d in shape):
        raise _refuse(f"has a corrupt header: it declares the shape {shape}, with a dimension below 1; re-export the "
                      "image", name, "dimensions")
    code = int(raw["datatype"])
    if code in _COMPLEX_OR_RGB:
        raise _refuse(
            f"holds {_COMPLEX_OR_RGB[code]} data ({family} datatype {code}); the model takes one real-valued "
            "intensity per voxel — give the grey-matter map itself", name, "datatype")
    try:
        dtype = np.dtype(raw.get_data_dtype())
    except Exception:
        dtype = None
    if dtype is None or dtype.kind not in "iuf" or dtype.fields is not None:
        raise _refuse(f"has an unknown or unsupported {family} datatype code {code}; save it as float32 or a scaled "
                      "integer type", name, "datatype")
    bitpix = int(raw["bitpix"])
    if bitpix != dtype.itemsize * 8:
        raise _refuse(f"has a corrupt header: bitpix {bitpix} contradicts its datatype {dtype.name} "
                      f"({dtype.itemsize * 8} bits); re-export the image", name, "bitpix")
    if "scl_slope" in raw.keys():
        slope, inter = float(raw["scl_slope"]), float(raw["scl_inter"]) if "scl_inter" in raw.keys() else 0.0
        if np.isinf(slope):
            raise _refuse(f"has an infinite scale factor (scl_slope {slope}); its header is corrupt — re-export the "
                          "image", name, "scaling")
        if np.isfinite(slope) and slope != 0.0:
            if abs(slope) < np.finfo(np.float32).tiny:
                raise _refuse(f"has a denormal scale factor (scl_slope {slope:g}), which wipes out the image; "
                              "re-export it", name, "scaling")
            if not np.isfinite(inter):
                raise _refuse(f"has a non-finite intercept (scl_inter {inter}) with scale factor {slope:g}; "
                              "re-export the image", name, "scaling")


def _check_size(shape: tuple[int, ...], dtype: np.dtype, name: str | None) -> None:
    volume = float(np.prod(shape[:3], dtype=np.float64)) * dtype.itemsize  # float: no overflow for any header
    if volume > MAX_DATA_BYTES:
        raise _refuse(f"declares {volume / 2**30:.1f} GiB of image data per volume (shape {shape}, {dtype.name}), "
                      "more than any brain volume; its header is corrupt or it is not a brain map", name, "too-large")
    count = float(np.prod(shape[3:], dtype=np.float64)) if len(shape) > 3 else 1.0
    if count > MAX_VOLUMES:
        raise _refuse(f"declares {count:.0f} volumes (shape {shape}), more than {MAX_VOLUMES}; its header is corrupt",
                      name, "too-large")


def _nifti_orientation(hdr: Any, name: str | None) -> str:
    """``"sform"``, ``"qform"`` or ``"none"``, as ``get_best_affine`` chooses; NaN/inf in the one in use is refused."""
    if int(hdr["sform_code"]) != 0:
        srow = np.stack([np.asarray(hdr[k], dtype=np.float64) for k in ("srow_x", "srow_y", "srow_z")])
        if not np.all(np.isfinite(srow)):
            raise _refuse("has NaN or infinite numbers in its sform (voxel-to-world matrix); fix the header "
                          "(e.g. re-export from CAT12)", name, "orientation")
        return "sform"
    if int(hdr["qform_code"]) != 0:
        q = [hdr[k] for k in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z")]
        if not np.all(np.isfinite(np.asarray(q, dtype=np.float64))) or not np.all(
                np.isfinite(np.asarray(hdr["pixdim"][:4], dtype=np.float64))):
            raise _refuse("has NaN or infinite numbers in its qform (voxel-to-world orientation); fix the header",
                          name, "orientation")
        return "qform"
    return "none"


def _parse_analyze_family(klass: type, head: bytes, name: str | None, log: Any, single: bool) -> HeaderInfo:
    import nibabel as nib
    from nibabel import imageglobals

    fmt, version = _format_name(klass)
    header_class = klass.header_class
    size = int(header_class.sizeof_hdr)
    if len(head) < size:
        raise _refuse(f"is truncated inside its {fmt} header ({len(head)} of {size} bytes); copy or recreate it",
                      name, "truncated-header")
    try:
        raw = header_class(head[:size], check=False)
    except Exception as exc:  # nibabel raises several types for bad headers
        raise _refuse(f"has a corrupt {fmt} header ({exc}); re-export the image", name, "corrupt-header") from None
    _check_raw_fields(raw, fmt, name)
    vox_offset = float(raw["vox_offset"])
    if not np.isfinite(vox_offset):
        raise _refuse(f"has a corrupt header: vox_offset {vox_offset} is not a file position; re-export the image", name,
                      "offset-in-header")
    if single and vox_offset < size + 4:
        raise _refuse(
            f"has vox_offset {vox_offset:g}, inside its {size}-byte header: a single-file {fmt.split()[0]} keeps its data "
            f"at byte {size + 4} or later (nibabel would read the header itself as data); fix the header or re-export "
            "the image", name, "offset-in-header")
    if single and len(head) >= size + 4 and head[size: size + 1] != b"\0" and vox_offset > MAX_HEADER_BYTES:
        raise _refuse(f"declares {vox_offset - size - 4:.0f} bytes of header extensions, more than "
                      f"{MAX_HEADER_BYTES >> 20} MiB; its header is corrupt", name, "extensions")
    if not single and len(head) > MAX_HEADER_BYTES:
        raise _refuse(f"has a header file of more than {MAX_HEADER_BYTES >> 20} MiB; it is not a {fmt} header",
                      name, "extensions")
    try:
        hdr = header_class.from_fileobj(io.BytesIO(head), check=False)  # extensions read as nibabel.load reads them
    except Exception as exc:
        raise _refuse(f"has header extensions nibabel cannot read ({type(exc).__name__}: {exc}); re-export the image",
                      name, "extensions") from None
    try:
        hdr.check_fix(logger=log, error_level=imageglobals.error_level)  # what nibabel.load does, logged here
        shape = tuple(int(s) for s in hdr.get_data_shape())
        dtype = np.dtype(hdr.get_data_dtype())
        offset = int(hdr.get_data_offset())
        slope, inter = hdr.get_slope_inter()
    except Exception as exc:  # HeaderDataError and friends
        raise _refuse(f"has a {fmt} header nibabel refuses ({exc}); re-export the image", name, "corrupt-header") from None
    if offset < 0:
        raise _refuse(f"has a negative vox_offset ({offset}); its header is corrupt", name, "offset-in-header")
    _check_size(shape, dtype, name)
    orientation = _nifti_orientation(hdr, name) if isinstance(hdr, nib.Nifti1Header) else "none"
    try:
        affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
    except Exception as exc:  # e.g. a qform quaternion whose norm exceeds 1
        raise _refuse(f"has an unusable orientation ({type(exc).__name__}: {exc}); fix the header (sform/qform)",
                      name, "orientation") from None
    return HeaderInfo(
        format=fmt, image_class=klass, header=hdr, shape=shape, dtype=dtype, offset=offset,
        slope=1.0 if slope is None else slope, inter=0.0 if inter is None else inter,
        affine=affine, orientation=orientation, version=version,
    )


def _parse_mgh(head: bytes, name: str | None, log: Any) -> HeaderInfo:
    import nibabel as nib
    from nibabel import imageglobals
    from nibabel.freesurfer.mghformat import MGHHeader, data_type_codes, header_dtype

    if len(head) < header_dtype.itemsize:
        raise _refuse(f"is truncated inside its MGH header ({len(head)} of {header_dtype.itemsize} bytes); copy or "
                      "recreate it", name, "truncated-header")
    raw = np.ndarray(shape=(), dtype=header_dtype, buffer=head[: header_dtype.itemsize])
    if int(raw["version"]) != 1:
        raise _refuse(f"is not an MGH image (its header's version is {int(raw['version'])}, not 1); give a .mgz written "
                      "by FreeSurfer, or a NIfTI file", name, "not-an-image")
    dims = tuple(int(d) for d in raw["dims"])
    if any(d < 1 for d in dims):
        raise _refuse(f"has a corrupt MGH header: it declares the dimensions {dims}, one below 1; re-export the image",
                      name, "dimensions")
    code = int(raw["type"])
    if code not in data_type_codes.code:
        raise _refuse(f"has an unknown or unsupported MGH data type {code}; save it as float or a NIfTI file", name,
                      "datatype")
    try:
        hdr = MGHHeader(head[: header_dtype.itemsize], check=False)  # the footer (TR, TE...) is not needed
        hdr.check_fix(logger=log, error_level=imageglobals.error_level)
        shape = tuple(int(s) for s in hdr.get_data_shape())
        dtype = np.dtype(hdr.get_data_dtype())
        affine = np.asarray(hdr.get_affine(), dtype=np.float64)
        slope, inter = hdr.get_slope_inter()
    except Exception as exc:
        raise _refuse(f"has an MGH header nibabel refuses ({exc}); re-export the image", name, "corrupt-header") from None
    _check_size(shape, dtype, name)
    if not np.all(np.isfinite(affine)):
        raise _refuse("has NaN or infinite numbers in its orientation (direction cosines, voxel sizes or centre); fix "
                      "the header", name, "orientation")
    return HeaderInfo(
        format="MGH", image_class=nib.MGHImage, header=hdr, shape=shape, dtype=dtype, offset=int(hdr.get_data_offset()),
        slope=1.0 if slope is None else slope, inter=0.0 if inter is None else inter, affine=affine,
        orientation="mgh" if int(raw["goodRASFlag"]) else "none",
    )
