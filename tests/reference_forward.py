"""An independent ResNet-18 forward pass written with ``torch.nn.functional`` only.

It reads a state dict by key (the authors' names, REFERENCE §1) and shares no code
with ``anatcl_infer.model.network``, so a wrong stride, padding, block order or key mapping
in the package shows up as a numeric difference.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

__all__ = ["reference_features", "reference_projection"]

_EPS = 1e-5


def _bn(x: torch.Tensor, sd: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return F.batch_norm(
        x,
        sd[f"{prefix}.running_mean"],
        sd[f"{prefix}.running_var"],
        sd[f"{prefix}.weight"],
        sd[f"{prefix}.bias"],
        training=False,
        eps=_EPS,
    )


def _block(x: torch.Tensor, sd: Mapping[str, torch.Tensor], prefix: str, stride: int) -> torch.Tensor:
    out = F.conv3d(x, sd[f"{prefix}.conv1.weight"], stride=stride, padding=1)
    out = F.relu(_bn(out, sd, f"{prefix}.bn1"))
    out = F.conv3d(out, sd[f"{prefix}.conv2.weight"], stride=1, padding=1)
    out = _bn(out, sd, f"{prefix}.bn2")
    if f"{prefix}.downsample.0.weight" in sd:
        identity = F.conv3d(x, sd[f"{prefix}.downsample.0.weight"], stride=stride)
        identity = _bn(identity, sd, f"{prefix}.downsample.1")
    else:
        identity = x
    return F.relu(out + identity)


def reference_features(state_dict: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """(B, 512) ResNet-18 features of ``x`` (B, 1, D, H, W) from an AnatCL state dict."""
    sd = {k.removeprefix("module."): v.double() if v.is_floating_point() else v for k, v in state_dict.items()}
    sd = {k.removeprefix("encoder."): v for k, v in sd.items()}
    x = x.double()
    x = F.conv3d(x, sd["conv1.weight"], stride=2, padding=3)
    x = F.relu(_bn(x, sd, "bn1"))
    x = F.max_pool3d(x, kernel_size=3, stride=2, padding=1)
    for stage, stride in zip((1, 2, 3, 4), (1, 2, 2, 2)):
        x = _block(x, sd, f"layer{stage}.0", stride)
        x = _block(x, sd, f"layer{stage}.1", 1)
    return F.adaptive_avg_pool3d(x, 1).flatten(1)


def reference_projection(state_dict: Mapping[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """(B, 128) unit-norm projections of features through the authors' ``head.0``/``head.2``."""
    sd = {k.removeprefix("module."): v.double() for k, v in state_dict.items() if k.removeprefix("module.").startswith("head.")}
    h = F.relu(F.linear(features.double(), sd["head.0.weight"], sd["head.0.bias"]))
    h = F.linear(h, sd["head.2.weight"], sd["head.2.bias"])
    return F.normalize(h, dim=1)
