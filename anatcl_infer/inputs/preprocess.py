"""The preprocessing pipeline: one input in, exactly what the model receives out.

:func:`prepare` composes the pure steps — read (:mod:`anatcl_infer.io`), check
(:mod:`anatcl_infer.checks`), conform, crop/pad and normalise
(:mod:`anatcl_infer.conform`) — as a :class:`~anatcl_infer.config.PreprocessConfig`
says. It holds no global state, so it is safe to call in DataLoader worker processes.
"""

from __future__ import annotations

import logging
import os
import warnings as _warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checks import KindGuess, check_kind, check_volume, guess_input_kind
from ..config import PreprocessConfig
from .conform import conform_to_grid, crop_and_pad, normalise_intensity
from ..errors import InputError, InputKindWarning, InputWarning, user_stacklevel
from .io import MAX_DATA_BYTES, NiftiVolume, _open_regular, _printable, count_volumes, load_volume, read_volume

__all__ = ["Prepared", "prepare", "describe_item", "split_volumes", "emit_input_warnings"]

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
        kind_warning: the input-kind warning (also in ``warnings``), when the input does
            not look like what the model expects.
        volume: for one volume of a 4D file (a :class:`~anatcl_infer.inputs.io.NiftiVolume`),
            its index in the file; else None.
    """

    array: np.ndarray
    method: str
    warnings: list[str] = field(default_factory=list)
    kind: KindGuess = field(default_factory=lambda: KindGuess("other", 0.5, {}))
    grid: np.ndarray | None = None
    source: str = "<array>"
    kind_warning: str | None = None
    volume: int | None = None


def _is_torchio_subject(item: Any) -> bool:
    return hasattr(item, "get_images") and isinstance(item, dict)


def _is_torchio_image(item: Any) -> bool:
    return hasattr(item, "affine") and hasattr(item, "spatial_shape") and hasattr(item, "data") and not hasattr(item, "get_images")


def _is_metatensor(item: Any) -> bool:
    return hasattr(item, "affine") and hasattr(item, "meta") and hasattr(item, "as_tensor")


def describe_item(item: Any) -> str:
    """A short name for an input: its path, its file name, or ``"<array>"``.

    Undecodable bytes in a file name are shown as ``\\xNN``.

    Example:
        >>> describe_item("sub-01.nii.gz")
        'sub-01.nii.gz'
    """
    if isinstance(item, (str, os.PathLike)):
        return _printable(os.fspath(item))
    if isinstance(item, NiftiVolume):
        return str(item)
    if isinstance(item, np.ndarray):
        return f"<array {item.shape}>"
    if isinstance(item, tuple):
        return "<array, affine>"
    name: Any = None
    try:
        if _is_metatensor(item):
            name = item.meta.get("filename_or_obj")
        elif _is_torchio_image(item):
            name = getattr(item, "path", None)
        elif _is_torchio_subject(item):
            images = list(item.get_images(intensity_only=False))
            name = getattr(images[0], "path", None) if len(images) == 1 else None
        elif hasattr(item, "get_filename"):
            name = item.get_filename()
    except Exception:  # not a known image type, or one built in memory
        name = None
    if name and isinstance(name, (str, os.PathLike)):
        return _printable(os.fspath(name))
    shape = getattr(item, "shape", None)
    return f"<{type(item).__name__} {tuple(shape)}>" if shape is not None else f"<{type(item).__name__}>"


def _to_numpy(x: Any) -> np.ndarray:
    """A numpy array from a numpy array, a torch tensor (any device) or an array-like."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if hasattr(x, "as_tensor"):  # MONAI MetaTensor: a plain tensor first
            x = x.as_tensor()
        x = x.numpy()
    return np.asarray(x)


def _metatensor_affine(item: Any) -> np.ndarray:
    """A MONAI MetaTensor's voxel-to-world affine in RAS+ (MONAI may keep it in LPS)."""
    affine = _to_numpy(item.affine).astype(np.float64)
    space = str(item.meta.get("space", "RAS")).upper() if hasattr(item.meta, "get") else "RAS"
    if "LPS" in space:
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    return affine


def _channel_first(shape: tuple[int, ...]) -> bool:
    """For a 4D (channel, x, y, z) or (x, y, z, volume) shape: whether the channel axis is first."""
    if shape[0] == 1:
        return True
    if shape[-1] == 1:
        return False
    return shape[0] < shape[-1]


def split_volumes(item: Any) -> list[Any]:
    """The single volumes an in-memory input holds: a 4D stack of N volumes is N inputs.

    * a numpy array or tensor: ``(X, Y, Z)`` and ``(1, X, Y, Z)`` are one volume,
      ``(N, X, Y, Z)`` (and ``(N, 1, X, Y, Z)``) are N;
    * an ``(array, affine)`` tuple: ``(X, Y, Z, N)`` is N volumes (the NIfTI convention:
      volumes last), each with the same affine; a leading singleton axis is dropped;
    * a nibabel 4D image: one image per volume;
    * a TorchIO ``ScalarImage`` (``(C, X, Y, Z)``): one input per channel; a ``Subject``
      stands for its single image;
    * a MONAI ``MetaTensor``: ``(X, Y, Z)`` is one volume; 4D is one per channel, the
      channel axis being the first if it is smaller than the last (``EnsureChannelFirst``
      output), else the last (``LoadImage`` output of a 4D file).

    * a path to a 4D image file of N volumes: N :class:`~anatcl_infer.inputs.io.NiftiVolume`
      items (its header only is read here); any other path is returned as it is (one that
      cannot be read fails, with its reason, when it is prepared).

    Example:
        >>> len(split_volumes(np.zeros((3, 121, 145, 121), np.float32)))
        3
    """
    if isinstance(item, (str, os.PathLike)):
        if os.fspath(item).lower().endswith(".npy"):
            return [item]
        try:
            count = count_volumes(item)
        except Exception:  # reported with its reason when the path is prepared
            return [item]
        return [NiftiVolume(os.fspath(item), i, count) for i in range(count)] if count > 1 else [item]
    if item is None or isinstance(item, NiftiVolume):
        return [item]
    if isinstance(item, tuple) and len(item) == 2:
        data = item[0]
        shape = tuple(getattr(data, "shape", ()))
        if len(shape) == 4 and shape[0] == 1:
            return [(data[0], item[1])]
        if len(shape) == 4 and shape[-1] > 1:
            return [(data[..., i], item[1]) for i in range(shape[-1])]
        return [item]
    if _is_torchio_subject(item):
        return [item]
    if _is_torchio_image(item):
        data = item.data
        if data.ndim == 4 and data.shape[0] > 1:
            affine = np.asarray(item.affine, dtype=np.float64)
            return [(data[c], affine) for c in range(data.shape[0])]
        return [item]
    if _is_metatensor(item):
        if item.ndim == 4 and item.shape[0] > 1 and item.shape[-1] > 1:
            affine = _metatensor_affine(item)
            if _channel_first(tuple(item.shape)):
                return [(item.as_tensor()[c], affine) for c in range(item.shape[0])]
            return [(item.as_tensor()[..., c], affine) for c in range(item.shape[-1])]
        return [item]
    if hasattr(item, "get_fdata") and hasattr(item, "slicer"):
        shape = tuple(item.shape)
        if len(shape) == 4 and shape[3] > 1:
            return [item.slicer[..., i] for i in range(shape[3])]
        return [item]
    shape = tuple(getattr(item, "shape", ()))
    if hasattr(item, "__array__") or hasattr(item, "detach"):
        if len(shape) == 4 and shape[0] > 1:
            return [item[i] for i in range(shape[0])]
        if len(shape) == 5 and shape[1] == 1:
            return [item[i, 0] for i in range(shape[0])]
    return [item]


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
    """A ``.npy`` array (OpenBHB stores its maps so), read without pickle, regular files only."""
    os.close(_open_regular(Path(path), path))  # missing, FIFO, device, directory: refused here
    try:
        mapped = np.load(path, allow_pickle=False, mmap_mode="r")
        if mapped.nbytes > MAX_DATA_BYTES:
            raise InputError(f"holds {mapped.nbytes / 2**30:.1f} GiB, more than any brain volume", path=path, stage="read")
        return np.array(mapped)
    except InputError:
        raise
    except Exception as exc:  # OSError, ValueError, EOFError, ...
        raise InputError(f"cannot be read as a .npy array ({type(exc).__name__}: {exc})", path=path, stage="read") from None


@dataclass
class _Resolved:
    data: np.ndarray
    affine: np.ndarray | None
    already_cropped: bool = False
    notes: list[str] = field(default_factory=list)
    qform_only: bool = False


def _bare_array(data: np.ndarray, config: PreprocessConfig, source: str, assume_reference_grid: bool) -> _Resolved:
    """An array without an affine: only on the caller's word that it lies on the reference grid."""
    data = _squeeze_leading(data)
    on_grid = data.shape == tuple(config.grid_shape)
    cropped = data.shape == tuple(config.model_input_shape)
    if assume_reference_grid and on_grid:
        return _Resolved(data, np.asarray(config.grid_affine, dtype=np.float64))
    if assume_reference_grid and cropped:
        return _Resolved(data, None, already_cropped=True)
    if on_grid or cropped:
        raise InputError(
            f"is an array of shape {data.shape} without an affine: its orientation is unknown (an array from "
            "TorchIO, MONAI or nilearn is usually stored right-to-left the other way round, and would be embedded "
            "mirrored); pass (array, affine) or an image (nibabel, TorchIO, MONAI MetaTensor), or, if the array is "
            "stored exactly like the reference grid (x from right to left, as CAT12 writes it), say so with "
            "assume_reference_grid=True",
            path=source,
            stage="check",
        )
    raise InputError(
        f"is an array of shape {data.shape} without an affine; pass (array, affine) or an image (nibabel, TorchIO, "
        f"MONAI MetaTensor) so it can be conformed — only arrays of the grid shape {tuple(config.grid_shape)} or the "
        f"model input shape {tuple(config.model_input_shape)} can be taken as they are (assume_reference_grid=True)",
        path=source,
        stage="check",
    )


def _header_orientation(img: Any) -> str | None:
    """``"sform"``, ``"qform"``, ``"mgh"`` or ``"none"`` from an image's header; None for other images.

    As nibabel's ``get_best_affine`` chooses: a non-zero sform code, else a non-zero qform code;
    an Analyze header has no orientation, nor an MGH header without ``goodRASFlag``.
    """
    header = getattr(img, "header", None)
    try:
        import nibabel as nib

        if isinstance(header, nib.Nifti1Header):
            sform, qform = int(header["sform_code"]), int(header["qform_code"])
            return "sform" if sform != 0 else ("qform" if qform != 0 else "none")
        if isinstance(header, nib.AnalyzeHeader):
            return "none"
        if isinstance(header, nib.freesurfer.MGHHeader):
            return "mgh" if int(header["goodRASFlag"]) else "none"
    except Exception:  # not a header nibabel knows
        return None
    return None


def _no_orientation(data: np.ndarray, what: str, config: PreprocessConfig, source: str) -> _Resolved:
    """An image without orientation: only at the reference grid's shape, taken as lying on that grid."""
    if data.shape != tuple(config.grid_shape):
        raise InputError(
            f"has no orientation in its header ({what}), so where it lies in MNI space is unknown; fix the header "
            "(e.g. re-export from CAT12 as NIfTI with an sform) — only an image of exactly the reference grid shape "
            f"{tuple(config.grid_shape)} is taken as lying on that grid",
            path=source,
            stage="check",
            reason="no-orientation",
        )
    note = (
        f"the header has no orientation ({what}); the image is taken as lying exactly on the model's reference grid "
        "because it has that shape"
    )
    return _Resolved(data, np.asarray(config.grid_affine, dtype=np.float64), notes=[note])


_NO_ORIENTATION_WORDS = {
    "NIfTI": "qform_code and sform_code are both 0",
    "Analyze": "an Analyze 7.5 .hdr/.img pair, a format without orientation",
    "MGH": "an MGH header whose goodRASFlag is 0",
}


def _from_image(img: Any, config: PreprocessConfig, source: str) -> _Resolved:
    """A nibabel image in memory: its data, and its affine unless its header has no orientation."""
    orientation = _header_orientation(img)
    data, affine = load_volume(img)
    if orientation == "none":
        import nibabel as nib

        header = img.header
        kind = "NIfTI" if isinstance(header, nib.Nifti1Header) else ("Analyze" if isinstance(header, nib.AnalyzeHeader) else "MGH")
        return _no_orientation(data, _NO_ORIENTATION_WORDS[kind], config, source)
    return _Resolved(data, affine, qform_only=orientation == "qform")


def _from_file(path: Any, volume: int | None, config: PreprocessConfig, source: str) -> _Resolved:
    """An image file read as nibabel reads it (:func:`~anatcl_infer.inputs.io.read_volume`), orientation rule applied."""
    read = read_volume(path, volume)
    if read.orientation == "none":
        return _no_orientation(read.data, _NO_ORIENTATION_WORDS[read.format.split("-")[0].split()[0]], config, source)
    return _Resolved(read.data, read.affine, qform_only=read.orientation == "qform")


def _resolve(item: Any, config: PreprocessConfig, source: str, assume_reference_grid: bool = False) -> _Resolved:
    """Data, affine and what was assumed, for any supported input."""
    if isinstance(item, (str, os.PathLike)):
        if os.fspath(item).lower().endswith(".npy"):
            return _bare_array(_load_npy(os.fspath(item)), config, source, assume_reference_grid)
        return _from_file(item, None, config, source)
    if isinstance(item, NiftiVolume):
        return _from_file(item.path, item.index, config, source)
    if isinstance(item, tuple):
        if len(item) != 2:
            raise InputError(f"a tuple input must be (array, affine), got {len(item)} items", path=source, stage="read")
        data = _squeeze_leading(_to_numpy(item[0]))
        affine = _to_numpy(item[1]).astype(np.float64)
        if affine.shape == (3, 4):
            affine = np.vstack([affine, [0.0, 0.0, 0.0, 1.0]])
        if affine.shape != (4, 4):
            raise InputError(f"the affine must be 4x4, got shape {affine.shape}", path=source, stage="read")
        if data.ndim == 4 and data.shape[-1] > 1:
            raise InputError(
                f"holds {data.shape[-1]} volumes (shape {data.shape}); prepare() takes one — pass it to encode()/"
                "extract_features(), which embed each volume as one input",
                path=source,
                stage="check",
            )
        return _Resolved(data, affine)
    if _is_torchio_subject(item):
        images = list(item.get_images(intensity_only=True)) or list(item.get_images(intensity_only=False))
        if len(images) != 1:
            raise InputError(
                f"is a TorchIO Subject holding {len(images)} intensity images ({', '.join(map(str, item.keys()))}); "
                "pass the one image to embed (subject['t1'])",
                path=source,
                stage="read",
            )
        return _resolve(images[0], config, source, assume_reference_grid)
    if _is_torchio_image(item):
        data = _to_numpy(item.data)
        if data.ndim == 4 and data.shape[0] > 1:
            raise InputError(
                f"is a TorchIO image with {data.shape[0]} channels; prepare() takes one — pass it to encode()/"
                "extract_features(), which embed each channel as one input",
                path=source,
                stage="check",
            )
        return _Resolved(_squeeze_leading(data), np.asarray(item.affine, dtype=np.float64))
    if _is_metatensor(item):
        parts = split_volumes(item)
        if len(parts) > 1:
            raise InputError(
                f"is a MetaTensor holding {len(parts)} volumes (shape {tuple(item.shape)}); prepare() takes one — pass it "
                "to encode()/extract_features(), which embed each volume as one input",
                path=source,
                stage="check",
            )
        return _Resolved(_squeeze_leading(_to_numpy(item)), _metatensor_affine(item))
    if hasattr(item, "affine") and hasattr(item, "get_fdata"):
        return _from_image(item, config, source)
    if isinstance(item, np.ndarray) or hasattr(item, "__array__") or hasattr(item, "detach"):
        return _bare_array(_to_numpy(item), config, source, assume_reference_grid)
    raise InputError(
        f"unsupported input of type {type(item).__name__}; give a path, a nibabel image, an (array, affine) tuple, "
        "a TorchIO ScalarImage, a MONAI MetaTensor, or a numpy array on the model's grid with assume_reference_grid=True",
        path=source,
        stage="read",
    )


def emit_input_warnings(source: str, warnings_list: Sequence[str], kind_warning: str | None = None, *, stacklevel: int = 2) -> None:
    """One :mod:`warnings` warning for one input: its path and every reason, in one message.

    The category is :class:`~anatcl_infer.errors.InputKindWarning` when the input does not look
    like what the model expects, else :class:`~anatcl_infer.errors.InputWarning`.
    """
    if not warnings_list:
        return
    category = InputKindWarning if kind_warning else InputWarning
    # point at the user's call, however deep in the package (``stacklevel`` is kept for compatibility)
    _warnings.warn(f"{source}: " + "; ".join(warnings_list), category, stacklevel=user_stacklevel())


def prepare(
    item: Any,
    config: PreprocessConfig | None = None,
    *,
    strict: bool = False,
    keep_grid: bool = False,
    model_name: str | None = None,
    assume_reference_grid: bool = False,
    emit_warnings: bool = True,
) -> Prepared:
    """Turn one input into the array the model receives.

    Steps: read; the orientation rule (an image without orientation — NIfTI codes both 0, an
    Analyze pair, an MGH without ``goodRASFlag`` — is refused unless it has exactly
    ``config.grid_shape``, then taken as lying on the grid, with a warning); check
    (:func:`~anatcl_infer.inputs.checks.check_volume`); conform onto
    ``config.grid_shape``/``grid_affine`` (exact whenever the voxel centres coincide);
    guess the input kind and compare it with ``config.input_kind``; crop (and pad);
    normalise intensities per ``config.intensity``.

    Args:
        item: a path to an image file (NIfTI ``.nii``/``.nii.gz``, a ``.hdr``/``.img`` pair,
            ``.mgh``/``.mgz``: read exactly as nibabel reads it, see
            :func:`~anatcl_infer.inputs.io.read_volume`; a 4D file is refused here — give one
            :class:`~anatcl_infer.inputs.io.NiftiVolume` per volume, as :func:`split_volumes`
            makes them); a nibabel image; an ``(array, affine)`` tuple (numpy or torch); a TorchIO ``ScalarImage`` or ``Subject``; a MONAI ``MetaTensor``
            (their affines are used, so RAS-ordered arrays reach the model the right way
            round); or, with ``assume_reference_grid=True`` only, a numpy array or tensor
            without affine (or a ``.npy`` file of one) of shape ``config.grid_shape``
            (taken as stored exactly like the reference grid) or ``config.model_input_shape``
            (taken as already cropped). Leading singleton axes (``(1, 121, 145, 121)`` as
            in OpenBHB) are dropped. TorchIO and MONAI are never imported: their objects
            are recognised by their attributes.
        config: the preprocessing spec (default: the published models').
        strict: raise :class:`~anatcl_infer.errors.InputKindError` when the input does not
            look like what the model was trained on, instead of warning.
        keep_grid: keep the conformed full-grid volume in :attr:`Prepared.grid`.
        model_name: the model's name, used in warnings.
        assume_reference_grid: accept an array without an affine, on the caller's word that
            it is stored exactly like the reference grid (x running right to left).
        emit_warnings: emit the input's warnings (one per input) through :mod:`warnings`
            (:class:`~anatcl_infer.errors.InputKindWarning` or
            :class:`~anatcl_infer.errors.InputWarning`); they are always in
            :attr:`Prepared.warnings`.

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
        resolved = _resolve(item, config, source, assume_reference_grid)
        data, affine, already_cropped = resolved.data, resolved.affine, resolved.already_cropped
        if already_cropped:
            if not np.all(np.isfinite(data)):
                check_volume(data, np.asarray(config.grid_affine), path=source)  # raises with the count
            grid = _uncrop(np.ascontiguousarray(data, dtype=np.float32), config)
            warnings = check_volume(grid, np.asarray(config.grid_affine), path=source)
            method = "cropped"
        else:
            warnings = check_volume(
                data, affine, path=source, grid_shape=config.grid_shape, grid_affine=config.grid_affine,
                require_mni_placement=resolved.qform_only,
            )
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
        warnings = resolved.notes + warnings
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
    if emit_warnings:
        emit_input_warnings(source, warnings, kind_warning)
    return Prepared(
        array=array,
        method=method,
        warnings=warnings,
        kind=kind,
        grid=grid if keep_grid else None,
        source=source,
        kind_warning=kind_warning,
        volume=item.index if isinstance(item, NiftiVolume) else None,
    )

