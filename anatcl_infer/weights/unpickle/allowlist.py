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
from .limits import ITEM_BYTES, LIMITS, _bad, _Refused, charge
from .rebuild import (
    _NDARRAY_TYPE,
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
    charge(len(text), f"bytes of {len(text)} characters")
    return text.encode("latin1")


def _type_of(obj: Any = None, *rest: Any) -> type[Placeholder]:
    """``builtins.type(None)`` (how ``typing.Optional[...]`` pickles ``NoneType``): an inert placeholder class."""
    if obj is not None or rest:
        raise _bad("builtins.type is only allowed as type(None)")
    return _NONE_TYPE


_NONE_TYPE = _make_placeholder("builtins", "NoneType")


def _subscript(obj: Any, key: Any) -> Placeholder:
    """``operator.getitem`` as typing aliases pickle (``typing.Union[int, None]``): an inert placeholder instance."""
    if isinstance(obj, type) and issubclass(obj, Placeholder) and obj.qualified_name.startswith(_TYPING_PREFIXES):
        return obj()
    raise _bad("operator.getitem is only allowed on typing names")


def _sized(kind: type) -> Callable[..., Any]:
    """``bytes``/``bytearray``/``str`` whose size (an integer argument, or the source's length) is charged first."""

    def build(*args: Any) -> Any:
        if kind is str and args and isinstance(args[0], (int, float, complex, type(None))):
            return str(args[0])  # str(5): the text of a number (at most 4300 digits)
        if args and isinstance(args[0], int) and not isinstance(args[0], bool):
            if kind is str or not 0 <= args[0] <= LIMITS["object_bytes"]:
                raise _Refused(f"the checkpoint asks for a {kind.__name__} of {args[0]} bytes (limit {LIMITS['object_bytes']})")
            charge(args[0], f"{kind.__name__}({args[0]})")
        elif args:
            if not isinstance(args[0], (bytes, bytearray, str, list, tuple)):
                raise _bad(f"{kind.__name__} of a {type(args[0]).__name__} is not allowed")
            charge(len(args[0]) * (4 if kind is str else 1), f"a {kind.__name__} of {len(args[0])} items")
        if len(args) > 1 and not all(isinstance(a, str) for a in args[1:]):
            raise _bad(f"{kind.__name__} encoding arguments must be text")
        return kind(*args)

    build.__name__ = kind.__name__
    build.kind = kind  # type: ignore[attr-defined]
    return build


def _container(kind: type) -> Callable[..., Any]:
    """``list``/``tuple``/``set``/``frozenset``/``dict`` built from one sized argument, charged per element first."""

    def build(*args: Any, **kwargs: Any) -> Any:
        if kwargs or len(args) > 1:
            raise _bad(f"{kind.__name__} takes at most one argument")
        if args:
            if not hasattr(args[0], "__len__"):
                raise _bad(f"{kind.__name__} of a {type(args[0]).__name__} is not allowed")
            charge(len(args[0]) * ITEM_BYTES, f"a {kind.__name__} of {len(args[0])} items")
        return kind(*args)

    build.__name__ = kind.__name__
    build.kind = kind  # type: ignore[attr-defined]
    return build


def _range(*args: Any) -> range:
    """``range``: cheap itself, but charged for what a container built from it would hold."""
    if not args or len(args) > 3 or not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
        raise _bad("range takes one to three integers")
    made = range(*args)
    charge(len(made) * ITEM_BYTES, f"range of {len(made)} items")
    return made


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
    raise _bad(f"copyreg._reconstructor is not allowed for a {type(cls).__name__}")


_NEWOBJ_CLASSES = (collections.OrderedDict, collections.defaultdict, dict, list, set, tuple)


def _newobj(cls: Any, *args: Any) -> Any:
    """``copyreg.__newobj__`` for allowed classes and placeholders."""
    if isinstance(cls, _Frozen):  # builtins.list... as the allowlist hands them out
        cls = getattr(cls._fn, "kind", cls)
    if isinstance(cls, type) and (issubclass(cls, (Placeholder, _Namespace)) or cls in _NEWOBJ_CLASSES):
        if args and hasattr(args[0], "__len__"):
            charge(len(args[0]) * ITEM_BYTES, f"a {cls.__name__} of {len(args[0])} items")
        return cls.__new__(cls, *args)
    raise _bad(f"copyreg.__newobj__ is not allowed for a {type(cls).__name__}")


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
    ("builtins", "set"): _Frozen(_container(set)),
    ("builtins", "frozenset"): _Frozen(_container(frozenset)),
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): _Frozen(_sized(bytearray)),
    ("builtins", "bytes"): _Frozen(_sized(bytes)),
    ("builtins", "list"): _Frozen(_container(list)),
    ("builtins", "dict"): _Frozen(_container(dict)),
    ("builtins", "tuple"): _Frozen(_container(tuple)),
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "bool"): bool,
    ("builtins", "str"): _Frozen(_sized(str)),
    ("builtins", "object"): object,
    ("builtins", "range"): _Frozen(_range),
    ("builtins", "type"): _Frozen(_type_of),
    ("_operator", "getitem"): _Frozen(_subscript),
    ("operator", "getitem"): _Frozen(_subscript),
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
    ("numpy", "ndarray"): _NDARRAY_TYPE,
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


#: modules whose every global is an inert placeholder, never looked up: the training script itself
#: (classes of ``__main__``), type annotations
_INERT_MODULES = frozenset({"__main__", "__mp_main__", "typing", "typing_extensions", "collections.abc"})
#: qualified-name prefixes of typing placeholders that ``operator.getitem`` may subscript
_TYPING_PREFIXES = ("typing.", "typing_extensions.", "types.", "collections.abc.", "builtins.NoneType")
#: standard-library classes that only hold data (and ``functools.partial``, whose callable is inert too):
#: named in a checkpoint, they are placeholders like any unknown class
_INERT_STDLIB = frozenset({
    ("functools", "partial"), ("types", "GenericAlias"), ("types", "UnionType"), ("types", "NoneType"),
    ("types", "SimpleNamespace"), ("uuid", "UUID"), ("decimal", "Decimal"), ("fractions", "Fraction"),
    ("collections", "Counter"), ("collections", "deque"), ("collections", "ChainMap"),
})
_NUMPY_RANDOM_CLASSES = frozenset({
    "RandomState", "Generator", "BitGenerator", "MT19937", "PCG64", "PCG64DXSM", "Philox", "SFC64", "SeedSequence",
    "SeedlessSeedSequence",
})


def _data_class(module: str, name: str) -> bool:
    """True for an already-imported torch/numpy class that only holds data: modules, optimizers, schedulers.

    Such a class is never called; its instances become placeholders (a module's state dict is kept).
    numpy's masked arrays, random generators and seed sequences, scalar types and dtype classes
    count too. Looking it up reads the module's ``__dict__``: nothing is imported or run.
    """
    if (module + ".").startswith("numpy.random.") and name in _NUMPY_RANDOM_CLASSES:
        return True
    mod = sys.modules.get(module)
    obj = None if mod is None else vars(mod).get(name)
    if not isinstance(obj, type):
        return (module + ".").startswith("numpy.ma.") and name in {"MaskedArray", "MaskedConstant", "mvoid"}
    data_bases: list[type] = [torch.nn.Module, torch.optim.Optimizer]
    for holder, attr in ((torch.optim.lr_scheduler, "LRScheduler"), (torch.optim.lr_scheduler, "_LRScheduler"), (torch.amp, "GradScaler")):
        base = getattr(holder, attr, None)
        if isinstance(base, type):
            data_bases.append(base)
    if (module + ".").startswith("numpy.ma.") and issubclass(obj, np.ndarray):
        return True
    if module.split(".", 1)[0] == "numpy" and issubclass(obj, (np.generic, np.dtype)):
        return True  # numpy.float64, numpy.dtypes.Float64DType... named as values (never called)
    return issubclass(obj, tuple(data_bases))


def _inert(module: str, name: str) -> bool:
    """True for a global of a guarded module that is nevertheless only ever a placeholder (never looked up)."""
    return module in _INERT_MODULES or module.split(".", 1)[0] in {"__main__", "__mp_main__"} or (module, name) in _INERT_STDLIB


# --------------------------------------------------------------------------- the unpickler

class _SafeUnpickler(pickle.Unpickler):
    """Unpickler resolving globals from the allowlist and storages through ``storage``."""

    def __init__(self, file: Any, *, path: str, storage: Callable[[str, torch.dtype, int, Any], _Storage] | None,
                 partial_callables: set[tuple[str, str]] | None = None) -> None:
        super().__init__(file)
        self._partial_callables = partial_callables or set()
        self._path = path
        self._storage = storage
        self._storages: dict[str, _Storage] = {}
        self._classes: dict[tuple[str, str], type] = {}
        self._calls: dict[tuple[str, str], _Frozen] = {}
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
        # the callable of a functools.partial (found by the pre-scan) is inert like the partial itself;
        # names that load or run code (os.system...) are refused there too: no genuine file holds them
        after_partial = (module, name) in self._partial_callables
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
        if allowed is not None:  # harmless in a partial too (which is never called)
            return allowed
        root = module.split(".", 1)[0]
        last = name.rsplit(".", 1)[-1]
        if root in _DENIED_ROOTS or last in _DENIED_NAMES:
            raise self._refuse(qualified)
        key = (module, name)
        if (module + ".").startswith("numpy.random.") and name.startswith("__pyx_unpickle_"):
            if key not in self._calls:  # Cython's unpickle helper of SeedSequence...: an inert call
                self._calls[key] = _inert_call(qualified)
            return self._calls[key]
        guarded = root in _GUARDED_ROOTS or root.startswith("_")
        if guarded and not after_partial and not _inert(module, name) and not _data_class(module, name):
            raise self._refuse(qualified)
        if key not in self._classes:
            logger.debug("%s: %s replaced by an inert placeholder (never imported)", self._path, qualified)
            self._classes[key] = _make_placeholder(module, name)
        self.placeholders.add(qualified)
        return self._classes[key]

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage" or self._storage is None:
            raise _bad(f"unsupported persistent id (a {type(pid).__name__})")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise _bad(f"unknown storage type (a {type(storage_type).__name__})")
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise _bad("a storage size must be a non-negative integer")
        key = str(key)
        view = pid[5] if len(pid) > 5 else None
        if key not in self._storages:
            self._storages[key] = self._storage(key, storage_type.dtype, numel, view)
        elif self._storages[key].dtype != storage_type.dtype or self._storages[key].numel != numel:
            raise _bad(f"storage {key} is declared twice with different types or sizes")
        return self._storages[key]
