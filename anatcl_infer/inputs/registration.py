"""Affine registration of a T1 to the packaged MNI152 template (SimpleITK), and how well it fits.

The moving image is any 3-D T1 (skull-stripped or not) with its voxel-to-world affine; the
fixed image is the packaged 3 mm MNI152 2009a T1 (skull-stripped,
``anatcl_infer/inputs/data/mni152_t1_3mm.nii.gz``). SimpleITK: moments initialisation
(centres of mass), Mattes mutual information (32 bins, 25 % random samples with a fixed
seed), regular-step gradient descent on a 12-parameter affine transform, two resolution
levels. The result is resampled (trilinear) onto a model's grid.

The fit is measured by the normalised cross-correlation (Pearson) of the registered image
with the template, both on the model's grid, over the template's brain (template > 10 % of
its maximum), the registered image first smoothed to the template's 3 mm resolution. Measured
(tests/test_t1_route.py, benchmarks/t1_route.py): 0.995 for the template itself moved by 10
degrees and 8-12 mm and registered back (0.2 mm RMS placement error), 0.97 for a synthetic head
skull-stripped by deepbet, 0.34 and 0.43 for that brain left upside down or front to back, and
0.0 for noise; a real subject's anatomy differs from the template, so expect less than the first
two. Below :data:`MIN_REGISTRATION_NCC` the registration is a
failure of that input (:class:`~anatcl_infer.errors.InputError`), never a misplaced brain.

The transform is also reported as a 4x4 matrix in RAS millimetres, mapping template (MNI)
coordinates to the input's world coordinates, so a placement can be checked without ITK's
LPS conventions.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError, MissingDependencyError

__all__ = [
    "MIN_REGISTRATION_NCC",
    "REGISTRATION_TEMPLATE",
    "Registration",
    "normalised_cross_correlation",
    "register_volume",
    "template_on_grid",
]

logger = logging.getLogger(__name__)

#: File name (in ``anatcl_infer/inputs/data``) of the fixed image of the affine registration.
REGISTRATION_TEMPLATE = "mni152_t1_3mm.nii.gz"
#: Below this similarity to the template a registration is an input failure.
MIN_REGISTRATION_NCC = 0.7
TEMPLATE_DESCRIPTION = f"MNI152 ICBM 2009a symmetric T1 (skull-stripped), 3 mm ({REGISTRATION_TEMPLATE}, packaged)"
METHOD = "SimpleITK affine registration (Mattes MI, regular-step gradient descent, 2 levels)"
_INSTALL = 'pip install "anatcl-infer[prep]"'
_MASK_FRACTION = 0.1  # template voxels above this fraction of its maximum make the similarity mask
_TEMPLATE_MM = 3.0  # resolution of the packaged template: the registered image is smoothed to it for the NCC
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def require_tool(module: str, package: str) -> ModuleType:
    """Import an optional dependency of the ``[prep]`` extra or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{package} is needed for this step but cannot be imported ({exc}); install it with `{_INSTALL}`",
            package=package,
            extra="prep",
        ) from None


def tool_version(dist: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def read_template(sitk: ModuleType) -> Any:
    """The packaged registration template as a SimpleITK image (read while the file is sure to exist,
    also from a zipped install)."""
    from importlib import resources

    with resources.as_file(resources.files("anatcl_infer.inputs").joinpath("data", REGISTRATION_TEMPLATE)) as path:
        return sitk.ReadImage(str(path), sitk.sitkFloat32)


def grid_image(sitk: ModuleType, shape: tuple[int, ...], affine: Any) -> Any:
    """An empty SimpleITK image on a grid given by its shape and RAS affine (ITK works in LPS millimetres)."""
    affine = np.asarray(affine, dtype=np.float64)
    matrix = _RAS_TO_LPS @ affine[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    image = sitk.Image([int(n) for n in shape], sitk.sitkFloat32)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (matrix / spacing).ravel()])
    image.SetOrigin([float(v) for v in _RAS_TO_LPS @ affine[:3, 3]])
    return image


def to_sitk(sitk: ModuleType, data: np.ndarray, affine: np.ndarray, *, path: str | None = None) -> Any:
    """A SimpleITK image from a 3-D array and its RAS affine (no shear: ITK cannot hold one)."""
    affine = np.asarray(affine, dtype=np.float64)
    matrix = _RAS_TO_LPS @ affine[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(matrix)):
        raise InputError("has a degenerate affine (a zero or non-finite voxel size)", path=path, stage="check")
    direction = matrix / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise InputError(
            "has a sheared affine (its axes are not perpendicular), which the registration cannot represent; "
            "resample it onto an orthogonal grid first",
            path=path,
            stage="check",
        )
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(np.asarray(data, dtype=np.float32), (2, 1, 0))))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in direction.ravel()])
    image.SetOrigin([float(v) for v in _RAS_TO_LPS @ affine[:3, 3]])
    return image


def _from_sitk(sitk: ModuleType, image: Any) -> np.ndarray:
    return np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))  # ITK arrays are (z, y, x)


@functools.lru_cache(maxsize=4)
def _template_on_grid(shape: tuple[int, ...], affine: tuple[tuple[float, ...], ...]) -> tuple[np.ndarray, np.ndarray]:
    sitk = require_tool("SimpleITK", "SimpleITK")
    template = read_template(sitk)
    on_grid = _from_sitk(sitk, sitk.Resample(template, grid_image(sitk, shape, affine), sitk.Transform(), sitk.sitkLinear, 0.0))
    data = np.ascontiguousarray(on_grid, dtype=np.float32)
    mask = data > _MASK_FRACTION * float(data.max())
    for arr in (data, mask):
        arr.setflags(write=False)
    return data, mask


def template_on_grid(shape: tuple[int, ...], affine: Any) -> tuple[np.ndarray, np.ndarray]:
    """The registration template resampled (trilinear) onto a grid, and its brain mask there (cached).

    Example:
        >>> from anatcl_infer.config import REFERENCE_AFFINE, REFERENCE_SHAPE
        >>> data, mask = template_on_grid(REFERENCE_SHAPE, REFERENCE_AFFINE)  # doctest: +SKIP
        >>> data.shape, mask.dtype  # doctest: +SKIP
        ((121, 145, 121), dtype('bool'))
    """
    key = tuple(tuple(float(v) for v in row) for row in np.asarray(affine, dtype=np.float64))
    return _template_on_grid(tuple(int(n) for n in shape), key)


def normalised_cross_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson correlation of two volumes (over ``mask``); 0.0 when either is constant there.

    Example:
        >>> x = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
        >>> round(normalised_cross_correlation(x, 2 * x + 1), 6)
        1.0
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if mask is not None:
        x, y = x[mask], y[mask]
    x = np.nan_to_num(x.ravel(), nan=0.0, posinf=0.0, neginf=0.0)
    y = np.nan_to_num(y.ravel(), nan=0.0, posinf=0.0, neginf=0.0)
    x = x - x.mean()
    y = y - y.mean()
    denom = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denom) if denom > 0 else 0.0


def _similarity(registered: np.ndarray, grid_shape: tuple[int, ...], grid_affine: Any) -> float:
    """NCC of a registered image with the template on the grid, the image smoothed to the template's resolution."""
    from scipy import ndimage

    template, mask = template_on_grid(grid_shape, grid_affine)
    spacing = np.linalg.norm(np.asarray(grid_affine, dtype=np.float64)[:3, :3], axis=0)
    fwhm = np.sqrt(np.clip(_TEMPLATE_MM**2 - spacing**2, 0.0, None))  # Gaussian FWHMs add in quadrature
    sigma = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0))) / spacing
    smooth = ndimage.gaussian_filter(registered, sigma) if np.any(sigma > 0) else registered
    return normalised_cross_correlation(smooth, template, mask)


def _matrix_ras(transform: Any) -> np.ndarray:
    """The 4x4 RAS matrix of an affine ITK transform (template point -> input point), by fitting four points."""
    points = np.array([[0.0, 0.0, 0.0], [100.0, 0.0, 0.0], [0.0, 100.0, 0.0], [0.0, 0.0, 100.0]])
    mapped = np.array([transform.TransformPoint([float(v) for v in p]) for p in points])
    lps = np.eye(4)
    lps[:3, 3] = mapped[0]
    lps[:3, :3] = ((mapped[1:] - mapped[0]) / 100.0).T
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ lps @ flip


@dataclass(frozen=True)
class Registration:
    """An input affinely registered to MNI152 and resampled onto a grid.

    Attributes:
        data: the input's intensities on the grid (float32, trilinear), ``grid_shape``.
        affine: the grid's affine.
        ncc: normalised cross-correlation with the template over its brain, on the grid.
        matrix_ras: 4x4 affine, template (MNI, RAS mm) -> input world (RAS mm).
        info: what the sidecar records (method, versions, template, parameters, metric...).
    """

    data: np.ndarray
    affine: np.ndarray
    ncc: float
    matrix_ras: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def register_volume(
    data: np.ndarray,
    affine: np.ndarray,
    *,
    grid_shape: tuple[int, int, int],
    grid_affine: Any,
    seed: int = 1234,
    iterations: int = 200,
    threads: int | None = None,
    min_ncc: float | None = None,
    path: str | None = None,
) -> Registration:
    """Affinely register a 3-D T1 (array + RAS affine) to MNI152 and resample it onto a grid.

    Args:
        data: the T1's voxels (skull-stripped gives the most reliable fit; the template has no skull).
        affine: its 4x4 voxel-to-world affine (RAS mm).
        grid_shape: shape of the output grid (a model's ``PreprocessConfig.grid_shape``).
        grid_affine: its affine (``PreprocessConfig.grid_affine``).
        seed: seed of the metric's random sampling, > 0 (ITK reads 0 as "seed from the clock").
        iterations: optimiser iterations per level.
        threads: ITK threads (default: ITK's choice). With several threads sums are taken in a
            varying order and results differ in the 3rd-4th decimal from run to run;
            ``threads=1`` makes them bit-reproducible.
        min_ncc: fail when the similarity to the template is below this (None: never).
        path: the input's name, for messages.

    Returns:
        A :class:`Registration`.

    Raises:
        MissingDependencyError: SimpleITK is not installed.
        InputError: the registration failed, or its similarity is below ``min_ncc``
            (``stage="register"``; the message gives the similarity and what to check).

    Example:
        >>> reg = register_volume(data, affine, grid_shape=(121, 145, 121), grid_affine=REFERENCE_AFFINE)  # doctest: +SKIP
        >>> round(reg.ncc, 2)  # doctest: +SKIP
        0.93
    """
    if int(seed) <= 0:
        raise ConfigError(f"seed must be a positive integer (ITK takes 0 as 'seed from the clock'), got {seed!r}")
    sitk = require_tool("SimpleITK", "SimpleITK")
    values = np.asarray(data, dtype=np.float32)
    if values.ndim != 3:
        raise InputError(f"needs a 3-D image, got {values.ndim}-D", path=path, stage="check")
    if not np.all(np.isfinite(values)):
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    if float(values.max()) <= float(values.min()):
        raise InputError("is constant: there is nothing to register", path=path, stage="register")
    fixed = read_template(sitk)
    moving = to_sitk(sitk, values, affine, path=path)
    previous_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    if threads is not None:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    try:
        initial = sitk.CenteredTransformInitializer(
            fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
        )
        reg = sitk.ImageRegistrationMethod()
        if threads is not None:
            reg.SetNumberOfThreads(int(threads))
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.25, int(seed))
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=2.0, minStep=1e-4, numberOfIterations=int(iterations), gradientMagnitudeTolerance=1e-8
        )
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([2, 1])
        reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        reg.SetInitialTransform(initial, inPlace=False)
        transform = reg.Execute(fixed, moving)
        resampled = sitk.Resample(moving, grid_image(sitk, grid_shape, grid_affine), transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    except RuntimeError as exc:  # ITK exceptions surface as RuntimeError
        raise InputError(f"affine registration to MNI152 failed: {str(exc).strip()[-300:]}", path=path, stage="register") from None
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous_threads)
    out = np.ascontiguousarray(_from_sitk(sitk, resampled), dtype=np.float32)
    ncc = _similarity(out, grid_shape, grid_affine)
    matrix = _matrix_ras(transform)
    info = {
        "method": METHOD,
        "simpleitk_version": sitk.Version.VersionString() if hasattr(sitk, "Version") else tool_version("SimpleITK"),
        "template": TEMPLATE_DESCRIPTION,
        "transform_parameters": [float(v) for v in transform.GetParameters()] if hasattr(transform, "GetParameters") else [],
        "transform_matrix_ras": matrix.round(6).tolist(),
        "transform_convention": "4x4, template (MNI152, RAS mm) -> input world (RAS mm)",
        "ncc": round(ncc, 6),
        "ncc_definition": (
            f"Pearson correlation with the template on the model grid over the template brain (> {_MASK_FRACTION:g} of "
            f"its max), the registered image smoothed to the template's {_TEMPLATE_MM:g} mm"
        ),
        "final_metric": float(reg.GetMetricValue()),
        "stop_condition": str(reg.GetOptimizerStopConditionDescription()),
        "seed": int(seed),
        "threads": threads,
        "iterations": int(iterations),
    }
    if min_ncc is not None and not ncc >= float(min_ncc):
        raise InputError(
            f"affine registration to MNI152 failed: similarity to the template NCC {ncc:.3f} < {float(min_ncc):g} "
            "(the brain would be misplaced); check the image's orientation and header, that it is a T1, and "
            "whether it needs skull-stripping (--skull-strip)",
            path=path,
            stage="register",
        )
    return Registration(data=out, affine=np.asarray(grid_affine, dtype=np.float64), ncc=ncc, matrix_ras=matrix, info=info)
