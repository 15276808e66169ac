""":func:`safe_load`: the entry point; picks the container reader and turns any failure into a checkpoint error."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from ...errors import CheckpointError, UnsafeCheckpointError
from .containers import _ZIP_MAGIC, _load_legacy, _load_zip
from .limits import _Refused, _refuse_sizes, budget


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
        CheckpointError: the file is not a regular file (a FIFO, a device), not a torch
            checkpoint, is truncated, declares sizes it does not hold, nests objects too
            deeply or asks for more memory than its budget (:data:`LIMITS`). Nothing else
            escapes: any other failure of a parser on a damaged file becomes this error.

    Example:
        >>> ckpt = safe_load("fold0.pth")  # doctest: +SKIP
        >>> sorted(ckpt)  # doctest: +SKIP
        ['epoch', 'model', 'optimizer', 'opts', 'run_id']
    """
    path = Path(path)
    where = str(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat on the same descriptor decides
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{where} does not exist; check the path", path=where) from None
    except IsADirectoryError:
        raise CheckpointError(f"{where} is a directory, not a checkpoint file", path=where) from None
    except OSError as exc:
        raise CheckpointError(f"{where} cannot be opened ({exc.strerror or exc})", path=where) from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise CheckpointError(f"{where} is a directory, not a checkpoint file", path=where)
        if not stat.S_ISREG(info.st_mode):
            kind = "a named pipe (FIFO)" if stat.S_ISFIFO(info.st_mode) else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "not a regular file"
            raise CheckpointError(f"{where} is {kind}, not a checkpoint file; pass the .pth file itself", path=where)
        head = os.pread(fd, 3, 0)
    except OSError as exc:
        raise CheckpointError(f"{where} cannot be read ({exc.strerror or exc})", path=where) from None
    finally:
        os.close(fd)
    try:
        with budget(info.st_size):
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
    except Exception as exc:  # noqa: BLE001  (whatever a damaged file makes a parser raise is the file's fault)
        raise CheckpointError(
            f"{where}: cannot read the checkpoint ({type(exc).__name__}: {str(exc)[:300]}); the file may be damaged, download it again",
            path=where,
        ) from None
    raise CheckpointError(
        f"{where} is not a torch checkpoint (expected the zip or legacy format written by torch.save); "
        "pass a .pth/.pt checkpoint, a .safetensors file or a directory with config.json + model.safetensors",
        path=where,
    )
