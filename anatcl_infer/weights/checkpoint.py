"""State dicts in and out: cleaning, strict loading, and the safetensors layout.

The inference layout is a directory with ``config.json`` (a :class:`ModelConfig`)
and ``model.safetensors`` (the state dict). It is what ``anatcl convert`` writes,
what is pushed to the Hub, and what the training subpackage exports.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ..config import CONFIG_NAME, WEIGHTS_NAME, ModelConfig
from ..errors import CheckpointError, StateDictMismatchError

__all__ = [
    "clean_state_dict",
    "load_state_dict_strict",
    "save_pretrained",
    "load_pretrained_dir",
    "model_with_weights",
]

logger = logging.getLogger(__name__)

_PREFIXES = ("module.", "_orig_mod.")


def clean_state_dict(state_dict: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Strip DataParallel/compile prefixes (``module.``, ``_orig_mod.``) and keep tensors only."""
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        name = str(key)
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    name = name[len(prefix):]
                    changed = True
        cleaned[name] = value
    return cleaned


def load_state_dict_strict(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, path: str | None = None, assign: bool = False
) -> None:
    """Copy ``state_dict`` into ``model``; any missing, unexpected or mis-shaped key is an error.

    With ``assign=True`` the tensors (cast to the model's dtypes) replace the model's
    own, which lets a model built on the ``meta`` device skip random initialisation.

    Raises:
        StateDictMismatchError: listing every offending key.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched[:20])}")
        where = f"{path}: " if path else ""
        raise StateDictMismatchError(
            f"{where}the weights do not match the {getattr(getattr(model, 'config', None), 'architecture', 'model')} "
            f"network. " + " | ".join(parts) + ". Check that the file is an AnatCL checkpoint and that the "
            "architecture in config.json is right.",
            path=path,
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )
    with torch.no_grad():
        if assign:
            # fresh, aligned allocations: kernels may take other paths on unaligned (mmap) memory
            state = {k: state_dict[k].to(dtype=v.dtype).clone(memory_format=torch.contiguous_format) for k, v in expected.items()}
            model.load_state_dict(state, strict=True, assign=True)
        else:
            model.load_state_dict(dict(state_dict), strict=True)


def model_with_weights(config: ModelConfig, state_dict: Mapping[str, torch.Tensor], *, path: str | None = None) -> torch.nn.Module:
    """An :class:`~anatcl_infer.model.AnatCL` in eval mode holding exactly ``state_dict``.

    The network is built on the ``meta`` device (no random initialisation, ~0.4 s saved
    per load) and the checkpoint tensors are assigned after the strict key check.
    """
    from ..model.network import AnatCL

    with torch.device("meta"):
        model = AnatCL(config)
    load_state_dict_strict(model, clean_state_dict(state_dict), path=path, assign=True)
    return model.eval()


def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write ``config.json`` + ``model.safetensors`` for an :class:`~anatcl_infer.model.AnatCL`.

    The directory is first written under a temporary name beside the target and then
    renamed, so a crash never leaves a half-written model behind.

    Example:
        >>> from anatcl_infer.model.network import AnatCL
        >>> save_pretrained(AnatCL(), "my-model")  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    config: ModelConfig = getattr(model, "config")
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config.save(tmp)
        if target.exists():
            # Replace file by file so an existing directory with other content survives.
            for name in (WEIGHTS_NAME, CONFIG_NAME):
                os.replace(tmp / name, target / name)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved %s and %s to %s", CONFIG_NAME, WEIGHTS_NAME, target)
    return target


def load_pretrained_dir(directory: str | os.PathLike[str], *, config: ModelConfig | None = None) -> torch.nn.Module:
    """Build an :class:`~anatcl_infer.model.AnatCL` from a ``config.json`` + ``model.safetensors`` directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = config if config is not None else ModelConfig.load(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights} not found: a model directory holds {CONFIG_NAME} and {WEIGHTS_NAME}", path=str(weights))
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({exc}); re-create it with `anatcl convert`", path=str(weights)) from None
    return model_with_weights(cfg, state, path=str(weights))
