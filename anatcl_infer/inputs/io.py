"""Reading image files: nibabel's meaning, a bounded fast path for the bytes.

One reading of every file. nibabel decides what a header means — which image class a file is,
its shape, on-disk dtype, data offset, scaling and affine (:mod:`anatcl_infer.inputs.headers`);
the array is computed by nibabel's own array-proxy code (``ArrayProxy._get_scaled``, what
``get_fdata`` runs) over the bytes read here. So every file read here gives exactly
``nibabel.load(path).get_fdata(dtype=np.float32)`` and ``nibabel.load(path).affine``, bit for
bit — or it is refused with its reason (``InputError.reason``, see :data:`REASONS`).

What is read: single-file NIfTI-1/-2 (``.nii``, ``.nii.gz``, ``.nii.bz2``), NIfTI-1/-2 and
Analyze 7.5 pairs (``.hdr`` + ``.img``, each possibly compressed) and MGH (``.mgh``, ``.mgz``).
Compression follows the file name, as in nibabel; a file whose bytes contradict its name is
refused.

The bytes (:mod:`anatcl_infer.inputs.streams`): only regular files are opened; the header is
read and judged before any image data; a compressed file is inflated as a stream (``isal``
when installed, else ``zlib``; every gzip member, in linear time) straight into an array of the
size the header declares, never holding the compressed file; a ``vox_offset`` is skipped, never
stored; after the data, at most 1 MiB more may follow (more is a gzip bomb, refused). Memory
is one volume above normal whatever the file's length. Each input has a deadline
(:func:`read_timeout`, ``ANATCL_READ_TIMEOUT``, default 120 s) after which it alone fails.

Why not ``nibabel.load``: for ``.nii.gz`` it reads 2x slower (REFERENCE §6), does not bound
decompression by the declared size, and costs quadratic time on many empty gzip members.
"""

from __future__ import annotations

import atexit
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from .headers import MAX_DATA_BYTES, MAX_HEADER_BYTES, REFUSALS, HeaderInfo, header_bytes_needed, image_class_for, is_pair_name, nibabel_messages, parse_header
from .streams import BZIP2_MAGIC, GZIP_MAGIC, CompressedStream, CorruptStream, Deadline, DeadlineExceeded, PlainStream, Truncated
from .streams import open_regular as _open_regular
from .streams import printable as _printable

if TYPE_CHECKING:
    from nibabel.spatialimages import SpatialImage

__all__ = [
    "read_nifti", "read_volume", "load_volume", "count_volumes", "read_timeout", "VolumeRead", "NiftiVolume",
    "HeaderInfo", "MAX_DATA_BYTES", "NIFTI_SUFFIXES", "REASONS",
]

logger = logging.getLogger(__name__)

#: File name endings treated as NIfTI by input discovery.
NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")

#: Every ``InputError.reason`` the reader gives, with what it means.
REASONS: dict[str, str] = {
    **REFUSALS,
    "not-a-file": "missing, a directory, a FIFO, a device, a broken or looping link, unreadable",
    "file-name": "a file name that is not valid UTF-8",
    "empty": "a 0-byte file",
    "compression": "bytes that contradict the name's compression (.gz not gzip, gzip named .nii), or zstd",
    "format": "not a NIfTI, Analyze or MGH file",
    "pair-missing": "one file of a .hdr/.img pair is missing",
    "corrupt-stream": "a truncated or corrupt gzip/bzip2 stream",
    "truncated": "less image data than the header declares",
    "bomb": "more decompressed data after the image than any writer leaves (a gzip bomb)",
    "scaling-non-finite": "the scale factor makes finite data infinite",
    "deadline": "reading took longer than its deadline",
    "memory": "the image does not fit in memory",
    "volumes": "a 4D file given where one volume is taken, or more than 4 dimensions",
    "not-3d": "fewer than 3 dimensions",
    "no-orientation": "no orientation (NIfTI codes 0, Analyze, MGH without goodRASFlag) and not the reference grid's shape",
}

_DEFAULT_TIMEOUT = 120.0
# How much decompressed data may follow the image (padding, an MGH footer) before it is a bomb.
_INFLATE_MARGIN = 1 << 20
_SNIFF = 1024  # header bytes read first (nibabel sniffs 1024 too)
_CODECS = {".gz": "gzip", ".mgz": "gzip", ".bz2": "bzip2", ".zst": "zstd"}


def read_timeout() -> float | None:
    """Seconds one input may take to read: ``ANATCL_READ_TIMEOUT`` (``0``/``none``: no limit), default 120."""
    raw = os.environ.get("ANATCL_READ_TIMEOUT", "").strip().lower()
    if not raw:
        return _DEFAULT_TIMEOUT
    if raw in ("0", "none", "inf", "off"):
        return None
    try:
        return float(raw)
    except ValueError:
        logger.warning("ANATCL_READ_TIMEOUT=%r is not a number of seconds; using %g", raw, _DEFAULT_TIMEOUT)
        return _DEFAULT_TIMEOUT


def _fail(message: str, name: str | None, reason: str, stage: str = "read") -> InputError:
    return InputError(message, path=name, stage=stage, reason=reason)


def _identity(fd: int) -> tuple[int, ...]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _open_stream(p: Path, name: str, deadline: Deadline, *, has_header: bool) -> tuple[Any, tuple[int, ...]]:
    """A stream over one file, compressed or not as its name says (nibabel's rule), checked against its first bytes."""
    fd = _open_regular(p, name)
    fh = os.fdopen(fd, "rb")
    try:
        identity = _identity(fd)
        first = fh.read(4)
        fh.seek(0)
        if not first:
            raise _fail("is an empty file (0 bytes); the image was not written completely — recreate it", name, "empty")
        ext = os.path.splitext(p.name)[1].lower()
        codec = _CODECS.get(ext)
        if codec == "zstd":
            raise _fail("is zstd-compressed (.zst), which is not read here; decompress it (zstd -d) or save it as .nii.gz", name, "compression")
        if codec == "gzip" and first[:2] != GZIP_MAGIC:
            raise _fail(f"is named {ext} but is not gzip-compressed; rename it (e.g. to .nii) if it is an uncompressed image", name, "compression")
        if codec == "bzip2" and first[:3] != BZIP2_MAGIC:
            raise _fail("is named .bz2 but is not bzip2-compressed; rename it", name, "compression")
        if codec is None and has_header and first[:2] == GZIP_MAGIC:
            raise _fail(f"is gzip-compressed but named {p.name!r}; rename it to end in .gz (e.g. .nii.gz)", name, "compression")
        stream = PlainStream(fh, deadline) if codec is None else CompressedStream(fh, codec, deadline)
        return stream, identity
    except BaseException:
        fh.close()
        raise


def _read_upto(stream: Any, n: int) -> bytes:
    buf = bytearray(n)
    got = stream.readinto(memoryview(buf))
    return bytes(buf[:got])


@dataclass
class _Opened:
    """An input whose header has been read: its meaning, and the data file's stream."""

    info: HeaderInfo
    stream: Any
    buffered: bytes  # the data file's first bytes, already read with the header (single files)
    identity: tuple[int, ...]
    name: str

    def close(self) -> None:
        self.stream.close()


def _guess_message(head: bytes, name: str) -> InputError:
    """Why a single file's first bytes are no header nibabel recognises."""
    for order in "<>":
        size = int(np.frombuffer(head[:4].ljust(4, b"\0"), dtype=order + "i4")[0])
        if size in (348, 540) and len(head) < size:
            version = 1 if size == 348 else 2
            return _fail(f"is truncated inside its NIfTI-{version} header ({len(head)} of {size} bytes); copy or recreate it", name, "truncated-header")
    lower = name.lower()
    if is_pair_name(lower) or lower.endswith(NIFTI_SUFFIXES) or ".nii." in lower:
        return _fail("is not a NIfTI file (its header does not start like a NIfTI-1 or NIfTI-2 header); convert it to "
                     ".nii/.nii.gz, e.g. with dcm2niix for DICOM", name, "format")
    return _fail("cannot be read as a neuroimaging volume (read here: NIfTI-1/-2 .nii/.nii.gz, .hdr/.img pairs, "
                 "MGH .mgh/.mgz); give a .nii or .nii.gz file", name, "format")


def _open_input(path: str | os.PathLike[str], deadline: Deadline) -> _Opened:
    """Open an input and read its header as nibabel does (refusals raised here)."""
    p = Path(path)
    name = _printable(os.fspath(p))
    try:
        os.fspath(p).encode("utf-8")
    except UnicodeEncodeError:
        raise _fail("has a file name that is not valid UTF-8, which cannot be stored in the output table; rename the file", name, "file-name") from None
    if is_pair_name(p.name):
        return _open_pair(p, name, deadline)
    stream, identity = _open_stream(p, name, deadline, has_header=True)
    try:
        head = _read_upto(stream, _SNIFF)
        klass = image_class_for(p.name, head)
        if klass is None:
            raise _guess_message(head, name)
        needed = header_bytes_needed(klass, head)
        if len(head) < needed <= MAX_HEADER_BYTES:
            head += _read_upto(stream, needed - len(head))
        info = parse_header(klass, head, name, single=True)
        return _Opened(info, stream, head, identity, name)
    except (Truncated, CorruptStream, DeadlineExceeded) as exc:
        stream.close()
        raise _stream_error(exc, name) from None
    except OSError as exc:  # an I/O error while reading (EIO on a network disk, ...)
        stream.close()
        raise _fail(f"cannot be read ({type(exc).__name__}: {exc}); check the file and its disk", name, "not-a-file") from None
    except MemoryError:
        stream.close()
        raise _fail("does not fit in memory while its header is read; free memory or use fewer loader workers", name, "memory") from None
    except BaseException:
        stream.close()
        raise


def _open_pair(p: Path, name: str, deadline: Deadline) -> _Opened:
    """A ``.hdr``/``.img`` pair (NIfTI or Analyze): the header file, then a stream on the image file."""
    import nibabel as nib
    from nibabel.filename_parser import types_filenames

    os.close(_open_regular(p, name))  # the file given: missing, a directory, a FIFO... said as such
    files = types_filenames(os.fspath(p), nib.Nifti1Pair.files_types, trailing_suffixes=nib.Nifti1Pair._compressed_suffixes)
    hdr_path, img_path = Path(files["header"]), Path(files["image"])
    for kind, other in (("header", hdr_path), ("image", img_path)):
        if not os.path.lexists(other):
            given = "header" if kind == "image" else "image"
            raise _fail(f"is the {given} file of a .hdr/.img pair, but its {kind} file {_printable(other.name)} is missing; "
                        f"give both files side by side (or convert the pair to .nii.gz)", name, "pair-missing")
    stream, _ = _open_stream(hdr_path, name, deadline, has_header=True)
    try:
        head = _read_upto(stream, MAX_HEADER_BYTES + 1)
        _check_garbage(stream, name)
    except (Truncated, CorruptStream, DeadlineExceeded) as exc:
        raise _stream_error(exc, name) from None
    except OSError as exc:
        raise _fail(f"cannot be read ({type(exc).__name__}: {exc}); check the file and its disk", name, "not-a-file") from None
    finally:
        stream.close()
    klass = image_class_for(hdr_path.name, head)
    if klass is None:
        raise _fail(f"is not a NIfTI or Analyze image: its header file {_printable(hdr_path.name)} holds no NIfTI-1/-2 or "
                    "Analyze header", name, "format")
    info = parse_header(klass, head, name, single=False)
    data, identity = _open_stream(img_path, name, deadline, has_header=False)
    return _Opened(info, data, b"", identity, name)


def _check_garbage(stream: Any, name: str) -> None:
    """Refuse bytes after a compressed file's last member that are neither zero padding nor a member."""
    if getattr(stream, "garbage", False):
        raise _fail(f"has bytes after the end of its {stream.codec} stream that are neither padding nor another "
                    f"{stream.codec} member; the file is corrupt (gzip readers refuse it) — recreate it", name, "corrupt-stream")


def _stream_error(exc: BaseException, name: str) -> InputError:
    if isinstance(exc, DeadlineExceeded):
        return _fail(f"{exc} (ANATCL_READ_TIMEOUT); the file is very large, its disk very slow, or it is hostile — it was "
                     "not read further", name, "deadline")
    return _fail(f"is a truncated or corrupt {getattr(exc, 'codec', 'gzip')} file ({exc}); the file was probably cut short or damaged while "
                 "copying or writing — copy or recreate it", name, "corrupt-stream")


def _read_block(opened: _Opened, start: int, n: int) -> np.ndarray:
    """Bytes ``[start, start + n)`` of the (decompressed) data file, read forward into a new uint8 array."""
    info, stream, name = opened.info, opened.stream, opened.name
    try:
        out = np.empty(n, dtype=np.uint8)
    except MemoryError:
        raise _fail(f"needs {n / 2**20:.0f} MiB for its image data, which does not fit in memory; free memory or use fewer "
                    "loader workers", name, "memory") from None
    view = memoryview(out)
    filled = 0
    if start < len(opened.buffered):
        part = opened.buffered[start: start + n]
        view[: len(part)] = part
        filled = len(part)
    try:
        if filled < n:
            gap = start + filled - stream.position
            if gap < 0:
                raise RuntimeError("the stream has already passed this volume")  # callers reopen before this
            if gap and stream.skip(gap) < gap:
                filled = -1
            else:
                filled += stream.readinto(view[filled:])
        end = info.offset + info.data_bytes
        if filled == n and start + n == end and isinstance(stream, CompressedStream):
            if stream.exceeds(_INFLATE_MARGIN):
                raise _fail(f"decompresses to more data than its header declares ({end} bytes for shape {info.shape}); the "
                            "file is corrupt or hostile — it was not read further", name, "bomb")
            _check_garbage(stream, name)
    except (Truncated, CorruptStream, DeadlineExceeded) as exc:
        raise _stream_error(exc, name) from None
    except InputError:
        raise
    except OSError as exc:  # an I/O error while reading (EIO on a network disk, ...)
        raise _fail(f"cannot be read ({type(exc).__name__}: {exc}); check the file and its disk", name, "not-a-file") from None
    except MemoryError:
        raise _fail("does not fit in memory while it is decompressed; free memory or use fewer loader workers", name, "memory") from None
    if filled != n:
        have = "less" if filled < 0 else f"{start + filled} bytes"
        raise _fail(f"is truncated: the header announces {info.offset + info.data_bytes} bytes of image data and header "
                    f"but the file holds {have}; the file was probably cut short while copying — copy it again", name, "truncated")
    return out


class _Cursor:
    """The last 4D compressed input read, kept open so the next volume continues the stream
    (a file of N volumes costs one pass, not N; one per process)."""

    opened: _Opened | None = None

    @classmethod
    def take(cls, path: str, identity: tuple[int, ...]) -> _Opened | None:
        o = cls.opened
        cls.opened = None
        if o is not None and o.identity == identity and o.name == _printable(path):
            return o
        if o is not None:
            o.close()
        return None

    @classmethod
    def keep(cls, opened: _Opened) -> None:
        cls.close()
        cls.opened = opened

    @classmethod
    def close(cls) -> None:
        if cls.opened is not None:
            cls.opened.close()
            cls.opened = None


atexit.register(_Cursor.close)


def _proxy(raw: np.ndarray, spec: Any) -> Any:
    """A nibabel ``ArrayProxy`` whose bytes are ``raw``: nibabel's scaling code, our bytes."""
    from nibabel.arrayproxy import ArrayProxy

    class _BufferProxy(ArrayProxy):
        def _get_unscaled(self, slicer: Any) -> np.ndarray:
            return raw if slicer == () else raw[slicer]

    return _BufferProxy("<memory>", spec, mmap=False)


def _scaled(info: HeaderInfo, raw: np.ndarray, spec: Any, name: str) -> np.ndarray:
    """``get_fdata(dtype=float32)`` over ``raw``, as nibabel computes it; finite data made infinite by the scaling is refused."""
    with nibabel_messages(name):
        data = np.asanyarray(_proxy(raw, spec), dtype=np.float32)  # what DataobjImage.get_fdata runs
    if (info.slope, info.inter) != (1, 0) and not np.isfinite(data).all() and (raw.dtype.kind != "f" or np.isfinite(raw).all()):
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        raise _fail(f"has a scale factor (scl_slope {info.slope:g}, scl_inter {info.inter:g}) that turns {bad} finite "
                    "voxels into infinite values; its header is corrupt — re-export the image", name, "scaling-non-finite")
    return data


@dataclass(frozen=True)
class VolumeRead:
    """One 3D volume read from a file, with what its header says.

    Attributes:
        data: float32, the file's shape (Fortran order for NIfTI): ``get_fdata(dtype=float32)``.
        affine: nibabel's 4x4 affine (for ``orientation == "none"``, nibabel's guess).
        orientation: ``"sform"``, ``"qform"``, ``"mgh"`` or ``"none"`` (see :class:`HeaderInfo`).
        format: the format's name (``"NIfTI-1"``, ``"Analyze"``...).
        volume: the volume's index in a 4D file, else None.
        n_volumes: how many volumes the file holds.
    """

    data: np.ndarray
    affine: np.ndarray
    orientation: str
    format: str
    volume: int | None
    n_volumes: int


def _volume_shape(info: HeaderInfo, name: str) -> tuple[int, ...]:
    shape = info.shape
    if len(shape) < 3:
        raise _fail(f"is a {len(shape)}D image of shape {shape}; the model takes a 3D volume", name, "not-3d", "check")
    if any(s != 1 for s in shape[4:]):
        raise _fail(f"is a {len(shape)}D image of shape {shape}; the model takes 3D volumes (a 4D file is read one "
                    "volume at a time)", name, "volumes", "check")
    return shape[:3]


def read_volume(path: str | os.PathLike[str], volume: int | None = None, *, timeout: float | None = -1.0) -> VolumeRead:
    """Read one 3D volume of an image file, exactly as nibabel reads it, or refuse it with the reason.

    Args:
        path: a ``.nii``/``.nii.gz``/``.nii.bz2``, a ``.hdr``/``.img`` pair (either name), ``.mgh``/``.mgz``.
        volume: which volume of a 4D file (0-based); None for a 3D file (or a 4D one of one volume).
        timeout: seconds the read may take (None: no limit); default :func:`read_timeout`.

    Returns:
        A :class:`VolumeRead` whose ``data`` is ``nibabel.load(path).get_fdata(dtype=np.float32)``
        (``[..., volume]`` for a 4D file) and ``affine`` is ``nibabel.load(path).affine``.

    Raises:
        InputError: ``stage="read"`` for every way the file is unusable, ``stage="check"`` for
            a 4D file without ``volume`` (or one out of range) and for other than 3D/4D data; the
            ``reason`` attribute names the rule (:data:`REASONS`).

    Example:
        >>> v = read_volume("examples/data/mwp1sub-mni01_T1w.nii.gz")
        >>> v.data.shape, v.orientation
        ((121, 145, 121), 'sform')
    """
    deadline = Deadline(read_timeout() if timeout == -1.0 else timeout)
    name = _printable(os.fspath(path))
    opened: _Opened | None = None
    if volume is not None:
        try:
            identity = _identity_of(path)
        except OSError:
            identity = ()
        opened = _Cursor.take(os.fspath(path), identity) if identity else None
    if opened is None:
        opened = _open_input(path, deadline)
    else:
        opened.stream.deadline = deadline
    keep = False
    try:
        info = opened.info
        shape3 = _volume_shape(info, name)
        n = info.n_volumes
        if volume is None and n > 1:
            raise _fail(f"is a 4D image of shape {info.shape} holding {n} volumes; the model takes one 3D volume per input — "
                        "encode()/extract_features() embed each volume as one row; otherwise split it (e.g. `fslsplit` or "
                        "nibabel's `image.slicer[..., i]`) and pass each volume", name, "volumes", "check")
        index = 0 if volume is None else int(volume)
        if not 0 <= index < n:
            raise _fail(f"has {n} volume(s); volume {index} does not exist", name, "volumes", "check")
        start = info.offset + index * info.volume_bytes
        if opened.stream.position > max(start, len(opened.buffered)):  # a kept stream already past this volume: start over
            opened.close()
            opened = _open_input(path, deadline)
        raw_bytes = _read_block(opened, start, info.volume_bytes)
        raw = np.ndarray(shape3, dtype=info.dtype, buffer=raw_bytes, order="F")
        data = _scaled(info, raw, (shape3, info.dtype, start, info.slope, info.inter), name)
        keep = n > 1 and index < n - 1 and isinstance(opened.stream, CompressedStream)
        return VolumeRead(data, info.affine.copy(), info.orientation, info.format, None if volume is None else index, n)
    finally:
        if keep:
            _Cursor.keep(opened)
        else:
            opened.close()


def _identity_of(path: str | os.PathLike[str]) -> tuple[int, ...]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else ()


def count_volumes(path: str | os.PathLike[str], *, timeout: float | None = -1.0) -> int:
    """How many 3D volumes a file holds (its header only is read): 1 for a 3D file, N for a 4D one
    (1 for data that are no 3D volumes, such as 2D or 5D: the file is refused once when read).

    Raises:
        InputError: the file cannot be read or is refused (same rules as :func:`read_volume`).
    """
    opened = _open_input(path, Deadline(read_timeout() if timeout == -1.0 else timeout))
    try:
        shape = opened.info.shape
        if len(shape) < 3 or any(s != 1 for s in shape[4:]):
            return 1  # not volumes: refused once, when the file is read
        return opened.info.n_volumes
    finally:
        opened.close()


def read_nifti(path: str | os.PathLike[str], *, timeout: float | None = -1.0) -> SpatialImage:
    """Read a whole image file into memory as the nibabel image ``nibabel.load`` would return.

    Same formats, rules and bounds as :func:`read_volume`; the image's class, header, affine
    and ``get_fdata()`` are nibabel's. The whole data array is read (all volumes), at most
    :data:`MAX_DATA_BYTES`.

    Raises:
        InputError: (``stage="read"``) for every way the file can be unusable, with the reason.

    Example:
        >>> img = read_nifti("examples/data/mwp1sub-mni01_T1w.nii.gz")
        >>> img.shape
        (121, 145, 121)
    """
    import nibabel as nib

    deadline = Deadline(read_timeout() if timeout == -1.0 else timeout)
    opened = _open_input(path, deadline)
    try:
        info = opened.info
        if info.data_bytes > MAX_DATA_BYTES:
            raise _fail(f"holds {info.data_bytes / 2**30:.1f} GiB of image data in {info.n_volumes} volumes; read it one "
                        "volume at a time (read_volume)", opened.name, "too-large")
        raw_bytes = _read_block(opened, info.offset, info.data_bytes)
    finally:
        opened.close()
    raw = np.ndarray(info.shape, dtype=info.dtype, buffer=raw_bytes, order="F")
    header = info.header.copy()
    with nibabel_messages(opened.name):
        proxy = _proxy(raw, header)
        if info.image_class is nib.MGHImage:
            return info.image_class(proxy, info.affine.copy(), info.header)
        img = info.image_class(proxy, None, info.header)  # as from_file_map: the header passes through unmodified
        img._affine = info.affine.copy()
    return img


def load_volume(source: Any, volume: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read one 3D volume and its affine.

    Scaling (``scl_slope``/``scl_inter``) is applied as nibabel applies it, to float data too;
    a 4D image holding a single volume is squeezed to 3D.

    Args:
        source: a path to an image file (read by :func:`read_volume`), or a nibabel image in memory.
        volume: for a 4D file of several volumes, which one (0-based).

    Returns:
        ``(data, affine)``: a float32 array with 3 dimensions (in the file's memory order,
        usually Fortran order; conforming and cropping return C-ordered copies), and the
        4x4 float64 voxel-to-world affine (nibabel's; for a file without orientation, nibabel's
        guess — :func:`~anatcl_infer.inputs.preprocess.prepare` refuses those unless they have
        the reference grid's shape).

    Raises:
        InputError: the file cannot be read (``stage="read"``), or it is not a single 3D
            volume (``stage="check"``).

    Example:
        >>> data, affine = load_volume("examples/data/mwp1sub-mni01_T1w.nii.gz")
        >>> data.dtype, data.shape
        (dtype('float32'), (121, 145, 121))
    """
    if isinstance(source, (str, os.PathLike)):
        read = read_volume(source, volume)
        return read.data, read.affine
    img = source
    name = _image_name(img)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) > 3 and all(s == 1 for s in shape[3:]):
        squeeze = True
    elif len(shape) > 3:
        raise _fail(f"is a {len(shape)}D image of shape {shape} holding {int(np.prod(shape[3:]))} volumes; the model takes "
                    "one 3D volume — split it (e.g. `fslsplit` or nibabel's `image.slicer[..., i]`) and pass each volume",
                    name, "volumes", "check")
    elif len(shape) < 3:
        raise _fail(f"is a {len(shape)}D image of shape {shape}; the model takes a 3D volume", name, "not-3d", "check")
    else:
        squeeze = False
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:  # a broken data block surfaces here
        raise InputError(f"image data cannot be read ({type(exc).__name__}: {exc})", path=name, stage="read") from None
    if squeeze:
        data = data.reshape(shape[:3])
    affine = np.asarray(img.affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise InputError("has no usable voxel-to-world affine; fix its header (sform/qform)", path=name, stage="read")
    return np.asarray(data, dtype=np.float32), affine


@dataclass(frozen=True)
class NiftiVolume:
    """One volume of a 4D image file, as an input (:func:`~anatcl_infer.inputs.preprocess.split_volumes` makes them).

    Attributes:
        path: the file.
        index: the volume (0-based).
        count: how many volumes the file holds.
    """

    path: str
    index: int
    count: int

    def __str__(self) -> str:
        return f"{_printable(self.path)}[volume {self.index}]"


def _image_name(img: Any) -> str | None:
    """The file an in-memory nibabel image was read from, if nibabel knows it."""
    try:
        filename = img.get_filename()
    except Exception:  # images built from arrays have no file map entry
        return None
    return os.fspath(filename) if filename else None
