"""What the unpickler hands out instead of real globals; none of it can be changed by a file.

* :class:`Placeholder` classes (one per unknown global, made by :func:`_make_placeholder`):
  inert, never imported, dropped from the result (an ``nn.Module`` one becomes its state dict);
* :class:`_Namespace`, the per-load stand-in base for ``argparse.Namespace``;
* :class:`_Frozen`, an allowlisted function that BUILD cannot modify;
* :class:`_StorageType` (``torch.FloatStorage``... as a dtype) and :data:`_TENSOR_TYPE`
  (``torch.Tensor``/``nn.Parameter`` as a rebuild's ``new_type``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from .limits import _bad


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
