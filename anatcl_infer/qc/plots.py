"""QC pictures: three orthogonal slices of what the model receives, and contact sheets.

Matplotlib is the optional extra ``[qc]``; it is imported inside the functions that
draw, and only its object-oriented API with the Agg canvas is used (no ``pyplot``, no
global backend switch), so drawing is safe in worker processes and threads.

Orientation: slices are shown in world (MNI) orientation worked out from the grid
affine with ``nibabel.orientations`` — superior up, anterior up in axial views and right
in sagittal views — in the neurological convention by default (the subject's left on the
viewer's left), with L/R, A/P, S/I letters on every panel.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from nibabel.affines import apply_affine
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

from .._files import atomic_path
from .._version import __version__
from ..config import PreprocessConfig
from ..errors import ConfigError, MissingDependencyError
from ..inputs.template import GMTemplate, load_gm_template, to_model_space

__all__ = [
    "SLICES_SIZE_PX",
    "Thumbnail",
    "make_thumbnail",
    "render_contact_sheet",
    "model_input_affine",
    "render_relevance",
    "render_slices",
    "slice_positions_mm",
]

logger = logging.getLogger(__name__)

#: Pixel size (width, height) of the three-slice PNG at the default dpi.
SLICES_SIZE_PX: tuple[int, int] = (1050, 420)
_SLICES_INCHES = (10.5, 4.2)
_DPI = 100
_OUTLINE = "#00e5ff"
_CROP = "#ffd400"
_FLAG = "#e0301e"
_ORIENTATIONS = ("neurological", "radiological")
_CELL_INCHES = 1.7


def _matplotlib() -> tuple[Any, Any]:
    """``(Figure, FigureCanvasAgg)``, or a clear error telling how to install the extra."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError(
            'QC pictures need matplotlib: install it with `pip install "anatcl-infer[qc]"`',
            package="matplotlib",
            extra="qc",
        ) from None
    return Figure, FigureCanvasAgg


def _ras_orientation(affine: np.ndarray) -> np.ndarray:
    """The nibabel orientation of a grid: for each array axis, the world axis (x, y, z) it follows and its sign."""
    ornt = io_orientation(np.asarray(affine, dtype=np.float64))
    if np.isnan(ornt).any():
        raise ConfigError("QC pictures need a grid whose axes follow x, y and z (any order and sign)")
    return ornt


def _to_ras(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """View of ``volume`` with axes (x, y, z), each increasing towards R, A, S."""
    return apply_orientation(volume, _ras_orientation(affine))


def _box_to_ras(box: Sequence[tuple[int, int]], shape: Sequence[int], affine: np.ndarray) -> list[tuple[int, int]]:
    """A per-array-axis (start, stop) box in the RAS view's index space."""
    out = [(0, 0)] * 3
    for (start, stop), n, (world, sign) in zip(box, shape, _ras_orientation(affine).astype(int)):
        out[world] = (int(n - stop), int(n - start)) if sign < 0 else (int(start), int(stop))
    return out


def _window(volume: np.ndarray) -> tuple[float, float]:
    lo, hi = (float(v) for v in np.percentile(volume, [0.5, 99.5]))
    lo = min(lo, 0.0) if float(volume.min()) >= 0 else lo
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi


def model_input_affine(config: PreprocessConfig) -> np.ndarray:
    """The affine of the model input (the crop box, plus any padding) in the grid's world space.

    Example:
        >>> float(model_input_affine(PreprocessConfig())[1, 3])  # y of the first model-input voxel: -126 + 8 * 1.5
        -114.0
    """
    grid = np.asarray(config.grid_affine, dtype=np.float64)
    shift = np.eye(4)
    for axis, ((start, stop), size) in enumerate(zip(config.crop, config.model_input_shape)):
        shift[axis, 3] = start - (size - (stop - start)) // 2
    return grid @ shift


def _ras_to_world(centre: Sequence[int], shape: Sequence[int], affine: np.ndarray) -> tuple[float, float, float]:
    """World (MNI mm) coordinates x, y, z of the voxel at ``centre`` of the RAS view of a volume."""
    ras_affine = np.asarray(affine, dtype=np.float64) @ inv_ornt_aff(_ras_orientation(affine), shape)
    x, y, z = apply_affine(ras_affine, centre)
    return float(x), float(y), float(z)


def _mm(value: float) -> str:
    return f"{value:.1f}".replace("-0.0", "0.0") + " mm"


@dataclass
class _View:
    """One panel: a 2-D image (rows = vertical), its outline, box, overlay and edge letters."""

    image: np.ndarray
    outline: np.ndarray | None
    box: tuple[tuple[int, int], tuple[int, int]] | None
    left: str
    right: str
    bottom: str
    top: str
    name: str
    overlay: np.ndarray | None = None


def _views(
    ras: np.ndarray,
    outline: np.ndarray | None,
    box: list[tuple[int, int]] | None,
    centre: Sequence[int],
    orientation: str,
    mm: Sequence[float] | None = None,
    overlay: np.ndarray | None = None,
) -> list[_View]:
    """Sagittal, coronal and axial panels through ``centre`` (RAS index space).

    ``mm`` (the world position of ``centre``) names each slice by its MNI coordinate;
    without it slices are named by voxel index.
    """
    cx, cy, cz = (int(c) for c in centre)
    neuro = orientation == "neurological"
    names = (
        [f"sagittal x={_mm(mm[0])}", f"coronal y={_mm(mm[1])}", f"axial z={_mm(mm[2])}"]
        if mm is not None
        else [f"sagittal x={cx}", f"coronal y={cy}", f"axial z={cz}"]
    )

    def pick(vol: np.ndarray | None, axis: int, index: int) -> np.ndarray | None:
        return None if vol is None else np.take(vol, index, axis=axis).T  # rows = the later axis

    def lr_flip(img: np.ndarray | None) -> np.ndarray | None:
        return None if img is None or neuro else img[:, ::-1]

    views = []
    # sagittal: horizontal = y (P -> A), vertical = z
    views.append(
        _View(pick(ras, 0, cx), pick(outline, 0, cx), (box[1], box[2]) if box else None, "P", "A", "I", "S", names[0],
              pick(overlay, 0, cx))
    )
    # coronal and axial: horizontal = x; neurological puts the subject's left on the left
    panels = [(pick(ras, 1, cy), pick(outline, 1, cy), pick(overlay, 1, cy)),
              (pick(ras, 2, cz), pick(outline, 2, cz), pick(overlay, 2, cz))]
    xbox = box[0] if box else None
    lr = ("L", "R")
    if not neuro:
        nx = ras.shape[0]
        panels = [tuple(lr_flip(p) for p in trio) for trio in panels]  # type: ignore[misc]
        xbox = (nx - xbox[1], nx - xbox[0]) if xbox else None
        lr = ("R", "L")
    (cor, cor_out, cor_ov), (ax, ax_out, ax_ov) = panels
    views.append(_View(cor, cor_out, (xbox, box[2]) if box else None, lr[0], lr[1], "I", "S", names[1], cor_ov))  # type: ignore[arg-type]
    views.append(_View(ax, ax_out, (xbox, box[1]) if box else None, lr[0], lr[1], "P", "A", names[2], ax_ov))  # type: ignore[arg-type]
    return views


def _draw_panel(
    axes: Any,
    view: _View,
    window: tuple[float, float],
    *,
    small: bool = False,
    overlay_window: float = 1.0,
) -> Any:
    from matplotlib.patches import Rectangle

    axes.imshow(view.image, cmap="gray", vmin=window[0], vmax=window[1], origin="lower", interpolation="nearest")
    shown = None
    if view.overlay is not None:
        masked = np.ma.masked_where(np.abs(view.overlay) < 0.15 * overlay_window, view.overlay)
        shown = axes.imshow(
            masked, cmap="RdBu_r", vmin=-overlay_window, vmax=overlay_window, origin="lower", interpolation="nearest",
            alpha=0.85,
        )
    if view.outline is not None and view.outline.any() and not view.outline.all():
        axes.contour(view.outline.astype(np.float32), levels=[0.5], colors=[_OUTLINE], linewidths=0.6 if small else 0.9)
    if view.box is not None:
        (x0, x1), (y0, y1) = view.box
        axes.add_patch(
            Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=_CROP, linewidth=1.2, linestyle="--")
        )
    axes.set_xticks([])
    axes.set_yticks([])
    if not small:
        kw = {"color": "white", "fontsize": 9, "fontweight": "bold", "transform": axes.transAxes}
        axes.text(0.02, 0.5, view.left, ha="left", va="center", **kw)
        axes.text(0.98, 0.5, view.right, ha="right", va="center", **kw)
        axes.text(0.5, 0.02, view.bottom, ha="center", va="bottom", **kw)
        axes.text(0.5, 0.98, view.top, ha="center", va="top", **kw)
        axes.set_title(view.name, fontsize=9)
    axes.set_facecolor("black")
    return shown


def _grid_kept(prepared: Any, config: PreprocessConfig) -> bool:
    """Whether ``prepared`` kept its conformed volume on ``config``'s grid (``prepare(keep_grid=True)``)."""
    grid = getattr(prepared, "grid", None)
    return grid is not None and tuple(np.shape(grid)) == tuple(config.grid_shape)


def _slice_plan(
    config: PreprocessConfig, grid_kept: bool
) -> tuple[list[tuple[int, int]] | None, list[int], tuple[float, float, float]]:
    """The crop box in the RAS view (``None`` without the grid), the slices' RAS index and their MNI mm.

    With the grid, the slices go through the centre of the crop box; without it, through the
    centre of the model input.
    """
    if grid_kept:
        shape, affine, box = tuple(config.grid_shape), np.asarray(config.grid_affine, dtype=np.float64), config.crop
    else:
        shape, affine = tuple(config.model_input_shape), model_input_affine(config)
        box = tuple((0, n) for n in shape)
    ras_box = _box_to_ras(box, shape, affine)
    centre = [(a + b) // 2 for a, b in ras_box]
    return (ras_box if grid_kept else None), centre, _ras_to_world(centre, shape, affine)


def slice_positions_mm(prepared: Any, *, config: PreprocessConfig | None = None) -> tuple[float, float, float]:
    """MNI coordinates (x, y, z, in mm) of the three slices :func:`render_slices` draws.

    Example:
        >>> from anatcl_infer.inputs.preprocess import prepare
        >>> slice_positions_mm(prepare("examples/data/mwp1sub-mni01_T1w.nii.gz", keep_grid=True))
        (0.0, -18.0, 18.0)
    """
    config = config or PreprocessConfig()
    return _slice_plan(config, _grid_kept(prepared, config))[2]


def _png(fig: Any, dpi: int, description: str, path: str | os.PathLike[str] | None) -> bytes:
    """The figure's PNG bytes (``description`` in a text chunk), also written atomically to ``path`` if given."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": f"anatcl-infer {__version__}", "Description": description})
    data = buf.getvalue()
    if path is not None:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    return data


def _defaults(
    orientation: str, config: PreprocessConfig | None, template: GMTemplate | None
) -> tuple[PreprocessConfig, GMTemplate]:
    """Check ``orientation`` and that matplotlib is there (before any work); fill in the spec and template."""
    if orientation not in _ORIENTATIONS:
        raise ConfigError(f"orientation must be one of {_ORIENTATIONS}, got {orientation!r}")
    _matplotlib()
    return config or PreprocessConfig(), template if template is not None else load_gm_template()


def _three_slices(
    views: Sequence[_View],
    window: tuple[float, float],
    *,
    head: str,
    line2: str,
    subtitle: str,
    mm: Sequence[float],
    path: str | os.PathLike[str] | None,
    dpi: int,
    overlay_window: float = 1.0,
    colorbar_label: str | None = None,
) -> bytes:
    """The three panels side by side under a two-line caption, as PNG bytes (see :func:`_png`).

    With ``colorbar_label``, a colour bar of the overlay (its scale and unit) stands at the right.
    """
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=_SLICES_INCHES, dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    widths = [view.image.shape[1] for view in views]
    right = 0.99 if colorbar_label is None else 0.90
    spec = fig.add_gridspec(1, 3, width_ratios=widths, left=0.01, right=right, bottom=0.04, top=0.80, wspace=0.04)
    overlay = None
    for k, view in enumerate(views):
        shown = _draw_panel(fig.add_subplot(spec[0, k]), view, window, overlay_window=overlay_window)
        overlay = overlay if overlay is not None else shown
    if colorbar_label is not None and overlay is not None:
        bar = fig.colorbar(overlay, cax=fig.add_axes((0.915, 0.08, 0.014, 0.68)))
        bar.set_label(colorbar_label, fontsize=8)
        bar.ax.tick_params(labelsize=7)
    if len(head) > 110:
        head = "..." + head[-107:]
    fig.text(0.01, 0.965, head, fontsize=10, fontweight="bold", va="top")
    fig.text(0.01, 0.905, line2 + (f"\n{subtitle}" if subtitle else ""), fontsize=8, va="top", color="#333333")
    description = f"slices at MNI x={mm[0]:.1f} mm, y={mm[1]:.1f} mm, z={mm[2]:.1f} mm".replace("-0.0", "0.0")
    return _png(fig, dpi, description, path)


def render_slices(
    prepared: Any,
    path: str | os.PathLike[str] | None = None,
    *,
    config: PreprocessConfig | None = None,
    template: GMTemplate | None = None,
    title: str | None = None,
    subtitle: str = "",
    orientation: str = "neurological",
    dpi: int = _DPI,
) -> bytes:
    """Draw three orthogonal slices through the centre of what the model receives.

    The outline of the reference brain (the template's brain mask) is drawn in cyan.
    When ``prepared.grid`` was kept, the whole conformed grid is shown and the crop
    box (what the model receives) is the dashed yellow rectangle; otherwise the model
    input itself fills the panels. Each panel is named by its MNI coordinate in mm;
    the PNG's ``Description`` text chunk repeats them (:func:`slice_positions_mm`).

    Args:
        prepared: a :class:`anatcl_infer.inputs.preprocess.Prepared`.
        path: where to write the PNG (atomically); ``None`` only returns the bytes.
        config: the preprocessing spec that made ``prepared`` (default: the published one).
        template: the GM template (default: the packaged one).
        title: first line of the caption (default: ``prepared.source``).
        subtitle: second line of the caption (e.g. key metrics).
        orientation: ``"neurological"`` (subject's left on the left) or ``"radiological"``.
        dpi: resolution; the default gives :data:`SLICES_SIZE_PX`.

    Returns:
        The PNG bytes.

    Raises:
        MissingDependencyError: matplotlib is not installed.

    Example:
        >>> from anatcl_infer.inputs.preprocess import prepare
        >>> png = render_slices(prepare("examples/data/mwp1sub-mni01_T1w.nii.gz", keep_grid=True))
        >>> png[:4]
        b'\\x89PNG'
    """
    config, template = _defaults(orientation, config, template)
    affine = np.asarray(config.grid_affine, dtype=np.float64)
    on_template = template.matches(config)
    grid_kept = _grid_kept(prepared, config)
    if grid_kept:
        volume = np.asarray(prepared.grid, dtype=np.float32)
        outline = template.brain_mask if on_template else None
        what = f"conformed grid {tuple(config.grid_shape)}; dashed box = model input {tuple(config.model_input_shape)}"
    else:
        volume = np.asarray(prepared.array, dtype=np.float32).reshape(config.model_input_shape)
        outline = to_model_space(template.brain_mask, config) if on_template else None
        what = f"model input {tuple(config.model_input_shape)}"
    volume = np.nan_to_num(volume, nan=0.0, posinf=0.0, neginf=0.0)
    box, centre, mm = _slice_plan(config, grid_kept)
    ras_outline = None if outline is None else _to_ras(outline, affine)
    views = _views(_to_ras(volume, affine), ras_outline, box, centre, orientation, mm)
    head = title if title is not None else str(getattr(prepared, "source", ""))
    line2 = f"{what}; {orientation} (L/R marked); cyan = reference brain outline"
    return _three_slices(views, _window(volume), head=head, line2=line2, subtitle=subtitle, mm=mm, path=path, dpi=dpi)


def render_relevance(
    relevance: np.ndarray,
    background: np.ndarray,
    path: str | os.PathLike[str] | None = None,
    *,
    config: PreprocessConfig | None = None,
    template: GMTemplate | None = None,
    title: str = "",
    subtitle: str = "",
    centre_mm: Sequence[float] | None = None,
    orientation: str = "neurological",
    dpi: int = _DPI,
    unit: str = "score units per voxel",
) -> bytes:
    """Draw a relevance map over its input: three slices, like the QC pictures.

    Red voxels raise the explained score, blue ones lower it (a diverging scale symmetric
    around 0, saturating at the 99.9th percentile of ``|relevance|``; values under 15 % of
    that are not coloured); a colour bar at the right gives the scale in ``unit``. The cyan
    line is the reference brain outline, the dashed box the model's field of view; panels are
    named by their MNI coordinates in mm.

    Args:
        relevance: map on ``config.grid_shape`` (zeros outside the crop box).
        background: the input on the same grid (its conformed volume).
        path: where to write the PNG (atomically); ``None`` only returns the bytes.
        config: the preprocessing spec (default: the published one).
        template: the GM template (default: the packaged one).
        title: first caption line.
        subtitle: second caption line.
        centre_mm: MNI point the three slices go through; default: the peak of ``|relevance|``.
        orientation: ``"neurological"`` or ``"radiological"``.
        dpi: resolution; the default gives :data:`SLICES_SIZE_PX`.
        unit: the relevance's unit, on the colour bar (the score's unit per voxel, e.g. ``"years per voxel"``).

    Returns:
        The PNG bytes.

    Raises:
        MissingDependencyError: matplotlib is not installed.
        ConfigError: a volume is not on the grid, or an unknown orientation.
    """
    config, template = _defaults(orientation, config, template)
    shape = tuple(config.grid_shape)
    if tuple(np.shape(relevance)) != shape or tuple(np.shape(background)) != shape:
        raise ConfigError(f"relevance and background must both be on the grid {shape}")
    affine = np.asarray(config.grid_affine, dtype=np.float64)
    rel = np.nan_to_num(np.asarray(relevance, dtype=np.float32))
    bg = np.nan_to_num(np.asarray(background, dtype=np.float32))
    ras = _to_ras(bg, affine)
    ras_rel = _to_ras(rel, affine)
    outline = _to_ras(template.brain_mask, affine) if template.matches(config) else None
    box = _box_to_ras(config.crop, shape, affine)
    if centre_mm is not None:
        ijk = np.linalg.solve(affine, np.array([*centre_mm, 1.0]))[:3]
        idx = np.clip(np.rint(ijk).astype(int), 0, np.array(shape) - 1)
        centre = [start for start, _ in _box_to_ras([(i, i + 1) for i in idx], shape, affine)]  # that voxel in the RAS view
    else:
        centre = list(np.unravel_index(int(np.argmax(np.abs(ras_rel))), ras_rel.shape))
    mm = _ras_to_world(centre, shape, affine)
    scale = float(np.percentile(np.abs(rel[rel != 0]), 99.9)) if np.any(rel) else 1.0
    scale = scale if scale > 0 else 1.0
    views = _views(ras, outline, box, centre, orientation, mm, overlay=ras_rel)
    line2 = (f"red raises the score, blue lowers it (scale +/-{scale:.2g}); {orientation} (L/R marked); "
             "cyan = reference brain outline; dashed box = model input")
    return _three_slices(
        views, _window(bg), head=title, line2=line2, subtitle=subtitle, mm=mm, path=path, dpi=dpi, overlay_window=scale,
        colorbar_label=f"relevance ({unit})",
    )


@dataclass
class Thumbnail:
    """A small axial view of one input for contact sheets (cheap to keep for thousands).

    Attributes:
        label: caption (file name).
        image: 2-D float16 axial slice in display orientation (rows = P->A).
        outline: matching slice of the reference brain mask, or ``None``.
        window: display range.
        flagged: drawn with a red caption when true.
    """

    label: str
    image: np.ndarray
    outline: np.ndarray | None
    window: tuple[float, float]
    flagged: bool = False


def make_thumbnail(
    prepared: Any,
    label: str,
    *,
    config: PreprocessConfig | None = None,
    template: GMTemplate | None = None,
    orientation: str = "neurological",
) -> Thumbnail:
    """The central axial slice of the model input, ready for :func:`render_contact_sheet`.

    Example:
        >>> from anatcl_infer.inputs.preprocess import prepare
        >>> thumb = make_thumbnail(prepare("examples/data/mwp1sub-mni01_T1w.nii.gz"), "sub-mni01")
        >>> thumb.image.shape
        (128, 121)
    """
    config = config or PreprocessConfig()
    template = template if template is not None else load_gm_template()
    affine = np.asarray(config.grid_affine, dtype=np.float64)
    volume = np.nan_to_num(np.asarray(prepared.array, dtype=np.float32).reshape(config.model_input_shape))
    outline = to_model_space(template.brain_mask, config) if template.matches(config) else None
    ras = _to_ras(volume, affine)
    ras_outline = None if outline is None else _to_ras(outline, affine)
    views = _views(ras, ras_outline, None, [n // 2 for n in ras.shape], orientation)
    axial = views[2]
    return Thumbnail(
        label=label,
        image=np.ascontiguousarray(axial.image, dtype=np.float16),
        outline=None if axial.outline is None else np.ascontiguousarray(axial.outline),
        window=_window(volume),
    )


def render_contact_sheet(
    thumbnails: Sequence[Thumbnail],
    path: str | os.PathLike[str] | None = None,
    *,
    columns: int = 8,
    title: str = "",
    dpi: int = _DPI,
) -> bytes:
    """One PNG with the central axial slice of every input, flagged ones captioned in red.

    Args:
        thumbnails: from :func:`make_thumbnail`.
        path: where to write the PNG (atomically); ``None`` only returns the bytes.
        columns: cells per row.
        title: a line above the grid.
        dpi: resolution (cells are 1.7 inch wide).

    Returns:
        The PNG bytes.

    Raises:
        MissingDependencyError: matplotlib is not installed.
        ValueError: no thumbnails.

    Example:
        >>> from anatcl_infer.inputs.preprocess import prepare
        >>> png = render_contact_sheet([make_thumbnail(prepare("examples/data/mwp1sub-mni01_T1w.nii.gz"), "sub-mni01")])
        >>> png[1:4]
        b'PNG'
    """
    if not thumbnails:
        raise ValueError("a contact sheet needs at least one thumbnail")
    Figure, FigureCanvasAgg = _matplotlib()
    columns = max(1, min(columns, len(thumbnails)))
    rows = math.ceil(len(thumbnails) / columns)
    header = 0.35 if title else 0.0
    cell_h = _CELL_INCHES * 1.3
    fig = Figure(figsize=(columns * _CELL_INCHES, rows * cell_h + header), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    top = 1.0 - header / (rows * cell_h + header)
    spec = fig.add_gridspec(rows, columns, left=0.005, right=0.995, bottom=0.005, top=top, wspace=0.03, hspace=0.18)
    for k, thumb in enumerate(thumbnails):
        axes = fig.add_subplot(spec[k // columns, k % columns])
        view = _View(thumb.image.astype(np.float32), thumb.outline, None, "", "", "", "", "")
        _draw_panel(axes, view, thumb.window, small=True)
        label = thumb.label if len(thumb.label) <= 26 else thumb.label[:12] + "…" + thumb.label[-12:]
        axes.set_title(("! " if thumb.flagged else "") + label, fontsize=7, color=_FLAG if thumb.flagged else "black")
        if thumb.flagged:
            for spine in axes.spines.values():
                spine.set_edgecolor(_FLAG)
                spine.set_linewidth(2.0)
    if title:
        fig.text(0.005, 1.0 - 0.08 / (rows * cell_h + header), title, fontsize=10, fontweight="bold", va="top")
    return _png(fig, dpi, title or "contact sheet", path)
