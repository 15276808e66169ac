"""Multi-process training under ``torchrun``: process group, gathers, BatchNorm.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init_distributed`
reads them and joins a process group (``nccl`` on CUDA, ``gloo`` on CPU).

The contrastive loss needs every sample of the **global** batch: projections are
gathered with a differentiable all-gather, so every rank computes the same loss on
the same global batch, and DDP's gradient averaging gives exactly the single-process
gradient.

BatchNorm: the published runs normalised over the whole batch on one GPU. To keep
that meaning under DDP, BatchNorm layers are synchronised across ranks:
:class:`torch.nn.SyncBatchNorm` on CUDA, and :class:`GlobalBatchNorm` (a small
autograd-aware all-reduce of per-channel sums, usable with gloo) on CPU, where
``SyncBatchNorm`` refuses to run (torch 2.13: ``ValueError: SyncBatchNorm expected input
tensor to be on GPU``). With ``sync_batchnorm=False`` each rank normalises
over its local batch only (faster, but no longer the single-device computation).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "GlobalBatchNorm", "gather", "gather_with_grad", "init_distributed", "sync_batchnorm"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, GPU ``local_rank``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the one that logs, checkpoints and exports)."""
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the ``torchrun`` process group if ``WORLD_SIZE`` > 1 (no-op otherwise).

    Example:
        >>> init_distributed(torch.device("cpu"))  # outside torchrun
        DistInfo(rank=0, world_size=1, local_rank=0)
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        logger.info("joined %s process group as rank %d of %d", backend, rank, world)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def _world_size() -> int:
    """Processes in the joined group; 1 outside a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums the gradient over ranks and keeps this rank's rows.

    (Hand-written, as is :class:`_AllReduceSum`: torch's autograd-aware collectives,
    ``torch.distributed.nn.functional.all_gather``/``all_reduce``, warn ``FutureWarning:
    deprecated`` on every call in torch 2.13 and point to the private
    ``torch.distributed._functional_collectives``; under gloo that ``all_gather`` emulates
    its backward with one scatter per rank. An all-reduce of one contiguous tensor is
    simple and exact on every torch we support.)
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor)
        ctx.rows = tensor.shape[0]
        ctx.rank = rank
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every input is the sum of the ranks' output gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.contiguous().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) along dim 0, keeping gradients.

    Every rank computes the same loss on the gathered batch; the backward sums the
    gradients of all ranks' copies, so with DDP's averaging each parameter receives
    exactly the single-process gradient.
    """
    if _world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, without gradients (rank order)."""
    with torch.no_grad():
        return gather_with_grad(tensor)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover every rank's batch (works with gloo).

    Same parameters, buffers and state-dict keys as :class:`torch.nn.BatchNorm3d`.
    Outside a process group, or in eval mode, it is an ordinary BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise with global batch statistics in training, running statistics in eval."""
        if not (self.training and _world_size() > 1):
            return super().forward(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        x = input.float()
        # two passes (mean, then centred squares) for the precision of a local BatchNorm
        count = torch.tensor([x.numel() / channels], dtype=torch.float32, device=x.device)
        totals = _AllReduceSum.apply(torch.cat([x.sum(dims), count]))
        n = totals[-1]
        mean = totals[:channels] / n
        shape = [1, channels] + [1] * (input.dim() - 2)
        centred = x - mean.reshape(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / n
        with torch.no_grad():
            if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
        out = centred * torch.rsqrt(var.reshape(shape) + self.eps)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out.to(input.dtype)


def _to_global_bn(module: nn.Module) -> nn.Module:
    """``SyncBatchNorm.convert_sync_batchnorm`` for :class:`GlobalBatchNorm` (torch's always builds a ``SyncBatchNorm``)."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_global_bn(child))
    return out


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Make BatchNorm layers normalise over the global batch (``SyncBatchNorm`` on CUDA).

    Parameters and buffers are shared with ``model`` (state-dict keys unchanged).

    Example:
        >>> m = sync_batchnorm(nn.Sequential(nn.BatchNorm3d(4)), torch.device("cpu"))
        >>> type(m[0]).__name__
        'GlobalBatchNorm'
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _to_global_bn(model)

