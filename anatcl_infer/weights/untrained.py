"""The untrained model: the published network with random weights, asked for by name.

``load_model("untrained", seed=0)`` and ``anatcl embed ... --model untrained`` build the
published architecture and preprocessing spec with weights drawn from ``seed``: no download,
no cache, works offline, the same numbers for the same seed (with one torch build on one kind
of CPU). Its features carry no anatomy; it is there to try every command before the published
weights are fetched. It is labelled ``untrained`` everywhere (log, the table's ``model`` column,
metadata, QC page, converted ``config.json``; source ``untrained:seed=<n>``).
"""

from __future__ import annotations

import logging
import operator
from typing import TYPE_CHECKING

from ..config import UNTRAINED, ModelConfig, PreprocessConfig
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..model.network import AnatCL

__all__ = ["UNTRAINED", "is_untrained_name", "untrained_config", "untrained_model"]

logger = logging.getLogger(__name__)


def is_untrained_name(text: str) -> bool:
    """True when a model source names the untrained model (``untrained``, any case).

    Example:
        >>> is_untrained_name("Untrained"), is_untrained_name("anatcl-global")
        (True, False)
    """
    return text.strip().lower() == UNTRAINED


def _check_seed(seed: object) -> int:
    """``seed`` as a non-negative int (NumPy integers pass; bools, floats and text do not)."""
    try:
        if isinstance(seed, bool):
            raise TypeError
        value = operator.index(seed)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r:.40}") from None
    if not 0 <= value < 2**63:
        raise ConfigError(f"seed must be a non-negative integer below 2**63, got {value}")
    return value


def untrained_config(seed: int = 0, *, architecture: str = "resnet18", preprocess: PreprocessConfig | None = None) -> ModelConfig:
    """The :class:`ModelConfig` of an untrained model: name and variant ``untrained``, no fold.

    Example:
        >>> cfg = untrained_config(3)
        >>> cfg.name, cfg.variant, cfg.fold, cfg.source
        ('untrained', 'untrained', None, 'untrained:seed=3')
    """
    return ModelConfig(
        architecture=architecture, variant=UNTRAINED, fold=None, name=UNTRAINED,
        source=f"{UNTRAINED}:seed={_check_seed(seed)}",
        preprocess=preprocess if preprocess is not None else PreprocessConfig(),
    )


def untrained_model(seed: int = 0, *, architecture: str = "resnet18", preprocess: PreprocessConfig | None = None,
                    cls: type | None = None) -> AnatCL:
    """An :class:`~anatcl_infer.model.AnatCL` with random weights drawn from ``seed``, in eval mode, on the CPU.

    The global random state is left as it was (the draw happens in a forked generator). ``cls``
    is the class to build (default: the registered public class, see
    :func:`~anatcl_infer.model.resnet.model_class`).

    Example:
        >>> a, b = untrained_model(0), untrained_model(0)
        >>> all(bool((x == y).all()) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        True
    """
    import torch

    from ..model.resnet import model_class

    config = untrained_config(seed, architecture=architecture, preprocess=preprocess)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_check_seed(seed))
        with torch.device("cpu"):
            model = (cls or model_class())(config)
    logger.warning(
        "using the untrained model (random weights, seed %d): its features carry no anatomy; "
        "for trying the commands before the published weights are fetched", _check_seed(seed),
    )
    return model.eval()
