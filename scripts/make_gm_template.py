"""Build the mean grey-matter reference template shipped in ``anatcl_infer/data/``.

The template is nilearn's MNI152 (ICBM 2009a, symmetric) grey-matter probability
map, resampled (trilinear) from its 1 mm RAS grid onto the CAT12 1.5 mm reference
grid the published AnatCL models were trained on (121x145x121, ``REFERENCE_AFFINE``),
and stored as uint8 (probability x 255) in a small compressed NIfTI.

nilearn is a build/test dependency only: the package reads the file with nibabel.

Run from the repository root::

    python scripts/make_gm_template.py            # writes anatcl_infer/data/mni152_gm_1p5mm.nii.gz
    python scripts/make_gm_template.py --check    # rebuild in memory, compare to the shipped file
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

OUT = Path(__file__).resolve().parents[1] / "anatcl_infer" / "data" / "mni152_gm_1p5mm.nii.gz"


def build() -> np.ndarray:
    """Return the GM probability map on the reference grid as uint8 (0..255)."""
    from nilearn.datasets import load_mni152_gm_template

    src = load_mni152_gm_template(resolution=1)
    data = np.asarray(src.get_fdata(dtype=np.float32))
    data = data / max(float(data.max()), 1e-6)
    target = np.asarray(REFERENCE_AFFINE, dtype=np.float64)
    # voxel index on the target grid -> world mm -> voxel index in the source image
    vox2vox = np.linalg.inv(src.affine) @ target
    ijk = np.indices(REFERENCE_SHAPE, dtype=np.float64).reshape(3, -1)
    src_ijk = vox2vox[:3, :3] @ ijk + vox2vox[:3, 3:4]
    values = ndimage.map_coordinates(data, src_ijk, order=1, mode="constant", cval=0.0)
    values = np.clip(values.reshape(REFERENCE_SHAPE), 0.0, 1.0)
    return np.round(values * 255.0).astype(np.uint8)


def to_image(quantised: np.ndarray) -> nib.Nifti1Image:
    """Wrap the uint8 array in a NIfTI whose scaling gives probabilities back."""
    img = nib.Nifti1Image(quantised, np.asarray(REFERENCE_AFFINE, dtype=np.float64))
    img.header.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0 / 255.0, 0.0)
    img.header.set_qform(img.affine, code=4)  # MNI
    img.header.set_sform(img.affine, code=4)
    img.header["descrip"] = b"MNI152 2009a sym GM prob, CAT12 1.5mm grid"
    return img


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="compare a fresh build with the shipped file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quantised = build()
    if args.check:
        shipped = np.asarray(nib.load(str(args.out)).dataobj.get_unscaled())
        diff = int(np.abs(shipped.astype(int) - quantised.astype(int)).max())
        logger.info("max difference with %s: %d (of 255)", args.out, diff)
        return 0 if diff <= 1 else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(to_image(quantised), str(args.out))
    logger.info("wrote %s (%d bytes)", args.out, args.out.stat().st_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
