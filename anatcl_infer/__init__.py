"""anatcl-infer: use AnatCL anatomical foundation models for brain MRI.

Quick start::

    import anatcl_infer
    feats = anatcl_infer.extract_features(["sub-01_mwp1.nii.gz"])  # (1, 512) float32

Importing the package is cheap: torch, nibabel and friends load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import *  # noqa: F403  (one exception hierarchy, always importable)
from .errors import __all__ as _error_names

if TYPE_CHECKING:
    from .config import ModelConfig, PreprocessConfig
    from .inputs.discovery import discover_inputs
    from .encoding.encoder import extract_features
    from .downstream.features import read_features
    from .downstream.heads import Head, fit_head
    from .weights.loading import load_model
    from .model.network import AnatCL
    from .inputs.preprocess import prepare
    from .downstream.probe import linear_probe
    from .weights.registry import list_models

_LAZY = {
    "load_model": ".weights.loading",
    "extract_features": ".encoding.encoder",
    "AnatCL": ".model.network",
    "ModelConfig": ".config",
    "PreprocessConfig": ".config",
    "list_models": ".weights.registry",
    "prepare": ".inputs.preprocess",
    "discover_inputs": ".inputs.discovery",
    "read_features": ".downstream.features",
    "Head": ".downstream.heads",
    "fit_head": ".downstream.heads",
    "linear_probe": ".downstream.probe",
}

__all__ = ["__version__", *sorted(_LAZY), *_error_names]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
