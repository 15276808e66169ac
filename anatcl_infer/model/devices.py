"""The one place a torch device is chosen."""

from __future__ import annotations

import logging

import torch

__all__ = ["resolve_device"]

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Return ``device`` as a :class:`torch.device`; ``None``/``"auto"`` picks cuda, then mps, then cpu.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        if torch.cuda.is_available():
            chosen = torch.device("cuda")
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            chosen = torch.device("mps")
        else:
            chosen = torch.device("cpu")
        logger.debug("using device %s", chosen)
        return chosen
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        from ..errors import ConfigError

        raise ConfigError(f"device {device!r} was asked for but CUDA is not available; use --device cpu or auto")
    return chosen
