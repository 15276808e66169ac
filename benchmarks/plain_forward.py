"""The speed reference: a plain float32 functional forward of the same ResNet-18 weights.

Same operators as the module (conv3d, batch_norm in eval mode, relu, max/avg pooling), no
nn.Module machinery, so the ratio model/plain measures what the package adds on top.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F


def plain_forward(sd: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """(B, 512) features from an AnatCL state dict, float32, functional ops only."""

    def bn(t: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"], False, 0.0, 1e-5)

    e = "encoder."
    x = F.max_pool3d(F.relu(bn(F.conv3d(x, sd[e + "conv1.weight"], stride=2, padding=3), e + "bn1")), 3, 2, 1)
    for stage, stride in ((1, 1), (2, 2), (3, 2), (4, 2)):
        for block in (0, 1):
            p = f"{e}layer{stage}.{block}"
            s = stride if block == 0 else 1
            y = F.relu(bn(F.conv3d(x, sd[p + ".conv1.weight"], stride=s, padding=1), p + ".bn1"))
            y = bn(F.conv3d(y, sd[p + ".conv2.weight"], padding=1), p + ".bn2")
            if p + ".downsample.0.weight" in sd:
                x = bn(F.conv3d(x, sd[p + ".downsample.0.weight"], stride=s), p + ".downsample.1")
            x = F.relu(y + x)
    return F.adaptive_avg_pool3d(x, 1).flatten(1)
