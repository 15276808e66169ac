"""The AnatCL losses against REFERENCE §7's values and a slow explicit-loop implementation."""

from __future__ import annotations

import math

import pytest
import torch

from anatcl_infer.errors import ConfigError
from anatcl_infer.training.losses import (
    age_kernel,
    anatcl_loss,
    anatomical_kernel,
    kernelized_supcon,
    label_kernel,
)

Z = torch.tensor([[[1.0, 0.0], [0.8, 0.6]], [[0.0, 1.0], [0.6, 0.8]], [[-1.0, 0.0], [-0.6, -0.8]]])


def loop_loss(features, kernel, tau, tau_base):
    """Literal transcription of the per-anchor formula (views view-major, self excluded)."""
    b, v, _ = features.shape
    z = [features[i % b, i // b].double() for i in range(b * v)]
    w = (lambda i, j: 1.0 if i % b == j % b else 0.0) if kernel is None else (lambda i, j: float(kernel[i % b, j % b]))
    total, count = 0.0, 0
    for a in range(b * v):
        others = [t for t in range(b * v) if t != a]
        log_denom = math.log(sum(math.exp(float(z[a] @ z[t]) / tau) for t in others))
        wsum = sum(w(a, t) for t in others)
        if wsum == 0:
            continue
        acc = sum(w(a, t) * (float(z[a] @ z[t]) / tau - log_denom) for t in others)
        total += -(tau / tau_base) * acc / wsum
        count += 1
    return total / count


@pytest.mark.parametrize(
    ("ages", "tau_base", "expected"),
    [
        ([20, 22, 25], None, 4.474453),
        ([20, 22, 25], 0.07, 6.392076),
        ([20, 22, 60], None, 1.595103),
        ([20, 22, 60], 0.07, 2.278719),
    ],
)
def test_y_aware_reference_values(ages, tau_base, expected):
    kernel = age_kernel(torch.tensor(ages, dtype=torch.float32), sigma=2.0)
    loss = kernelized_supcon(Z, kernel, temperature=0.1, base_temperature=tau_base)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_supcon_and_simclr_reference_values():
    assert kernelized_supcon(Z, label_kernel(torch.tensor([0, 0, 1]))).item() == pytest.approx(1.800554, abs=1e-6)
    assert kernelized_supcon(Z, None).item() == pytest.approx(0.644999, abs=1e-6)


@pytest.mark.parametrize("kind", ["rbf", "gaussian", "cauchy"])
@pytest.mark.parametrize("views", [1, 2, 3])
def test_matches_loop_on_random_inputs(kind, views):
    g = torch.Generator().manual_seed(views)
    feats = torch.nn.functional.normalize(torch.randn(5, views, 7, generator=g), dim=-1)
    ages = torch.rand(5, generator=g) * 60 + 10
    kernel = age_kernel(ages, sigma=7.0, kind=kind)
    fast = kernelized_supcon(feats, kernel, temperature=0.2, base_temperature=0.07)
    assert fast.item() == pytest.approx(loop_loss(feats, kernel, 0.2, 0.07), rel=1e-5)


def test_simclr_and_anatomical_match_loop():
    g = torch.Generator().manual_seed(3)
    feats = torch.nn.functional.normalize(torch.randn(6, 2, 5, generator=g), dim=-1)
    assert kernelized_supcon(feats, None).item() == pytest.approx(loop_loss(feats, None, 0.1, 0.1), rel=1e-5)
    desc = torch.rand(6, 68, 3, generator=g)
    for mode in ("local", "global"):
        k = anatomical_kernel(desc, mode)
        assert kernelized_supcon(feats, k).item() == pytest.approx(loop_loss(feats, k, 0.1, 0.1), rel=1e-5)


def test_anatomical_kernel_definitions():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 68, 3, generator=g)
    cos = torch.nn.functional.cosine_similarity
    local = torch.stack([torch.stack([cos(x[n], x[m], dim=1).mean() for m in range(3)]) for n in range(3)])
    glob = torch.stack([torch.stack([cos(x[n], x[m], dim=0).mean() for m in range(3)]) for n in range(3)])
    torch.testing.assert_close(anatomical_kernel(x, "local"), local)
    torch.testing.assert_close(anatomical_kernel(x, "global"), glob)
    assert not torch.allclose(local, glob)
    # scaling one subject's measures by a constant leaves the global kernel unchanged
    y = x.clone()
    y[0] *= 3.0
    torch.testing.assert_close(anatomical_kernel(y, "global"), glob)


def test_age_kernel_values():
    k = age_kernel(torch.tensor([20.0, 22.0]), sigma=2.0)
    assert k[0, 1].item() == pytest.approx(math.exp(-0.5))
    assert age_kernel(torch.tensor([20.0, 22.0]), 2.0, "cauchy")[0, 1].item() == pytest.approx(0.5)
    g = age_kernel(torch.tensor([20.0, 22.0]), 2.0, "gaussian")
    assert g[0, 0].item() == pytest.approx(1 / (2 * math.sqrt(2 * math.pi)))


def test_anatcl_loss_combines_terms():
    g = torch.Generator().manual_seed(1)
    feats = torch.nn.functional.normalize(torch.randn(4, 2, 8, generator=g), dim=-1)
    ages = torch.tensor([20.0, 35.0, 50.0, 70.0])
    desc = torch.rand(4, 68, 3, generator=g)
    parts = anatcl_loss(feats, ages, desc, alpha=0.5, lambd=2.0, mode="global")
    assert parts.age.item() == pytest.approx(kernelized_supcon(feats, age_kernel(ages)).item())
    assert parts.anat.item() == pytest.approx(kernelized_supcon(feats, anatomical_kernel(desc, "global")).item())
    assert parts.total.item() == pytest.approx(0.5 * parts.age.item() + 2.0 * parts.anat.item())
    only_age = anatcl_loss(feats, ages, None, mode=None)
    assert only_age.anat.item() == 0.0 and only_age.total.item() == pytest.approx(parts.age.item())


def test_errors_say_what_to_do():
    with pytest.raises(ConfigError, match="descriptor"):
        anatcl_loss(Z, torch.tensor([1.0, 2.0, 3.0]), None, mode="local")
    with pytest.raises(ConfigError, match="at least 2 views"):
        kernelized_supcon(Z[:, :1], None)
    with pytest.raises(ConfigError, match="unknown kernel"):
        age_kernel(torch.tensor([1.0]), kind="laplace")
    with pytest.raises(ConfigError, match=r"\(B, V, D\)"):
        kernelized_supcon(Z[:, 0], None)


def test_gradient_flows():
    feats = torch.nn.functional.normalize(torch.randn(4, 2, 8), dim=-1).requires_grad_(True)
    kernelized_supcon(feats, age_kernel(torch.tensor([1.0, 2.0, 3.0, 4.0]))).backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0
