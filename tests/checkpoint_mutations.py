"""A mutation fuzzer over real checkpoints: every case loads or ends in a package error, in bounded memory.

Seeds are small but real ``torch.save`` files of the shapes training code writes (an
authors'-style training dict with options, Adam state, numpy arrays and generators, a partial,
an unknown class; the legacy pre-1.6 format; protocol 4; a pickled module). Each case mutates
one seed:

* byte flips, insertions, deletions and splices in the pickle stream (the zip re-written with
  correct CRCs, so the unpickler sees them), in the raw zip (headers, central directory) and in
  the legacy stream; truncation;
* structural: objects nested deep (lists, tuples, dict keys), huge declared sizes (integers in
  the pickle, sizes in the zip directory), duplicated zip members, globals swapped for others.

:func:`run_fuzz` feeds the cases to a worker process that runs the allowlist unpickler (the
first layer, under an address-space limit) and the state-dict extraction on each, and restarts
it if it ever dies: a death is a finding (the jail would still turn it into a ``CheckpointError``,
but the first layer should not need it). ``benchmarks/checkpoint_fuzz.py`` runs it at scale.
"""

from __future__ import annotations

import argparse
import collections
import enum
import functools
import io
import json
import pickletools
import random
import struct
import subprocess
import sys
import textwrap
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["seed_checkpoints", "mutate", "write_cases", "run_fuzz", "peak_rss", "KINDS"]

_GLOBALS = [
    ("os", "system"), ("builtins", "eval"), ("builtins", "bytearray"), ("builtins", "frozenset"), ("builtins", "range"),
    ("numpy", "dtype"), ("numpy", "ndarray"), ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.numeric", "_frombuffer"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch", "FloatStorage"), ("functools", "partial"), ("__main__", "Mode"),
    ("collections", "OrderedDict"), ("copyreg", "_reconstructor"), ("_codecs", "encode"), ("typing", "Any"),
    ("operator", "getitem"), ("builtins", "type"), ("argparse", "Namespace"), ("torch", "Size"), ("torch.nn.modules.linear", "Linear"),
]
_INT_OPS = {"BININT", "BININT1", "BININT2", "LONG1", "INT", "LONG"}
_HUGE = [1 << 31, (1 << 31) - 1, 1 << 40, (1 << 62), -1, -(1 << 31), 0]


def peak_rss() -> int:
    """This process's own peak resident set (``VmHWM``), in bytes.

    Not ``ru_maxrss``: Linux carries a parent's peak over ``exec`` into a child's, so a fresh
    interpreter started by a big process would report the parent's peak as its own.
    """
    import resource

    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _write_seeds() -> dict[str, bytes]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    state = net.state_dict()
    base = torch.arange(24.0).reshape(2, 3, 4)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(2, 1, 3, 3, 4)).sum().backward()
    opt.step()
    module = types.ModuleType("trainer_gone")

    class Mode(enum.Enum):
        TRAIN = "train"

    class Estimator:
        def __init__(self) -> None:
            self.coef = np.arange(4.0)
            self.names = np.array(["a", "b"])

    for cls in (Mode, Estimator):
        cls.__module__, cls.__qualname__ = "trainer_gone", cls.__name__
        setattr(module, cls.__name__, cls)
    sys.modules["trainer_gone"] = module
    try:
        rich = {
            "model": state, "opts": argparse.Namespace(lr=1e-3, mode=Mode.TRAIN, crop=(121, 128, 121), path="/data"),
            "optimizer": opt.state_dict(), "epoch": 3, "views": {"t": base.transpose(0, 2), "s": base[1, 1:]},
            "np": {"f": np.float32(1.5), "a": np.arange(6.0).reshape(2, 3), "i": np.int64(7), "fortran": np.asfortranarray(np.ones((2, 3)))},
            "rng": np.random.default_rng(0), "partial": functools.partial(torch.optim.Adam, lr=1e-4),
            "misc": collections.OrderedDict(a={1, 2}, b=frozenset({"x"}), c=b"\x00\xff", d=1 + 2j, e=[None, True, 2.5]),
            "estimator": Estimator(), "model_ema": {k: v.clone() for k, v in state.items()},
        }
        seeds = {}
        for name, kwargs in (("rich_zip", {}), ("rich_legacy", {"_use_new_zipfile_serialization": False}),
                             ("rich_proto4", {"pickle_protocol": 4})):
            buf = io.BytesIO()
            torch.save(rich, buf, **kwargs)
            seeds[name] = buf.getvalue()
        buf = io.BytesIO()
        torch.save(net, buf)
        seeds["whole_module"] = buf.getvalue()
        buf = io.BytesIO()
        torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "hyper_parameters": {"lr": 1e-3},
                    "callbacks": {"ModelCheckpoint{}": {"best_model_score": torch.tensor(0.5)}}}, buf)
        seeds["lightning"] = buf.getvalue()
    finally:
        del sys.modules["trainer_gone"]
    return seeds


@functools.lru_cache(maxsize=1)
def seed_checkpoints() -> dict[str, bytes]:
    """name -> bytes of each seed checkpoint (written once per process)."""
    return _write_seeds()


def _members(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(info.filename, zf.read(info)) for info in zf.infolist()]


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, payload in members:
            with zf.open(zipfile.ZipInfo(name), "w") as fh:  # duplicates allowed (zipfile only warns)
                fh.write(payload)
    return buf.getvalue()


def _opcode_starts(pkl: bytes) -> list[tuple[int, str, int]]:
    """(position, opcode name, length) of each opcode of a well-formed pickle."""
    ops = []
    try:
        items = list(pickletools.genops(pkl))
    except Exception:  # noqa: BLE001  (an already-mutated pickle: no structure to use)
        return []
    for (op, _arg, pos), nxt in zip(items, items[1:] + [(None, None, len(pkl))]):
        ops.append((pos, op.name, nxt[2] - pos))
    return ops


def _flip(data: bytes, rng: random.Random, lo: int = 0, hi: int | None = None) -> bytes:
    out = bytearray(data)
    hi = len(out) if hi is None else hi
    if hi <= lo:
        return bytes(out)
    for _ in range(rng.randint(1, 8)):
        at = rng.randrange(lo, hi)
        out[at] = rng.randrange(256) if rng.random() < 0.5 else out[at] ^ (1 << rng.randrange(8))
    return bytes(out)


def _deep(rng: random.Random) -> bytes:
    k = rng.choice([150, 199, 201, 250, 1000, 100_000, 1_000_000])
    kind = rng.randrange(4)
    if kind == 0:
        return b"]" * k + b"a" * (k - 1) + b"0"
    if kind == 1:
        return b")" + b"\x85" * k + b"0"
    if kind == 2:
        return b"}" + b")" + b"\x85" * k + b"Ns0"
    return b"(" * k + b"t" * k + b"0"


def _pickle_mutation(pkl: bytes, rng: random.Random, kind: str, other: bytes) -> bytes:
    ops = _opcode_starts(pkl)
    if kind == "pickle_flip":
        return _flip(pkl, rng)
    if kind == "pickle_insert":
        at = rng.randrange(len(pkl) + 1)
        return pkl[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + pkl[at:]
    if kind == "pickle_delete":
        at = rng.randrange(len(pkl))
        return pkl[:at] + pkl[at + rng.randint(1, 64):]
    if kind == "pickle_splice":
        at, src = rng.randrange(len(pkl)), rng.randrange(len(other))
        return pkl[:at] + other[src:src + rng.randint(1, 256)] + pkl[at + rng.randint(0, 256):]
    if kind == "deep_nesting" and ops:
        pos = rng.choice([p for p, name, _n in ops if name not in ("PROTO", "FRAME")] or [2])
        return pkl[:pos] + _deep(rng) + pkl[pos:]
    if kind == "huge_integer" and ops:
        ints = [(p, n) for p, name, n in ops if name in _INT_OPS]
        if ints:
            pos, n = rng.choice(ints)
            value = rng.choice(_HUGE)
            return pkl[:pos] + b"\x8a\x08" + struct.pack("<q", value) + pkl[pos + n:]
    if kind == "swap_global" and ops:
        globs = [(p, n) for p, name, n in ops if name == "GLOBAL"]
        if globs:
            pos, n = rng.choice(globs)
            module, name = rng.choice(_GLOBALS)
            return pkl[:pos] + b"c" + module.encode() + b"\n" + name.encode() + b"\n" + pkl[pos + n:]
    if kind == "huge_bytes":
        at = rng.choice([p for p, _n, _l in ops] or [2])
        return pkl[:at] + b"\x8e" + struct.pack("<Q", rng.choice([1 << 33, 1 << 40, 1 << 62])) + pkl[at:]
    return _flip(pkl, rng)


#: mutation kinds (chosen uniformly; each applies to a zip or a legacy seed as it can)
KINDS = ("pickle_flip", "pickle_insert", "pickle_delete", "pickle_splice", "deep_nesting", "huge_integer", "swap_global",
         "huge_bytes", "zip_flip", "zip_directory", "zip_sizes", "duplicate_member", "truncate", "legacy_flip")


def mutate(name: str, data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One mutant of the seed ``name``: (kind, bytes)."""
    kind = rng.choice(KINDS)
    seeds = seed_checkpoints()
    other = seeds[rng.choice(sorted(seeds))]
    is_zip = data[:2] == b"PK"
    if kind == "truncate":
        return kind, data[: rng.randrange(len(data))]
    if not is_zip:  # the legacy stream: the pickles, the storage keys and the raw storages in one
        if kind.startswith("pickle") or kind in ("deep_nesting", "huge_integer", "swap_global", "huge_bytes"):
            head = data[: min(len(data), 4096)]
            return kind, _pickle_mutation(head, rng, kind, other) + data[len(head):]
        return "legacy_flip", _flip(data, rng)
    if kind in ("zip_flip", "legacy_flip"):
        return "zip_flip", _flip(data, rng)
    if kind == "zip_directory":  # the central directory and end record: the last members * 46 + 22 bytes
        return kind, _flip(data, rng, max(0, len(data) - 22 - 80 * 8))
    members = _members(data)
    pkl_index = next(i for i, (n, _p) in enumerate(members) if n.endswith("data.pkl"))
    if kind == "zip_sizes":
        out = bytearray(_zip(members))
        at = out.rfind(b"PK\x01\x02")
        while at > 0 and rng.random() < 0.7:  # some earlier directory entry
            at = out.rfind(b"PK\x01\x02", 0, at)
        field = rng.choice([20, 24])  # compressed / uncompressed size
        out[at + field:at + field + 4] = struct.pack("<I", rng.choice([0xFFFFFFFF, 1 << 31, 1 << 30, 0]))
        return kind, bytes(out)
    if kind == "duplicate_member":
        i = rng.randrange(len(members))
        dup = (members[i][0], _flip(members[i][1], rng) if members[i][1] else b"x")
        members.insert(rng.randrange(len(members) + 1), dup)
        return kind, _zip(members)
    pname, pkl = members[pkl_index]
    other_pkl = next((p for n, p in _members(other) if n.endswith("data.pkl")), pkl) if other[:2] == b"PK" else other[:4096]
    members[pkl_index] = (pname, _pickle_mutation(pkl, rng, kind, other_pkl))
    return kind, _zip(members)


def write_cases(root: Path, n: int, seed: int = 0) -> list[tuple[str, str, Path]]:
    """Write ``n`` mutants into ``root``; returns (seed name, kind, path) for each."""
    rng = random.Random(seed)
    seeds = seed_checkpoints()
    root.mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n):
        name = rng.choice(sorted(seeds))
        kind, data = mutate(name, seeds[name], rng)
        path = root / f"case{i:05d}-{name}-{kind}.pth"
        path.write_bytes(data)
        cases.append((name, kind, path))
    return cases


_WORKER = textwrap.dedent(
    """
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, ({as_limit}, {as_limit}))
    from anatcl_infer.errors import AnatCLError
    from anatcl_infer.weights.convert import extract_state_dict
    from anatcl_infer.weights.unpickle import safe_load

    def peak_rss():  # this process's own peak (ru_maxrss would include the parent's: Linux carries it over exec)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    for path in json.load(open(sys.argv[1])):
        print(json.dumps({{"start": path}}), flush=True)
        try:
            obj = safe_load(path)
            try:
                extract_state_dict(obj, path=path)
                outcome = "loaded"
            except AnatCLError as exc:
                outcome = "loaded (" + type(exc).__name__ + ")"
        except AnatCLError as exc:
            outcome = type(exc).__name__
        except BaseException as exc:
            outcome = "ESCAPED " + type(exc).__name__ + ": " + str(exc)[:300]
        rss = peak_rss()
        print(json.dumps({{"path": path, "outcome": outcome, "maxrss": rss}}), flush=True)
    """
)


def run_fuzz(paths: list[Path], work: Path, *, as_limit: int = 4 << 30, timeout: float = 3600.0, env: dict[str, str] | None = None) -> dict[str, object]:
    """Load every path in a worker process (restarted after a death); outcomes per path, deaths, peak RSS."""
    script = work / "fuzz_worker.py"
    script.write_text(_WORKER.format(as_limit=as_limit))
    outcomes: dict[str, str] = {}
    deaths: dict[str, str] = {}
    peak = 0
    todo = [str(p) for p in paths]
    start = time.monotonic()
    while todo:
        listing = work / "fuzz_todo.json"
        listing.write_text(json.dumps(todo))
        proc = subprocess.Popen([sys.executable, str(script), str(listing)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
        try:
            out, err = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        current = None
        for line in out.splitlines():
            record = json.loads(line)
            if "start" in record:
                current = record["start"]
            else:
                outcomes[record["path"]] = record["outcome"]
                peak = max(peak, int(record["maxrss"]))
                current = None
        if current is not None:  # died (or hung) on this one
            deaths[current] = f"worker exit status {proc.returncode}: {err[-500:]}"
            outcomes[current] = "DIED"
        todo = [p for p in todo if p not in outcomes]
        if proc.returncode == 0 or time.monotonic() - start > timeout:
            break
    return {"outcomes": outcomes, "deaths": deaths, "peak_rss": peak, "seconds": time.monotonic() - start}
