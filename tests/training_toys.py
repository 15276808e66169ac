"""Tiny real-anatomy training data for the training tests (MNI152 GM on a 4 mm grid)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from anatcl_infer.config import PreprocessConfig

#: a 4 mm version of the reference box: 45 x 54 x 45 voxels, cropped to 40 x 46 x 40
TINY = PreprocessConfig(
    grid_shape=(45, 54, 45),
    grid_affine=((-4.0, 0, 0, 90), (0, 4.0, 0, -126), (0, 0, 4.0, -72), (0, 0, 0, 1)),
    crop=((3, 43), (5, 51), (0, 40)),
)


@functools.lru_cache(maxsize=1)
def tiny_gm() -> np.ndarray:
    """The MNI152 GM probability map resampled onto :data:`TINY`'s grid (float32)."""
    import nibabel as nib
    from nilearn.datasets import load_mni152_gm_template
    from nilearn.image import resample_img

    gm = load_mni152_gm_template(resolution=2)
    gm = nib.Nifti1Image(np.asarray(gm.get_fdata(), dtype=np.float32), gm.affine)
    target = np.array(TINY.grid_affine)
    out = resample_img(gm, target_affine=target, target_shape=TINY.grid_shape, interpolation="continuous",
                       force_resample=True, copy_header=True)
    return np.clip(np.asarray(out.get_fdata(), dtype=np.float32), 0, 1)


def make_subjects(root: Path, n: int = 16, *, seed: int = 0, sites: int = 2, val: int = 0) -> Path:
    """Write ``n`` synthetic subjects (age-dependent atrophy of real GM) and a manifest; return its path.

    Each subject: ``sub-K.npy`` (1, 45, 54, 45) on :data:`TINY`'s grid and ``sub-K_roi.npy``
    (7, 68) FreeSurfer-style descriptors whose thickness falls with age.
    """
    rng = np.random.default_rng(seed)
    base = tiny_gm()
    root.mkdir(parents=True, exist_ok=True)
    rows = ["path,age,site,split,descriptors"]
    ages = np.linspace(10, 80, n)
    rng.shuffle(ages)
    x = np.linspace(-1, 1, base.shape[0])[:, None, None]
    for k, age in enumerate(ages):
        site = k % sites
        atrophy = 1.0 - 0.006 * (age - 10) * (1.0 + 0.5 * x)  # asymmetric, age-graded
        vol = base * atrophy * (1.0 + 0.05 * site) + rng.normal(0, 0.01, base.shape).astype(np.float32) * (base > 0.05)
        np.save(root / f"sub-{k}.npy", np.clip(vol, 0, None).astype(np.float32)[None])
        roi = np.abs(rng.normal(1.0, 0.1, (7, 68))).astype(np.float32)
        roi[0] *= 1000 * (1 - 0.003 * age)  # area
        roi[1] *= 3000 * (1 - 0.004 * age)  # volume
        roi[2] *= 3.0 - 0.01 * age  # thickness
        np.save(root / f"sub-{k}_roi.npy", roi)
        split = "val" if k >= n - val else "train"
        rows.append(f"sub-{k}.npy,{age:.2f},site{site},{split},sub-{k}_roi.npy")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest

#: same grid, a 32^3 crop of the central brain: a cheaper input for trainer tests
SMALL = PreprocessConfig(
    grid_shape=TINY.grid_shape,
    grid_affine=TINY.grid_affine,
    crop=((6, 38), (12, 44), (4, 36)),
)
