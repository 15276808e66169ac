"""The preprocessing pipeline: one input in, exactly what the model receives out.

:func:`prepare` composes the pure steps — read (:mod:`anatcl_infer.io`), check
(:mod:`anatcl_infer.checks`), conform, crop/pad and normalise
(:mod:`anatcl_infer.conform`) — as a :class:`~anatcl_infer.config.PreprocessConfig`
says. It holds no global state, so it is safe to call in DataLoader worker processes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .checks import KindGuess, check_kind, check_volume, guess_input_kind
from ..config import PreprocessConfig
from .conform import conform_to_grid, crop_and_pad, normalise_intensity
from ..errors import InputError
from .io import load_volume

__all__ = ["Prepared", "prepare", "describe_item"]

logger = logging.getLogger(__name__)

# Share of the positive signal that may fall outside the crop before a warning (on the reference
# grid the whole brain lies inside y 13..132, so a correctly placed map loses nothing).
_MAX_CROP_LOSS = 0.005


@dataclass
class Prepared:
    """One preprocessed input.

    Attributes:
        array: ``(1, *config.model_input_shape)`` float32, C-contiguous: exactly what the
            model receives (one channel).
        method: how the image reached the grid: ``"identity"``, ``"reindex"``,
            ``"resample"``, or ``"cropped"`` for arrays given already cropped.
        warnings: soft problems found (plain sentences).
        kind: what the input looks like (see :func:`anatcl_infer.inputs.checks.guess_input_kind`).
        grid: the conformed full-grid volume before cropping (only with ``keep_grid=True``).
        source: the path, or a description such as ``"<array>"``.
    """

    array: np.ndarray
    method: str
    warnings: list[str] = field(default_factory=list)
    kind: KindGuess = field(default_factory=lambda: KindGuess("other", 0.5, {}))
    grid: np.ndarray | None = None
    source: str = "<array>"


def describe_item(item: Any) -> str:
    """A short name for an input: its path, its file name, or ``"<array>"``.

    Example:
        >>> describe_item("sub-01.nii.gz")
        'sub-01.nii.gz'
    """
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    if isinstance(item, np.ndarray):
        return f"<array {item.shape}>"
    if isinstance(item, tuple):
        return "<array, affine>"
    try:
        name = item.get_filename()
    except Exception:  # not a nibabel image, or one built in memory
        name = None
    return os.fspath(name) if name else f"<{type(item).__name__}>"


def _squeeze_leading(arr: np.ndarray) -> np.ndarray:
    """Drop leading and trailing singleton axes beyond three (``(1, X, Y, Z)`` -> ``(X, Y, Z)``)."""
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return arr


def _fraction_outside_crop(grid: np.ndarray, crop: tuple[tuple[int, int], ...]) -> float:
    """Share of the positive signal of ``grid`` outside the ``crop`` box."""
    positive = np.clip(grid, 0, None)
    total = float(positive.sum(dtype=np.float64))
    if total <= 0:
        return 0.0
    inside = float(positive[tuple(slice(a, b) for a, b in crop)].sum(dtype=np.float64))
    return max(0.0, 1.0 - inside / total)


def _uncrop(arr: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Put an already cropped (and padded) array back on the full grid, zeros elsewhere."""
    cropped_shape = tuple(b - a for a, b in config.crop)
    if config.pad_to is not None:
        inner = tuple(slice((p - s) // 2, (p - s) // 2 + s) for p, s in zip(config.pad_to, cropped_shape))
        arr = arr[inner]
    grid = np.zeros(config.grid_shape, dtype=np.float32)
    grid[tuple(slice(a, b) for a, b in config.crop)] = arr
    return grid


def _load_npy(path: str) -> np.ndarray:
    """A ``.npy`` array (OpenBHB stores its maps so), read without pickle."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError("file not found; check the path", path=path, stage="read") from None
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"cannot be read as a .npy array ({exc})", path=path, stage="read") from None


def _resolve(item: Any, config: PreprocessConfig, source: str) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """``(data, affine, already_cropped)`` for any supported input."""
    if isinstance(item, (str, os.PathLike)):
        if os.fspath(item).lower().endswith(".npy"):
            return _resolve(_load_npy(source), config, source)
        data, affine = load_volume(item)
        return data, affine, False
    if isinstance(item, tuple):
        if len(item) != 2:
            raise InputError(f"a tuple input must be (array, affine), got {len(item)} items", path=source, stage="read")
        data = _squeeze_leading(np.asarray(item[0]))
        affine = np.asarray(item[1], dtype=np.float64)
        if affine.shape == (3, 4):
            affine = np.vstack([affine, [0.0, 0.0, 0.0, 1.0]])
        if affine.shape != (4, 4):
            raise InputError(f"the affine must be 4x4, got shape {affine.shape}", path=source, stage="read")
        return data, affine, False
    if isinstance(item, np.ndarray) or (hasattr(item, "__array__") and not hasattr(item, "affine")):
        data = _squeeze_leading(np.asarray(item))
        if data.shape == tuple(config.grid_shape):
            return data, np.asarray(config.grid_affine, dtype=np.float64), False
        if data.shape == tuple(config.model_input_shape):
            return data, None, True
        raise InputError(
            f"an array without an affine must have the grid shape {tuple(config.grid_shape)} (assumed on the "
            f"grid) or the model input shape {tuple(config.model_input_shape)} (assumed already cropped), got "
            f"{data.shape}; pass (array, affine) or a nibabel image so it can be conformed",
            path=source,
            stage="check",
        )
    if hasattr(item, "affine") and hasattr(item, "get_fdata"):
        data, affine = load_volume(item)
        return data, affine, False
    raise InputError(
        f"unsupported input of type {type(item).__name__}; give a path, a nibabel image, an (array, affine) "
        "tuple or a numpy array on the model's grid",
        path=source,
        stage="read",
    )


def prepare(
    item: Any,
    config: PreprocessConfig | None = None,
    *,
    strict: bool = False,
    keep_grid: bool = False,
    model_name: str | None = None,
) -> Prepared:
    """Turn one input into the array the model receives.

    Steps: read; check (:func:`~anatcl_infer.inputs.checks.check_volume`); conform onto
    ``config.grid_shape``/``grid_affine`` (exact whenever the voxel centres coincide);
    guess the input kind and compare it with ``config.input_kind``; crop (and pad);
    normalise intensities per ``config.intensity``.

    Args:
        item: a path to a NIfTI file; a nibabel image; an ``(array, affine)`` tuple; or a
            numpy array without affine (or a ``.npy`` file of one), which must have
            ``config.grid_shape`` (taken as on the grid) or ``config.model_input_shape``
            (taken as already cropped). Leading singleton axes (``(1, 121, 145, 121)`` as
            in OpenBHB) are dropped.
        config: the preprocessing spec (default: the published models').
        strict: raise :class:`~anatcl_infer.errors.InputKindError` when the input does not
            look like what the model was trained on, instead of warning.
        keep_grid: keep the conformed full-grid volume in :attr:`Prepared.grid`.
        model_name: the model's name, used in warnings.

    Returns:
        A :class:`Prepared`.

    Raises:
        InputError: the input cannot be read, checked or conformed; ``path`` and ``stage``
            say which and where.

    Example:
        >>> p = prepare("examples/data/mwp1sub-mni01_T1w.nii.gz")
        >>> p.array.shape, p.method
        ((1, 121, 128, 121), 'identity')
    """
    config = config if config is not None else PreprocessConfig()
    source = describe_item(item)
    try:
        data, affine, already_cropped = _resolve(item, config, source)
        if already_cropped:
            if not np.all(np.isfinite(data)):
                check_volume(data, np.asarray(config.grid_affine), path=source)  # raises with the count
            grid = _uncrop(np.ascontiguousarray(data, dtype=np.float32), config)
            warnings = check_volume(grid, np.asarray(config.grid_affine), path=source)
            method = "cropped"
        else:
            warnings = check_volume(data, affine, path=source, grid_shape=config.grid_shape, grid_affine=config.grid_affine)
            grid, method = conform_to_grid(data, affine, config.grid_shape, config.grid_affine)
            if not np.any(grid):
                raise InputError(
                    "lies entirely outside the model's grid after conforming; check that it is in MNI space",
                    path=source,
                    stage="conform",
                )
            lost = _fraction_outside_crop(grid, config.crop)
            if lost > _MAX_CROP_LOSS:
                warnings.append(
                    f"{lost:.1%} of the image's signal lies outside the model's field of view {config.crop} and is cut "
                    "off; the brain is probably not centred as in MNI space — check the image's position"
                )
        kind = guess_input_kind(grid, config.grid_affine)
        kind_warning = check_kind(kind, config.input_kind, strict=strict, path=source, model_name=model_name)
        if kind_warning:
            warnings.append(kind_warning)
        if already_cropped:
            cropped = np.array(data, dtype=np.float32, order="C", copy=True)
        else:
            cropped = crop_and_pad(grid, config.crop, config.pad_to)
        array = np.ascontiguousarray(normalise_intensity(cropped, config.intensity), dtype=np.float32)[None]
    except InputError as exc:
        if exc.path is None:
            exc.path = source
        raise
    for text in warnings:
        logger.debug("%s: %s", source, text)
    return Prepared(
        array=array,
        method=method,
        warnings=warnings,
        kind=kind,
        grid=grid if keep_grid else None,
        source=source,
    )

