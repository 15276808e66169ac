"""The child's side of the jail: leave the network, set limits, read one checkpoint, write safetensors and a report.

Started by :mod:`.parent` as a fresh interpreter; imports nothing but the standard library
before :func:`_leave_network` (a namespace can only be entered while the process has one
thread), then torch and the package, then :func:`_limit` sets its limits relative to what it
has mapped. Every outcome ends in ``report.json`` (written last, atomically) and exit status 0;
anything else -- a signal, a limit -- the parent sees in the exit status.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

try:
    import resource
except ImportError:  # Windows: no resource limits (the process is still separate)
    resource = None  # type: ignore[assignment]

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000


def _leave_network() -> str:
    """Move into a new, empty network namespace (Linux; a user namespace too when not root); say how it went."""
    if not sys.platform.startswith("linux"):
        return "not isolated (network namespaces are Linux-only)"
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        uid, gid = os.geteuid(), os.getegid()
        if libc.unshare(_CLONE_NEWNET if uid == 0 else _CLONE_NEWUSER | _CLONE_NEWNET) != 0:
            return f"not isolated (unshare: {os.strerror(ctypes.get_errno())})"
        if uid != 0:  # map our own ids, so files we create keep their owner
            Path("/proc/self/setgroups").write_text("deny")
            Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
            Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    except OSError as exc:
        return f"not isolated ({exc})"
    return "isolated (a new network namespace with no interface up)"


# Landlock (Linux >= 5.13): the filesystem rights this process keeps only inside its job folder,
# and (ABI >= 4) TCP, which it loses entirely
_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446
_FS_WRITE = sum(1 << bit for bit in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write, remove, make char/dir/reg/sock/fifo/block/sym
_FS_REFER, _FS_TRUNCATE = 1 << 13, 1 << 14
_NET_TCP = (1 << 0) | (1 << 1)  # bind, connect
_SCOPES = (1 << 0) | (1 << 1)  # abstract unix sockets, signals outside the domain


def _restrict_filesystem(folder: Path) -> str:
    """Keep write rights only beneath ``folder`` and drop TCP (Landlock, where the kernel has it); say how it went."""
    if not sys.platform.startswith("linux"):
        return "not restricted (Landlock is Linux-only)"
    import ctypes
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return f"not restricted (Landlock unavailable: {os.strerror(ctypes.get_errno())})"
    handled = _FS_WRITE | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0)
    fields = [handled] + ([_NET_TCP] if abi >= 4 else []) + ([_SCOPES] if abi >= 6 else [])
    attr = ctypes.create_string_buffer(struct.pack(f"<{len(fields)}Q", *fields))
    ruleset = libc.syscall(_LANDLOCK_CREATE_RULESET, attr, ctypes.c_size_t(len(attr.raw)), ctypes.c_uint32(0))
    if ruleset < 0:
        return f"not restricted (Landlock: {os.strerror(ctypes.get_errno())})"
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_PATH", 0) | os.O_DIRECTORY)
        try:
            rule = ctypes.create_string_buffer(struct.pack("<Qi", handled, fd))
            if libc.syscall(_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(1), rule, ctypes.c_uint32(0)) != 0:
                return f"not restricted (Landlock rule: {os.strerror(ctypes.get_errno())})"
        finally:
            os.close(fd)
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, required to restrict oneself
            return f"not restricted (no_new_privs: {os.strerror(ctypes.get_errno())})"
        if libc.syscall(_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            return f"not restricted (Landlock: {os.strerror(ctypes.get_errno())})"
    finally:
        os.close(ruleset)
    return f"writes only in its job folder{', no TCP' if abi >= 4 else ''} (Landlock ABI {abi})"


def _vm_bytes() -> int | None:
    """The address space mapped now (``VmSize``), or None where /proc is not available."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _set(limit: int, value: int) -> None:
    assert resource is not None
    _soft, hard = resource.getrlimit(limit)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(limit, (value, hard if hard == resource.RLIM_INFINITY else value))


def _limit(memory: int, cpu_seconds: float) -> dict[str, Any]:
    """Set address-space, CPU, file-size and open-file limits relative to the current state; return them."""
    applied: dict[str, Any] = {}
    if resource is None:
        return applied
    mapped = _vm_bytes()
    if mapped is not None:  # what torch (a CUDA build maps several GB) and the package hold, plus the budget
        _set(resource.RLIMIT_AS, mapped + memory)
        applied["address_space"] = mapped + memory
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu = int(used.ru_utime + used.ru_stime + cpu_seconds) + 1
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard == resource.RLIM_INFINITY or cpu + 5 <= hard:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))  # SIGXCPU at cpu, SIGKILL 5 s later
        applied["cpu_seconds"] = cpu
    _set(resource.RLIMIT_FSIZE, memory)
    try:
        open_now = len(os.listdir("/proc/self/fd"))
        _set(resource.RLIMIT_NOFILE, open_now + 32)
    except OSError:
        pass
    return applied


class _Collect(logging.Handler):
    """Keeps the package's log records for the report."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < 1000:
            self.records.append({"logger": record.name, "level": record.levelno, "message": record.getMessage()[:20_000]})


def _memory_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, MemoryError) or (isinstance(seen, RuntimeError) and "allocate" in str(seen)):
            return True
        seen = seen.__context__
    return "ran out of memory" in str(exc) or "can't allocate memory" in str(exc)


def _over_budget(job: dict[str, Any]) -> Exception:
    from ...errors import CheckpointError

    budget = int(job["memory_bytes"])
    text = f"{budget / (1 << 30):.1f} GiB" if budget >= 1 << 30 else f"{budget / (1 << 20):.0f} MiB"
    return CheckpointError(f"{job['source']}: reading it exceeded the {text} memory budget of the separate process "
                           "reading it; the file is damaged or hostile (or larger than this budget allows)", path=job["source"])


def _convert(job: dict[str, Any], out: Path) -> None:
    """Read the checkpoint with the allowlist unpickler and write what the parent asked for into ``out``."""
    import torch

    from ...config import ModelConfig
    from ...errors import StateDictMismatchError
    from safetensors.torch import save_file

    from ...config import WEIGHTS_NAME
    from ..checkpoint import model_with_weights
    from ..selection import choose_weights, match_prefix
    from ..unpickle import safe_load

    where = job["source"]
    obj = safe_load(where)
    state, _key = choose_weights(obj, weights=job["weights"], path=where)
    del obj
    if job["mode"] == "state":
        tensors, _hint = match_prefix(state, None, path=where)
        out.mkdir()
        save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(out / "state.safetensors"))
        return
    from ...model.resnet import AnatCLNetwork as AnatCL  # the bare network: only its key names are needed

    config = ModelConfig.from_dict(job["config"])
    with torch.device("meta"):
        expected = set(AnatCL(config).state_dict())
    tensors, hint = match_prefix(state, expected, path=where)
    try:
        model = model_with_weights(config, tensors, path=where)
    except StateDictMismatchError as exc:
        if not hint:
            raise
        raise StateDictMismatchError(f"{exc} {hint}", path=where, missing=exc.missing, unexpected=exc.unexpected,
                                     mismatched=exc.mismatched) from None
    out.mkdir()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    config.save(out)


def _error_record(exc: BaseException) -> dict[str, Any]:
    record: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    for attr in ("global_name", "missing", "unexpected", "mismatched"):
        if hasattr(exc, attr):
            record[attr] = getattr(exc, attr)
    return record


def main(job_dir: str) -> int:
    """Run one job (``job_dir/job.json``); always exit 0 with ``job_dir/report.json`` unless killed."""
    if resource is not None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash leaves no core file behind
    folder = Path(job_dir)
    job = json.loads((folder / "job.json").read_text())
    network = _leave_network() if job.get("isolate_network", True) else "not isolated (turned off)"
    import torch

    torch.set_num_threads(1)
    from ...errors import AnatCLError

    applied = _limit(int(job["memory_bytes"]), float(job["cpu_seconds"]))
    filesystem = _restrict_filesystem(folder) if job.get("isolate_network", True) else "not restricted (turned off)"
    handler = _Collect()
    package = logging.getLogger("anatcl_infer")
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    report: dict[str, Any] = {"network": network, "filesystem": filesystem, "limits": applied}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _convert(job, folder / "out")
            report["ok"] = True
        except AnatCLError as exc:
            report.update(ok=False, error=_error_record(_over_budget(job) if _memory_failure(exc) else exc))
        except MemoryError:
            report.update(ok=False, error=_error_record(_over_budget(job)))
    from ...errors import CheckpointWarning

    report["messages"] = handler.records
    report["warnings"] = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    tmp = folder / "report.json.tmp"
    tmp.write_text(json.dumps(report))
    os.replace(tmp, folder / "report.json")
    return 0
