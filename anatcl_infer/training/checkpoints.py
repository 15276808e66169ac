"""Training checkpoints that reload with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (no
pickled classes): model, optimizer, scheduler and grad-scaler states, the epoch, the
run's configs, and every random state (torch CPU/CUDA, numpy, python ``random``,
the augmentation generator) of every rank, so a resumed run continues exactly.
Files are written to a temporary name and renamed, so a crash never leaves a
half-written checkpoint.

Also here, shared by :mod:`~anatcl_infer.training.trainer` and
:mod:`~anatcl_infer.training.finetune`: seeding every generator, and appending one
record to a run's ``log.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

__all__ = ["FORMAT", "append_jsonl", "load_checkpoint", "resolve_resume", "rng_state", "save_checkpoint", "seed_everything", "set_rng_state"]

logger = logging.getLogger(__name__)

FORMAT = "anatcl-infer-train/1"


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global generator and torch (every device) from ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line (a crash loses at most the line being written)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, numpy and python random states as plain data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": int(version), "state": [int(v) for v in internal], "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states returned by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` atomically with :func:`torch.save`.

    Example:
        >>> save_checkpoint({"epoch": 3}, "run/checkpoints/last.pt")  # doctest: +SKIP
    """
    from .._files import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training checkpoint with ``weights_only=True`` on the CPU.

    Raises:
        CheckpointError: the file is missing, unreadable, or not a training checkpoint.

    Example:
        >>> state = load_checkpoint("run/checkpoints/last.pt")  # doctest: +SKIP
        >>> state["epoch"]
        10
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found; pass --resume RUN_DIR or a checkpoints/*.pt file", path=str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"{path} cannot be read as a training checkpoint ({type(exc).__name__}: {exc})", path=str(path)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an anatcl training checkpoint (format {FORMAT}); to start from pretrained weights "
            "use `anatcl finetune --model`",
            path=str(path),
        )
    return state


def resolve_resume(resume: str | os.PathLike[str]) -> Path:
    """A run directory means its ``checkpoints/last.pt``; a file is taken as is."""
    path = Path(resume)
    if path.is_dir():
        return path / "checkpoints" / "last.pt"
    return path
