"""Training AnatCL: losses, data, augmentations, the trainer, export and fine-tuning.

Install with ``pip install anatcl-infer[train]``. This subpackage imports the core
(``anatcl_infer.model``, ``anatcl_infer.preprocess``, ``anatcl_infer.checkpoint``);
the core never imports it. Submodules load on first use::

    from anatcl_infer.training import TrainConfig, train
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "kernelized_supcon": ".losses",
    "age_kernel": ".losses",
    "anatomical_kernel": ".losses",
    "anatcl_loss": ".losses",
    "AugmentConfig": ".augment",
    "Augmenter": ".augment",
    "read_manifest": ".data",
    "read_openbhb": ".data",
    "VolumeDataset": ".data",
    "TrainConfig": ".trainer",
    "train": ".trainer",
    "FinetuneConfig": ".finetune",
    "finetune": ".finetune",
    "load_finetuned": ".finetune",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
