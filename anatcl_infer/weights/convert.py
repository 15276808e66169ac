"""Original checkpoints -> the inference layout (``config.json`` + ``model.safetensors``).

An original ``.pth`` is read with :func:`~anatcl_infer.weights.unpickle.safe_load`
(no code executed), its state dict found (``ckpt["model"]``, ``ckpt["state_dict"]``
or the flat dict itself), cleaned of ``module.`` prefixes and loaded with strict key
checking into a fresh :class:`~anatcl_infer.model.AnatCL`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import clean_state_dict, model_from_safetensors, model_with_weights, read_safetensors, save_pretrained
from ..config import ModelConfig
from ..errors import CheckpointError

if TYPE_CHECKING:
    from ..model.resnet import AnatCLNetwork

__all__ = ["extract_state_dict", "read_checkpoint", "model_from_checkpoint", "convert_checkpoint", "guess_identity"]

logger = logging.getLogger(__name__)

_STATE_KEYS = ("model", "state_dict", "model_state_dict", "net")


def extract_state_dict(obj: Any, *, path: str | None = None) -> dict[str, torch.Tensor]:
    """Find the network's state dict in a loaded checkpoint and strip ``module.`` prefixes.

    Looks at ``obj["model"]``, then ``obj["state_dict"]`` (and a few common names),
    then ``obj`` itself when it is a flat mapping of tensors.

    Raises:
        CheckpointError: no state dict found; the message lists the top-level keys.

    Example:
        >>> extract_state_dict({"model": {"module.head.0.bias": torch.zeros(2)}, "epoch": 3})
        {'head.0.bias': tensor([0., 0.])}
    """
    where = f"{path}: " if path else ""
    if isinstance(obj, Mapping):
        for key in _STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and any(isinstance(v, torch.Tensor) for v in inner.values()):
                return _unwrap(clean_state_dict(inner))
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return _unwrap(clean_state_dict(obj))
        keys = ", ".join(repr(k) for k in list(obj)[:20])
        raise CheckpointError(
            f"{where}no state dict found: expected a dict of tensors under 'model' or 'state_dict' "
            f"(top-level keys: {keys or 'none'}); pass an AnatCL checkpoint",
            path=path,
        )
    raise CheckpointError(f"{where}the checkpoint holds a {type(obj).__name__}, not a dict with a state dict; pass an AnatCL checkpoint", path=path)


def _unwrap(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network inside the authors' ``anatcl.AnatCL`` wrapper: every key under ``backbone.``."""
    if state and all(k.startswith("backbone.") for k in state):
        return {k[len("backbone."):]: v for k, v in state.items()}
    return state


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read the state dict of a ``.pth``/``.pt`` (safely) or ``.safetensors`` file.

    Example:
        >>> state = read_checkpoint("fold0.pth")  # doctest: +SKIP
        >>> len(state)  # doctest: +SKIP
        124
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return clean_state_dict(read_safetensors(path))
    from .unpickle import safe_load

    return extract_state_dict(safe_load(path), path=str(path))


def guess_identity(text: str) -> tuple[str, str, int | None]:
    """Guess (registry name, variant, fold) from a file name or URL of the published files.

    Example:
        >>> guess_identity("resnet18-anatcl-l3/fold2.pth")
        ('anatcl-local', 'local', 2)
    """
    # only the last two path components: a directory such as /usr/local/ must not decide the variant
    lower = "/".join(text.replace("\\", "/").lower().rstrip("/").split("/")[-2:])
    fold_match = re.findall(r"fold[_-]?(\d+)", lower)
    fold = int(fold_match[-1]) if fold_match else None
    if re.search(r"(^|[^a-z])(local|l3)([^a-z0-9]|$)", lower):
        return "anatcl-local", "local", fold
    if re.search(r"(^|[^a-z])(global|g3)([^a-z0-9]|$)", lower):
        return "anatcl-global", "global", fold
    return "anatcl", "unknown", fold


def model_from_checkpoint(
    path: str | os.PathLike[str], config: ModelConfig, *, cls: type[AnatCLNetwork] | None = None
) -> torch.nn.Module:
    """Build an :class:`~anatcl_infer.model.AnatCL` (or ``cls``) from an original checkpoint, strictly.

    Raises:
        StateDictMismatchError: missing, unexpected or mis-shaped keys (all listed).

    Example:
        >>> model = model_from_checkpoint("fold0.pth", ModelConfig(fold=0))  # doctest: +SKIP
    """
    if Path(path).suffix == ".safetensors":
        return model_from_safetensors(path, config, cls=cls)  # names and shapes checked before any tensor is read
    return model_with_weights(config, read_checkpoint(path), path=str(path), cls=cls)


def convert_checkpoint(src: str | os.PathLike[str], out_dir: str | os.PathLike[str], config: ModelConfig) -> Path:
    """Convert an original checkpoint into ``out_dir/config.json`` + ``model.safetensors``.

    Args:
        src: the ``.pth``/``.pt``/``.safetensors`` file.
        out_dir: directory to write (created atomically).
        config: the config to record (source URL, source sha256, variant, fold...).

    Example:
        >>> convert_checkpoint("fold0.pth", "anatcl-global-fold0", ModelConfig())  # doctest: +SKIP
    """
    model = model_from_checkpoint(src, config)
    return save_pretrained(model, out_dir)
