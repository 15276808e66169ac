"""Plain-language checks on an input volume and on what kind of image it is.

:func:`check_volume` rejects what can never be a brain image in MNI space (wrong
dimensionality, NaN/inf, an empty image, voxel sizes or a field of view no MNI
image has, no overlap with the MNI brain) and returns warnings for what is merely
suspicious. :func:`guess_input_kind` tells a CAT12 mwp1 grey-matter map from a
smoothed one and from a T1-weighted image with a few documented statistics, and
:func:`check_kind` turns a mismatch into a message (or an error under ``strict``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from nibabel.affines import apply_affine, voxel_sizes

from ..config import REFERENCE_AFFINE
from ..errors import InputError, InputKindError

__all__ = [
    "KindGuess",
    "INPUT_KINDS",
    "MNI_BRAIN_BOX",
    "check_volume",
    "guess_input_kind",
    "check_kind",
]

logger = logging.getLogger(__name__)

#: Kinds :func:`guess_input_kind` can return.
INPUT_KINDS: tuple[str, ...] = ("gm", "smoothed-gm", "t1", "other")

#: World bounding box (MNI mm, min/max per axis) that holds the whole brain
#: (cerebrum, cerebellum, brain stem) in MNI152 space.
MNI_BRAIN_BOX: tuple[tuple[float, float], ...] = ((-72.0, 72.0), (-108.0, 76.0), (-60.0, 84.0))

# Voxel sizes (mm) an image resampled to MNI space can plausibly have.
_MIN_VOXEL_MM, _MAX_VOXEL_MM = 0.5, 4.0
# Fraction of MNI_BRAIN_BOX the image must cover: below _MIN_OVERLAP it cannot be an
# MNI-space brain image (error); below _WARN_OVERLAP part of the brain is cut off.
_MIN_OVERLAP, _WARN_OVERLAP = 0.5, 0.95
# Distance (mm) of the intensity centre of mass from the MNI brain centre that is suspicious.
_CENTRE_MNI = np.array([0.0, -18.0, 14.0])
_MAX_CENTRE_SHIFT_MM = 30.0
# Deep white-matter spheres (MNI mm centre, radius 6 mm) used by guess_input_kind:
# bilateral centrum semiovale and posterior/anterior periventricular white matter.
_DEEP_WM_MNI = ((-26.0, -12.0, 30.0), (26.0, -12.0, 30.0), (-28.0, -40.0, 26.0), (28.0, -40.0, 26.0), (-22.0, 20.0, 24.0), (22.0, 20.0, 24.0))
_DEEP_WM_RADIUS_MM = 6.0


def _world_box(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """(3, 2) min/max world coordinates of the voxel centres' bounding box."""
    corners = np.array(list(itertools.product(*[(0, n - 1) for n in shape[:3]])))
    world = apply_affine(affine, corners)
    return np.stack([world.min(axis=0), world.max(axis=0)], axis=1)


def _box_fraction(box: np.ndarray, reference: Sequence[Sequence[float]]) -> float:
    """Fraction of the ``reference`` box's volume covered by ``box``."""
    ref = np.asarray(reference, dtype=np.float64)
    inter = np.clip(np.minimum(box[:, 1], ref[:, 1]) - np.maximum(box[:, 0], ref[:, 0]), 0.0, None)
    return float(np.prod(inter) / np.prod(ref[:, 1] - ref[:, 0]))


def _centre_of_mass_world(data: np.ndarray, affine: np.ndarray) -> np.ndarray | None:
    """Intensity-weighted centre (world mm) of the positive part of ``data``.

    Computed on every second voxel (8x less work; the centre moves by well under a
    voxel, and it only feeds a 30 mm plausibility warning), from the three marginal
    profiles: the same centre as ``scipy.ndimage.center_of_mass`` (to 1e-13 voxel), which
    multiplies the whole volume once per axis and measured 2-3x slower.
    """
    step = 2 if min(data.shape) >= 16 else 1
    weights = np.clip(data[::step, ::step, ::step], 0, None)
    total = float(weights.sum(dtype=np.float64))
    if total <= 0:
        return None
    idx = np.empty(3)
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        profile = weights.sum(axis=other, dtype=np.float64)
        idx[axis] = step * float(profile @ np.arange(profile.size)) / total
    return affine[:3, :3] @ idx + affine[:3, 3]


def check_volume(
    data: np.ndarray,
    affine: np.ndarray,
    *,
    path: str | None = None,
    grid_shape: Sequence[int] | None = None,
    grid_affine: np.ndarray | Sequence[Sequence[float]] | None = None,
    require_mni_placement: bool = False,
) -> list[str]:
    """Reject volumes that cannot be a brain in MNI space; return warnings for odd ones.

    Args:
        data: the image array (expected 3D).
        affine: its 4x4 voxel-to-world affine (MNI mm).
        path: the input's name, used in messages.
        grid_shape: the target grid's shape (default: none, overlap checked against the
            MNI brain box only).
        grid_affine: the target grid's affine (with ``grid_shape``).
        require_mni_placement: refuse (instead of warning) an image whose intensity centre
            lies more than 30 mm from the MNI brain centre; used for images whose only
            orientation is a qform (scanner-style), where such a shift means the header
            does not place the image in MNI space.

    Returns:
        Warnings (plain sentences); empty when nothing is suspicious (denormal values, a partial
        field of view, oblique axes, an off-centre image, negative values are warned about).

    Raises:
        InputError: (``stage="check"``) not 3D; NaN or infinite values; an empty or constant
            image; a singular affine; voxel sizes outside 0.5-4 mm; a field of view or
            position no MNI-space brain image has; no overlap with the target grid.

    Example:
        >>> from anatcl_infer.config import REFERENCE_AFFINE
        >>> vol = np.zeros((121, 145, 121), np.float32); vol[30:90, 30:110, 20:100] = 0.5
        >>> check_volume(vol, np.array(REFERENCE_AFFINE))
        []
    """
    data = np.asarray(data)
    if data.ndim != 3:
        raise InputError(
            f"has {data.ndim} dimensions (shape {data.shape}); the model takes one 3D volume", path=path, stage="check"
        )
    if min(data.shape) < 2:
        raise InputError(f"has shape {data.shape}, a single slice, not a 3D volume", path=path, stage="check")
    # min and max propagate NaN and reach +-inf, so two reductions tell whether every voxel is
    # finite; the voxels are only counted (three more passes) when one is not.
    lo, hi = float(data.min()), float(data.max())
    n_bad = 0 if np.isfinite(lo) and np.isfinite(hi) else int(data.size - np.count_nonzero(np.isfinite(data)))
    if n_bad:
        n_nan = int(np.count_nonzero(np.isnan(data)))
        raise InputError(
            f"contains {n_bad} non-finite voxels ({n_nan} NaN, {n_bad - n_nan} infinite) out of {data.size}; "
            "the preprocessing that wrote it failed — rerun it, or replace them (e.g. np.nan_to_num) if "
            "they are only outside the brain",
            path=path,
            stage="check",
        )
    if lo == hi:
        raise InputError(
            f"is empty: every voxel equals {lo:g}; check that the right file was written", path=path, stage="check"
        )
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError("has an invalid or singular voxel-to-world affine; fix its header (sform/qform)", path=path, stage="check")

    warnings: list[str] = []
    denormal = _denormal_warning(data, lo, hi)
    if denormal:
        warnings.append(denormal)
    sizes = voxel_sizes(affine)
    if np.any(sizes < _MIN_VOXEL_MM) or np.any(sizes > _MAX_VOXEL_MM):
        raise InputError(
            f"has voxel sizes {tuple(round(float(s), 3) for s in sizes)} mm, outside the {_MIN_VOXEL_MM}-{_MAX_VOXEL_MM} mm "
            "of any MNI-space image; it is probably not in MNI space or its header is wrong — normalise it "
            "to MNI space first (CAT12/deepmriprep)",
            path=path,
            stage="check",
        )
    box = _world_box(data.shape, affine)
    extent = box[:, 1] - box[:, 0]
    if np.any(extent < 60.0):
        raise InputError(
            f"covers only {tuple(round(float(e)) for e in extent)} mm, too small a field of view for a whole brain "
            "in MNI space; give the whole-brain image",
            path=path,
            stage="check",
        )
    covered = _box_fraction(box, MNI_BRAIN_BOX)
    if covered < _MIN_OVERLAP:
        raise InputError(
            f"covers only {covered:.0%} of where the brain lies in MNI space (its field of view spans "
            f"{_fmt_box(box)} mm); it is probably in scanner space, not MNI space — normalise it "
            "(CAT12/deepmriprep) or fix its affine",
            path=path,
            stage="check",
        )
    if grid_shape is not None and grid_affine is not None:
        grid_box = _world_box(grid_shape, np.asarray(grid_affine, dtype=np.float64))
        if _box_fraction(box, grid_box) <= 0.0:
            raise InputError(
                f"does not overlap the model's grid at all (image spans {_fmt_box(box)} mm, grid spans "
                f"{_fmt_box(grid_box)} mm); check that it is in MNI space",
                path=path,
                stage="check",
            )
    if covered < _WARN_OVERLAP:
        warnings.append(
            f"the image covers {covered:.0%} of the MNI brain box; parts of the brain outside its field of view "
            "will be zero"
        )
    lin = affine[:3, :3] / sizes
    if not np.allclose(np.abs(lin), np.round(np.abs(lin)), atol=1e-3):
        warnings.append("the image axes are oblique to the MNI axes; it will be resampled (trilinear)")
    centre = _centre_of_mass_world(data, affine)
    if centre is not None:
        shift = float(np.linalg.norm(centre - _CENTRE_MNI))
        if shift > _MAX_CENTRE_SHIFT_MM and require_mni_placement:
            raise InputError(
                f"has only a qform orientation, and it places the image's centre {shift:.0f} mm from the centre of "
                f"the MNI brain (at {tuple(round(float(c)) for c in centre)} mm): the header does not put it in MNI "
                "space — normalise it to MNI space (CAT12/deepmriprep) or fix its header",
                path=path,
                stage="check",
            )
        if shift > _MAX_CENTRE_SHIFT_MM:
            warnings.append(
                f"the image's intensity centre lies {shift:.0f} mm from the centre of the MNI brain "
                f"(at {tuple(round(float(c)) for c in centre)} mm); check that it is really in MNI space"
            )
    if lo < -0.01 * abs(hi):  # interpolation leaves tiny negatives in real mwp1 maps; those are fine
        warnings.append(f"the image has negative values (minimum {lo:g}); CAT12 grey-matter maps are non-negative")
    return warnings


# Share of the non-zero voxels (sampled) that may be denormal before a warning.
_MAX_DENORMAL_SHARE = 0.01


def _denormal_warning(data: np.ndarray, lo: float, hi: float) -> str | None:
    """A warning when the map's values are denormal (below float32's smallest normal number), else None.

    Such values (a map scaled by 1e-40...) lose precision, run slowly on CPUs and reach the model as
    nearly zero; real maps have at most a few. Judged on every second voxel along each axis.
    """
    tiny = float(np.finfo(np.float32).tiny)
    peak = max(abs(lo), abs(hi))
    if peak < tiny:
        return (f"its values are denormal (largest magnitude {peak:.3g}, below float32's smallest normal number "
                f"{tiny:.3g}): the model sees an almost empty image; the map is probably scaled wrongly — check how it was written")
    sample = np.asarray(data[::2, ::2, ::2], dtype=np.float32)
    magnitude = np.abs(sample)
    nonzero = int(np.count_nonzero(magnitude))
    small = int(np.count_nonzero(magnitude < tiny)) - (magnitude.size - nonzero)
    if nonzero and small > _MAX_DENORMAL_SHARE * nonzero:
        return (f"{small / nonzero:.0%} of its non-zero values are denormal (below float32's smallest normal number "
                f"{tiny:.3g}); they lose precision and reach the model as nearly zero — check how the map was written")
    return None


def _fmt_box(box: np.ndarray) -> str:
    """'x -90..90, y -126..90, z -72..108'."""
    return ", ".join(f"{ax} {box[i, 0]:.0f}..{box[i, 1]:.0f}" for i, ax in enumerate("xyz"))


@dataclass(frozen=True)
class KindGuess:
    """What an input looks like, from :func:`guess_input_kind`.

    Attributes:
        kind: ``"gm"`` (unsmoothed grey-matter density, CAT12 mwp1), ``"smoothed-gm"``
            (e.g. s6mwp1), ``"t1"`` (T1-weighted intensities) or ``"other"``.
        confidence: 0.5 (a coin toss) to 1.0 (clear-cut).
        evidence: the statistics the guess rests on (see :func:`guess_input_kind`).
        reason: for ``"other"``, what rules out a grey-matter map or a T1, in plain words.

    Example:
        >>> KindGuess("gm", 0.9, {}).kind
        'gm'
    """

    kind: str
    confidence: float
    evidence: dict[str, float] = field(default_factory=dict)
    reason: str = ""


# Decision thresholds, calibrated on MNI152 2009 maps on the reference grid
# (GM map ~ mwp1, its 6 mm FWHM smoothing ~ s6mwp1, the T1 template).
_WM_RATIO_T1 = 0.5  # deep-WM median / brain p99: T1 ~0.9, GM maps < 0.3
_ROUGHNESS_GM = 0.08  # high-frequency energy ratio: MNI GM map 0.17 (single-subject mwp1 higher), 4-8 mm FWHM smoothing < 0.03
_MAX_GM_VALUE = 2.0  # grey-matter density (modulated) stays below this
_MAX_VALUE_RATIO = 20.0  # a brightest voxel this many times the 99th percentile is no density map
_NOISE_ROUGHNESS = 0.85  # white noise scores ~0.9-1; the MNI GM map 0.17 at 1.5 mm, 0.58 at 3 mm
_NOISE_ROUGHNESS_NO_BACKGROUND, _NOISE_BACKGROUND = 0.5, 0.05  # rough and without any background
_ROUGHNESS_STEP = 3  # roughness is averaged over every third slice (see guess_input_kind)


def _deep_wm_mask(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """Boolean mask of the deep white-matter spheres on a grid."""
    inv = np.linalg.inv(affine)
    sizes = voxel_sizes(affine)
    mask = np.zeros(tuple(shape), dtype=bool)
    radius_vox = np.ceil(_DEEP_WM_RADIUS_MM / sizes).astype(int)
    for centre in _DEEP_WM_MNI:
        c = apply_affine(inv, centre)
        lo = np.maximum(np.floor(c).astype(int) - radius_vox, 0)
        hi = np.minimum(np.ceil(c).astype(int) + radius_vox + 1, np.asarray(shape))
        if np.any(lo >= hi):
            continue
        grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
        vox = np.stack([g.ravel() for g in grids])
        world = affine[:3, :3] @ vox + affine[:3, 3:4]
        inside = np.linalg.norm(world - np.asarray(centre)[:, None], axis=0) <= _DEEP_WM_RADIUS_MM
        mask[tuple(v[inside] for v in vox)] = True
    return mask


def guess_input_kind(
    arr_on_grid: np.ndarray,
    affine: np.ndarray | Sequence[Sequence[float]] = REFERENCE_AFFINE,
) -> KindGuess:
    """Guess whether a conformed volume is an mwp1 map, a smoothed one, a T1 or other.

    Statistics (all in ``evidence``), computed on the volume on its MNI grid:

    * ``p99``, ``max``, ``min``: value range. ``p99`` is the 99th percentile of the
      positive voxels (the brain's bright end).
    * ``background_fraction``: share of voxels at or below 1% of ``p99``.
    * ``wm_ratio``: median value inside six 6 mm spheres of deep white matter
      (centrum semiovale, periventricular) divided by ``p99``. Grey-matter maps are
      near 0 there; T1-weighted images are at their brightest (~0.8-1).
    * ``roughness``: high-frequency energy inside the brain,
      ``mean((x - G1(x))**2) / mean((x - mean)**2)`` over voxels above 10% of ``p99``,
      where ``G1`` is a Gaussian blur of sigma one voxel (kernel cut at two sigma), averaged over
      every third slice along the first axis. Unsmoothed mwp1 maps have sharp
      cortical ribbons (the MNI152 GM map, an average of many brains, scores ~0.17;
      single-subject maps more); a 4-8 mm FWHM smoothing leaves < 0.03.

    Rules: fewer than 100 positive voxels (one voxel, all negative) -> ``"other"``;
    noticeably negative values (``min < -5% p99``) -> ``"other"`` (already normalised
    data); ``roughness > 0.85``, or ``> 0.5`` with under 5% background -> ``"other"``
    (noise, no spatial structure) — checked after ``max`` above both 2 and 20 times ``p99``
    -> ``"other"`` (values far outside any mwp1 range); ``wm_ratio > 0.5`` -> ``"t1"``;
    otherwise a grey-matter pattern, ``"other"`` if ``p99`` exceeds 2 (not a density), ``"gm"`` if ``roughness`` >= 0.08,
    else ``"smoothed-gm"``. ``"other"`` guesses carry a plain-language ``reason``. ``confidence`` grows with the distance of the deciding
    statistic from its threshold.

    Args:
        arr_on_grid: the 3D volume conformed onto an MNI grid.
        affine: that grid's affine (default: the reference grid).

    Returns:
        A :class:`KindGuess`.

    Example:
        >>> from anatcl_infer.inputs.io import load_volume
        >>> guess = guess_input_kind(load_volume("examples/data/mwp1sub-mni01_T1w.nii.gz")[0])
        >>> guess.kind
        'gm'
    """
    from scipy import ndimage

    arr = np.asarray(arr_on_grid, dtype=np.float32)
    affine = np.asarray(affine, dtype=np.float64)
    positive = arr[arr > 0]
    if positive.size < 100:
        return KindGuess(
            "other", 0.9, {"positive_voxels": float(positive.size)},
            f"only {positive.size} voxels are above zero (a grey-matter map has tens of thousands)",
        )
    p99 = float(np.percentile(positive, 99))
    vmin, vmax = float(arr.min()), float(arr.max())
    background = float(np.count_nonzero(arr <= 0.01 * p99) / arr.size)
    wm = arr[_deep_wm_mask(arr.shape, affine)]
    wm_ratio = float(np.median(wm) / p99) if wm.size else float("nan")
    brain = arr > 0.1 * p99
    # blur only the brain's bounding box (plus the kernel's reach): same values, less work
    nz = np.nonzero(brain.any(axis=(1, 2)))[0], np.nonzero(brain.any(axis=(0, 2)))[0], np.nonzero(brain.any(axis=(0, 1)))[0]
    box = tuple(slice(max(int(ix[0]) - 2, 0), int(ix[-1]) + 3) for ix in nz)
    sub, sub_brain = arr[box], brain[box]
    # The blur is exact but evaluated on every third slice only (the statistic is a mean over
    # ~1e5 brain voxels either way): the pass along axis 0 is computed at those slices from
    # their +-2 neighbours, then the in-plane passes run on a third of the data. 3x less work
    # than blurring the whole box (benchmarks/NOTES.md); values within ~1 % of the full mean.
    rows = np.arange(0, sub.shape[0], _ROUGHNESS_STEP)
    taps = np.exp(-0.5 * np.arange(-2, 3, dtype=np.float64) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    padded = np.pad(sub, ((2, 2), (0, 0), (0, 0)))
    blurred = taps[0] * padded[rows]
    for d in range(1, 5):
        blurred += taps[d] * padded[rows + d]
    for axis in (1, 2):
        blurred = ndimage.gaussian_filter1d(blurred, 1.0, axis=axis, mode="constant", truncate=2.0)
    sample, sample_brain = sub[rows], sub_brain[rows]
    inside = sample[sample_brain]
    variance = float(np.var(inside, dtype=np.float64))
    high = float(np.mean((inside - blurred[sample_brain]).astype(np.float64) ** 2))
    roughness = high / variance if variance > 0 else 0.0
    evidence = {
        "p99": p99,
        "max": vmax,
        "min": vmin,
        "background_fraction": background,
        "wm_ratio": wm_ratio,
        "roughness": roughness,
    }

    def conf(distance: float, scale: float) -> float:
        return float(np.clip(0.5 + 0.5 * np.tanh(abs(distance) / scale), 0.5, 0.99))

    if vmin < -0.05 * p99:
        return KindGuess("other", conf(-vmin / p99, 0.1), evidence, f"it has clearly negative values (minimum {vmin:.3g})")
    if vmax > _MAX_VALUE_RATIO * max(p99, 1e-6) and vmax > _MAX_GM_VALUE:
        return KindGuess("other", 0.9, evidence,
                         f"some values (up to {vmax:.3g}) are far outside the range of a grey-matter density (0 to about 1)")
    if roughness > _NOISE_ROUGHNESS or (roughness > _NOISE_ROUGHNESS_NO_BACKGROUND and background < _NOISE_BACKGROUND):
        return KindGuess("other", conf(roughness - _NOISE_ROUGHNESS_NO_BACKGROUND, 0.2), evidence,
                         "its values have no spatial structure (it looks like noise)")
    if np.isnan(wm_ratio):
        return KindGuess("other", 0.5, evidence, "it has no signal where the brain's white matter lies")
    if wm_ratio > _WM_RATIO_T1:
        return KindGuess("t1", conf(wm_ratio - _WM_RATIO_T1, 0.15), evidence)
    if p99 > _MAX_GM_VALUE:
        return KindGuess("other", conf(np.log(p99 / _MAX_GM_VALUE), 0.5), evidence,
                         f"its values (99th percentile {p99:.3g}) are far above a grey-matter density (0 to about 1)")
    confidence = min(conf(wm_ratio - _WM_RATIO_T1, 0.15), conf(np.log(max(roughness, 1e-6) / _ROUGHNESS_GM), 0.5))
    return KindGuess("gm" if roughness >= _ROUGHNESS_GM else "smoothed-gm", confidence, evidence)


_KIND_WORDS = {
    "gm": "an unsmoothed grey-matter map (CAT12 mwp1)",
    "smoothed-gm": "a smoothed grey-matter map (e.g. CAT12 s6mwp1)",
    "t1": "a T1-weighted image",
    "other": "neither a grey-matter map nor a T1-weighted image",
}
_EXPECTED_WORDS = {
    "gm": "a CAT12 mwp1 grey-matter map (modulated, normalised, unsmoothed)",
    "t1": "a skull-stripped T1-weighted image in MNI space",
}
_ADVICE = {
    ("gm", "t1"): "run CAT12 or deepmriprep first and give its mwp1 output",
    ("gm", "smoothed-gm"): "give the unsmoothed mwp1 file that CAT12 wrote before smoothing",
    ("gm", "other"): "give the mwp1 map written by CAT12 or deepmriprep, with raw (not normalised) values",
    ("t1", "gm"): "give the skull-stripped T1 image in MNI space, or use a grey-matter model",
    ("t1", "smoothed-gm"): "give the skull-stripped T1 image in MNI space, or use a grey-matter model",
    ("t1", "other"): "give a skull-stripped T1 image registered to MNI space",
}


def check_kind(
    guess: KindGuess,
    expected_kind: str,
    *,
    strict: bool = False,
    path: str | None = None,
    model_name: str | None = None,
) -> str | None:
    """Compare a :class:`KindGuess` with the kind the model expects.

    Args:
        guess: the result of :func:`guess_input_kind`.
        expected_kind: the model's ``PreprocessConfig.input_kind`` (``"gm"`` or ``"t1"``).
        strict: raise instead of returning a warning.
        path: the input's name, used in messages.
        model_name: the model's name, used in messages (e.g. ``"anatcl-global"``).

    Returns:
        ``None`` when the input looks right, otherwise a warning naming the problem and
        what to do.

    Raises:
        InputKindError: under ``strict``, when the input does not look right.
        InputError: ``expected_kind`` is unknown.

    Example:
        >>> check_kind(KindGuess("t1", 0.95, {}), "gm", model_name="anatcl-global")
        'this looks like a T1-weighted image (confidence 0.95), but anatcl-global expects a CAT12 mwp1 grey-matter map (modulated, normalised, unsmoothed); run CAT12 or deepmriprep first and give its mwp1 output'
    """
    if expected_kind not in _EXPECTED_WORDS:
        raise InputError(f"unknown expected input kind {expected_kind!r}; use one of {sorted(_EXPECTED_WORDS)}", path=path, stage="check")
    if guess.kind == expected_kind:
        return None
    who = model_name or ("this grey-matter model" if expected_kind == "gm" else "this T1 model")
    what = _KIND_WORDS.get(guess.kind, guess.kind) + (f" — {guess.reason}" if guess.reason else "")
    message = (
        f"this looks like {what} (confidence {guess.confidence:.2f}), "
        f"but {who} expects {_EXPECTED_WORDS[expected_kind]}; {_ADVICE[(expected_kind, guess.kind)]}"
    )
    if strict:
        raise InputKindError(message + " (an error because of strict=True, --strict on the command line; without it, only a warning)", path=path, stage="check")
    logger.debug("%s: %s", path or "<input>", message)
    return message
