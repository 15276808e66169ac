"""The AnatCL objective: kernelised supervised contrastive losses and their kernels.

Notation follows REFERENCE §7. ``features`` are (B, V, D) unit vectors: B subjects,
V views each. Views are stacked view-major (row ``v * B + b`` is view ``v`` of
subject ``b``), giving M = B·V anchors. For anchor ``a`` and every other sample
``b`` (self excluded)::

    L_a = -(τ / τ_base) · Σ_b w_ab (s_ab/τ − log Σ_{t≠a} exp(s_at/τ)) / Σ_b w_ab

with ``s_ab = z_a·z_b`` and ``w_ab`` the subject kernel tiled over views. The loss
is the mean of ``L_a`` over the anchors that have a positive total weight.

* ``kernel=None`` is SimCLR: the positives of an anchor are the other views of its
  own subject.
* a 0/1 label-equality kernel is SupCon; an age kernel is the y-aware loss (L_age);
  an anatomical kernel from Desikan descriptors is L_anat.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import ConfigError

__all__ = [
    "DESCRIPTOR_MODES",
    "KERNELS",
    "LossParts",
    "age_kernel",
    "anatcl_loss",
    "anatomical_kernel",
    "kernelized_supcon",
    "label_kernel",
]

KERNELS = ("rbf", "gaussian", "cauchy")
DESCRIPTOR_MODES = ("local", "global")


def kernelized_supcon(
    features: torch.Tensor,
    kernel: torch.Tensor | None,
    *,
    temperature: float = 0.1,
    base_temperature: float | None = None,
) -> torch.Tensor:
    """Kernel-weighted supervised contrastive loss (y-aware / SupCon / SimCLR).

    Args:
        features: (B, V, D) L2-normalised projections, V views per subject.
        kernel: (B, B) non-negative similarity between subjects, or ``None`` for
            SimCLR (positives = the other views of the same subject).
        temperature: τ, dividing the cosine similarities.
        base_temperature: τ_base; the loss is scaled by τ/τ_base. ``None`` means
            τ_base = τ (scale 1). The y-aware lineage's code used 0.07.

    Returns:
        The scalar loss (float32, differentiable w.r.t. ``features``).

    Raises:
        ConfigError: on wrong shapes, a non-positive temperature, or when no
            anchor has any positive (e.g. SimCLR with a single view).

    Example:
        >>> z = torch.nn.functional.normalize(torch.randn(4, 2, 8), dim=-1)
        >>> loss = kernelized_supcon(z, age_kernel(torch.tensor([20., 30., 40., 50.])))
        >>> loss.ndim
        0
    """
    if features.ndim != 3:
        raise ConfigError(f"features must be (B, V, D), got shape {tuple(features.shape)}; add a view axis with .unsqueeze(1)")
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature!r}")
    tau_base = temperature if base_temperature is None else float(base_temperature)
    if tau_base <= 0:
        raise ConfigError(f"base_temperature must be > 0, got {base_temperature!r}")
    n_subj, n_views, _ = features.shape
    z = features.float().transpose(0, 1).reshape(n_subj * n_views, -1)
    m = z.shape[0]
    if kernel is None:
        kernel = torch.eye(n_subj, device=z.device, dtype=z.dtype)
    if tuple(kernel.shape) != (n_subj, n_subj):
        raise ConfigError(f"kernel must be ({n_subj}, {n_subj}) for {n_subj} subjects, got {tuple(kernel.shape)}")
    self_mask = torch.eye(m, dtype=torch.bool, device=z.device)
    weights = kernel.to(device=z.device, dtype=z.dtype).repeat(n_views, n_views).masked_fill(self_mask, 0.0)

    logits = (z @ z.T) / temperature
    log_denom = torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    log_prob = (logits - log_denom).masked_fill(self_mask, 0.0)

    total_w = weights.sum(dim=1)
    valid = total_w > 0
    if not bool(valid.any()):
        raise ConfigError(
            "no anchor has a positive: use at least 2 views, or a kernel with non-zero weight between different subjects"
        )
    per_anchor = -(weights * log_prob).sum(dim=1)[valid] / total_w[valid]
    return (temperature / tau_base) * per_anchor.mean()


def age_kernel(ages: torch.Tensor, sigma: float = 2.0, kind: str = "rbf") -> torch.Tensor:
    """(B, B) similarity between subjects from their ages (or any scalar label).

    With d = y_a − y_b:

    * ``rbf``: exp(−d²/(2σ²)) (the published runs, σ = 2; 1 on the diagonal);
    * ``gaussian``: the normal density, exp(−d²/(2σ²)) / (σ·√(2π));
    * ``cauchy``: 1 / (1 + d²/σ²).

    Because the loss divides by each anchor's total weight, a constant factor
    (rbf vs gaussian) does not change it.

    Example:
        >>> age_kernel(torch.tensor([20.0, 22.0]), sigma=2.0)
        tensor([[1.0000, 0.6065],
                [0.6065, 1.0000]])
    """
    if sigma <= 0:
        raise ConfigError(f"sigma must be > 0, got {sigma!r}")
    y = torch.as_tensor(ages).float().reshape(-1)
    d2 = (y[:, None] - y[None, :]) ** 2
    if kind == "rbf":
        return torch.exp(-d2 / (2 * sigma**2))
    if kind == "gaussian":
        return torch.exp(-d2 / (2 * sigma**2)) / (sigma * (2 * torch.pi) ** 0.5)
    if kind == "cauchy":
        return 1.0 / (1.0 + d2 / sigma**2)
    raise ConfigError(f"unknown kernel kind {kind!r}; choose one of {KERNELS}")


def label_kernel(labels: torch.Tensor) -> torch.Tensor:
    """(B, B) 0/1 kernel, 1 where two subjects share a label (makes SupCon).

    Example:
        >>> label_kernel(torch.tensor([0, 0, 1]))
        tensor([[1., 1., 0.],
                [1., 1., 0.],
                [0., 0., 1.]])
    """
    y = torch.as_tensor(labels).reshape(-1)
    return (y[:, None] == y[None, :]).float()


def anatomical_kernel(descriptors: torch.Tensor, mode: str = "local", *, eps: float = 1e-8) -> torch.Tensor:
    """(B, B) anatomical similarity from Desikan descriptors (REFERENCE §7, a reconstruction).

    ``descriptors`` is (B, R, K): R regions (68 for Desikan) × K measures
    (CT, GMV, SA), **already normalised to [0, 1]**. This package normalises with a
    min-max per (region, measure) fitted once over the training set
    (:func:`anatcl_infer.training.data.fit_descriptor_range`), not per batch, so the
    kernel of a pair does not depend on the batch it lands in (and a DDP run sees the
    same kernel as a single-process run).

    * ``local``: mean over the R regions of the cosine between the two subjects'
      K-vectors of that region (α_nm).
    * ``global``: mean over the K measures of the cosine between the two subjects'
      R-vectors of that measure (β_nm).

    Example:
        >>> x = torch.rand(4, 68, 3)
        >>> anatomical_kernel(x, "global").shape
        torch.Size([4, 4])
    """
    x = torch.as_tensor(descriptors).float()
    if x.ndim != 3:
        raise ConfigError(f"descriptors must be (B, regions, measures), got shape {tuple(x.shape)}")
    # (axis of the unit vectors, einsum to per-region (R, B, B) or per-measure (K, B, B) cosines)
    cosines = {
        "local": (2, "nrk,mrk->rnm"),  # cosine over the measures of one region, mean over regions
        "global": (1, "nrk,mrk->knm"),  # cosine over the regions of one measure, mean over measures
    }
    if mode not in cosines:
        raise ConfigError(f"unknown descriptor mode {mode!r}; choose one of {DESCRIPTOR_MODES}")
    axis, pattern = cosines[mode]
    unit = torch.nn.functional.normalize(x, dim=axis, eps=eps)
    return torch.einsum(pattern, unit, unit).mean(dim=0)


class LossParts(NamedTuple):
    """The AnatCL objective and its two terms (``anat`` is 0 when unused)."""

    total: torch.Tensor
    age: torch.Tensor
    anat: torch.Tensor


def anatcl_loss(
    features: torch.Tensor,
    ages: torch.Tensor,
    descriptors: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
    lambd: float = 1.0,
    mode: str | None = "local",
    sigma: float = 2.0,
    kernel: str = "rbf",
    temperature: float = 0.1,
    base_temperature: float | None = None,
) -> LossParts:
    """AnatCL objective L = α·L_age + λ·L_anat.

    Args:
        features: (B, V, D) unit projections.
        ages: (B,) ages in years.
        descriptors: (B, 68, 3) normalised Desikan descriptors; required when
            ``lambd > 0`` and ``mode`` is not ``None``.
        alpha: weight of the y-aware age term.
        lambd: weight of the anatomical term.
        mode: ``"local"``, ``"global"`` or ``None`` (no anatomical term: y-aware only).
        sigma: age kernel bandwidth in years.
        kernel: age kernel kind (``rbf``, ``gaussian``, ``cauchy``).
        temperature: τ.
        base_temperature: τ_base (``None`` = τ).

    Returns:
        :class:`LossParts` ``(total, age, anat)``.

    Example:
        >>> z = torch.nn.functional.normalize(torch.randn(4, 2, 8), dim=-1)
        >>> parts = anatcl_loss(z, torch.tensor([20., 30., 40., 50.]), torch.rand(4, 68, 3))
        >>> parts.total.ndim
        0
    """
    temps = {"temperature": temperature, "base_temperature": base_temperature}
    zero = features.new_zeros((), dtype=torch.float32)
    age_term = kernelized_supcon(features, age_kernel(ages, sigma, kernel).to(features.device), **temps) if alpha else zero
    use_anat = bool(lambd) and mode is not None and mode != "none"
    if use_anat:
        if descriptors is None:
            raise ConfigError(
                f"descriptor mode {mode!r} needs Desikan descriptors for every subject; "
                "provide them, or train with descriptor mode 'none' (y-aware only)"
            )
        anat_term = kernelized_supcon(features, anatomical_kernel(descriptors.to(features.device), mode), **temps)
    else:
        anat_term = zero
    return LossParts(alpha * age_term + lambd * anat_term, age_term, anat_term)
