"""A T1 of a whole head, built around nilearn's skull-stripped MNI152 brain.

No package ships an MNI152 T1 with its skull (nilearn's template is skull-stripped; its
``fetch_icbm152_2009`` downloads), so one is built: nilearn's T1 inside its brain mask
(``load_mni152_brain_mask``), wrapped in the layers of a T1-weighted head at their usual
thickness and contrast (white matter = 1): CSF and meninges (2 mm, 0.08), the inner table of the
skull (1.5 mm, 0.03), the diploe, fatty marrow (2.5 mm, 0.38), the outer table (1.5 mm, 0.03),
galea and muscle (2 mm, 0.30), subcutaneous fat (3.5 mm, 0.85) and skin (1.5 mm, 0.45); a neck
of muscle in fat below the skull base; two eyes (vitreous 0.10 in orbital fat 0.80) in front of
the frontal lobes; then partial-volume blur (0.6 mm), a smooth bias field (+-20 %) and noise
(2 % of white matter, in the background too). deepbet's brain mask on it is compared with
nilearn's brain mask (the true answer by construction).

Example:
    >>> head, brain_mask, affine = mni_head(2)
    >>> head.shape, brain_mask.dtype
    ((99, 117, 95), dtype('bool'))
"""

from __future__ import annotations

import functools

import numpy as np

from anatomy import mni_t1_1mm

__all__ = ["mni_brain_mask_1mm", "mni_head"]

# (outer distance from the brain mask in mm, intensity), from the inside out
_LAYERS = ((2.0, 0.08), (3.5, 0.03), (6.0, 0.38), (7.5, 0.03), (9.5, 0.30), (13.0, 0.85), (14.5, 0.45))


@functools.lru_cache(maxsize=None)
def _mask_1mm() -> np.ndarray:
    # nilearn's load_mni152_brain_mask(resolution=1) is its T1 template (scaled to max 1) > 0.2;
    # the same rule on the same file (importing nilearn.datasets costs ~2 s)
    t1, _ = mni_t1_1mm()
    mask = t1 > 0.2
    mask.setflags(write=False)
    return mask


def mni_brain_mask_1mm() -> np.ndarray:
    """nilearn's MNI152 brain mask at 1 mm (``load_mni152_brain_mask(resolution=1)``, read directly)."""
    return np.array(_mask_1mm())


@functools.lru_cache(maxsize=None)
def _head(step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from scipy import ndimage

    t1, affine = mni_t1_1mm()
    mask = _mask_1mm()
    t1, mask = t1[::step, ::step, ::step], mask[::step, ::step, ::step]
    affine = affine.copy()
    affine[:3, :3] *= step
    dist = ndimage.distance_transform_edt(~mask, sampling=float(step))  # mm from the brain
    head = np.where(mask, t1, 0.0).astype(np.float32)
    inner = 0.0
    for outer, value in _LAYERS:
        head[(dist > inner) & (dist <= outer)] = value
        inner = outer
    ijk = np.indices(mask.shape, dtype=np.float64).reshape(3, -1)
    x, y, z = (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape((3, *mask.shape))
    below = (z < -30.0) & (dist > 2.0)
    neck = below & ((x / 55.0) ** 2 + ((y + 20.0) / 60.0) ** 2 < 1.0)
    fat = below & ((x / 62.0) ** 2 + ((y + 20.0) / 67.0) ** 2 < 1.0) & ~neck
    head[neck & (head == 0)] = 0.32
    head[fat & (head == 0)] = 0.80
    for side in (-32.0, 32.0):
        r = np.sqrt((x - side) ** 2 + (y - 52.0) ** 2 + (z + 38.0) ** 2)
        eye = (r < 16.0) & (dist > 1.0)
        head[eye] = np.where(r[eye] < 12.0, 0.10, 0.80)
    head = ndimage.gaussian_filter(head, 0.6 / step)
    head[mask] = 0.92 * t1[mask] + 0.08 * head[mask]
    rng = np.random.default_rng(0)
    bias = 1.0 + 0.12 * np.sin(x / 60.0) + 0.08 * np.cos(y / 70.0)
    head = np.abs(head * bias + rng.normal(0.0, 0.02, head.shape)).astype(np.float32)
    for arr in (head, mask, affine):
        arr.setflags(write=False)
    return head, mask, affine


def mni_head(step: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A T1 of a head with skull, scalp, eyes and neck around the MNI152 brain, at ``step`` mm.

    Returns:
        ``(head, brain_mask, affine)``: float32 intensities (white matter ~1, scaled by a
        bias field), nilearn's brain mask on the same grid, and the RAS affine.
    """
    head, mask, affine = _head(int(step))
    return np.array(head), np.array(mask), np.array(affine)
