"""Tensors, storages and numpy objects rebuilt from what the pickle declares, after checking it.

* :class:`_Storage` reads its bytes (through the container's reader) only when a kept tensor
  needs them; :class:`_PendingTensor` is a view checked against its storage by :func:`_rebuild`
  (inside it, no negative, stride-0 or overlapping strides) and materialised after unpickling as
  a view of it (views share their storage: 150 views of one storage cost one storage);
* ``torch._utils._rebuild_tensor*``/``_rebuild_parameter``/``_rebuild_from_type_v2``,
  ``torch.Size``, ``torch.device`` as the allowlist hands them to the unpickler;
* numpy's ``dtype``/``_reconstruct``/``_frombuffer``/``scalar``: dtypes only of plain numeric/bool
  kinds (:class:`_PlainDtype`, whose BUILD may set the byte order and nothing else), objects/text
  held inert (:class:`_OpaqueDtype`), void and structured ones refused; arrays are
  :class:`_PendingArray` objects filled by one checked BUILD, their bytes (itemsize x count)
  charged to the load's budget (:func:`~.limits.charge`) before anything is allocated.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .limits import _bad, _Refused, charge
from .stand_ins import _Frozen


class _Storage:
    """A storage the pickle refers to; its bytes are read only when a kept tensor needs them."""

    __slots__ = ("key", "dtype", "numel", "_reader", "_flat")

    def __init__(self, key: str, dtype: torch.dtype, numel: int, reader: Callable[[str, torch.dtype, int], torch.Tensor]) -> None:
        self.key, self.dtype, self.numel, self._reader, self._flat = key, dtype, numel, reader, None

    def flat(self) -> torch.Tensor:
        if self._flat is None:
            charge(self.numel * torch.empty((), dtype=self.dtype).element_size(), f"storage {self.key}")
            self._flat = self._reader(self.key, self.dtype, self.numel)
        return self._flat


class _PendingTensor:
    """A tensor described by the pickle, materialised after unpickling (storages come last in legacy files)."""

    __slots__ = ("storage", "offset", "size", "stride", "dtype")

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype) -> None:
        self.storage, self.offset, self.size, self.stride, self.dtype = storage, offset, size, stride, dtype

    def materialize(self) -> torch.Tensor:
        """The tensor, as a view of its storage: tensors sharing a storage share its memory (as with ``torch.load``)."""
        flat = self.storage.flat()
        if flat.dtype != self.dtype:
            flat = flat.view(torch.uint8).view(self.dtype)
        if any(s == 0 for s in self.size):
            return torch.empty(self.size, dtype=self.dtype)
        if not self.size:
            return flat[self.offset]
        contiguous = tuple(int(np.prod(self.size[i + 1:])) for i in range(len(self.size)))
        if self.offset == 0 and self.stride == contiguous and int(np.prod(self.size)) == flat.numel():
            return flat.view(self.size)
        return torch.as_strided(flat, self.size, self.stride, self.offset)  # checked by _rebuild: inside, no overlap


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


#: numpy type codes (as ``numpy.dtype(code, align, copy)`` pickles them) of the plain kinds an array may have
_PLAIN_CODES = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"})
#: codes of dtypes that are held inert (never built by numpy; arrays of them are dropped): objects, text, dates
_OPAQUE_CODE = re.compile(r"(O[48]?|[US][0-9]{1,9}|[Mm]8)")
_BYTEORDERS = frozenset({"<", ">", "|", "="})


class _PlainDtype:
    """``numpy.dtype(code)`` of a plain numeric/bool kind, as the unpickler hands it out.

    The real dtype is made from the code alone (:meth:`resolve`); BUILD may only set the byte
    order, with the state numpy writes for these kinds ``(3, order, None, None, None, -1, -1, 0)``:
    names, fields, a subarray or flags in it are a forged dtype and refused.
    """

    __slots__ = ("code", "byteorder")

    def __init__(self, code: str) -> None:
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "byteorder", "=")

    def __setstate__(self, state: Any) -> None:
        itemsize = np.dtype(self.code).itemsize
        if (not isinstance(state, tuple) or len(state) != 8 or state[0] != 3 or state[1] not in _BYTEORDERS
                or state[2:5] != (None, None, None) or state[5] not in (-1, itemsize) or state[6] not in (-1, itemsize)
                or state[7] != 0):
            raise _bad(f"the checkpoint gives the numpy dtype {self.code} a forged state")
        object.__setattr__(self, "byteorder", state[1])

    def __setattr__(self, key: str, value: Any) -> None:
        raise _bad("the checkpoint tries to modify a dtype")

    def resolve(self) -> np.dtype:
        """The numpy dtype (a plain kind, from the code and byte order only)."""
        dtype = np.dtype(self.code)
        return dtype if self.byteorder in ("|", "=") else dtype.newbyteorder(self.byteorder)


class _OpaqueDtype:
    """A dtype of objects, text or dates: held inert, never given to numpy; arrays of it are dropped."""

    __slots__ = ("code",)

    def __init__(self, code: str) -> None:
        object.__setattr__(self, "code", code)

    def __setstate__(self, state: Any) -> None:
        pass  # whatever it says, no numpy dtype is ever built from it

    def __setattr__(self, key: str, value: Any) -> None:
        raise _bad("the checkpoint tries to modify a dtype")


class _NdarrayType:
    """Stands for ``numpy.ndarray`` (the ``subtype`` of ``_reconstruct``); cannot be called."""

    __slots__ = ()


_NDARRAY_TYPE = _NdarrayType()


class _PendingArray:
    """A ``numpy.ndarray`` being unpickled: ``_reconstruct`` makes it, one BUILD checks and fills it.

    Only plain dtypes are built, from exactly ``itemsize x count`` raw bytes charged to the load's
    budget; an array of an opaque dtype (objects, text) keeps ``array=None`` and is dropped.
    """

    __slots__ = ("array", "kind", "_built")

    def __init__(self, array: np.ndarray | None = None, kind: str = "uninitialised") -> None:
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "_built", array is not None)

    def __setattr__(self, key: str, value: Any) -> None:
        raise _bad("the checkpoint tries to modify an array")

    def __setstate__(self, state: Any) -> None:
        if self._built:
            raise _bad("a numpy array is given its state twice")
        object.__setattr__(self, "_built", True)
        if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4:
            raise _bad("a numpy array state is (shape, dtype, fortran, data)")
        shape, dtype, fortran, raw = state
        dims = _ints(shape, "shape")
        if isinstance(dtype, _OpaqueDtype):
            object.__setattr__(self, "kind", f"numpy arrays of dtype {dtype.code}")
            return
        object.__setattr__(self, "array", _plain_array(raw, dtype, dims, "F" if fortran is True else "C"))


def _plain_array(raw: Any, dtype: Any, dims: tuple[int, ...], order: str) -> np.ndarray:
    """A copy of ``raw`` as an array of a plain dtype; its size is checked and charged before anything is allocated."""
    if not isinstance(dtype, _PlainDtype):
        raise _bad(f"a numpy array needs a plain dtype, got {type(dtype).__name__}")
    if isinstance(raw, memoryview):
        raw = raw.cast("B")
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise _bad("a numpy array's data must be bytes")
    resolved = dtype.resolve()
    if min(dims, default=0) < 0:
        raise _bad(f"numpy array shape {dims} has negative entries")
    count = int(np.prod(dims, dtype=object))
    nbytes = count * resolved.itemsize
    if nbytes != len(raw):
        raise _Refused(f"a numpy array of shape {dims} and dtype {resolved} needs {nbytes} bytes, the checkpoint holds {len(raw)}")
    charge(nbytes, f"a numpy array of shape {dims}")
    return np.frombuffer(raw, dtype=resolved, count=count).reshape(dims, order=order).copy(order="K")  # type: ignore[call-overload]


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> _PendingArray:
    if subtype is not _NDARRAY_TYPE:
        raise _bad("only numpy.ndarray may be reconstructed")
    if not isinstance(dtype, (bytes, str)) or len(dtype) > 4:
        raise _bad("numpy _reconstruct takes a type code")
    dims = _ints(shape if isinstance(shape, (tuple, list)) else (shape,), "shape")
    if min(dims, default=0) < 0:
        raise _bad(f"numpy array shape {dims} has negative entries")
    charge(int(np.prod(dims, dtype=object)) * 8, f"a numpy array of shape {dims}")
    return _PendingArray()


def _np_frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any = "C") -> _PendingArray:
    dims = _ints(shape, "shape")
    if isinstance(dtype, _OpaqueDtype):
        return _PendingArray(None, f"numpy arrays of dtype {dtype.code}")
    return _PendingArray(_plain_array(buffer, dtype, dims, "F" if order == "F" else "C"))


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    if isinstance(dtype, _OpaqueDtype):
        return _PendingArray(None, f"numpy scalars of dtype {dtype.code}")
    if not isinstance(dtype, _PlainDtype):
        raise _bad("a numpy scalar needs a plain dtype")
    resolved = dtype.resolve()
    if not isinstance(data, bytes) or len(data) != resolved.itemsize:
        raise _bad("a numpy scalar needs its raw bytes")
    return np.frombuffer(data, dtype=resolved, count=1)[0]


def _np_dtype(code: Any = None, align: Any = False, copy: Any = True) -> _PlainDtype | _OpaqueDtype:
    """``numpy.dtype(code, align, copy)``: a stand-in (plain kinds, or inert opaque ones); structured or void dtypes are refused."""
    if not isinstance(code, str) or not isinstance(align, (bool, int)) or not isinstance(copy, (bool, int)):
        raise _bad("numpy.dtype takes a type code")
    if code in _PLAIN_CODES:
        return _PlainDtype(code)
    if _OPAQUE_CODE.fullmatch(code):
        return _OpaqueDtype(code)
    raise _bad(f"numpy dtype {code[:40]!r} is not a plain numeric kind (void, structured and other dtypes are refused)")
