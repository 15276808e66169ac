"""Tensors, storages and numpy objects rebuilt from what the pickle declares, after checking it.

* :class:`_Storage` reads its bytes (through the container's reader) only when a kept tensor
  needs them; :class:`_PendingTensor` is a view checked against its storage by :func:`_rebuild`
  (inside it, no negative, stride-0 or overlapping strides) and materialised after unpickling;
* ``torch._utils._rebuild_tensor*``/``_rebuild_parameter``/``_rebuild_from_type_v2``,
  ``torch.Size``, ``torch.device`` and numpy's ``_reconstruct``/``_frombuffer``/``scalar``/``dtype``
  as the allowlist hands them to the unpickler, with sizes bounded by :data:`LIMITS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .limits import LIMITS, _bad, _Refused
from .stand_ins import _Frozen


class _Storage:
    """A storage the pickle refers to; its bytes are read only when a kept tensor needs them."""

    __slots__ = ("key", "dtype", "numel", "_reader", "_flat")

    def __init__(self, key: str, dtype: torch.dtype, numel: int, reader: Callable[[str, torch.dtype, int], torch.Tensor]) -> None:
        self.key, self.dtype, self.numel, self._reader, self._flat = key, dtype, numel, reader, None

    def flat(self) -> torch.Tensor:
        if self._flat is None:
            self._flat = self._reader(self.key, self.dtype, self.numel)
        return self._flat


class _PendingTensor:
    """A tensor described by the pickle, materialised after unpickling (storages come last in legacy files)."""

    __slots__ = ("storage", "offset", "size", "stride", "dtype")

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype) -> None:
        self.storage, self.offset, self.size, self.stride, self.dtype = storage, offset, size, stride, dtype

    def materialize(self) -> torch.Tensor:
        flat = self.storage.flat()
        if flat.dtype != self.dtype:
            flat = flat.view(torch.uint8).view(self.dtype)
        if any(s == 0 for s in self.size):
            return torch.empty(self.size, dtype=self.dtype)
        if not self.size:
            return flat[self.offset].clone()
        contiguous = tuple(int(np.prod(self.size[i + 1:])) for i in range(len(self.size)))
        if self.offset == 0 and self.stride == contiguous and int(np.prod(self.size)) == flat.numel():
            return flat.view(self.size)  # the whole storage: no copy
        return torch.as_strided(flat, self.size, self.stride, self.offset).clone()


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list, torch.Size)) or len(value) > 16:
        raise _bad(f"tensor {what} must be a short tuple of integers, got {type(value).__name__}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise _bad(f"tensor {what} must hold integers, got {type(v).__name__}")
        out.append(int(v))
    return tuple(out)


def _rebuild(storage: Any, storage_offset: Any, size: Any, stride: Any, dtype: torch.dtype | None = None) -> _PendingTensor:
    """Check a view against its storage: inside it, no negative or overlapping strides."""
    if not isinstance(storage, _Storage):
        raise _bad(f"expected a tensor storage, got {type(storage).__name__}")
    if isinstance(storage_offset, bool) or not isinstance(storage_offset, (int, np.integer)):
        raise _bad("tensor storage offset must be an integer")
    dtype = storage.dtype if dtype is None else dtype
    size, stride, offset = _ints(size, "size"), _ints(stride, "stride"), int(storage_offset)
    if len(size) != len(stride):
        raise _bad(f"tensor size {size} and stride {stride} differ in length")
    itemsize = torch.empty((), dtype=dtype).element_size()
    storage_items = storage.numel * torch.empty((), dtype=storage.dtype).element_size() // itemsize
    if min(size, default=1) < 0 or min(stride, default=0) < 0 or offset < 0:
        raise _bad(f"tensor of size {size}, stride {stride}, offset {offset} has negative entries")
    if size and min(size) == 0:
        return _PendingTensor(storage, offset, size, stride, dtype)
    # non-overlapping: along strides in increasing order, each stride must step past what the
    # smaller ones cover (stride-0 and overlapping views would multiply memory on copy)
    extent = 0
    for n, st in sorted(((n, st) for n, st in zip(size, stride) if n > 1), key=lambda p: p[1]):
        if st <= extent:
            raise _Refused(f"tensor of size {size} and stride {stride} overlaps itself (stride 0 or overlapping view)")
        extent += (n - 1) * st
    if offset + extent >= storage_items:
        raise _Refused(f"tensor of size {size} and stride {stride} at offset {offset} does not fit its storage of {storage_items} elements")
    return _PendingTensor(storage, offset, size, stride, dtype)


def _rebuild_tensor_v1(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _PendingTensor:
    return _rebuild(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False, backward_hooks: Any = None, metadata: Any = None) -> _PendingTensor:
    return _rebuild(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any, backward_hooks: Any, dtype: Any, metadata: Any = None) -> _PendingTensor:
    if not isinstance(dtype, torch.dtype):
        raise _bad(f"expected a dtype, got {type(dtype).__name__}")
    return _rebuild(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data: Any, requires_grad: Any = True, backward_hooks: Any = None, state: Any = None) -> _PendingTensor:
    # Parameters come back as plain tensors: the caller copies them into a fresh network.
    if not isinstance(data, _PendingTensor):
        raise _bad(f"a parameter must wrap a tensor, got {type(data).__name__}")
    return data


_REBUILDERS = (_rebuild_tensor_v1, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """``torch._tensor._rebuild_from_type_v2`` restricted to our own rebuild functions."""
    if not isinstance(func, _Frozen) or func._fn not in _REBUILDERS or not isinstance(args, tuple):
        raise _bad("_rebuild_from_type_v2 may only call a tensor rebuild function")
    return func(*args)


def _torch_device(*args: Any) -> torch.device:
    if not all(isinstance(a, (str, int)) for a in args):
        raise _bad("torch.device takes a name and an index")
    return torch.device(*args)


def _torch_size(dims: Any = ()) -> torch.Size:
    return torch.Size(_ints(dims, "size"))


def _array_bytes(shape: Any, dtype: Any) -> None:
    dims = _ints(shape if isinstance(shape, (tuple, list)) else (shape,), "shape")
    itemsize = dtype.itemsize if isinstance(dtype, np.dtype) else 8
    if min(dims, default=0) < 0 or int(np.prod(dims, dtype=object)) * max(itemsize, 1) > LIMITS["object_bytes"]:
        raise _Refused(f"the checkpoint asks for a numpy array of shape {dims} (limit {LIMITS['object_bytes']} bytes)")


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise _bad("only numpy.ndarray may be reconstructed")
    if not isinstance(dtype, (bytes, str)):
        raise _bad("numpy _reconstruct takes a type code")
    _array_bytes(shape, np.dtype("u1"))
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _np_frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any = "C") -> np.ndarray:
    if not isinstance(buffer, (bytes, bytearray)) or not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise _bad("numpy _frombuffer takes bytes and a plain dtype")
    return np.frombuffer(bytes(buffer), dtype=dtype).reshape(_ints(shape, "shape"), order="F" if order == "F" else "C").copy()


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise _bad("numpy scalars of object dtype are not allowed")
    if not isinstance(data, bytes) or len(data) < dtype.itemsize:
        raise _bad("a numpy scalar needs its raw bytes")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _np_dtype(*args: Any) -> np.dtype:
    if not args or not isinstance(args[0], str) or not all(isinstance(a, (bool, int)) for a in args[1:]):
        raise _bad("numpy.dtype takes a type code")
    return np.dtype(*args)

