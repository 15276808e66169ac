"""The bare AnatCL network: 3D ResNet blocks, the encoder trunk, and encoder + projection head.

Stage 1: imports only the configuration, the errors and the fused CPU plan. Parameter names are
identical to the authors' checkpoints (``encoder.conv1.weight``, ``encoder.layer1.0.bn1.running_mean``,
``head.0.weight``...), so their state dicts load with strict key checking.

The weights stage builds networks from here. It cannot import the public class
:class:`~anatcl_infer.model.network.AnatCL`, whose ``from_pretrained``/``save_pretrained``/``encode``
call the weights and encoding stages. Its loaders take the class to build (``cls``, as in
transformers' ``from_pretrained(cls, ...)``), and without one they build :func:`model_class`, the
class registered here with :func:`register_model_class`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from . import fused as _fused

__all__ = [
    "ARCHITECTURES",
    "AnatCLNetwork",
    "BasicBlock3D",
    "Bottleneck3D",
    "ResNet3D",
    "build_encoder",
    "model_class",
    "register_model_class",
]

logger = logging.getLogger(__name__)

class BasicBlock3D(nn.Module):
    """Two 3x3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck3D(nn.Module):
    """1x1x1 -> 3x3x3 -> 1x1x1 bottleneck block (ResNet-50/101)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


#: architecture name -> (block type, blocks per stage)
ARCHITECTURES: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock3D, (2, 2, 2, 2)),
    "resnet34": (BasicBlock3D, (3, 4, 6, 3)),
    "resnet50": (Bottleneck3D, (3, 4, 6, 3)),
    "resnet101": (Bottleneck3D, (3, 4, 23, 3)),
}


class ResNet3D(nn.Module):
    """3D ResNet trunk ending in global average pooling (no classifier).

    Args:
        block: :class:`BasicBlock3D` or :class:`Bottleneck3D`.
        layers: number of blocks in each of the four stages.
        in_channels: input channels (1 for a single MRI volume).
    """

    def __init__(self, block: type[nn.Module], layers: Sequence[int], in_channels: int = 1) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv3d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], stride=1)
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.num_features = 512 * block.expansion  # type: ignore[attr-defined]
        #: run inference on CPU through the fused plan of :mod:`anatcl_infer.model.fused`
        self.fused = True
        if self.conv1.weight.is_meta:  # built to receive checkpoint weights: nothing to initialise
            return
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        expansion = block.expansion  # type: ignore[attr-defined]
        downsample = None
        if stride != 1 or self.in_planes != planes * expansion:
            downsample = nn.Sequential(
                nn.Conv3d(self.in_planes, planes * expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm3d(planes * expansion),
            )
        layers = [block(self.in_planes, planes, stride, downsample)]
        self.in_planes = planes * expansion
        layers += [block(self.in_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fused.eligible(self, x):
            try:
                return _fused.run_fused(self, x)
            except (RuntimeError, NotImplementedError) as exc:  # pragma: no cover - depends on the torch build
                logger.warning("fused CPU inference unavailable (%s); using the plain forward", exc)
                self.fused = False
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def build_encoder(architecture: str = "resnet18") -> ResNet3D:
    """Build an (untrained) encoder by name: resnet18, resnet34, resnet50 or resnet101."""
    try:
        block, layers = ARCHITECTURES[architecture]
    except KeyError:
        raise ConfigError(
            f"unknown architecture {architecture!r}; choose one of {sorted(ARCHITECTURES)}"
        ) from None
    return ResNet3D(block, layers)


class AnatCLNetwork(nn.Module):
    """AnatCL encoder plus projection head, carrying its :class:`ModelConfig`: the bare network.

    What the weights stage builds and the encoder runs. The public class,
    :class:`anatcl_infer.model.network.AnatCL`, adds the conveniences that call those stages
    (``encode``, ``from_pretrained``, ``save_pretrained``, ``push_to_hub``).

    ``model(x)`` returns the (B, 512) features used for linear probing;
    ``model(x, head=True)`` returns the (B, 128) L2-normalised projections the
    contrastive loss works on. ``x`` is (B, 1, 121, 128, 121) float32 for the
    published models (see ``model.config.preprocess``).

    Example:
        >>> model = AnatCLNetwork(ModelConfig(source="untrained"))
        >>> model(torch.zeros(1, 1, 32, 32, 32)).shape
        torch.Size([1, 512])
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else ModelConfig()
        self.encoder = build_encoder(self.config.architecture)
        dim = self.encoder.num_features
        if dim != self.config.feature_dim:
            raise ConfigError(
                f"architecture {self.config.architecture!r} gives {dim}-d features "
                f"but the config says feature_dim={self.config.feature_dim}"
            )
        self.head = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, self.config.projection_dim)
        )

    def forward(self, x: torch.Tensor, head: bool = False) -> torch.Tensor:
        """Features (B, feature_dim), or unit-norm projections with ``head=True``."""
        feats = self.encoder(x)
        if not head:
            return feats
        return F.normalize(self.head(feats), dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, feature_dim) encoder output (same as ``model(x)``)."""
        return self.encoder(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Unit-norm projections of precomputed features."""
        return F.normalize(self.head(features), dim=1)

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return next(self.parameters()).device


_Network = TypeVar("_Network", bound=AnatCLNetwork)

#: the class the weights stage builds when not told which: see :func:`register_model_class`
_registered: type[AnatCLNetwork] | None = None


def register_model_class(cls: type[_Network]) -> type[_Network]:
    """Make ``cls`` the class that loaders build by default (a class decorator).

    ``anatcl_infer.model.network`` registers the public :class:`~anatcl_infer.model.network.AnatCL`
    when it defines it, so ``load_model``, ``load_pretrained_dir`` and the rest return a model with
    ``encode``/``save_pretrained`` although the weights stage, below that class, never imports it
    (the explicit mapping transformers' Auto classes use). The package's ``__init__`` imports
    ``network``, and Python runs it before any ``anatcl_infer.model`` submodule, this one included:
    whoever can call a loader has the public class registered.

    Raises:
        TypeError: ``cls`` is not a subclass of :class:`AnatCLNetwork`.
    """
    global _registered
    if not (isinstance(cls, type) and issubclass(cls, AnatCLNetwork)):
        raise TypeError(f"register_model_class takes a subclass of AnatCLNetwork, got {cls!r}")
    _registered = cls
    return cls


def model_class() -> type[AnatCLNetwork]:
    """The class loaders build when no ``cls`` is given: the registered one, else :class:`AnatCLNetwork`."""
    return _registered if _registered is not None else AnatCLNetwork
