"""Real anatomy for tests: the MNI152 2009 maps shipped in the nilearn wheel, on the reference grid.

Every helper is cached per process and returns a fresh copy, so tests may modify what they get.
The maps are read straight from the nilearn wheel's data folder and resampled trilinearly with
``scipy.ndimage.map_coordinates``, independently of the package's own conforming code.

Example:
    >>> gm = mni_gm_on_grid()
    >>> gm.shape, gm.dtype
    ((121, 145, 121), dtype('float32'))
"""

from __future__ import annotations

import functools
import os

import numpy as np

from anatcl_infer.config import REFERENCE_AFFINE, REFERENCE_SHAPE

__all__ = [
    "REF_AFFINE",
    "BOX113_AFFINE",
    "BOX113_SHAPE",
    "BOX113_OFFSET",
    "mni_gm_1mm",
    "mni_t1_1mm",
    "mni_gm_on_grid",
    "mni_t1_on_grid",
    "mni_gm_smoothed_on_grid",
    "save_nifti",
]

REF_AFFINE = np.array(REFERENCE_AFFINE, dtype=np.float64)
#: The CAT12.8 / deepmriprep 1.5 mm box (REFERENCE §3) and its voxel offset in the reference grid.
BOX113_SHAPE = (113, 137, 113)
BOX113_AFFINE = np.array([[-1.5, 0, 0, 84], [0, 1.5, 0, -120], [0, 0, 1.5, -72], [0, 0, 0, 1]], dtype=np.float64)
BOX113_OFFSET = (4, 4, 0)


@functools.lru_cache(maxsize=None)
def _load_1mm(kind: str):
    # Read the files inside the nilearn wheel directly (importing nilearn.datasets costs ~2 s);
    # nilearn's load_mni152_*_template returns exactly these uint8 values divided by their max, 255.
    import importlib.util

    import nibabel as nib

    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the MNI152 test anatomy needs nilearn: pip install nilearn")
    root = list(spec.submodule_search_locations)[0]
    name = {"gm": "gm", "t1": "t1"}[kind]
    img = nib.load(os.path.join(root, "datasets", "data", f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"))
    data = np.asarray(img.get_fdata(dtype=np.float32))
    data /= data.max()
    return data, np.asarray(img.affine, dtype=np.float64)


def mni_gm_1mm() -> tuple[np.ndarray, np.ndarray]:
    """MNI152 2009 grey-matter probability map at 1 mm (197x233x189, RAS) and its affine."""
    data, affine = _load_1mm("gm")
    return data.copy(), affine.copy()


def mni_t1_1mm() -> tuple[np.ndarray, np.ndarray]:
    """MNI152 2009 skull-stripped T1 template at 1 mm and its affine."""
    data, affine = _load_1mm("t1")
    return data.copy(), affine.copy()


@functools.lru_cache(maxsize=None)
def _on_grid(kind: str) -> np.ndarray:
    # Trilinear resampling with scipy's map_coordinates, written independently of anatcl_infer.inputs.conform.
    from scipy import ndimage

    data, affine = _load_1mm(kind)
    target_idx = np.indices(REFERENCE_SHAPE, dtype=np.float64).reshape(3, -1)
    world = REF_AFFINE[:3, :3] @ target_idx + REF_AFFINE[:3, 3:4]
    inv = np.linalg.inv(affine)
    source_idx = inv[:3, :3] @ world + inv[:3, 3:4]
    arr = ndimage.map_coordinates(data, source_idx, order=1, mode="constant", cval=0.0).astype(np.float32)
    arr = arr.reshape(REFERENCE_SHAPE)
    arr[arr < 1e-6] = 0.0
    arr.setflags(write=False)
    return arr


def mni_gm_on_grid() -> np.ndarray:
    """MNI152 GM map on the reference grid (121x145x121, float32): a stand-in for a CAT12 mwp1 map."""
    return np.array(_on_grid("gm"))


def mni_t1_on_grid() -> np.ndarray:
    """MNI152 T1 template on the reference grid (121x145x121, float32, values 0..1)."""
    return np.array(_on_grid("t1"))


@functools.lru_cache(maxsize=None)
def _smoothed(fwhm_mm: float) -> np.ndarray:
    from scipy import ndimage

    sigma_vox = fwhm_mm / (2.0 * np.sqrt(2.0 * np.log(2.0))) / 1.5
    arr = ndimage.gaussian_filter(_on_grid("gm"), sigma=sigma_vox, mode="constant").astype(np.float32)
    arr.setflags(write=False)
    return arr


def mni_gm_smoothed_on_grid(fwhm_mm: float = 6.0) -> np.ndarray:
    """The GM map on the grid smoothed with a Gaussian of ``fwhm_mm`` (default 6 mm: like s6mwp1)."""
    return np.array(_smoothed(float(fwhm_mm)))


def save_nifti(
    path: str | os.PathLike[str],
    data: np.ndarray,
    affine: np.ndarray | None = None,
    *,
    dtype: np.dtype | type | str = np.float32,
    version: int = 1,
    slope: float | None = None,
    inter: float = 0.0,
) -> str:
    """Write ``data`` as NIfTI-1 (or -2) at ``path`` (``.nii`` or ``.nii.gz``); returns the path.

    ``dtype`` is the on-disk data type; for integer types nibabel chooses a scale factor
    itself, unless ``slope`` is given: then ``data`` is stored as raw ``dtype`` values and
    the header says ``value = raw * slope + inter``.
    """
    import gzip
    import io

    import nibabel as nib

    affine = REF_AFFINE if affine is None else np.asarray(affine, dtype=np.float64)
    klass = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    raw = np.asarray(data).astype(np.dtype(dtype)) if slope is not None else np.asarray(data)
    img = klass(raw, affine)
    img.set_data_dtype(np.dtype(dtype))
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=4)
    path = os.fspath(path)
    if slope is None:
        nib.save(img, path)
        return path
    buffer = bytearray(img.to_bytes())
    header = klass.header_class.from_fileobj(io.BytesIO(bytes(buffer)))
    header["scl_slope"] = slope
    header["scl_inter"] = inter
    block = header.binaryblock
    buffer[: len(block)] = block
    payload = bytes(buffer)
    with open(path, "wb") as fh:
        fh.write(gzip.compress(payload) if path.endswith(".gz") else payload)
    return path
