"""The models a run embeds with, and what identifies them in every table it writes.

:class:`_FoldStack` runs several fold models on one prepared batch; :func:`weights_sha256`
identifies the numbers a model holds (:func:`weights_unchanged` hashes each model once
inside a block); :func:`_metadata` is the provenance block stored with the table (model,
weights, preprocessing, versions, device); :func:`check_head` checks a head against the models.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import os
import platform
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..._version import __version__
from ...errors import ConfigError

if TYPE_CHECKING:
    import torch

    from ...model.network import AnatCL


class _FoldStack:
    """Runs several fold models on the same prepared batch (inputs are prepared once)."""

    def __init__(self, models: Sequence[AnatCL]) -> None:
        import torch

        self.models = list(models)
        first = self.models[0].config
        for m in self.models[1:]:
            if m.config.preprocess != first.preprocess:
                raise ConfigError("all folds must share one preprocessing spec to be embedded in one pass")
        self.module = torch.nn.ModuleList(self.models)
        self.config = dataclasses.replace(first, feature_dim=first.feature_dim * len(self.models))

    # The small surface iter_encoded needs from a model.
    @property
    def device(self) -> torch.device:
        return self.models[0].device

    def to(self, device: torch.device) -> _FoldStack:
        self.module.to(device)
        return self

    def eval(self) -> _FoldStack:
        self.module.eval()
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.cat([m(x) for m in self.models], dim=1)


def weights_sha256(model: Any) -> str:
    """SHA-256 of the weights a model actually holds (its state dict: names, dtypes, shapes, bytes).

    Unlike ``config.source_sha256`` (the file it came from, unknown for a re-exported or
    in-memory model) this identifies the numbers that produce the features, however they
    were loaded.

    Example:
        >>> weights_sha256(model)[:12]  # doctest: +SKIP
        '3f5a0c9e1b2d'
    """
    import torch

    memo = _WEIGHTS_MEMO.get()
    if memo is not None and id(model) in memo:
        return memo[id(model)][1]
    h = hashlib.sha256()
    module = model.module if isinstance(model, _FoldStack) else model
    for name, value in sorted(module.state_dict().items()):
        t = value.detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    if memo is not None:
        memo[id(model)] = (model, digest)  # the model is held, so its id is not reused inside the block
    return digest


#: digests remembered inside :func:`weights_unchanged` (None outside it)
_WEIGHTS_MEMO: contextvars.ContextVar[dict[int, tuple[Any, str]] | None] = contextvars.ContextVar("anatcl_weights_memo", default=None)


@contextlib.contextmanager
def weights_unchanged() -> Iterator[None]:
    """Inside the block, :func:`weights_sha256` hashes each model object once.

    For callers that run many jobs with the same loaded models and do not change their
    weights meanwhile (``anatcl bids`` runs one embed job per subject: hashing ~130 MB of
    weights per subject and fold costs ~0.07 s each time).
    """
    token = _WEIGHTS_MEMO.set({})
    try:
        yield
    finally:
        _WEIGHTS_MEMO.reset(token)


def _metadata(models: Sequence[AnatCL], device: str) -> dict[str, Any]:
    import torch

    cfg = models[0].config
    digests = [weights_sha256(m) for m in models]
    return {
        "package_version": __version__,
        "model": {
            "name": cfg.name,
            "source": cfg.source,
            "source_sha256": [m.config.source_sha256 for m in models] if len(models) > 1 else cfg.source_sha256,
            "weights_sha256": digests if len(models) > 1 else digests[0],
            "architecture": cfg.architecture,
            "variant": cfg.variant,
            "folds": [m.config.fold for m in models],
        },
        "preprocess": cfg.preprocess.to_dict(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": device,
    }


def check_head(head_dir: str | os.PathLike[str], models: Sequence[AnatCL], *, source: str | os.PathLike[str] | None = None) -> None:
    """Raise :class:`HeadError` unless the head was fitted on these models' weights (SHA-256, else name) and folds.

    ``source`` is what the models were loaded from (``--model``): a fold mismatch then says how
    to get the head's fold in words that fit it (:func:`~anatcl_infer.weights.sources.fold_advice`).
    """
    from ..._optional import require
    from ...downstream.heads import Head
    from ...errors import HeadError
    from ...weights.sources import fold_advice

    require("sklearn", "sklearn", "pandas")  # applying a head needs the [sklearn] extra: say so first
    head = Head.load(head_dir)
    have = [m.config.fold for m in models]
    fitted = sorted((k for k in head.folds if k is not None), key=int)
    missing = [f for f in have if f is not None and f not in head.folds]
    if missing and fitted and not (len(head.folds) == 1 and len(have) == 1 and None in head.folds):
        raise HeadError(
            f"the head was fitted on features of fold{'s' if len(fitted) > 1 else ''} {', '.join(map(str, fitted))}, "
            f"the model is fold {', '.join(map(str, missing))}; {fold_advice(source, fitted[0])}"
        )
    head.check_model(_metadata(models, "-"), feature_dim=models[0].config.feature_dim)
