"""Make the example grey-matter maps in ``examples/data/`` from the MNI152 2009 GM template.

The template ships inside the nilearn wheel, so this runs offline::

    pip install nilearn
    python examples/make_example_data.py            # writes examples/data/*.nii.gz

Three maps on the reference grid (121x145x121, 1.5 mm, CAT12 affine), stored as
uint8 with a 1/255 scale factor (small files; the reader applies the scaling):

* ``mwp1sub-mni01_T1w.nii.gz``: the template itself, a stand-in for a CAT12 mwp1 map;
* ``mwp1sub-mni02_T1w.nii.gz``: the template with mild grey-matter loss — 4% everywhere,
  up to 25% in the medial temporal lobes (hippocampus/amygdala) and 12% in the
  posterior cingulate/precuneus, the pattern typical of ageing and early Alzheimer's disease;
* ``mwp1sub-mni03_T1w.nii.gz``: the template under a smooth, seeded deformation
  (displacements up to ~3 mm), like another brain after imperfect normalisation.

They are derived from the MNI152 templates: see ``data/LICENSE-MNI152.txt``.
"""

from __future__ import annotations

import argparse
import gzip
import logging
from pathlib import Path

import numpy as np

from anatcl_infer.config import REFERENCE_AFFINE, REFERENCE_SHAPE
from anatcl_infer.inputs.conform import conform_to_grid

logger = logging.getLogger("make_example_data")

AFFINE = np.array(REFERENCE_AFFINE, dtype=np.float64)
SEED = 20240814


def template_on_grid() -> np.ndarray:
    """The MNI152 GM probability map, trilinearly resampled onto the reference grid."""
    from nilearn.datasets import load_mni152_gm_template

    img = load_mni152_gm_template(resolution=1)
    data = np.asarray(img.get_fdata(dtype=np.float32))
    grid, method = conform_to_grid(data, img.affine, REFERENCE_SHAPE, AFFINE)
    logger.info("template put on the grid by %s", method)
    return np.clip(grid, 0.0, 1.0)


def _world_coordinates() -> np.ndarray:
    """(3, X, Y, Z) MNI mm coordinates of every grid voxel."""
    idx = np.indices(REFERENCE_SHAPE, dtype=np.float64)
    return np.einsum("ij,jxyz->ixyz", AFFINE[:3, :3], idx) + AFFINE[:3, 3, None, None, None]


def _bump(world: np.ndarray, centre: tuple[float, float, float], fwhm_mm: float) -> np.ndarray:
    """A Gaussian bump (peak 1) around an MNI coordinate."""
    sigma = fwhm_mm / 2.3548
    d2 = sum((world[i] - centre[i]) ** 2 for i in range(3))
    return np.exp(-d2 / (2 * sigma**2))


def atrophied(gm: np.ndarray) -> np.ndarray:
    """Mild global and medial-temporal / posterior-cingulate grey-matter loss."""
    world = _world_coordinates()
    loss = 0.04 * np.ones(REFERENCE_SHAPE)
    for centre in ((-26.0, -18.0, -16.0), (26.0, -18.0, -16.0)):  # hippocampi / amygdalae
        loss += 0.21 * _bump(world, centre, 22.0)
    loss += 0.08 * _bump(world, (0.0, -56.0, 30.0), 30.0)  # precuneus / posterior cingulate
    return (gm * (1.0 - np.clip(loss, 0.0, 0.5))).astype(np.float32)


def warped(gm: np.ndarray, seed: int = SEED) -> np.ndarray:
    """The map under a smooth random displacement field (trilinear, zero outside)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = rng.standard_normal((3, *REFERENCE_SHAPE))
    field = np.stack([ndimage.gaussian_filter(f, sigma=8.0, mode="constant") for f in field])
    field *= 2.0 / np.abs(field).max()  # at most 2 voxels = 3 mm
    coords = np.indices(REFERENCE_SHAPE, dtype=np.float64) + field
    return ndimage.map_coordinates(gm, coords, order=1, mode="constant", cval=0.0).astype(np.float32)


def save_uint8(path: Path, data: np.ndarray) -> None:
    """Write as gzipped uint8 NIfTI-1 with scale 1/255 and the reference affine (sform and qform)."""
    import nibabel as nib

    quantised = np.clip(np.round(data * 255.0), 0, 255).astype(np.uint8)
    img = nib.Nifti1Image(quantised, AFFINE)
    img.header.set_slope_inter(1.0 / 255.0, 0.0)
    img.header.set_qform(AFFINE, code=4)
    img.header.set_sform(AFFINE, code=4)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b"anatcl-infer example from MNI152 2009 GM"
    # gzip level 9 with a fixed timestamp: smaller than nibabel's default, and reproducible
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=9, mtime=0))
    logger.info("wrote %s (%d bytes)", path, path.stat().st_size)


def main(argv: list[str] | None = None) -> None:
    """Write the three example maps."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    gm = template_on_grid()
    save_uint8(args.out / "mwp1sub-mni01_T1w.nii.gz", gm)
    save_uint8(args.out / "mwp1sub-mni02_T1w.nii.gz", atrophied(gm))
    save_uint8(args.out / "mwp1sub-mni03_T1w.nii.gz", warped(gm))


if __name__ == "__main__":
    main()
