"""The crafted checkpoints of issue 22, each a few bytes to a few MB, and the pickle assembler that writes them.

Each one once crashed or bloated the process that read it (segfault, raw ``RecursionError``,
several GB of memory, a hang). :func:`build_crafted` writes them all into a folder and returns
name -> path; every one must now end as a package error (``CheckpointError``) in a caller that
lives on.

Example:
    >>> files = build_crafted(tmp_path)  # doctest: +SKIP
    >>> sorted(files)[:2]  # doctest: +SKIP
    ['bytearray_x40', 'deep_key_100k']
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from pathlib import Path

import torch

__all__ = ["build_crafted", "pickle_zip", "glob", "text", "CRAFTED"]


def glob(module: str, name: str) -> bytes:
    """``GLOBAL module name`` (protocol 2)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def text(value: str) -> bytes:
    """``BINUNICODE``."""
    raw = value.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value) if -(1 << 31) <= value < (1 << 31) else b"\x8a\x08" + struct.pack("<q", value)


def pickle_zip(path: Path, pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    """A torch-style zip (``archive/data.pkl``, ``archive/byteorder``, ``archive/data/<key>``) around ``pkl``."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", data)
    return path


def _dtype(code: str, state: bytes) -> bytes:
    """``numpy.dtype(code, False, True)`` followed by BUILD with the pickled ``state`` tuple."""
    return glob("numpy", "dtype") + text(code) + b"\x89\x88\x87R" + state + b"b"


def forged_dtype() -> bytes:
    """V16 given an object field by a forged state (flags 0: numpy then reports ``hasobject=False``), then ``_frombuffer``."""
    obj_dtype = _dtype("O8", b"(K\x03" + text("|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x3ft")
    fields = b"}" + text("f") + b"(" + obj_dtype + b"K\x00t" + b"s"  # {'f': (dtype('O'), 0)}
    state = b"(K\x03" + text("|") + b"N" + text("f") + b"\x85" + fields + b"K\x10K\x01K\x00t"
    return (b"\x80\x02" + glob("numpy._core.numeric", "_frombuffer") + b"(" + b"C\x10" + b"\x41" * 16
            + _dtype("V16", state) + b"K\x01\x85" + text("C") + b"tR.")


def forged_plain_dtype() -> bytes:
    """A float64 dtype whose BUILD state names fields: forged, refused."""
    state = b"(K\x03" + text("<") + b"N" + text("f") + b"\x85" + b"}" + b"K\x08K\x01K\x00t"
    return b"\x80\x02" + _dtype("f8", state) + b"."


def deep_key(depth: int) -> bytes:
    """A dict whose key is a tuple nested ``depth`` deep: hashing it recurses in C."""
    return b"\x80\x02}" + b")" + b"\x85" * depth + b"Ns."


def object_array() -> bytes:
    """``_reconstruct(ndarray)`` given the state of a 260-million-element object array (2.1 GB) with no items."""
    return (b"\x80\x02" + glob("numpy._core.multiarray", "_reconstruct") + glob("numpy", "ndarray") + b"K\x00\x85"
            + glob("_codecs", "encode") + text("b") + text("latin1") + b"\x86R\x87R"
            + b"(K\x01" + _int(260_000_000) + b"\x85"
            + _dtype("O8", b"(K\x03" + text("|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x3ft")
            + b"\x89]tb.")


def bytearrays(count: int = 40, size: int = 256 << 20) -> bytes:
    """A list of ``count`` ``bytearray(size)`` calls, each one within the per-object bound."""
    one = glob("builtins", "bytearray") + b"q\x01" + _int(size) + b"\x85R"
    again = b"h\x01" + _int(size) + b"\x85R"
    return b"\x80\x02](" + one + again * (count - 1) + b"e."


def frozenset_of_range(n: int = 100_000_000) -> bytes:
    """``frozenset(range(n))``: a few dozen bytes asking for n Python ints."""
    return b"\x80\x02" + glob("builtins", "frozenset") + glob("builtins", "range") + b"K\x00" + _int(n) + b"\x86R\x85R."


def write_views(path: Path, n_views: int = 150, numel: int = 4 << 20) -> Path:
    """One 16 MB storage and ``n_views`` partial views of it (each nearly the whole storage)."""
    base = torch.zeros(numel)
    torch.save({f"v{i}": base[i:] for i in range(n_views)}, path)
    return path


def inflating_bytes() -> tuple[bytes, int]:
    """A data.pkl member that inflates 16 MB into 3 GiB of zeros declared as one bytes object."""
    head = zlib.compressobj(9, zlib.DEFLATED, -15)
    return head.compress(b"\x80\x04\x8e" + struct.pack("<Q", 3 << 30)) + head.flush(), 3 << 30


#: name -> what the file is (for messages)
CRAFTED = {
    "forged_dtype": "V16 dtype with an object field given by a forged state (431-byte class of file)",
    "forged_plain_dtype": "float64 dtype whose state names fields",
    "deep_key_1m": "dict key: a tuple nested 1,000,000 deep",
    "deep_key_100k": "dict key: a tuple nested 100,000 deep",
    "object_array": "numpy object array of 260 million items from a few hundred bytes",
    "bytearray_x40": "bytearray(256 MB) x 40",
    "frozenset_range": "frozenset(range(10**8))",
    "views_150": "150 partial views of one 16 MB storage",
    "fifo": "a named pipe",
    "dev_zero": "a symbolic link to /dev/zero",
}


def build_crafted(root: Path) -> dict[str, Path]:
    """Write every crafted file of :data:`CRAFTED` into ``root``; returns name -> path."""
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "forged_dtype": pickle_zip(root / "forged_dtype.pth", forged_dtype()),
        "forged_plain_dtype": pickle_zip(root / "forged_plain_dtype.pth", forged_plain_dtype()),
        "deep_key_1m": pickle_zip(root / "deep_key_1m.pth", deep_key(1_000_000)),
        "deep_key_100k": pickle_zip(root / "deep_key_100k.pth", deep_key(100_000)),
        "object_array": pickle_zip(root / "object_array.pth", object_array()),
        "bytearray_x40": pickle_zip(root / "bytearray_x40.pth", bytearrays()),
        "frozenset_range": pickle_zip(root / "frozenset_range.pth", frozenset_of_range()),
        "views_150": write_views(root / "views_150.pth"),
    }
    os.mkfifo(root / "fifo.pth")
    files["fifo"] = root / "fifo.pth"
    os.symlink("/dev/zero", root / "dev_zero.pth")
    files["dev_zero"] = root / "dev_zero.pth"
    assert set(files) == set(CRAFTED)
    return files
