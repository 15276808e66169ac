"""Reading torch's two containers: the zip archive (torch >= 1.6) and the legacy pre-1.6 stream.

Each reader checks the sizes the container declares against the file, pre-scans and unpickles
its pickles with the allowlist unpickler, and reads a storage's bytes straight from the file
(byte-swapped where the writer's byte order differs) when a kept tensor needs them.
"""

from __future__ import annotations

import io
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError
from .allowlist import _SafeUnpickler
from .limits import LIMITS, _bad, _Refused, _refuse_sizes
from .prescan import _scan
from .rebuild import _Storage
from .result import _finish, _Walker

_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of the legacy format
_ZIP_MAGIC = b"PK\x03\x04"


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _read_into(stream: Any, nbytes: int, dtype: torch.dtype, swap: bool, what: str) -> torch.Tensor:
    """The next ``nbytes`` of ``stream`` as a fresh flat tensor of ``dtype`` (one copy, byte-swapped if asked)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    got = 0
    while got < nbytes:
        n = stream.readinto(view[got:])
        if not n:
            raise _bad(f"{what} is truncated ({nbytes - got} bytes missing)")
        got += n
    itemsize = _itemsize(dtype)
    if swap and itemsize > 1:
        buf = buf.view(-1, itemsize).flip(1).reshape(-1).contiguous()
    return buf.view(dtype)


def _load_zip(path: Path, where: str) -> Any:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{where} is a damaged or truncated checkpoint ({exc}); download it again", path=where) from None
    file_size = path.stat().st_size
    with archive, open(path, "rb") as raw:
        infos = {info.filename: info for info in archive.infolist()}
        declared = sum(info.file_size for info in infos.values())
        if declared > file_size + LIMITS["inflate_slack"]:
            raise _refuse_sizes(where, f"its members declare {declared} bytes inside a {file_size}-byte archive")
        pkl_names = [n for n in infos if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl_names) != 1:
            raise CheckpointError(
                f"{where} is a zip file but not a torch checkpoint (no single data.pkl inside); "
                "pass a .pth written by torch.save, a .safetensors file or a model directory",
                path=where,
            )
        prefix = pkl_names[0][: -len("data.pkl")]
        swap = False
        if f"{prefix}byteorder" in infos and infos[f"{prefix}byteorder"].file_size < 16:
            swap = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip() != sys.byteorder

        def read_storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
            name = f"{prefix}data/{key}"
            info = infos.get(name)
            if info is None:
                raise _bad(f"storage {name} is missing from the archive")
            nbytes = numel * _itemsize(dtype)
            if info.file_size != nbytes:
                raise _Refused(f"storage {name} holds {info.file_size} bytes, the pickle says {nbytes}")
            if info.compress_type == zipfile.ZIP_STORED:
                raw.seek(info.header_offset)
                header = raw.read(30)
                if len(header) != 30 or header[:4] != _ZIP_MAGIC:
                    raise _bad(f"storage {name} has a damaged zip header")
                n_name, n_extra = struct.unpack("<HH", header[26:30])
                start = info.header_offset + 30 + n_name + n_extra
                if start + nbytes > file_size:
                    raise _bad(f"storage {name} runs past the end of the file")
                raw.seek(start)
                return _read_into(raw, nbytes, dtype, swap, f"storage {name}")
            with archive.open(info) as member:  # inflation stops at the declared size
                return _read_into(member, nbytes, dtype, swap, f"storage {name}")

        def storage(key: str, dtype: torch.dtype, numel: int, view: Any) -> _Storage:
            return _Storage(key, dtype, numel, read_storage)

        info = infos[pkl_names[0]]
        if info.file_size > LIMITS["pickle_bytes"]:
            raise _refuse_sizes(where, f"its data.pkl declares {info.file_size} bytes (limit {LIMITS['pickle_bytes']})")
        data = io.BytesIO(archive.read(info))
        partials = _scan(data, info.file_size, where)
        unpickler = _SafeUnpickler(data, path=where, storage=storage, partial_callables=partials)
        return _finish(unpickler.load(), unpickler, _Walker(where))


def _load_legacy(path: Path, where: str) -> Any:
    """The pre-1.6 format: magic, protocol, sys info and the object, then storage keys and raw storages."""
    file_size = path.stat().st_size
    with open(path, "rb") as fh:
        def small() -> Any:
            _scan(fh, min(file_size - fh.tell(), 1 << 16), where)
            return _SafeUnpickler(fh, path=where, storage=None).load()

        if small() != _TORCH_MAGIC:
            raise CheckpointError(f"{where} is not a torch checkpoint (bad legacy magic number)", path=where)
        if small() != 1001:
            raise CheckpointError(f"{where} uses a legacy torch protocol this loader does not know", path=where)
        info = small()
        little = not isinstance(info, dict) or info.get("little_endian", True)
        swap = bool(little) != (sys.byteorder == "little")
        offsets: dict[str, tuple[int, int]] = {}

        def read_storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
            if key not in offsets:
                raise _bad(f"storage {key} has no data in the file")
            start, nbytes = offsets[key]
            if nbytes != numel * _itemsize(dtype):
                raise _Refused(f"storage {key} holds {nbytes} bytes, the pickle says {numel * _itemsize(dtype)}")
            fh.seek(start)
            return _read_into(fh, nbytes, dtype, swap, f"storage {key}")

        declared: dict[str, _Storage] = {}

        def storage(key: str, dtype: torch.dtype, numel: int, view: Any) -> _Storage:
            if view is not None:
                raise _bad("legacy storage views (torch < 0.4) are not supported")
            declared[key] = _Storage(key, dtype, numel, read_storage)
            return declared[key]

        partials = _scan(fh, min(file_size - fh.tell(), LIMITS["pickle_bytes"]), where)
        unpickler = _SafeUnpickler(fh, path=where, storage=storage, partial_callables=partials)
        obj = unpickler.load()
        keys = small()
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise CheckpointError(f"{where}: the legacy storage list is damaged", path=where)
        pos = fh.tell()
        for key in keys:
            fh.seek(pos)
            head = fh.read(8)
            if len(head) != 8:
                raise _refuse_sizes(where, f"storage {key} is cut short")
            numel = int.from_bytes(head, "little")
            dtype = declared[key].dtype if key in declared else torch.uint8
            nbytes = numel * _itemsize(dtype)
            if key in declared and numel != declared[key].numel:
                raise _refuse_sizes(where, f"storage {key} holds {numel} elements, the pickle says {declared[key].numel}")
            if pos + 8 + nbytes > file_size:
                raise _refuse_sizes(where, f"storage {key} declares {nbytes} bytes past the end of the file")
            offsets[key] = (pos + 8, nbytes)
            pos += 8 + nbytes
        return _finish(obj, unpickler, _Walker(where))
