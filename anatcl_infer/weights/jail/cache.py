"""Local original checkpoints converted once: ``<cache>/models/local/<sha256>-<architecture>[-ema]/``.

``load_model("fold0.pth")`` reads the file in the jail the first time (a few seconds: a fresh
interpreter imports torch) and keeps ``config.json`` + ``model.safetensors`` under the file's
content hash; later loads of the same content read the safetensors directly.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ...config import CONFIG_NAME, WEIGHTS_NAME, ModelConfig

if TYPE_CHECKING:
    import torch

__all__ = ["local_model_dir", "local_model"]

logger = logging.getLogger(__name__)


def local_model_dir(sha256: str, config: ModelConfig, weights: str = "model") -> Path:
    """Where the converted form of a local checkpoint with content ``sha256`` is cached.

    Example:
        >>> local_model_dir("ab" * 32, ModelConfig()).name
        'abababababababababababababababab-resnet18'
    """
    from ..download import cache_dir

    return cache_dir() / "models" / "local" / f"{sha256[:32]}-{config.architecture}{'-ema' if weights == 'ema' else ''}"


def local_model(path: str | os.PathLike[str], config: ModelConfig, sha256: str, *, weights: str = "model", cls: type | None = None) -> torch.nn.Module:
    """The model of a local ``.pth``: from the cache when its content was converted before, else converted in the jail and cached.

    The config is the caller's (the file's name may differ from the first conversion's);
    where the cache cannot be written, the file is converted in the jail without caching.
    """
    from ..checkpoint import load_pretrained_dir, save_pretrained
    from .parent import convert_in_jail

    target = local_model_dir(sha256, config, weights)
    if (target / CONFIG_NAME).is_file() and (target / WEIGHTS_NAME).is_file():
        logger.debug("%s: using its converted form cached in %s", path, target)
        return load_pretrained_dir(target, config=config, cls=cls)
    model = convert_in_jail(path, config, weights=weights, cls=cls)
    try:
        save_pretrained(model, target)
    except OSError as exc:
        logger.debug("%s: could not cache its converted form in %s (%s)", path, target, exc)
    return model
