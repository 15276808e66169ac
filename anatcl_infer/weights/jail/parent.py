"""The caller's side of the jail: start the child, wait for it, turn what happened into one error or a safetensors file.

:func:`jailed` runs the child on a file and yields the folder it wrote; :func:`convert_in_jail`
and :func:`read_in_jail` read that folder's safetensors and delete it. The child's report (log
lines, warnings, its error) is JSON of a bounded size, validated field by field: nothing the
child writes is unpickled or executed here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import CheckpointError, CheckpointWarning, ConfigError, StateDictMismatchError, UnsafeCheckpointError, user_stacklevel

if TYPE_CHECKING:
    import torch

    from ...config import ModelConfig

__all__ = ["JAIL", "JailLimits", "jailed", "convert_in_jail", "read_in_jail", "check_regular_file"]

logger = logging.getLogger(__name__)

#: the environment variables the child inherits (nothing else: no proxies, tokens, credentials)
_ENV_KEEP = ("PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TMPDIR", "TZ", "LD_LIBRARY_PATH", "SYSTEMROOT")
_ENV_SET = {
    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
    "MALLOC_ARENA_MAX": "2",
}
#: the child's entry: the caller's sys.path (so it imports this very package), then the child module
_BOOT = (
    "import json, sys; job = json.load(open(sys.argv[1] + '/job.json')); "
    "sys.path[:0] = [p for p in job['sys_path'] if p not in sys.path]; "
    "from anatcl_infer.weights.jail.child import main; sys.exit(main(sys.argv[1]))"
)
_REPORT_BYTES = 4 << 20
_ERRORS: dict[str, type[Exception]] = {
    "CheckpointError": CheckpointError, "UnsafeCheckpointError": UnsafeCheckpointError,
    "StateDictMismatchError": StateDictMismatchError, "ConfigError": ConfigError,
}


@dataclasses.dataclass
class JailLimits:
    """Limits of the child process that reads one checkpoint.

    Attributes:
        memory_bytes: address space the child may map beyond what it holds after importing
            torch, plus ``2 x`` the file's size.
        seconds: wall-clock deadline (the child is killed) and CPU-time limit, plus
            ``1 s`` per ``bytes_per_second`` of file.
        bytes_per_second: the slowest reading speed allowed for (a big file gets more time).
        isolate_network: leave the network (Linux namespaces) before reading.
    """

    memory_bytes: int = 2 << 30
    seconds: float = 120.0
    bytes_per_second: float = 20e6
    isolate_network: bool = True

    def for_file(self, size: int) -> tuple[int, float]:
        """(memory budget in bytes, deadline in seconds) for a file of ``size`` bytes."""
        return self.memory_bytes + 2 * size, self.seconds + size / self.bytes_per_second


#: the limits every jailed read uses
JAIL = JailLimits()


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def check_regular_file(path: str) -> int:
    """The size of ``path``, a regular file; a FIFO, a device, a directory or a missing file is a CheckpointError."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist; check the path", path=path) from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory, not a checkpoint file", path=path) from None
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be opened ({exc.strerror or exc})", path=path) from None
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    if stat.S_ISDIR(info.st_mode):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file", path=path)
    if not stat.S_ISREG(info.st_mode):
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(info.st_mode) else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "not a regular file"
        raise CheckpointError(f"{path} is {kind}, not a checkpoint file; pass the .pth file itself", path=path)
    return info.st_size


def _child_command(job_dir: Path) -> list[str]:
    """The child's command line (a function, so tests can put a misbehaving child in its place)."""
    return [sys.executable, "-I", "-X", "faulthandler", "-c", _BOOT, str(job_dir)]


def _child_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in _ENV_KEEP if k in os.environ}
    env.update(_ENV_SET)
    return env


def _run(job_dir: Path, path: str, deadline: float, memory: int) -> tuple[int | None, float]:
    """Run the child to its end or the deadline; (return code, or None when killed at the deadline; seconds)."""
    start = time.monotonic()
    with open(job_dir / "stderr.txt", "wb") as err:
        try:
            proc = subprocess.Popen(
                _child_command(job_dir), stdin=subprocess.DEVNULL, stdout=err, stderr=err, close_fds=True,
                env=_child_env(), start_new_session=True,
            )
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot start the process that reads checkpoints ({exc})", path=path) from None
        try:
            code: int | None = proc.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            code = None
        except BaseException:  # KeyboardInterrupt: take the child down with us
            _kill(proc)
            raise
        if code is None:
            _kill(proc)
    return code, time.monotonic() - start


def _kill(proc: subprocess.Popen[bytes]) -> None:
    killpg = getattr(os, "killpg", None)
    if killpg is not None:
        with contextlib.suppress(OSError):
            killpg(proc.pid, signal.SIGKILL)  # its own session: whatever it started goes too
    with contextlib.suppress(OSError):
        proc.kill()
    proc.wait()


def _signal_text(code: int, memory: int, cpu: float) -> str:
    number = -code
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    if name == "SIGXCPU":
        return f"used more than {cpu:.0f} s of CPU time (killed by SIGXCPU)"
    if name == "SIGXFSZ":
        return f"tried to write a file larger than {_gib(memory)} (killed by SIGXFSZ)"
    if name == "SIGKILL":
        return "was killed by SIGKILL (the system's out-of-memory killer, or a user)"
    if name == "SIGABRT":
        return f"aborted (killed by SIGABRT; an allocation past the {_gib(memory)} memory budget does this)"
    return f"crashed (killed by {name})"


def _read_report(job_dir: Path) -> dict[str, Any] | None:
    path = job_dir / "report.json"
    try:
        if path.stat().st_size > _REPORT_BYTES:
            return None
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError, UnicodeDecodeError):
        return None
    return report if isinstance(report, dict) else None


def _strings(value: Any, limit: int = 10_000) -> list[str]:
    return [str(v)[:500] for v in value[:limit]] if isinstance(value, list) else []


def _relay(report: dict[str, Any]) -> None:
    """Re-emit the child's log lines (under their own logger names) and warnings in this process."""
    for record in report.get("messages", [])[:1000] if isinstance(report.get("messages"), list) else []:
        if not isinstance(record, dict) or not isinstance(record.get("message"), str):
            continue
        name = record.get("logger")
        name = name if isinstance(name, str) and name.startswith("anatcl_infer") else __name__
        level = record.get("level")
        level = min(max(level, logging.DEBUG), logging.ERROR) if isinstance(level, int) and not isinstance(level, bool) else logging.INFO
        logging.getLogger(name).log(level, "%s", record["message"][:20_000])
    for text in _strings(report.get("warnings"), 100):
        warnings.warn(text, CheckpointWarning, stacklevel=user_stacklevel())


def _error(report: dict[str, Any], path: str) -> Exception:
    """The child's error as this package's exception (known types only, fields checked)."""
    err = report.get("error")
    if not isinstance(err, dict) or not isinstance(err.get("message"), str):
        return CheckpointError(f"{path}: the process that reads checkpoints failed without saying why", path=path)
    kind = _ERRORS.get(str(err.get("type")), CheckpointError)
    message = err["message"][:50_000]
    if kind is StateDictMismatchError:
        return StateDictMismatchError(message, path=path, missing=_strings(err.get("missing")),
                                      unexpected=_strings(err.get("unexpected")), mismatched=_strings(err.get("mismatched")))
    if kind is UnsafeCheckpointError:
        name = err.get("global_name")
        return UnsafeCheckpointError(message, path=path, global_name=name[:500] if isinstance(name, str) else None)
    if kind is ConfigError:
        return ConfigError(message)
    return CheckpointError(message, path=path)


@contextlib.contextmanager
def jailed(path: str | os.PathLike[str], *, mode: str = "model", config: ModelConfig | None = None,
           weights: str = "model") -> Iterator[Path]:
    """Read a checkpoint in the jail; yield the folder holding what the child wrote (deleted afterwards).

    Args:
        path: the ``.pth``/``.pt`` file.
        mode: ``"model"``: the weights checked strictly against ``config``'s network, written as
            ``config.json`` + ``model.safetensors``; ``"state"``: the chosen state dict as
            ``state.safetensors`` (no network check).
        config: the model config (``"model"`` mode).
        weights: ``"model"`` or ``"ema"`` (see :func:`~anatcl_infer.weights.selection.choose_weights`).

    Raises:
        CheckpointError: the file is not a regular file, or the child crashed, was killed, broke
            a limit or the deadline (the message says which), or refused the file.
        UnsafeCheckpointError, StateDictMismatchError: as the child raised them.
    """
    where = os.fspath(path)
    size = check_regular_file(where)
    memory, deadline = JAIL.for_file(size)
    job_dir = Path(tempfile.mkdtemp(prefix="anatcl-jail-"))
    try:
        job = {
            "source": where, "mode": mode, "weights": weights,
            "config": config.to_dict() if config is not None else None,
            "memory_bytes": memory, "cpu_seconds": deadline, "isolate_network": JAIL.isolate_network,
            "sys_path": [os.path.abspath(p) if p else os.getcwd() for p in sys.path],
        }
        (job_dir / "job.json").write_text(json.dumps(job))
        code, took = _run(job_dir, where, deadline, memory)
        if code is None:
            raise CheckpointError(f"{where}: reading it took longer than {deadline:.0f} s; the process reading it was "
                                  "stopped (the file is damaged or hostile, or the machine is overloaded)", path=where)
        report = _read_report(job_dir)
        if code < 0:
            logger.debug("%s: the jailed reader's stderr ends with: %s", where, _tail(job_dir))
            raise CheckpointError(f"{where}: the separate process reading it {_signal_text(code, memory, deadline)}; "
                                  "the file is damaged or hostile (this process is unaffected)", path=where)
        if report is None or code != 0:
            logger.debug("%s: the jailed reader's stderr ends with: %s", where, _tail(job_dir))
            raise CheckpointError(f"{where}: the separate process reading it failed (exit status {code}) without a "
                                  "readable report; the file may be damaged or hostile", path=where)
        _relay(report)
        logger.debug("%s: read in a separate process in %.2f s (network: %s; filesystem: %s; limits: %s)", where, took,
                     str(report.get("network"))[:200], str(report.get("filesystem"))[:200], str(report.get("limits"))[:200])
        if report.get("ok") is not True:
            raise _error(report, where)
        yield job_dir / "out"
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)


def _tail(job_dir: Path, n: int = 2000) -> str:
    try:
        with open(job_dir / "stderr.txt", "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - n))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def convert_in_jail(path: str | os.PathLike[str], config: ModelConfig, *, weights: str = "model", cls: type | None = None) -> torch.nn.Module:
    """An :class:`~anatcl_infer.model.AnatCL` holding a ``.pth``'s weights, read in the jail.

    Example:
        >>> model = convert_in_jail("fold0.pth", ModelConfig(fold=0))  # doctest: +SKIP
    """
    from ...config import WEIGHTS_NAME
    from ..checkpoint import model_from_safetensors

    with jailed(path, mode="model", config=config, weights=weights) as out:
        return model_from_safetensors(_written(out / WEIGHTS_NAME, path), config, cls=cls)  # names and shapes checked first


def read_in_jail(path: str | os.PathLike[str], *, weights: str = "model") -> dict[str, torch.Tensor]:
    """The state dict of a ``.pth`` (model or EMA weights, prefixes cleaned), read in the jail.

    Example:
        >>> state = read_in_jail("fold0.pth")  # doctest: +SKIP
    """
    from ..checkpoint import read_safetensors

    with jailed(path, mode="state", weights=weights) as out:
        return {k: v.clone() for k, v in read_safetensors(_written(out / "state.safetensors", path)).items()}


def _written(file: Path, source: str | os.PathLike[str]) -> Path:
    """``file`` if the child wrote it as a regular file (not a link to something else)."""
    import stat

    try:
        regular = stat.S_ISREG(os.lstat(file).st_mode)
    except OSError:
        regular = False
    if not regular:
        raise CheckpointError(f"{os.fspath(source)}: the process reading it did not write {file.name}", path=os.fspath(source))
    return file
