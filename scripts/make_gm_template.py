"""Build the reference templates shipped in ``anatcl_infer/inputs/data/``.

The template is nilearn's MNI152 (ICBM 2009a, symmetric) grey-matter probability
map, resampled (trilinear) from its 1 mm RAS grid onto the CAT12 1.5 mm reference
grid the published AnatCL models were trained on (121x145x121, ``REFERENCE_AFFINE``),
and stored as uint8 (probability x 255) in a small compressed NIfTI.

It also writes ``mni152_t1_3mm.nii.gz``: nilearn's skull-stripped MNI152 T1, smoothed
(Gaussian, sigma 1 mm per 1 mm of downsampling) and resampled onto a 3 mm grid whose
voxel centres are every other voxel of the reference grid (61x73x61), uint8. It is the
fixed image of the affine registration in :mod:`anatcl_infer.prep` (``[prep]`` extra).

nilearn is a build/test dependency only: the package reads the files with nibabel.

Run from the repository root::

    python scripts/make_gm_template.py            # writes both files into anatcl_infer/inputs/data/
    python scripts/make_gm_template.py --check    # rebuild in memory, compare to the shipped files
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from anatcl_infer.config import REFERENCE_AFFINE, REFERENCE_SHAPE

logger = logging.getLogger("make_gm_template")

OUT = Path(__file__).resolve().parents[1] / "anatcl_infer" / "inputs" / "data" / "mni152_gm_1p5mm.nii.gz"
T1_NAME = "mni152_t1_3mm.nii.gz"
T1_SHAPE = (61, 73, 61)
T1_AFFINE = np.array([[-3.0, 0, 0, 90], [0, 3.0, 0, -126], [0, 0, 3.0, -72], [0, 0, 0, 1]])


def _resample(src: nib.Nifti1Image, shape: tuple[int, ...], affine: np.ndarray, sigma_mm: float = 0.0) -> np.ndarray:
    """Source rescaled to 0..1, optionally smoothed, trilinearly resampled onto (shape, affine), as uint8."""
    data = np.asarray(src.get_fdata(dtype=np.float32))
    data = data / max(float(data.max()), 1e-6)
    if sigma_mm > 0:
        data = ndimage.gaussian_filter(data, sigma_mm)  # the source is 1 mm isotropic
    # voxel index on the target grid -> world mm -> voxel index in the source image
    vox2vox = np.linalg.inv(src.affine) @ affine
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    src_ijk = vox2vox[:3, :3] @ ijk + vox2vox[:3, 3:4]
    values = ndimage.map_coordinates(data, src_ijk, order=1, mode="constant", cval=0.0)
    values = np.clip(values.reshape(shape), 0.0, 1.0)
    return np.round(values * 255.0).astype(np.uint8)


def build() -> np.ndarray:
    """Return the GM probability map on the reference grid as uint8 (0..255)."""
    from nilearn.datasets import load_mni152_gm_template

    return _resample(load_mni152_gm_template(resolution=1), REFERENCE_SHAPE, np.asarray(REFERENCE_AFFINE))


def build_t1() -> np.ndarray:
    """Return the skull-stripped MNI152 T1 on the 3 mm registration grid as uint8."""
    from nilearn.datasets import load_mni152_template

    return _resample(load_mni152_template(resolution=1), T1_SHAPE, T1_AFFINE, sigma_mm=1.0)


def to_image(quantised: np.ndarray, affine: np.ndarray | None = None, descrip: bytes = b"MNI152 2009a sym GM prob, CAT12 1.5mm grid") -> nib.Nifti1Image:
    """Wrap the uint8 array in a NIfTI whose scaling gives 0..1 values back."""
    affine = np.asarray(REFERENCE_AFFINE, dtype=np.float64) if affine is None else affine
    img = nib.Nifti1Image(quantised, affine)
    img.header.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0 / 255.0, 0.0)
    img.header.set_qform(img.affine, code=4)  # MNI
    img.header.set_sform(img.affine, code=4)
    img.header["descrip"] = descrip
    return img


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="compare a fresh build with the shipped file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t1_out = args.out.with_name(T1_NAME)
    built = {args.out: build(), t1_out: build_t1()}
    if args.check:
        worst = 0
        for path, quantised in built.items():
            shipped = np.asarray(nib.load(str(path)).dataobj.get_unscaled())
            diff = int(np.abs(shipped.astype(int) - quantised.astype(int)).max())
            logger.info("max difference with %s: %d (of 255)", path, diff)
            worst = max(worst, diff)
        return 0 if worst <= 1 else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(to_image(built[args.out]), str(args.out))
    nib.save(to_image(built[t1_out], T1_AFFINE, b"MNI152 2009a sym T1 (skull-stripped), 3mm"), str(t1_out))
    for path in built:
        logger.info("wrote %s (%d bytes)", path, path.stat().st_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
