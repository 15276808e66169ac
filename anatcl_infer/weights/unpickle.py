"""Read ``torch.save`` checkpoints without executing any code from them.

The authors' ``.pth`` files are pickles that reference training-time objects: an
``argparse.Namespace`` of options, optimizer state and classes of their
unpublished training package (``models.estimators.AgeEstimator``...).
``torch.load(weights_only=True)`` refuses them and a plain unpickle needs that
package. This module reads the torch zip container itself and unpickles
``data.pkl`` with an allowlist:

* tensors and parameters are rebuilt here from the raw storage bytes
  (``torch.frombuffer`` + ``as_strided``), never through torch's own loader;
* containers, primitives, namespaces, numpy arrays/scalars, ``torch.device``,
  ``torch.Size`` and dtypes are reconstructed;
* a class from a module outside the standard library, torch and numpy is never
  imported: it becomes an inert placeholder whose instances are dropped from the
  result;
* any other global of the standard library, torch or numpy (``os.system``,
  ``builtins.eval``, ``subprocess.Popen``, ``torch.load``...) is refused with
  :class:`~anatcl_infer.errors.UnsafeCheckpointError`.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import io
import logging
import os
import pickle
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, UnsafeCheckpointError

__all__ = ["safe_load", "Placeholder"]

logger = logging.getLogger(__name__)

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



class Placeholder:
    """Inert stand-in for a class the checkpoint names but that is never imported.

    Instances accept any constructor arguments and pickled state, run no code and
    are removed from the loaded result.
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

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        """Ignore list-style state."""

    def extend(self, values: Any) -> None:
        """Ignore list-style state."""

    def __repr__(self) -> str:
        return f"<placeholder for {self.qualified_name}>"


def _make_placeholder(module: str, name: str) -> type[Placeholder]:
    """A fresh placeholder class named after the global it replaces."""
    return type(name, (Placeholder,), {"__slots__": (), "qualified_name": f"{module}.{name}", "__module__": "anatcl_infer.placeholders"})


class _StorageType:
    """What a ``torch.FloatStorage``-style global resolves to: just its dtype (read-only)."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dtype)

    def __setattr__(self, key: str, value: Any) -> None:
        raise pickle.UnpicklingError("the checkpoint tries to modify a storage type")


class _Storage:
    """A storage read from the archive: a flat 1-d tensor of its dtype."""

    def __init__(self, flat: torch.Tensor) -> None:
        self.flat = flat


def _as_flat(storage: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The flat tensor of a storage, re-viewed as ``dtype`` when given (untyped storages)."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"expected a tensor storage, got {type(storage).__name__}")
    flat = storage.flat
    if dtype is not None and flat.dtype != dtype:
        flat = flat.view(torch.uint8).view(dtype)
    return flat


def _rebuild_tensor(storage: Any, storage_offset: int, size: Any, stride: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Tensor of ``size``/``stride`` at ``storage_offset`` in a storage, as an independent copy."""
    flat = _as_flat(storage, dtype)
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    if not size:
        return flat[int(storage_offset)].clone() if flat.numel() else torch.empty((), dtype=flat.dtype)
    if any(s == 0 for s in size):
        return torch.empty(size, dtype=flat.dtype)
    last = int(storage_offset) + sum((n - 1) * st for n, st in zip(size, stride))
    if storage_offset < 0 or min(stride) < 0 or last >= flat.numel():
        raise pickle.UnpicklingError(f"tensor of size {size} and stride {stride} does not fit its storage of {flat.numel()} elements")
    return torch.as_strided(flat, size, stride, int(storage_offset)).clone()


def _rebuild_tensor_v1(storage: Any, storage_offset: int, size: Any, stride: Any) -> torch.Tensor:
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage: Any, storage_offset: int, size: Any, stride: Any, requires_grad: Any = False, backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage: Any, storage_offset: int, size: Any, stride: Any, requires_grad: Any, backward_hooks: Any, dtype: Any, metadata: Any = None) -> torch.Tensor:
    if not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError(f"expected a dtype, got {type(dtype).__name__}")
    return _rebuild_tensor(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data: Any, requires_grad: Any = True, backward_hooks: Any = None, state: Any = None) -> torch.Tensor:
    # Parameters come back as plain tensors: the caller copies them into a fresh network.
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError(f"a parameter must wrap a tensor, got {type(data).__name__}")
    return data


_REBUILDERS = (_rebuild_tensor_v1, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """``torch._tensor._rebuild_from_type_v2`` restricted to our own rebuild functions."""
    if not isinstance(func, _Frozen) or func._fn not in _REBUILDERS:
        raise pickle.UnpicklingError("_rebuild_from_type_v2 may only call a tensor rebuild function")
    return func(*args)


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (``latin1`` only)."""
    if not isinstance(text, str) or encoding.lower().replace("-", "") not in {"latin1", "iso88591"}:
        raise pickle.UnpicklingError("_codecs.encode is only allowed on text with latin1")
    return text.encode("latin1")


def _torch_device(*args: Any) -> torch.device:
    return torch.device(*args)


def _torch_size(dims: Any = ()) -> torch.Size:
    return torch.Size(tuple(int(d) for d in dims))


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("only numpy.ndarray may be reconstructed")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("numpy scalars of object dtype are not allowed")
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError("a numpy scalar needs its raw bytes")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    """``copyreg._reconstructor`` (protocol 0/1 objects) for allowed classes and placeholders."""
    if isinstance(cls, type) and issubclass(cls, Placeholder):
        return cls()
    if cls in (_Namespace, collections.OrderedDict) and base is object:
        return cls()
    raise pickle.UnpicklingError(f"copyreg._reconstructor is not allowed for {cls!r}")


def _newobj(cls: Any, *args: Any) -> Any:
    """``copyreg.__newobj__`` for allowed classes and placeholders."""
    if isinstance(cls, type) and (issubclass(cls, Placeholder) or cls in _NEWOBJ_CLASSES):
        return cls.__new__(cls, *args)
    raise pickle.UnpicklingError(f"copyreg.__newobj__ is not allowed for {cls!r}")


class _Frozen:
    """An allowlisted function handed to the unpickler; BUILD cannot set attributes on it.

    Plain functions accept ``setattr`` (``__defaults__``...), which a pickle's BUILD
    opcode could use to alter them for later loads; this wrapper has no ``__dict__``.
    """

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setattr__(self, key: str, value: Any) -> None:
        raise pickle.UnpicklingError("the checkpoint tries to modify a loader function")

    def __repr__(self) -> str:
        return f"<allowed {self._fn.__name__}>"


class _Namespace(argparse.Namespace):
    """Private stand-in for ``argparse.Namespace``: BUILD on the class never alters argparse's."""


#: what ``torch.Tensor``/``torch.nn.Parameter`` resolve to: a marker, never called
class _TensorTypeMarker:
    """Stands for ``torch.Tensor``/``torch.nn.Parameter`` as the ``new_type`` of a rebuild."""

    __slots__ = ()


_TENSOR_TYPE = _TensorTypeMarker()

_NEWOBJ_CLASSES = (_Namespace, collections.OrderedDict, collections.defaultdict, dict, list, set, tuple)

#: (module, name) -> object handed to the unpickler
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("argparse", "Namespace"): _Namespace,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("builtins", "tuple"): tuple,
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "bool"): bool,
    ("builtins", "str"): str,
    ("builtins", "bytes"): bytes,
    ("builtins", "object"): object,
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
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _Frozen(_np_reconstruct),
    ("numpy._core.multiarray", "_reconstruct"): _Frozen(_np_reconstruct),
    ("numpy.core.multiarray", "scalar"): _Frozen(_np_scalar),
    ("numpy._core.multiarray", "scalar"): _Frozen(_np_scalar),
}
for _name, _dtype in _STORAGE_DTYPES.items():
    _ALLOWED[("torch", _name)] = _StorageType(_name, _dtype)
    _ALLOWED[("torch.storage", _name)] = _StorageType(_name, _dtype)
for _name in _DTYPE_NAMES:
    _ALLOWED[("torch", _name)] = getattr(torch, _name)
# numpy dtype classes appear in pickles written by numpy >= 1.25 (numpy.dtypes.Float64DType ...)
for _name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "Int16DType", "Int8DType",
              "UInt8DType", "BoolDType", "Complex64DType", "Complex128DType"):
    _dtype_cls = getattr(getattr(np, "dtypes", None), _name, None)
    if _dtype_cls is not None:
        _ALLOWED[("numpy.dtypes", _name)] = _dtype_cls


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler resolving globals from the allowlist and storages from the zip archive."""

    def __init__(self, file: io.BufferedIOBase, *, path: str, load_storage: Callable[[str, torch.dtype], torch.Tensor]) -> None:
        super().__init__(file)
        self._path = path
        self._load_storage = load_storage
        self._storages: dict[str, _Storage] = {}
        self.placeholders: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        # Python-2 names (protocol <= 2 pickles: ``__builtin__``, ``commands.Popen``...) mean what
        # a standard unpickler would map them to, so they meet the same allowlist.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        root = module.split(".", 1)[0]
        if root in _GUARDED_ROOTS or root.startswith("_"):
            raise UnsafeCheckpointError(
                f"{self._path}: refusing to load the global {module}.{name}, which the checkpoint asks to "
                "call or import while unpickling (it could run code). Only load checkpoints from sources you "
                "trust; if this file is genuine, re-save its state dict with `anatcl convert` on a machine "
                "where it can be inspected.",
                path=self._path,
                global_name=f"{module}.{name}",
            )
        qualified = f"{module}.{name}"
        if qualified not in self.placeholders:
            logger.debug("%s: %s replaced by an inert placeholder (never imported)", self._path, qualified)
        self.placeholders.add(qualified)
        return _make_placeholder(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage" or len(pid) < 5:
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unknown storage type {storage_type!r:.80}")
        key = str(key)
        if key not in self._storages:
            flat = self._load_storage(key, storage_type.dtype)
            if storage_type.name != "UntypedStorage" and flat.numel() != int(numel):
                raise pickle.UnpicklingError(f"storage {key} holds {flat.numel()} elements, the pickle says {numel}")
            self._storages[key] = _Storage(flat)
        return self._storages[key]


def _drop_placeholders(obj: Any, _seen: dict[int, Any] | None = None) -> Any:
    """A copy of ``obj`` with every placeholder instance removed from containers."""
    seen = {} if _seen is None else _seen
    if isinstance(obj, Placeholder) or (isinstance(obj, type) and issubclass(obj, Placeholder)):
        return _DROP
    if isinstance(obj, (torch.Tensor, np.ndarray, str, bytes, int, float, complex, bool, type(None))):
        return obj
    if id(obj) in seen:
        return seen[id(obj)]
    if isinstance(obj, dict):
        out: Any = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        seen[id(obj)] = out
        for key, value in obj.items():
            value = _drop_placeholders(value, seen)
            if value is not _DROP and not isinstance(key, Placeholder):
                out[key] = value
        meta = getattr(obj, "_metadata", None)
        if meta is not None:
            out._metadata = meta  # type: ignore[attr-defined]
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [v for v in (_drop_placeholders(v, seen) for v in obj) if v is not _DROP]
        if isinstance(obj, list):
            return items
        return type(obj)(items)
    if isinstance(obj, argparse.Namespace):
        ns = argparse.Namespace()
        seen[id(obj)] = ns
        for key, value in vars(obj).items():
            value = _drop_placeholders(value, seen)
            if value is not _DROP:
                setattr(ns, key, value)
        return ns
    return obj


_DROP = object()

_ZIP_MAGIC = b"PK\x03\x04"


def safe_load(path: str | os.PathLike[str]) -> Any:
    """Unpickle a ``torch.save`` zip checkpoint without running any code from it.

    Args:
        path: a ``.pth``/``.pt`` file written by ``torch.save`` (torch >= 1.6 format).

    Returns:
        The saved object (usually a dict) with tensors rebuilt on the CPU and every
        instance of a non-importable class removed.

    Raises:
        UnsafeCheckpointError: the pickle references a function or class outside the
            allowlist (``os.system``, ``builtins.eval``...); nothing was executed.
        CheckpointError: the file is not a torch checkpoint, is truncated, or uses the
            legacy (pre-1.6) format.

    Example:
        >>> ckpt = safe_load("fold0.pth")  # doctest: +SKIP
        >>> sorted(ckpt)  # doctest: +SKIP
        ['epoch', 'model', 'optimizer', 'opts', 'run_id']
    """
    path = Path(path)
    where = str(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except FileNotFoundError:
        raise CheckpointError(f"{where} does not exist; check the path", path=where) from None
    except IsADirectoryError:
        raise CheckpointError(f"{where} is a directory, not a checkpoint file", path=where) from None
    if head != _ZIP_MAGIC:
        raise _not_zip_error(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"{where} is a damaged or truncated checkpoint ({exc}); download it again", path=where) from None
    with archive:
        names = archive.namelist()
        pkl_names = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl_names) != 1:
            raise CheckpointError(
                f"{where} is a zip file but not a torch checkpoint (no single data.pkl inside); "
                "pass a .pth written by torch.save, a .safetensors file or a model directory",
                path=where,
            )
        prefix = pkl_names[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            byteorder = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()

        def load_storage(key: str, dtype: torch.dtype) -> torch.Tensor:
            name = f"{prefix}data/{key}"
            try:
                raw = bytearray(archive.read(name))
            except KeyError:
                raise pickle.UnpicklingError(f"storage {name} is missing from the archive") from None
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(raw) % itemsize:
                raise pickle.UnpicklingError(f"storage {name} has {len(raw)} bytes, not a multiple of {itemsize}")
            if not raw:
                return torch.empty(0, dtype=dtype)
            flat = torch.frombuffer(raw, dtype=torch.uint8)
            if byteorder != sys.byteorder and itemsize > 1:
                flat = flat.view(-1, itemsize).flip(1).reshape(-1).contiguous()
            return flat.view(dtype)

        try:
            data = archive.read(pkl_names[0])
            unpickler = _SafeUnpickler(io.BytesIO(data), path=where, load_storage=load_storage)
            obj = unpickler.load()
        except UnsafeCheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError, AttributeError, IndexError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{where}: cannot read the checkpoint ({type(exc).__name__}: {exc}); the file may be damaged, download it again", path=where) from None
    if unpickler.placeholders:
        logger.info("%s: dropped training-time objects of %s", where, ", ".join(sorted(unpickler.placeholders)))
    result = _drop_placeholders(obj)
    if result is _DROP:
        raise CheckpointError(
            f"{where} holds a whole pickled {obj.qualified_name} object rather than a dict with a state dict; "
            "its class is not available (and is never imported). Where that code is available, re-save it with "
            "`torch.save({'model': model.state_dict()}, 'fixed.pth')`.",
            path=where,
        )
    return result


def _not_zip_error(path: Path) -> CheckpointError:
    """The error for a file that is not a torch zip archive: legacy format or not a checkpoint."""
    where = str(path)
    with open(path, "rb") as fh:
        start = fh.read(64)
    if start[:3] == b"\x80\x02\x8a":  # a pickled long first: torch's legacy magic number
        return CheckpointError(
            f"{where} uses the legacy torch serialization format (torch < 1.6), which anatcl-infer reads only "
            "in the zip format. Re-save it once in a trusted environment: "
            "`python -c \"import torch; torch.save(torch.load('OLD.pth', weights_only=True), 'NEW.pth')\"`"
            " (add the training package to the path if weights_only refuses it), then load NEW.pth.",
            path=where,
        )
    return CheckpointError(
        f"{where} is not a torch checkpoint (expected the zip format written by torch.save); "
        "pass a .pth/.pt checkpoint, a .safetensors file or a directory with config.json + model.safetensors",
        path=where,
    )
