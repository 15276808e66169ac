"""Original checkpoints -> the inference layout (``config.json`` + ``model.safetensors``).

An original ``.pth`` is read in the jail (:mod:`~anatcl_infer.weights.jail`: a separate,
limited process running :func:`~anatcl_infer.weights.unpickle.safe_load`, no code executed),
its state dict found (``ckpt["model"]``, ``ckpt["state_dict"]``, an EMA key when asked, or the
flat dict itself), cleaned of ``module.`` and wrapper prefixes and loaded with strict key
checking into a fresh :class:`~anatcl_infer.model.AnatCL`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import clean_state_dict, model_from_safetensors, read_safetensors, save_pretrained
from ..config import ModelConfig

if TYPE_CHECKING:
    from ..model.resnet import AnatCLNetwork

__all__ = ["extract_state_dict", "read_checkpoint", "model_from_checkpoint", "convert_checkpoint", "guess_identity"]

logger = logging.getLogger(__name__)

def extract_state_dict(obj: Any, *, path: str | None = None, weights: str = "model") -> dict[str, torch.Tensor]:
    """Find the network's state dict in a loaded checkpoint and strip ``module.`` prefixes.

    Looks at ``obj["model"]``, then ``obj["state_dict"]`` (and a few common names), then
    ``obj`` itself when it is a flat mapping of tensors; ``weights="ema"`` takes the EMA weights
    (``state_dict_ema``, ``model_ema``, ``ema``) instead, as timm's ``use_ema``
    (:func:`~anatcl_infer.weights.selection.choose_weights`).

    Raises:
        CheckpointError: no state dict found; the message lists the top-level keys.

    Example:
        >>> extract_state_dict({"model": {"module.head.0.bias": torch.zeros(2)}, "epoch": 3})
        {'head.0.bias': tensor([0., 0.])}
    """
    from .selection import choose_weights, match_prefix

    state, _key = choose_weights(obj, weights=weights, path=path)
    return match_prefix(state, None, path=path)[0]


def read_checkpoint(path: str | os.PathLike[str], *, weights: str = "model") -> dict[str, torch.Tensor]:
    """Read the state dict of a ``.pth``/``.pt`` (in the jail: a separate, limited process) or ``.safetensors`` file.

    Example:
        >>> state = read_checkpoint("fold0.pth")  # doctest: +SKIP
        >>> len(state)  # doctest: +SKIP
        124
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return clean_state_dict(read_safetensors(path))
    from .jail import read_in_jail

    return read_in_jail(path, weights=weights)


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
    path: str | os.PathLike[str], config: ModelConfig, *, cls: type[AnatCLNetwork] | None = None, weights: str = "model"
) -> torch.nn.Module:
    """Build an :class:`~anatcl_infer.model.AnatCL` (or ``cls``) from an original checkpoint, strictly.

    A ``.pth``/``.pt`` is read in the jail (:mod:`anatcl_infer.weights.jail`: a separate, limited
    process that writes safetensors), with ``weights`` ``"model"`` or ``"ema"``.

    Raises:
        StateDictMismatchError: missing, unexpected or mis-shaped keys (all listed).

    Example:
        >>> model = model_from_checkpoint("fold0.pth", ModelConfig(fold=0))  # doctest: +SKIP
    """
    if Path(path).suffix == ".safetensors":
        return model_from_safetensors(path, config, cls=cls)  # names and shapes checked before any tensor is read
    from .jail import convert_in_jail

    return convert_in_jail(path, config, weights=weights, cls=cls)


def convert_checkpoint(src: str | os.PathLike[str], out_dir: str | os.PathLike[str], config: ModelConfig, *, weights: str = "model") -> Path:
    """Convert an original checkpoint into ``out_dir/config.json`` + ``model.safetensors``.

    Args:
        src: the ``.pth``/``.pt``/``.safetensors`` file.
        out_dir: directory to write (created atomically).
        config: the config to record (source URL, source sha256, variant, fold...).
        weights: ``"model"`` (default) or ``"ema"`` (the file's EMA weights, as timm's ``use_ema``).

    Example:
        >>> convert_checkpoint("fold0.pth", "anatcl-global-fold0", ModelConfig())  # doctest: +SKIP
    """
    model = model_from_checkpoint(src, config, weights=weights)
    return save_pretrained(model, out_dir)
