"""Training augmentations in torch, off by default (the published runs used none).

Randomness is split from computation: :func:`sample_params` draws every random
number from a :class:`torch.Generator` into a small :class:`AugmentParams`, and
:func:`apply_params` is a pure, deterministic function of the volume and those
parameters. The trainer owns the generator and saves its state in checkpoints, so a
resumed run draws the same augmentations.

Transforms, applied in this order to one (C, X, Y, Z) volume:

* random crop + pad: shift the volume by up to ``shift`` voxels per axis, filling
  with zeros (equivalent to zero-padding by ``shift`` then cropping back to the
  original shape at a random offset);
* flip along the left-right axis (axis 0 of the reference grid) with ``flip_p``;
* Gaussian blur with σ drawn uniformly from ``blur_sigma`` (voxels), with ``blur_p``;
* additive Gaussian noise with std drawn from ``noise_std``, with ``noise_p``;
* cutout: zero a ``cutout_size``³ cube at a random place, with ``cutout_p``
  (the predecessors used 32³, p = 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = ["AugmentConfig", "AugmentParams", "Augmenter", "apply_params", "sample_params"]


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations to use; every one is off by default.

    Attributes:
        shift: max random crop + pad shift in voxels per axis (0 = off).
        flip_p: probability of a left-right flip.
        blur_p: probability of a Gaussian blur; ``blur_sigma`` its (min, max) σ in voxels.
        noise_p: probability of additive noise; ``noise_std`` its (min, max) std, in
            units of the volume's own standard deviation.
        cutout_p: probability of a cutout; ``cutout_size`` the cube edge in voxels.

    Example:
        >>> AugmentConfig().enabled
        False
        >>> AugmentConfig(cutout_p=0.5).enabled
        True
    """

    shift: int = 0
    flip_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    noise_p: float = 0.0
    noise_std: tuple[float, float] = (0.0, 0.1)
    cutout_p: float = 0.0
    cutout_size: int = 32

    def __post_init__(self) -> None:
        for name in ("flip_p", "blur_p", "noise_p", "cutout_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be a probability in [0, 1], got {value!r}")
        if self.shift < 0 or self.cutout_size < 1:
            raise ConfigError(f"shift must be >= 0 and cutout_size >= 1, got {self.shift!r}, {self.cutout_size!r}")
        for name in ("blur_sigma", "noise_std"):
            lo, hi = (float(v) for v in getattr(self, name))
            if not 0.0 <= lo <= hi:
                raise ConfigError(f"{name} must be (min, max) with 0 <= min <= max, got {getattr(self, name)!r}")
            object.__setattr__(self, name, (lo, hi))

    @property
    def enabled(self) -> bool:
        """Whether any augmentation can fire."""
        return bool(self.shift or self.flip_p or self.blur_p or self.noise_p or self.cutout_p)

    @classmethod
    def predecessors(cls) -> AugmentConfig:
        """The y-Aware lineage's set: crop + pad, cutout 32³ p 0.5, flips, blur and noise."""
        return cls(shift=8, flip_p=0.5, blur_p=0.5, noise_p=0.5, cutout_p=0.5, cutout_size=32)


@dataclass(frozen=True)
class AugmentParams:
    """The random draw for one volume; :func:`apply_params` is deterministic given it."""

    shift: tuple[int, int, int] = (0, 0, 0)
    flip: bool = False
    blur_sigma: float = 0.0
    noise_std: float = 0.0
    noise_seed: int = 0
    cutout: tuple[int, int, int] | None = None
    cutout_size: int = 0


def _uniform(lo: float, hi: float, generator: torch.Generator) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _coin(p: float, generator: torch.Generator) -> bool:
    # Always draw, so the number of draws per volume does not depend on earlier outcomes.
    return float(torch.rand((), generator=generator)) < p


def sample_params(config: AugmentConfig, shape: tuple[int, ...], generator: torch.Generator) -> AugmentParams:
    """Draw the random parameters for one volume of spatial ``shape`` (X, Y, Z).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> sample_params(AugmentConfig(flip_p=1.0), (8, 8, 8), g).flip
        True
    """
    if not config.enabled:
        return AugmentParams()
    s = config.shift
    shift = tuple(int(torch.randint(-s, s + 1, (), generator=generator)) for _ in range(3))
    flip = _coin(config.flip_p, generator)
    do_blur = _coin(config.blur_p, generator)
    sigma = _uniform(*config.blur_sigma, generator)
    do_noise = _coin(config.noise_p, generator)
    std = _uniform(*config.noise_std, generator)
    noise_seed = int(torch.randint(0, 2**62, (), generator=generator))
    do_cut = _coin(config.cutout_p, generator)
    size = min(config.cutout_size, *shape)
    corner = tuple(int(torch.randint(0, n - size + 1, (), generator=generator)) for n in shape[-3:])
    return AugmentParams(
        shift=shift,  # type: ignore[arg-type]
        flip=flip,
        blur_sigma=sigma if do_blur else 0.0,
        noise_std=std if do_noise else 0.0,
        noise_seed=noise_seed,
        cutout=corner if do_cut else None,  # type: ignore[arg-type]
        cutout_size=size if do_cut else 0,
    )


def _shift(x: torch.Tensor, shift: tuple[int, int, int]) -> torch.Tensor:
    """Translate the last three axes by ``shift`` voxels, zero-filling.

    ``F.pad`` pads one side by ``d`` and crops the other by ``d`` (a negative pad crops).
    """
    if any(abs(d) >= n for n, d in zip(x.shape[-3:], shift)):
        return torch.zeros_like(x)  # shifted out entirely (F.pad refuses a crop beyond the size)
    return F.pad(x, [p for d in reversed(shift) for p in (d, -d)])


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable 3D Gaussian blur of a (C, X, Y, Z) volume, kernel radius 3σ, zero padding.

    Kept in torch (not ``scipy.ndimage.gaussian_filter``): it runs on the batch's device,
    the GPU in training, without a round trip through numpy.
    """
    radius = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[0]
    out = x.unsqueeze(0)
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = k.numel()
        pad = [0, 0, 0]
        pad[axis] = radius
        weight = k.reshape(1, 1, *shape).expand(c, 1, *shape)
        out = F.conv3d(out, weight, padding=tuple(pad), groups=c)
    return out.squeeze(0)


def apply_params(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Apply a drawn :class:`AugmentParams` to one (C, X, Y, Z) volume (pure function).

    Example:
        >>> x = torch.arange(8.0).reshape(1, 2, 2, 2)
        >>> apply_params(x, AugmentParams(flip=True))[0, :, 0, 0]
        tensor([4., 0.])
    """
    if params == AugmentParams():
        return x
    out = x
    if any(params.shift):
        out = _shift(out, params.shift)
    if params.flip:
        out = torch.flip(out, dims=(-3,))
    if params.blur_sigma > 0:
        out = _gaussian_blur(out, params.blur_sigma)
    if params.noise_std > 0:
        g = torch.Generator(device="cpu").manual_seed(params.noise_seed)
        noise = torch.randn(out.shape, generator=g, dtype=torch.float32).to(device=out.device, dtype=out.dtype)
        out = out + noise * (params.noise_std * out.float().std().to(out.dtype))
    if params.cutout is not None:
        out = out.clone() if out is x else out
        (a, b, c), s = params.cutout, params.cutout_size
        out[..., a : a + s, b : b + s, c : c + s] = 0
    return out


class Augmenter:
    """Draws and applies augmentations to a batch with its own seeded generator.

    Args:
        config: which augmentations.
        seed: seed of the generator (the trainer uses ``seed + rank``).

    Example:
        >>> aug = Augmenter(AugmentConfig(flip_p=0.5), seed=0)
        >>> aug(torch.zeros(2, 1, 8, 8, 8)).shape
        torch.Size([2, 1, 8, 8, 8])
    """

    def __init__(self, config: AugmentConfig | None = None, seed: int = 0) -> None:
        self.config = config if config is not None else AugmentConfig()
        self.generator = torch.Generator().manual_seed(int(seed))

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Augment each (C, X, Y, Z) volume of a (B, C, X, Y, Z) batch independently."""
        if not self.config.enabled:
            return batch
        shape = tuple(batch.shape[-3:])
        return torch.stack([apply_params(v, sample_params(self.config, shape, self.generator)) for v in batch])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Generator state, for checkpoints."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the generator state saved by :meth:`state_dict`."""
        self.generator.set_state(state["generator"])
