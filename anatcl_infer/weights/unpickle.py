"""Read ``torch.save`` checkpoints without executing any code from them, in bounded memory.

The authors' ``.pth`` files are pickles that carry training-time objects next to the
weights: an ``argparse.Namespace`` of options, optimizer and GradScaler state, a fitted
``models.estimators.AgeEstimator`` (a scikit-learn ``GridSearchCV`` with masked arrays
and scorer functions) or whole ``nn.Module`` objects of classes that cannot be imported.
This module reads the torch container itself (zip, or the legacy pre-1.6 stream) and
unpickles it with an allowlist:

* tensors are rebuilt here from the raw storage bytes, read straight from the file
  after their declared sizes were checked against the archive; overlapping or stride-0
  views are refused;
* containers, primitives, namespaces, paths, dates, numpy arrays/scalars, dtypes,
  ``torch.Size`` and ``torch.device`` are reconstructed;
* a class or function of a module outside the standard library, torch and numpy is
  never imported: it becomes an inert placeholder, dropped from the result, except that
  an ``nn.Module`` placeholder is turned into its state dict (whole-model pickles);
* any other global of the standard library, torch or numpy (``os.system``,
  ``builtins.eval``, ``subprocess.Popen``, ``torch.load``...), and loader functions of
  other libraries (``joblib.load``, ``dill``...), are refused with
  :class:`~anatcl_infer.errors.UnsafeCheckpointError`.

Why not PyTorch's ``weights_only`` unpickler with ``safe_globals`` stand-ins: its own
allowlist calls ``bytearray``/storage constructors with sizes the file chooses (a 3 MB
file can ask for 8 GiB, and the legacy format allocates every storage at its declared
size before reading it), it bounds neither nesting nor object count, and stand-ins are
registered in a process-wide list, so one file's names would leak into the next load
(and into other threads). Reading storages directly keeps this loader about as fast as
``torch.load`` (``benchmarks/checkpoint_load.py``).
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import datetime
import io
import logging
import os
import pathlib
import pickle
import pickletools
import struct
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, UnsafeCheckpointError

__all__ = ["safe_load", "Placeholder", "LIMITS"]

logger = logging.getLogger(__name__)

#: resource bounds of one load (bytes, counts, levels)
LIMITS: dict[str, int] = {
    "pickle_bytes": 256 << 20,  # the pickle stream itself (data.pkl)
    "opcodes": 5_000_000,  # pickle opcodes, i.e. objects created
    "depth": 200,  # nesting of the loaded object
    "object_bytes": 256 << 20,  # one bytes/bytearray/array built by a call in the pickle
    "inflate_slack": 256 << 20,  # declared sizes inside the archive beyond the file's own size
}

#: storage class name -> dtype (``torch.FloatStorage`` ...; ``UntypedStorage`` holds bytes)
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}

_DTYPE_NAMES = {
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "complex64", "complex128", "double", "float", "half", "long", "int", "short", "cfloat", "cdouble",
}

#: top-level modules whose globals are checked against the allowlist (anything else is a placeholder)
_GUARDED_ROOTS = frozenset(sys.stdlib_module_names) | {"torch", "numpy"}
#: libraries outside the standard library whose globals load or run code: always refused
_DENIED_ROOTS = frozenset({"dill", "cloudpickle", "joblib", "yaml", "IPython"})
#: function names that load, evaluate or run something, refused in any module
_DENIED_NAMES = frozenset({
    "system", "popen", "Popen", "eval", "exec", "execfile", "compile", "__import__", "import_module",
    "load", "loads", "read_pickle", "run", "call", "check_call", "check_output", "spawn", "spawnv",
    "getattr", "setattr", "delattr", "apply", "open", "remove", "rmtree", "unlink", "fork", "execv",
})

_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of the legacy format
_ZIP_MAGIC = b"PK\x03\x04"


def _bad(message: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(message)


class _Refused(pickle.UnpicklingError):
    """A bound of :data:`LIMITS` or a size check failed: the file asks for more than it holds."""


# --------------------------------------------------------------------------- placeholders

class Placeholder:
    """Inert stand-in for a class or function the checkpoint names but that is never imported.

    Instances accept any constructor arguments and pickled state, run no code and are
    removed from the loaded result (an ``nn.Module`` stand-in becomes its state dict).
    """

    __slots__ = ("_state",)
    qualified_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:  # noqa: D102
        obj = object.__new__(cls)
        object.__setattr__(obj, "_state", None)
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "_state", state)

    def __setattr__(self, key: str, value: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        """Ignore list-style state."""

    def extend(self, values: Any) -> None:
        """Ignore list-style state."""

    def __repr__(self) -> str:
        return f"<placeholder for {self.qualified_name}>"


class _FrozenType(type):
    """Metaclass of the classes handed to the unpickler: BUILD cannot set attributes on them."""

    def __setattr__(cls, key: str, value: Any) -> None:
        raise _bad("the checkpoint tries to modify a class")

    def __delattr__(cls, key: str) -> None:
        raise _bad("the checkpoint tries to modify a class")


def _make_placeholder(module: str, name: str, *, module_like: bool = False) -> type[Placeholder]:
    """A fresh placeholder class named after the global it replaces."""
    return _FrozenType(name, (Placeholder,), {
        "__slots__": (), "qualified_name": f"{module}.{name}", "__module__": "anatcl_infer.placeholders",
        "module_like": module_like,
    })


class _Namespace(argparse.Namespace, metaclass=_FrozenType):
    """Stand-in for ``argparse.Namespace``: BUILD on the class is refused, argparse's is never touched."""


class _Frozen:
    """An allowlisted function handed to the unpickler; BUILD cannot set attributes on it."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setattr__(self, key: str, value: Any) -> None:
        raise _bad("the checkpoint tries to modify a loader function")

    def __repr__(self) -> str:
        return f"<allowed {self._fn.__name__}>"


class _StorageType:
    """What a ``torch.FloatStorage``-style global resolves to: just its dtype (read-only)."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dtype)

    def __setattr__(self, key: str, value: Any) -> None:
        raise _bad("the checkpoint tries to modify a storage type")


class _TensorTypeMarker:
    """Stands for ``torch.Tensor``/``torch.nn.Parameter`` as the ``new_type`` of a rebuild."""

    __slots__ = ()


_TENSOR_TYPE = _TensorTypeMarker()


# --------------------------------------------------------------------------- storages and tensors

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


# --------------------------------------------------------------------------- other allowed calls

def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (``latin1`` only)."""
    if not isinstance(text, str) or not isinstance(encoding, str) or encoding.lower().replace("-", "") not in {"latin1", "iso88591"}:
        raise _bad("_codecs.encode is only allowed on text with latin1")
    return text.encode("latin1")


def _sized(kind: type) -> Callable[..., Any]:
    """``bytes``/``bytearray`` whose integer argument (a size to allocate) is capped."""

    def build(*args: Any) -> Any:
        if args and isinstance(args[0], int) and not isinstance(args[0], bool) and not 0 <= args[0] <= LIMITS["object_bytes"]:
            raise _Refused(f"the checkpoint asks for a {kind.__name__} of {args[0]} bytes (limit {LIMITS['object_bytes']})")
        if args and not isinstance(args[0], (int, bytes, bytearray, str, list, tuple)):
            raise _bad(f"{kind.__name__} of a {type(args[0]).__name__} is not allowed")
        if len(args) > 1 and not all(isinstance(a, str) for a in args[1:]):
            raise _bad(f"{kind.__name__} encoding arguments must be text")
        return kind(*args)

    build.__name__ = kind.__name__
    return build


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


def _pure_path(*parts: Any) -> pathlib.PurePath:
    if not all(isinstance(p, str) for p in parts):
        raise _bad("a path is built from text")
    return pathlib.PurePath(*parts)


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    """``copyreg._reconstructor`` (protocol 0/1 objects) for allowed classes and placeholders."""
    if isinstance(cls, type) and issubclass(cls, Placeholder):
        return cls()
    if isinstance(cls, type) and issubclass(cls, (_Namespace, collections.OrderedDict)) and base is object:
        return cls()
    raise _bad(f"copyreg._reconstructor is not allowed for {cls!r}")


_NEWOBJ_CLASSES = (collections.OrderedDict, collections.defaultdict, dict, list, set, tuple)


def _newobj(cls: Any, *args: Any) -> Any:
    """``copyreg.__newobj__`` for allowed classes and placeholders."""
    if isinstance(cls, type) and (issubclass(cls, (Placeholder, _Namespace)) or cls in _NEWOBJ_CLASSES):
        return cls.__new__(cls, *args)
    raise _bad(f"copyreg.__newobj__ is not allowed for {cls!r}")


def _inert_call(qualified: str) -> _Frozen:
    """A function of numpy/sklearn internals that rebuilds some object: returns a placeholder instance."""
    cls = _make_placeholder(*qualified.rsplit(".", 1))

    def build(*args: Any) -> Placeholder:
        return cls()

    build.__name__ = qualified
    return _Frozen(build)


#: (module, name) -> object handed to the unpickler (``argparse.Namespace`` is per load)
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): _Frozen(_sized(bytearray)),
    ("builtins", "bytes"): _Frozen(_sized(bytes)),
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("builtins", "tuple"): tuple,
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "bool"): bool,
    ("builtins", "str"): str,
    ("builtins", "object"): object,
    ("builtins", "range"): range,
    ("datetime", "datetime"): datetime.datetime,
    ("datetime", "date"): datetime.date,
    ("datetime", "time"): datetime.time,
    ("datetime", "timedelta"): datetime.timedelta,
    ("datetime", "timezone"): datetime.timezone,
    ("pathlib", "Path"): _Frozen(_pure_path),
    ("pathlib", "PosixPath"): _Frozen(_pure_path),
    ("pathlib", "WindowsPath"): _Frozen(_pure_path),
    ("pathlib", "PurePath"): _Frozen(_pure_path),
    ("pathlib", "PurePosixPath"): _Frozen(_pure_path),
    ("pathlib", "PureWindowsPath"): _Frozen(_pure_path),
    ("_codecs", "encode"): _Frozen(_codecs_encode),
    ("copyreg", "_reconstructor"): _Frozen(_reconstructor),
    ("copyreg", "__newobj__"): _Frozen(_newobj),
    ("torch._utils", "_rebuild_tensor"): _Frozen(_rebuild_tensor_v1),
    ("torch._utils", "_rebuild_tensor_v2"): _Frozen(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): _Frozen(_rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _Frozen(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Frozen(_rebuild_parameter),
    ("torch._tensor", "_rebuild_from_type_v2"): _Frozen(_rebuild_from_type_v2),
    ("torch", "Tensor"): _TENSOR_TYPE,
    ("torch.nn.parameter", "Parameter"): _TENSOR_TYPE,
    ("torch", "device"): _Frozen(_torch_device),
    ("torch", "Size"): _Frozen(_torch_size),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _Frozen(_np_dtype),
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "_reconstruct")] = _Frozen(_np_reconstruct)
    _ALLOWED[(_mod, "scalar")] = _Frozen(_np_scalar)
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_mod, "_frombuffer")] = _Frozen(_np_frombuffer)
for _qualified in ("numpy.ma.core._mareconstruct", "numpy.random._pickle.__randomstate_ctor",
                   "numpy.random._pickle.__generator_ctor", "numpy.random._pickle.__bit_generator_ctor"):
    _ALLOWED[tuple(_qualified.rsplit(".", 1))] = _inert_call(_qualified)  # type: ignore[index]
for _name, _dtype in _STORAGE_DTYPES.items():
    _ALLOWED[("torch", _name)] = _StorageType(_name, _dtype)
    _ALLOWED[("torch.storage", _name)] = _StorageType(_name, _dtype)
for _name in _DTYPE_NAMES:
    _ALLOWED[("torch", _name)] = getattr(torch, _name)
# numpy dtype classes appear in pickles written by numpy >= 1.25 (numpy.dtypes.Float64DType ...)
for _name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "Int16DType", "Int8DType",
              "UInt8DType", "BoolDType", "Complex64DType", "Complex128DType", "ObjectDType", "StrDType"):
    _dtype_cls = getattr(getattr(np, "dtypes", None), _name, None)
    if _dtype_cls is not None:
        _ALLOWED[("numpy.dtypes", _name)] = _dtype_cls


def _data_class(module: str, name: str) -> bool:
    """True for an already-imported torch/numpy class that only holds data: modules, optimizers, schedulers.

    Such a class is never called; its instances become placeholders (a module's state dict is kept).
    Looking it up reads the module's ``__dict__``: nothing is imported or run.
    """
    mod = sys.modules.get(module)
    obj = None if mod is None else vars(mod).get(name)
    if not isinstance(obj, type):
        return (module + ".").startswith("numpy.ma.") and name in {"MaskedArray", "MaskedConstant", "mvoid"} or (
            module.startswith("numpy.random") and name in {"RandomState", "Generator", "MT19937", "PCG64", "Philox", "SFC64"})
    data_bases: list[type] = [torch.nn.Module, torch.optim.Optimizer]
    for holder, attr in ((torch.optim.lr_scheduler, "LRScheduler"), (torch.optim.lr_scheduler, "_LRScheduler"), (torch.amp, "GradScaler")):
        base = getattr(holder, attr, None)
        if isinstance(base, type):
            data_bases.append(base)
    if (module + ".").startswith("numpy.ma.") and issubclass(obj, np.ndarray):
        return True
    if module.startswith("numpy.random") and name in {"RandomState", "Generator", "MT19937", "PCG64", "Philox", "SFC64"}:
        return True
    return issubclass(obj, tuple(data_bases))


# --------------------------------------------------------------------------- the unpickler

class _SafeUnpickler(pickle.Unpickler):
    """Unpickler resolving globals from the allowlist and storages through ``storage``."""

    def __init__(self, file: Any, *, path: str, storage: Callable[[str, torch.dtype, int, Any], _Storage] | None) -> None:
        super().__init__(file)
        self._path = path
        self._storage = storage
        self._storages: dict[str, _Storage] = {}
        self._classes: dict[tuple[str, str], type] = {}
        self._namespace = _FrozenType("Namespace", (_Namespace,), {"__module__": "argparse"})
        self.placeholders: set[str] = set()

    def _refuse(self, qualified: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(
            f"{self._path}: refusing to load the global {qualified}, which the checkpoint asks to "
            "call or import while unpickling (it could run code); nothing was run. Only load checkpoints from "
            "sources you trust; if this file is genuine, re-save its state dict with `anatcl convert` on a "
            "machine where it can be inspected.",
            path=self._path,
            global_name=qualified,
        )

    def find_class(self, module: str, name: str) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise _bad("global names must be text")
        # Python-2 names (protocol <= 2 pickles: ``__builtin__``, ``commands.Popen``...) mean what
        # a standard unpickler would map them to, so they meet the same allowlist.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        qualified = f"{module}.{name}"
        if (module, name) == ("argparse", "Namespace"):
            return self._namespace
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        root = module.split(".", 1)[0]
        last = name.rsplit(".", 1)[-1]
        guarded = root in _GUARDED_ROOTS or root.startswith("_")
        if root in _DENIED_ROOTS or last in _DENIED_NAMES or (guarded and not _data_class(module, name)):
            raise self._refuse(qualified)
        key = (module, name)
        if key not in self._classes:
            logger.debug("%s: %s replaced by an inert placeholder (never imported)", self._path, qualified)
            self._classes[key] = _make_placeholder(module, name)
        self.placeholders.add(qualified)
        return self._classes[key]

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage" or self._storage is None:
            raise _bad(f"unsupported persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise _bad(f"unknown storage type {storage_type!r:.80}")
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise _bad("a storage size must be a non-negative integer")
        key = str(key)
        view = pid[5] if len(pid) > 5 else None
        if key not in self._storages:
            self._storages[key] = self._storage(key, storage_type.dtype, numel, view)
        elif self._storages[key].dtype != storage_type.dtype or self._storages[key].numel != numel:
            raise _bad(f"storage {key} is declared twice with different types or sizes")
        return self._storages[key]


def _scan(stream: Any, size: int, path: str) -> None:
    """Walk the pickle's opcodes (no objects built): bound its size, opcode count and declared lengths.

    The C unpickler allocates a ``BINBYTES8``/``FRAME`` of the length the file declares *before*
    reading it, and grows its memo to the largest index named; these are checked here first.
    """
    limit = LIMITS["opcodes"]
    start = stream.tell()
    count = 0
    try:
        for opcode, arg, pos in pickletools.genops(_Bounded(stream, start + size)):
            count += 1
            if count > limit:
                raise CheckpointError(f"{path}: the pickle holds more than {limit} objects; refusing to build it", path=path)
            if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET") and int(arg) > limit:
                raise CheckpointError(f"{path}: the pickle names memo slot {arg} (limit {limit})", path=path)
            if opcode.name == "FRAME" and int(arg) > size:
                raise CheckpointError(f"{path}: the pickle declares a frame of {arg} bytes in a stream of {size}", path=path)
            if opcode.name == "STOP":
                break
    except CheckpointError:
        raise
    except (ValueError, TypeError, EOFError, OverflowError, struct.error) as exc:
        raise CheckpointError(f"{path}: the pickle stream is malformed ({exc}); the file may be damaged, download it again", path=path) from None
    stream.seek(start)


class _Bounded:
    """A read-only view of a stream that refuses reads past ``end`` (declared lengths are not trusted)."""

    def __init__(self, stream: Any, end: int) -> None:
        self._s, self._end = stream, end

    def read(self, n: int = -1) -> bytes:
        left = self._end - self._s.tell()
        if n is None or n < 0:
            n = left
        if n > left:
            raise ValueError(f"a length of {n} bytes runs past the end of the pickle ({left} bytes left)")
        return self._s.read(n)

    def readline(self) -> bytes:
        line = self._s.readline(max(self._end - self._s.tell(), 0))
        return line

    def tell(self) -> int:
        return self._s.tell()


# --------------------------------------------------------------------------- the result

_DROP = object()


class _Walker:
    """Copy the unpickled object: tensors materialised, placeholders dropped, modules turned into state dicts."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.seen: dict[int, Any] = {}
        self.modules: set[str] = set()
        self.dropped: set[str] = set()

    def _deep(self) -> CheckpointError:
        return CheckpointError(f"{self.path}: the checkpoint is nested more than {LIMITS['depth']} levels deep; refusing it", path=self.path)

    def module_state(self, obj: Placeholder, depth: int) -> dict[str, Any] | None:
        """The state dict of an ``nn.Module`` stand-in (its pickled ``__dict__``), or None if it is not one."""
        state = obj._state
        if isinstance(state, tuple) and state and isinstance(state[0], dict):
            state = state[0]
        if not isinstance(state, dict) or not isinstance(state.get("_modules"), dict) or not isinstance(state.get("_parameters"), dict):
            return None
        out: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._flatten(state, "", out, depth)
        self.modules.add(type(obj).qualified_name)
        return out

    def _flatten(self, state: dict[str, Any], prefix: str, out: dict[str, Any], depth: int) -> None:
        if depth > LIMITS["depth"]:
            raise self._deep()
        skip = state.get("_non_persistent_buffers_set") or ()
        for group in ("_parameters", "_buffers"):
            entries = state.get(group) or {}
            if not isinstance(entries, dict):
                continue
            for name, value in entries.items():
                if value is None or (group == "_buffers" and name in skip):
                    continue
                if isinstance(value, _PendingTensor):
                    out[f"{prefix}{name}"] = value.materialize()
        for name, child in (state.get("_modules") or {}).items():
            if child is None:
                continue
            if not isinstance(child, Placeholder):
                raise CheckpointError(f"{self.path}: submodule {prefix}{name} of a pickled model is a {type(child).__name__}", path=self.path)
            inner = child._state[0] if isinstance(child._state, tuple) and child._state else child._state
            if isinstance(inner, dict):
                self.modules.add(type(child).qualified_name)
                self._flatten(inner, f"{prefix}{name}.", out, depth + 1)

    def walk(self, obj: Any, depth: int = 0) -> Any:
        if depth > LIMITS["depth"]:
            raise self._deep()
        if isinstance(obj, _PendingTensor):
            if id(obj) not in self.seen:
                self.seen[id(obj)] = obj.materialize()
            return self.seen[id(obj)]
        if isinstance(obj, Placeholder):
            state = self.module_state(obj, depth)
            if state is None:
                self.dropped.add(type(obj).qualified_name)
                return _DROP
            return state
        if isinstance(obj, type) and issubclass(obj, Placeholder):
            self.dropped.add(obj.qualified_name)
            return _DROP
        if isinstance(obj, (str, bytes, int, float, complex, bool, type(None), np.ndarray, np.generic, torch.dtype,
                            torch.device, torch.Size, datetime.date, datetime.time, datetime.timedelta, pathlib.PurePath, slice, range)):
            return obj
        if id(obj) in self.seen:
            return self.seen[id(obj)]
        if isinstance(obj, dict):
            out: Any = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
            self.seen[id(obj)] = out
            for key, value in obj.items():
                value = self.walk(value, depth + 1)
                if value is not _DROP and not isinstance(key, (Placeholder, _PendingTensor)):
                    out[key] = value
            return out
        if isinstance(obj, list):
            items: list[Any] = []
            self.seen[id(obj)] = items
            items.extend(v for v in (self.walk(v, depth + 1) for v in obj) if v is not _DROP)
            return items
        if isinstance(obj, (tuple, set, frozenset)):
            kept = [v for v in (self.walk(v, depth + 1) for v in obj) if v is not _DROP]
            try:
                result = tuple(kept) if isinstance(obj, tuple) else type(obj)(kept)
            except TypeError:  # an unhashable item (a dict...) in a set: keep the set's other contents
                result = type(obj)(v for v in kept if isinstance(v, (str, bytes, int, float, tuple, type(None))))
            self.seen[id(obj)] = result
            return result
        if isinstance(obj, argparse.Namespace):
            ns = argparse.Namespace()
            self.seen[id(obj)] = ns
            for key, value in vars(obj).items():
                value = self.walk(value, depth + 1)
                if value is not _DROP:
                    setattr(ns, key, value)
            return ns
        if isinstance(obj, (_StorageType, _Frozen, _TensorTypeMarker)) or isinstance(obj, type):
            return _DROP
        if isinstance(obj, _Storage):
            return _DROP
        return obj


# --------------------------------------------------------------------------- containers

def _refuse_sizes(path: str, message: str) -> CheckpointError:
    return CheckpointError(f"{path}: {message}; the file is damaged or hostile, refusing it", path=path)


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
        _scan(data, info.file_size, where)
        unpickler = _SafeUnpickler(data, path=where, storage=storage)
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

        _scan(fh, min(file_size - fh.tell(), LIMITS["pickle_bytes"]), where)
        unpickler = _SafeUnpickler(fh, path=where, storage=storage)
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


def _finish(obj: Any, unpickler: _SafeUnpickler, walker: _Walker) -> Any:
    result = walker.walk(obj)
    if result is _DROP:
        name = getattr(obj, "qualified_name", type(obj).__name__)
        raise CheckpointError(
            f"{walker.path} holds a whole pickled {name} object rather than a dict with a state dict or a "
            "torch module; its class is not available (and is never imported). Where that code is available, "
            "re-save it with `torch.save({'model': model.state_dict()}, 'fixed.pth')`.",
            path=walker.path,
        )
    kept = walker.modules
    dropped = sorted(walker.dropped | (unpickler.placeholders - kept))
    parts = []
    if dropped:
        parts.append(f"dropped training-time objects of {', '.join(dropped)}")
    if kept:
        parts.append(f"recovered the state dict of pickled modules ({', '.join(sorted(kept))})")
    if parts:
        logger.info("%s: %s", walker.path, "; ".join(parts))  # one line: what was not kept as it was
    return result


def safe_load(path: str | os.PathLike[str]) -> Any:
    """Unpickle a ``torch.save`` checkpoint without running any code from it.

    Args:
        path: a ``.pth``/``.pt`` file written by ``torch.save`` (zip or legacy format).

    Returns:
        The saved object (usually a dict) with tensors rebuilt on the CPU, every
        instance of a non-importable class removed and every pickled ``nn.Module``
        replaced by its state dict.

    Raises:
        UnsafeCheckpointError: the pickle references a function or class outside the
            allowlist (``os.system``, ``builtins.eval``...); nothing was executed.
        CheckpointError: the file is not a torch checkpoint, is truncated, declares
            sizes it does not hold, or exceeds a bound of :data:`LIMITS`.

    Example:
        >>> ckpt = safe_load("fold0.pth")  # doctest: +SKIP
        >>> sorted(ckpt)  # doctest: +SKIP
        ['epoch', 'model', 'optimizer', 'opts', 'run_id']
    """
    path = Path(path)
    where = str(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(3)
    except FileNotFoundError:
        raise CheckpointError(f"{where} does not exist; check the path", path=where) from None
    except IsADirectoryError:
        raise CheckpointError(f"{where} is a directory, not a checkpoint file", path=where) from None
    try:
        if head == _ZIP_MAGIC[:3]:
            return _load_zip(path, where)
        if head == b"\x80\x02\x8a":  # a pickled long first: torch's legacy magic number
            return _load_legacy(path, where)
    except (UnsafeCheckpointError, CheckpointError):
        raise
    except _Refused as exc:
        raise _refuse_sizes(where, str(exc)) from None
    except RecursionError:
        raise CheckpointError(f"{where}: the checkpoint is nested too deeply; refusing it", path=where) from None
    except MemoryError:
        raise CheckpointError(f"{where}: reading the checkpoint ran out of memory; it asks for more than it holds", path=where) from None
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError, AttributeError, IndexError,
            KeyError, RuntimeError, OverflowError, struct.error, OSError) as exc:
        raise CheckpointError(f"{where}: cannot read the checkpoint ({type(exc).__name__}: {exc}); the file may be damaged, download it again", path=where) from None
    raise CheckpointError(
        f"{where} is not a torch checkpoint (expected the zip or legacy format written by torch.save); "
        "pass a .pth/.pt checkpoint, a .safetensors file or a directory with config.json + model.safetensors",
        path=where,
    )
