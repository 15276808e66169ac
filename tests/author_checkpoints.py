"""Checkpoints written the way the authors' trainer writes them (REFERENCE §2), with random weights.

``write_author_checkpoint`` saves, with ``torch.save``, a dict holding the state dict under
``"model"``, an ``argparse.Namespace`` of options, Adam optimizer state, the epoch, a run id
and an instance of ``models.estimators.AgeEstimator`` -- a class from a module that only
exists while saving (it is put in ``sys.modules`` and removed again), exactly the situation
of the published v0.0.2 files.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import numpy as np
import torch

from anatcl_infer.model.network import AnatCL

__all__ = ["random_state_dict", "write_author_checkpoint", "fake_training_module"]


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A full AnatCL ResNet-18 state dict with random weights and BatchNorm statistics."""
    torch.manual_seed(seed)
    model = AnatCL()
    state = {}
    for key, value in model.state_dict().items():
        value = value.clone()
        if key.endswith("num_batches_tracked"):
            value.fill_(1234)
        elif key.endswith("running_var"):
            value.uniform_(0.5, 2.0)
        elif key.endswith("running_mean") or key.endswith(".bias"):
            value.normal_(0.0, 0.1)
        elif ".bn" in key or "downsample.1" in key or key == "encoder.bn1.weight":
            value.uniform_(0.5, 1.5)
        elif key.startswith("head."):
            value.normal_(0.0, 0.05)
        state[key] = value
    return state


class _FakeModules:
    """Context manager installing a ``models.estimators`` package with an ``AgeEstimator`` class."""

    def __enter__(self) -> type:
        models = types.ModuleType("models")
        estimators = types.ModuleType("models.estimators")

        class AgeEstimator:
            def __init__(self) -> None:
                self.alpha = 1.0
                self.coef = np.arange(4.0)
                self.bias = torch.ones(3)

        AgeEstimator.__module__ = "models.estimators"
        AgeEstimator.__qualname__ = "AgeEstimator"
        estimators.AgeEstimator = AgeEstimator
        models.estimators = estimators
        sys.modules["models"] = models
        sys.modules["models.estimators"] = estimators
        return AgeEstimator

    def __exit__(self, *exc: object) -> None:
        sys.modules.pop("models.estimators", None)
        sys.modules.pop("models", None)


def fake_training_module() -> _FakeModules:
    """``with fake_training_module() as AgeEstimator: ...`` -- the class exists only inside."""
    return _FakeModules()


def write_author_checkpoint(
    path: str | Path,
    state: dict[str, torch.Tensor] | None = None,
    *,
    module_prefix: bool = False,
    drop_key: str | None = None,
    extra: dict[str, object] | None = None,
) -> Path:
    """Write an authors'-style training checkpoint; returns its path."""
    state = dict(random_state_dict() if state is None else state)
    if drop_key is not None:
        del state[drop_key]
    if module_prefix:
        state = {f"module.{k}": v for k, v in state.items()}
    head_params = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.Adam(head_params, lr=1e-4, weight_decay=5e-5)
    for p in head_params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    opts = argparse.Namespace(model="resnet18", lr=1e-4, batch_size=32, temp=0.1, kernel="rbf", sigma=2.0,
                              alpha=1.0, lambd=1.0, anat="desikan", fold=0, amp=True, device="cuda")
    with fake_training_module() as AgeEstimator:
        ckpt = {
            "model": state,
            "opts": opts,
            "optimizer": optimizer.state_dict(),
            "epoch": 49,
            "run_id": "2x7kq9vd",
            "estimator": AgeEstimator(),
            "estimators": [AgeEstimator(), {"mae": 2.55}],
            **(extra or {}),
        }
        torch.save(ckpt, path)
    return Path(path)
