"""The allowlist unpickler: which globals a checkpoint may name, and what each one resolves to.

* :data:`_ALLOWED` maps ``(module, name)`` to what the unpickler gets: containers, primitives,
  dates, paths, tensor/numpy rebuilds (:mod:`.rebuild`), storage types, dtypes, frozen wrappers;
* a global of a module outside the standard library, torch and numpy becomes a
  :class:`~.stand_ins.Placeholder` (never imported); torch/numpy classes that only hold data
  (modules, optimizers, schedulers, masked arrays: :func:`_data_class`) too;
* any other global of those modules, of a denied library (``dill``, ``joblib``...) or with a
  denied name (``system``, ``eval``, ``load``...) is refused with
  :class:`~anatcl_infer.errors.UnsafeCheckpointError` by :class:`_SafeUnpickler`.
"""

from __future__ import annotations

import _compat_pickle
import collections
import datetime
import logging
import pathlib
import pickle
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ...errors import UnsafeCheckpointError
from .limits import LIMITS, _bad, _Refused
from .rebuild import (
    _np_dtype,
    _np_frombuffer,
    _np_reconstruct,
    _np_scalar,
    _rebuild_from_type_v2,
    _rebuild_parameter,
    _rebuild_tensor_v1,
    _rebuild_tensor_v2,
    _rebuild_tensor_v3,
    _Storage,
    _torch_device,
    _torch_size,
)
from .stand_ins import _TENSOR_TYPE, Placeholder, _Frozen, _FrozenType, _make_placeholder, _Namespace, _StorageType

logger = logging.getLogger(__package__)  # the logger name records had before the split

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
