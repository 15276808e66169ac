"""Which weights of a loaded checkpoint to keep: the model's or their EMA, and under which key prefix.

Training code stores the network's state dict under various names, sometimes next to an
exponential moving average (EMA) of it, and under the attribute names of its own wrappers
(a Lightning module's ``model.``, a ``net.`` or ``encoder.`` attribute):

* :func:`choose_weights` picks the model's state dict (``model``, ``state_dict``,
  ``model_state_dict``, ``net``, or the flat dict itself) or the EMA one (``state_dict_ema``,
  ``model_ema``, ``ema``, ``ema_state_dict``), like timm's ``use_ema``: ``weights="model"`` (the
  default) takes the model's, ``"ema"`` the EMA's (the model's when there are none). When the file
  holds both, or EMA weights only, a :class:`~anatcl_infer.errors.CheckpointWarning` says which
  set is used and how to pick the other;
* :func:`match_prefix` strips ``model.``/``net.``/``encoder.``/``backbone.`` prefixes when that
  makes the keys exactly the network's, and otherwise returns a hint for the mismatch error.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Collection, Mapping
from typing import Any

import torch

from ..errors import CheckpointError, CheckpointWarning, ConfigError, user_stacklevel

__all__ = ["WEIGHT_SETS", "check_weights_choice", "choose_weights", "match_prefix"]

logger = logging.getLogger(__name__)

#: what ``load_model(..., weights=)`` and ``--weights`` accept
WEIGHT_SETS = ("model", "ema")
_MODEL_KEYS = ("model", "state_dict", "model_state_dict", "net")
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema", "ema_state_dict")
#: attribute names of wrappers whose prefix is stripped when that makes the keys match the network
_WRAPPERS = ("model.", "net.", "encoder.", "backbone.", "module.", "_orig_mod.")


def check_weights_choice(weights: object) -> str:
    """``weights`` if it is ``"model"`` or ``"ema"``; else a :class:`~anatcl_infer.errors.ConfigError`."""
    if weights not in WEIGHT_SETS:
        raise ConfigError(f"weights must be 'model' or 'ema' (timm's use_ema), got {weights!r:.40}")
    return str(weights)


def _tensors(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and any(isinstance(v, torch.Tensor) for v in value.values())


def _first(obj: Mapping[Any, Any], keys: tuple[str, ...]) -> tuple[str | None, Mapping[str, Any] | None]:
    for key in keys:
        if _tensors(obj.get(key)):
            return key, obj[key]
    return None, None


def _say(message: str) -> None:
    logger.warning(message)
    warnings.warn(message, CheckpointWarning, stacklevel=user_stacklevel())


def choose_weights(obj: Any, *, weights: str = "model", path: str | None = None) -> tuple[Mapping[str, Any], str]:
    """The state dict to load from a checkpoint, and the key it was found under (``""`` for a flat dict).

    Args:
        obj: the loaded checkpoint.
        weights: ``"model"`` (default) or ``"ema"``.
        path: the file, for messages.

    Raises:
        CheckpointError: no state dict found; the message lists the top-level keys.

    Example:
        >>> sd, key = choose_weights({"model": {"w": torch.zeros(1)}, "epoch": 3})
        >>> key
        'model'
    """
    weights = check_weights_choice(weights)
    where = f"{path}: " if path else ""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where}the checkpoint holds a {type(obj).__name__}, not a dict with a state dict; pass an AnatCL checkpoint", path=path)
    model_key, model = _first(obj, _MODEL_KEYS)
    ema_key, ema = _first(obj, _EMA_KEYS)
    if model is None and ema is None:
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj, ""
        keys = ", ".join(repr(k) for k in list(obj)[:20])
        raise CheckpointError(
            f"{where}no state dict found: expected a dict of tensors under 'model', 'state_dict' or an EMA key "
            f"({', '.join(_EMA_KEYS)}) (top-level keys: {keys or 'none'}); pass an AnatCL checkpoint",
            path=path,
        )
    if model is None:
        _say(f"{where}the file holds EMA weights only ({ema_key!r}); loading them")
        return ema, str(ema_key)  # type: ignore[return-value]
    if ema is None:
        if weights == "ema":
            _say(f"{where}weights='ema' was asked for, but the file holds no EMA weights (none of {', '.join(_EMA_KEYS)}); "
                 f"using the model weights ({model_key!r}), as timm's use_ema does")
        return model, str(model_key)
    if weights == "ema":
        logger.info("%susing the EMA weights (%r), as asked; the model weights (%r) are not used", where, ema_key, model_key)
        return ema, str(ema_key)
    _say(f"{where}the file holds model weights ({model_key!r}) and EMA weights ({ema_key!r}); using the model weights. "
         "Pass weights='ema' (--weights ema) to use the EMA weights")
    return model, str(model_key)


def _clean(state: Mapping[str, Any]) -> dict[str, Any]:
    from .checkpoint import clean_state_dict

    return clean_state_dict(state)


def _strip(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return _clean({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def match_prefix(state: Mapping[str, Any], expected: Collection[str] | None, *, path: str | None = None) -> tuple[dict[str, Any], str | None]:
    """The state dict with the wrapper prefix stripped that makes its keys the network's, and a hint otherwise.

    Without ``expected`` only ``module.``/``_orig_mod.`` are stripped, and ``backbone.`` when every
    key carries it (the authors' ``anatcl.AnatCL`` wrapper). With it, up to three wrapper prefixes
    (``model.``, ``net.``, ``encoder.``, ``backbone.``...) are tried: the first that leaves exactly
    the expected keys wins, and tensors outside it (a Lightning module's loss buffers...) are dropped.

    Returns:
        (state dict, hint): the hint, when no prefix makes the keys match, says which prefix most
        keys share, for the mismatch error; otherwise None.

    Example:
        >>> sd, hint = match_prefix({"model.w": torch.zeros(1), "criterion.t": torch.ones(1)}, {"w"})
        >>> sorted(sd), hint
        (['w'], None)
    """
    cleaned = _clean(state)
    if expected is None or set(cleaned) == set(expected):
        if expected is None and cleaned and all(k.startswith("backbone.") for k in cleaned):
            return _strip(cleaned, "backbone."), None
        return cleaned, None
    wanted = set(expected)
    frontier: list[tuple[str, dict[str, Any]]] = [("", cleaned)]
    for _ in range(3):
        nxt: list[tuple[str, dict[str, Any]]] = []
        for stripped, current in frontier:
            for prefix in _WRAPPERS:
                sub = _strip(current, prefix)
                if not sub:
                    continue
                if set(sub) == wanted:
                    dropped = len(cleaned) - len(sub)
                    logger.info("%sthe weights are under the prefix %r (a wrapper such as a Lightning module); stripped it%s",
                                f"{path}: " if path else "", stripped + prefix,
                                f" and left out {dropped} tensors outside it" if dropped else "")
                    return sub, None
                nxt.append((stripped + prefix, sub))
        frontier = nxt
    return cleaned, _prefix_hint(cleaned, wanted)


def _prefix_hint(state: Mapping[str, Any], wanted: set[str]) -> str | None:
    """Which leading name most keys share, when the network's keys do not start with it."""
    heads = Counter(k.split(".", 1)[0] for k in state if "." in k)
    if not heads:
        return None
    head, count = heads.most_common(1)[0]
    own = {k.split(".", 1)[0] for k in wanted}
    if head in own or count * 2 < len(state):
        return None
    return (f"Hint: {count} of the {len(state)} keys start with {head + '.'!r} (a Lightning module or another wrapper?); "
            f"stripping it does not leave the network's keys ({', '.join(sorted(own))}...), so the file may hold another network.")
