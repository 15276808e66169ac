"""The opcode pre-scan: a pickle's size, opcode count, memo slots, frame lengths and nesting, checked before it is unpickled.

The C unpickler allocates what a ``BINBYTES8``/``FRAME`` declares and grows its memo to the
largest index named *before* reading, and CPython hashes a dict key or set item recursively
without a depth check (a tuple nested a million deep overflows the C stack). :func:`_scan` walks
the opcodes within a :class:`_Bounded` view of the stream, building no object: it simulates the
stack with the nesting depth of each object and refuses what breaks :data:`LIMITS`.
"""

from __future__ import annotations

import pickletools
import struct
from typing import Any

from ...errors import CheckpointError
from .limits import ITEM_BYTES, LIMITS, _Refused, charge

_MARK = pickletools.markobject
_SLICE = pickletools.stackslice
#: opcodes that add to the container below their arguments (which stays on the stack)
_MUTATORS = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
_MEMO_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})


class _Machine:
    """The pickle machine's stack, memo and marks with one nesting depth per object (no object is built).

    A container's depth is one more than its deepest item when it is built, and grows when an
    item is added to it later (``APPEND``, ``SETITEM``, ``BUILD``...); tuples, the only containers
    CPython hashes recursively, are immutable, so their depth is exact. It also notes which globals
    are the callable of a ``functools.partial`` (the first item of its arguments): those are inert.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.stack: list[int] = []  # object ids
        self.marks: list[int] = []
        self.memo: dict[int, int] = {}
        self.depth: list[int] = []  # id -> depth
        self.limit = LIMITS["depth"]
        self.globals: dict[int, tuple[str, str]] = {}  # id -> (module, name) as written
        self.texts: dict[int, str] = {}  # id -> short text (the names STACK_GLOBAL takes)
        self.first: dict[int, int] = {}  # tuple id -> id of its first item
        self.partial_callables: set[tuple[str, str]] = set()

    def _new(self, depth: int) -> int:
        if depth > self.limit:
            raise CheckpointError(
                f"{self.path}: the checkpoint nests objects more than {self.limit} levels deep; refusing it "
                "before building anything (the file is damaged or hostile)",
                path=self.path,
            )
        self.depth.append(depth)
        return len(self.depth) - 1

    def _pop_to_mark(self) -> list[int]:
        if not self.marks:
            raise ValueError("a mark is missing")
        at = self.marks.pop()
        items, self.stack[at:] = self.stack[at:], []
        return items

    def _pop(self) -> int:
        if not self.stack:
            raise ValueError("the stack is empty")
        return self.stack.pop()

    def step(self, name: str, opcode: pickletools.OpcodeInfo, arg: Any) -> None:
        """Apply one opcode to the simulated stack."""
        before, after = opcode.stack_before, opcode.stack_after
        if name == "MARK":
            self.marks.append(len(self.stack))
            return
        if name in _MEMO_OPS or name == "MEMOIZE":
            if name.endswith("GET"):
                if arg not in self.memo:
                    raise ValueError(f"memo slot {arg} is read before it is written")
                self.stack.append(self.memo[arg])
            elif self.stack:
                self.memo[len(self.memo) if name == "MEMOIZE" else arg] = self.stack[-1]
            else:
                raise ValueError("nothing to memoize")
            return
        if name == "DUP":
            self.stack.append(self.stack[-1] if self.stack else self._pop())
            return
        if name == "POP":
            if self.stack and (not self.marks or self.marks[-1] < len(self.stack)):
                self.stack.pop()
            elif self.marks:
                self.marks.pop()
            else:
                raise ValueError("the stack is empty")
            return
        # arguments named before a mark lie below it (APPENDS: the list); after it, inside the slice (OBJ: the class)
        below = before.index(_MARK) if _MARK in before else len(before)
        items: list[int] = self._pop_to_mark() if _SLICE in before else []
        popped = [self._pop() for _ in before[:below]][::-1]
        if name in _MUTATORS:
            container, added = popped[0], popped[1:] + items
            deepest = max((self.depth[i] for i in added), default=0)
            self.depth[container] = max(self.depth[container], deepest + 1)
            if self.depth[container] > self.limit:
                self._new(self.depth[container])
            self.stack.append(container)
            return
        made = -1
        for _ in after:  # a new object: one level above what it was built from
            made = self._new(max((self.depth[i] for i in popped + items), default=0) + 1)
            self.stack.append(made)
        self._note(name, arg, made, popped + items)

    def _note(self, name: str, arg: Any, made: int, args: list[int]) -> None:
        """Remember what a ``functools.partial`` wraps: globals, their names, tuples' first items."""
        if name == "GLOBAL" and isinstance(arg, str) and " " in arg:
            module, _, qual = arg.partition(" ")
            self.globals[made] = (module, qual)
        elif name == "STACK_GLOBAL" and len(args) == 2 and args[0] in self.texts and args[1] in self.texts:
            self.globals[made] = (self.texts[args[0]], self.texts[args[1]])
        elif isinstance(arg, str) and len(arg) <= 256:
            self.texts[made] = arg
        elif name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3") and args:
            self.first[made] = args[0]
        elif name == "REDUCE" and len(args) == 2 and self.globals.get(args[0]) == ("functools", "partial"):
            wrapped = self.globals.get(self.first.get(args[1], -1))
            if wrapped is not None:
                self.partial_callables.add(wrapped)


def _scan(stream: Any, size: int, path: str) -> set[tuple[str, str]]:
    """Walk the pickle's opcodes (no objects built): bound its size, opcode count, declared lengths and nesting.

    The C unpickler allocates a ``BINBYTES8``/``FRAME`` of the length the file declares *before*
    reading it, and grows its memo to the largest index named; these are checked here first. The
    stream and one slot per opcode are charged to the load's memory budget.

    Returns:
        The globals (module, name, as written) that are the callable of a ``functools.partial``.
    """
    limit = LIMITS["opcodes"]
    start = stream.tell()
    count = 0
    depths = _Machine(path)
    try:
        for opcode, arg, _pos in pickletools.genops(_Bounded(stream, start + size)):
            count += 1
            if count > limit:
                raise CheckpointError(f"{path}: the pickle holds more than {limit} objects; refusing to build it", path=path)
            name = opcode.name
            if name in _MEMO_OPS and int(arg) > limit:
                raise CheckpointError(f"{path}: the pickle names memo slot {arg} (limit {limit})", path=path)
            if name == "FRAME" and int(arg) > size:
                raise CheckpointError(f"{path}: the pickle declares a frame of {arg} bytes in a stream of {size}", path=path)
            if name == "STOP":
                break
            if name not in ("PROTO", "FRAME"):
                depths.step(name, opcode, arg)
    except CheckpointError:
        raise
    except (ValueError, TypeError, EOFError, OverflowError, IndexError, KeyError, struct.error) as exc:
        raise CheckpointError(f"{path}: the pickle stream is malformed ({exc}); the file may be damaged, download it again", path=path) from None
    try:
        charge(stream.tell() - start + count * ITEM_BYTES, f"a pickle of {count} objects")
    except _Refused as exc:
        raise CheckpointError(f"{path}: {exc}; the file is damaged or hostile, refusing it", path=path) from None
    stream.seek(start)
    return depths.partial_callables


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
