"""The mean grey-matter reference template shipped with the package.

``anatcl_infer/inputs/data/mni152_gm_1p5mm.nii.gz`` is the MNI152 (ICBM 2009a, symmetric)
grey-matter probability map on the CAT12 1.5 mm reference grid (121x145x121,
:data:`~anatcl_infer.config.REFERENCE_AFFINE`), stored as uint8 with a NIfTI
scale factor; ``scripts/make_gm_template.py`` made it from nilearn's copy, and its
licence notice sits beside it (``MNI152_LICENSE.txt``). QC compares every input
with it and draws the outline of its brain mask on the pictures.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from importlib import resources

import numpy as np

from ..config import REFERENCE_AFFINE, REFERENCE_SHAPE, PreprocessConfig
from ..errors import ConfigError

__all__ = ["TEMPLATE_FILE", "GMTemplate", "load_gm_template", "to_model_space"]

logger = logging.getLogger(__name__)

#: File name of the template inside ``anatcl_infer/inputs/data``.
TEMPLATE_FILE = "mni152_gm_1p5mm.nii.gz"

# Brain mask rule: smooth the GM probability (sigma 1 voxel = 1.5 mm), keep > 0.3,
# fill the enclosed white matter and ventricles (~1.9 l, like nilearn's MNI152 mask).
_MASK_SIGMA = 1.0
_MASK_THRESHOLD = 0.3


@dataclass(frozen=True)
class GMTemplate:
    """A grey-matter template and the brain mask derived from it, on one grid.

    Attributes:
        gm: grey-matter probability, float32 in [0, 1], shape ``grid_shape``.
        brain_mask: boolean whole-brain mask (the outline drawn on QC pictures).
        affine: 4x4 voxel-to-MNI-mm affine of the grid.

    Example:
        >>> tpl = load_gm_template()
        >>> tpl.gm.shape, tpl.brain_mask.dtype
        ((121, 145, 121), dtype('bool'))
    """

    gm: np.ndarray
    brain_mask: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape of the template."""
        return tuple(self.gm.shape)  # type: ignore[return-value]

    def matches(self, config: PreprocessConfig) -> bool:
        """Whether the template lies on ``config``'s conform grid."""
        return self.shape == tuple(config.grid_shape) and np.allclose(
            self.affine, np.asarray(config.grid_affine, dtype=np.float64), atol=1e-4
        )


def brain_mask_from_gm(gm: np.ndarray, *, sigma: float = _MASK_SIGMA, threshold: float = _MASK_THRESHOLD) -> np.ndarray:
    """Whole-brain mask from a GM probability map: smooth, threshold, fill holes.

    Example:
        >>> mask = brain_mask_from_gm(load_gm_template().gm)
    """
    from scipy import ndimage

    mask = ndimage.gaussian_filter(np.asarray(gm, dtype=np.float32), sigma) > threshold
    return ndimage.binary_fill_holes(mask)


@functools.lru_cache(maxsize=1)
def load_gm_template() -> GMTemplate:
    """Read the packaged template once (cached); arrays are read-only.

    Returns:
        The template on the reference grid (121x145x121, 1.5 mm MNI).

    Raises:
        ConfigError: when the data file is missing from the installation.

    Example:
        >>> tpl = load_gm_template()
        >>> float(tpl.gm.max()) <= 1.0
        True
    """
    import nibabel as nib

    ref = resources.files("anatcl_infer.inputs").joinpath("data", TEMPLATE_FILE)
    try:
        with resources.as_file(ref) as path:
            img = nib.load(str(path))
            gm = np.asarray(img.get_fdata(dtype=np.float32))
            affine = np.asarray(img.affine, dtype=np.float64)
    except FileNotFoundError:
        raise ConfigError(
            f"the packaged template {TEMPLATE_FILE} is missing; reinstall with `pip install --force-reinstall anatcl-infer`"
            " or rebuild it with `python scripts/make_gm_template.py`"
        ) from None
    if gm.shape != REFERENCE_SHAPE or not np.allclose(affine, np.asarray(REFERENCE_AFFINE), atol=1e-4):
        raise ConfigError(f"{TEMPLATE_FILE} is not on the reference grid; rebuild it with `python scripts/make_gm_template.py`")
    mask = brain_mask_from_gm(gm)
    for arr in (gm, mask, affine):
        arr.setflags(write=False)
    logger.debug("loaded GM template %s: %d brain voxels", TEMPLATE_FILE, int(mask.sum()))
    return GMTemplate(gm=gm, brain_mask=mask, affine=affine)


def to_model_space(volume: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Crop (and zero-pad) a grid-shaped volume exactly as the model input is made.

    Padding, when ``config.pad_to`` is set, puts ``(pad - size) // 2`` zeros before
    and the rest after, on each axis.

    Args:
        volume: array of shape ``config.grid_shape`` (bool or numeric).
        config: the preprocessing spec.

    Returns:
        Array of shape ``config.model_input_shape`` and the input's dtype.

    Example:
        >>> cfg = PreprocessConfig()
        >>> to_model_space(load_gm_template().gm, cfg).shape
        (121, 128, 121)
    """
    if tuple(volume.shape) != tuple(config.grid_shape):
        raise ConfigError(f"volume shape {volume.shape} is not the conform grid {config.grid_shape}")
    out = volume[tuple(slice(a, b) for a, b in config.crop)]
    if config.pad_to is not None:
        widths = [((p - s) // 2, p - s - (p - s) // 2) for p, s in zip(config.pad_to, out.shape)]
        out = np.pad(out, widths, mode="constant")
    return out
