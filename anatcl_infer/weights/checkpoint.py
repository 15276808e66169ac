"""State dicts in and out: cleaning, strict loading, and the safetensors layout.

The inference layout is a directory with ``config.json`` (a :class:`ModelConfig`)
and ``model.safetensors`` (the state dict). It is what ``anatcl convert`` writes,
what is pushed to the Hub, and what the training subpackage exports.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .._files import atomic_dir, atomic_path
from ..config import CONFIG_NAME, WEIGHTS_NAME, ModelConfig
from ..errors import CheckpointError, StateDictMismatchError
from ..model.resnet import AnatCLNetwork, model_class

__all__ = [
    "clean_state_dict",
    "load_state_dict_strict",
    "save_pretrained",
    "load_pretrained_dir",
    "model_with_weights",
    "check_weights",
]

logger = logging.getLogger(__name__)

_PREFIXES = ("module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A state-dict key without DataParallel/compile prefixes (in any order, any number of times)."""
    while name.startswith(_PREFIXES):
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
    return name


def clean_state_dict(state_dict: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Strip DataParallel/compile prefixes (``module.``, ``_orig_mod.``) and keep tensors only."""
    return {clean_name(str(key)): value for key, value in state_dict.items() if isinstance(value, torch.Tensor)}


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
        listed = (("missing keys", missing, ", "), ("unexpected keys", unexpected, ", "), ("shape mismatches", mismatched, "; "))
        parts = [
            f"{label} ({len(keys)}): {sep.join(keys[:20])}{' ...' if len(keys) > 20 else ''}" for label, keys, sep in listed if keys
        ]
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
    check_weights(state_dict, expected, path=path)
    with torch.no_grad():
        if assign:
            # fresh, aligned allocations: kernels may take other paths on unaligned (mmap) memory
            state = {k: state_dict[k].to(dtype=v.dtype).clone(memory_format=torch.contiguous_format) for k, v in expected.items()}
            model.load_state_dict(state, strict=True, assign=True)
        else:
            model.load_state_dict(dict(state_dict), strict=True)


def check_weights(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *, path: str | None = None) -> None:
    """Refuse weights that cannot give meaningful features.

    A floating-point parameter or buffer stored with an integer/bool/complex dtype, a
    non-finite value, or a negative BatchNorm running variance is a :class:`CheckpointError`
    (each would silently give NaN or nonsense features).
    """
    where = f"{path}: " if path else ""
    for key, ref in expected.items():
        value = state_dict[key]
        if ref.is_floating_point():
            if not value.is_floating_point():
                raise CheckpointError(f"{where}{key} holds {value.dtype} values where the network expects floating point; the file is damaged or not AnatCL weights", path=path)
            # a float64 sum is NaN/inf exactly when a float32 value is (no float32 sum can overflow it);
            # ~10x faster than isfinite(), which is only run to count when the sum says so
            total = value.sum(dtype=torch.float64)
            if not bool(torch.isfinite(total)) and not bool(torch.isfinite(value).all()):
                bad = int((~torch.isfinite(value)).sum())
                raise CheckpointError(f"{where}{key} holds {bad} non-finite values (NaN or inf); the weights are damaged, download or export them again", path=path)
            if key.endswith("running_var") and bool((value < 0).any()):
                raise CheckpointError(f"{where}{key} holds negative BatchNorm variances; the weights are damaged", path=path)
        elif value.is_floating_point() or value.dtype == torch.bool or value.is_complex():
            raise CheckpointError(f"{where}{key} holds {value.dtype} values where the network expects {ref.dtype}", path=path)


def model_with_weights(
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    *,
    path: str | None = None,
    cls: type[AnatCLNetwork] | None = None,
) -> torch.nn.Module:
    """A ``cls`` (default :func:`~anatcl_infer.model.resnet.model_class`, the public
    :class:`~anatcl_infer.model.AnatCL`) in eval mode holding exactly ``state_dict``.

    The network is built on the ``meta`` device (no random initialisation, ~0.4 s saved
    per load) and the checkpoint tensors are assigned after the strict key check.
    """
    with torch.device("meta"):
        model = (cls or model_class())(config)
    load_state_dict_strict(model, clean_state_dict(state_dict), path=path, assign=True)
    return model.eval()


def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write ``config.json`` + ``model.safetensors`` for an :class:`~anatcl_infer.model.AnatCL`.

    A new directory is first written under a temporary name beside the target and then
    renamed, so a crash never leaves a half-written model behind; in an existing directory
    each file is replaced atomically and other content (a model card...) survives.

    Example:
        >>> from anatcl_infer.model.network import AnatCL
        >>> save_pretrained(AnatCL(), "my-model")  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    config: ModelConfig = getattr(model, "config")
    target = Path(directory)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if target.exists():
        with atomic_path(target / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        config.save(target)
    else:
        with atomic_dir(target) as tmp:
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            config.save(tmp)
    logger.info("saved %s and %s to %s", CONFIG_NAME, WEIGHTS_NAME, target)
    return target


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` file.

    Raises:
        CheckpointError: the file cannot be read as safetensors.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); re-create it with `anatcl convert`", path=str(path)) from None


def model_from_safetensors(
    path: str | os.PathLike[str], config: ModelConfig, *, cls: type[AnatCLNetwork] | None = None
) -> torch.nn.Module:
    """An :class:`~anatcl_infer.model.AnatCL` (or ``cls``) holding a ``.safetensors`` file's weights, strictly.

    The names and shapes in the header are checked before any tensor is read.
    """
    check_safetensors_header(path, config, cls=cls)
    return model_with_weights(config, read_safetensors(path), path=str(path), cls=cls)


def load_pretrained_dir(
    directory: str | os.PathLike[str], *, config: ModelConfig | None = None, cls: type[AnatCLNetwork] | None = None
) -> torch.nn.Module:
    """Build an :class:`~anatcl_infer.model.AnatCL` (or ``cls``) from a ``config.json`` + ``model.safetensors`` directory."""
    directory = Path(directory)
    cfg = config if config is not None else ModelConfig.load(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights} not found: a model directory holds {CONFIG_NAME} and {WEIGHTS_NAME}", path=str(weights))
    return model_from_safetensors(weights, cfg, cls=cls)


def check_safetensors_header(
    path: str | os.PathLike[str], config: ModelConfig, *, cls: type[AnatCLNetwork] | None = None
) -> None:
    """Compare the tensor names and shapes a ``.safetensors`` header declares with the network, before reading any.

    Raises:
        StateDictMismatchError: missing, unexpected or mis-shaped tensors (nothing was allocated).
        CheckpointError: the header cannot be read.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {clean_name(k): tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); re-create it with `anatcl convert`", path=str(path)) from None
    with torch.device("meta"):
        model = (cls or model_class())(config)
    fake = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    expected = model.state_dict()
    if set(fake) != set(expected) or any(tuple(fake[k].shape) != tuple(expected[k].shape) for k in expected):
        load_state_dict_strict(model, fake, path=str(path))  # raises with every offending key
