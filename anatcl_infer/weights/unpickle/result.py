"""The loaded object as returned: tensors materialised, placeholders dropped, pickled modules turned into state dicts.

:class:`_Walker` copies the unpickled object (bounded by ``LIMITS["depth"]``); :func:`_finish`
refuses a file that is only a placeholder and logs, in one line, what was not kept as it was.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import logging
import pathlib
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...errors import CheckpointError
from .limits import LIMITS
from .rebuild import _NdarrayType, _OpaqueDtype, _PendingArray, _PendingTensor, _PlainDtype, _Storage
from .stand_ins import Placeholder, _Frozen, _StorageType, _TensorTypeMarker

if TYPE_CHECKING:
    from .allowlist import _SafeUnpickler

logger = logging.getLogger(__package__)  # the logger name records had before the split

_DROP = object()
#: what the unpickler hands out instead of real objects: never a key of the result
_STAND_INS = (Placeholder, _PendingTensor, _PendingArray, _PlainDtype, _OpaqueDtype, _NdarrayType, _Frozen, _StorageType,
              _TensorTypeMarker, _Storage)


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
        if isinstance(obj, _PendingArray):
            if obj.array is None:
                self.dropped.add(obj.kind)
                return _DROP
            return obj.array
        if isinstance(obj, _PlainDtype):
            return obj.resolve()
        if isinstance(obj, _OpaqueDtype):
            self.dropped.add(f"numpy dtype {obj.code}")
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
                if value is not _DROP and not isinstance(key, _STAND_INS) and not (isinstance(key, type) and issubclass(key, Placeholder)):
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
        if isinstance(obj, _STAND_INS) or isinstance(obj, type):
            return _DROP
        return obj


def _finish(obj: Any, unpickler: _SafeUnpickler, walker: _Walker) -> Any:
    result = walker.walk(obj)
    if result is _DROP and isinstance(obj, _PendingArray):
        raise CheckpointError(f"{walker.path} holds only {obj.kind} (never built: only plain numeric arrays are), "
                              "not a dict with a state dict; pass an AnatCL checkpoint", path=walker.path)
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
