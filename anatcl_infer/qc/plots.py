"""QC pictures: three orthogonal slices of what the model receives, and contact sheets.

Matplotlib is the optional extra ``[qc]``; it is imported inside the functions that
draw, and only its object-oriented API with the Agg canvas is used (no ``pyplot``, no
global backend switch), so drawing is safe in worker processes and threads.

Orientation: slices are shown in world (MNI) orientation worked out from the grid
affine — superior up, anterior up in axial views and right in sagittal views — in the
neurological convention by default (the subject's left on the viewer's left), with
L/R, A/P, S/I letters on every panel.
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

from ..config import PreprocessConfig
from ..errors import ConfigError, MissingDependencyError
from ..inputs.template import GMTemplate, load_gm_template, to_model_space

__all__ = [
    "SLICES_SIZE_PX",
    "Thumbnail",
    "make_thumbnail",
    "render_contact_sheet",
    "render_slices",
    "write_atomic",
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


def write_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``.

    Example:
        >>> import tempfile, pathlib
        >>> write_atomic(pathlib.Path(tempfile.mkdtemp()) / "a.txt", b"hi").read_bytes()
        b'hi'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _axis_signs(affine: np.ndarray) -> tuple[int, int, int]:
    """For each array axis, +1 or -1: the sign of the world axis (x, y, z) it mostly follows."""
    rot = np.asarray(affine, dtype=np.float64)[:3, :3]
    world = np.argmax(np.abs(rot), axis=0)
    if sorted(world.tolist()) != [0, 1, 2]:
        raise ConfigError("QC pictures need a grid whose axes follow x, y and z (any order and sign)")
    return tuple(int(np.sign(rot[world[k], k])) or 1 for k in range(3))  # type: ignore[return-value]


def _world_order(affine: np.ndarray) -> list[int]:
    """Array axis carrying world x, y and z (in that order)."""
    rot = np.asarray(affine, dtype=np.float64)[:3, :3]
    world = np.argmax(np.abs(rot), axis=0)
    return [int(np.where(world == w)[0][0]) for w in range(3)]


def _to_ras(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """View of ``volume`` with axes (x, y, z), each increasing towards R, A, S."""
    order = _world_order(affine)
    signs = _axis_signs(affine)
    out = np.transpose(volume, order)
    flips = tuple(slice(None, None, -1) if signs[a] < 0 else slice(None) for a in order)
    return out[flips]


def _box_to_ras(box: Sequence[tuple[int, int]], shape: Sequence[int], affine: np.ndarray) -> list[tuple[int, int]]:
    """A per-array-axis (start, stop) box in the RAS view's index space."""
    order = _world_order(affine)
    signs = _axis_signs(affine)
    out = []
    for a in order:
        start, stop = box[a]
        if signs[a] < 0:
            start, stop = shape[a] - stop, shape[a] - start
        out.append((int(start), int(stop)))
    return out


def _window(volume: np.ndarray) -> tuple[float, float]:
    lo, hi = (float(v) for v in np.percentile(volume, [0.5, 99.5]))
    lo = min(lo, 0.0) if float(volume.min()) >= 0 else lo
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi


@dataclass
class _View:
    """One panel: a 2-D image (rows = vertical), its outline, box and edge letters."""

    image: np.ndarray
    outline: np.ndarray | None
    box: tuple[tuple[int, int], tuple[int, int]] | None
    left: str
    right: str
    bottom: str
    top: str
    name: str


def _views(
    ras: np.ndarray,
    outline: np.ndarray | None,
    box: list[tuple[int, int]] | None,
    centre: Sequence[int],
    orientation: str,
) -> list[_View]:
    """Sagittal, coronal and axial panels through ``centre`` (RAS index space)."""
    cx, cy, cz = (int(c) for c in centre)
    neuro = orientation == "neurological"

    def pick(vol: np.ndarray | None, axis: int, index: int) -> np.ndarray | None:
        return None if vol is None else np.take(vol, index, axis=axis).T  # rows = the later axis

    views = []
    # sagittal: horizontal = y (P -> A), vertical = z
    views.append(_View(pick(ras, 0, cx), pick(outline, 0, cx), (box[1], box[2]) if box else None, "P", "A", "I", "S", f"sagittal x={cx}"))
    # coronal and axial: horizontal = x; neurological puts the subject's left on the left
    cor = pick(ras, 1, cy)
    cor_out = pick(outline, 1, cy)
    ax = pick(ras, 2, cz)
    ax_out = pick(outline, 2, cz)
    xbox = box[0] if box else None
    lr = ("L", "R")
    if not neuro:
        nx = ras.shape[0]
        cor, ax = cor[:, ::-1], ax[:, ::-1]
        cor_out = None if cor_out is None else cor_out[:, ::-1]
        ax_out = None if ax_out is None else ax_out[:, ::-1]
        xbox = (nx - xbox[1], nx - xbox[0]) if xbox else None
        lr = ("R", "L")
    views.append(_View(cor, cor_out, (xbox, box[2]) if box else None, lr[0], lr[1], "I", "S", f"coronal y={cy}"))
    views.append(_View(ax, ax_out, (xbox, box[1]) if box else None, lr[0], lr[1], "P", "A", f"axial z={cz}"))
    return views


def _draw_panel(axes: Any, view: _View, window: tuple[float, float], *, small: bool = False) -> None:
    from matplotlib.patches import Rectangle

    axes.imshow(view.image, cmap="gray", vmin=window[0], vmax=window[1], origin="lower", interpolation="nearest")
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
    input itself fills the panels.

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
    if orientation not in _ORIENTATIONS:
        raise ConfigError(f"orientation must be one of {_ORIENTATIONS}, got {orientation!r}")
    Figure, FigureCanvasAgg = _matplotlib()
    config = config or PreprocessConfig()
    template = template if template is not None else load_gm_template()
    affine = np.asarray(config.grid_affine, dtype=np.float64)
    grid = getattr(prepared, "grid", None)
    on_template = template.matches(config)
    if grid is not None and tuple(np.shape(grid)) == tuple(config.grid_shape):
        volume = np.asarray(grid, dtype=np.float32)
        outline = template.brain_mask if on_template else None
        box_idx: list[tuple[int, int]] | None = list(config.crop)
        what = f"conformed grid {tuple(config.grid_shape)}; dashed box = model input {tuple(config.model_input_shape)}"
    else:
        volume = np.asarray(prepared.array, dtype=np.float32).reshape(config.model_input_shape)
        outline = to_model_space(template.brain_mask, config) if on_template else None
        box_idx = None
        what = f"model input {tuple(config.model_input_shape)}"
    volume = np.nan_to_num(volume, nan=0.0, posinf=0.0, neginf=0.0)
    ras = _to_ras(volume, affine)
    ras_outline = None if outline is None else _to_ras(outline, affine)
    ras_box = _box_to_ras(box_idx, volume.shape, affine) if box_idx else None
    centre = [(a + b) // 2 for a, b in ras_box] if ras_box else [n // 2 for n in ras.shape]
    window = _window(volume)

    fig = Figure(figsize=_SLICES_INCHES, dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    widths = [ras.shape[1], ras.shape[0], ras.shape[0]]
    grid_spec = fig.add_gridspec(1, 3, width_ratios=widths, left=0.01, right=0.99, bottom=0.04, top=0.80, wspace=0.04)
    for k, view in enumerate(_views(ras, ras_outline, ras_box, centre, orientation)):
        _draw_panel(fig.add_subplot(grid_spec[0, k]), view, window)
    head = title if title is not None else str(getattr(prepared, "source", ""))
    if len(head) > 110:
        head = "..." + head[-107:]
    fig.text(0.01, 0.965, head, fontsize=10, fontweight="bold", va="top")
    line2 = f"{what}; {orientation} (L/R marked); cyan = reference brain outline"
    fig.text(0.01, 0.905, line2 + (f"\n{subtitle}" if subtitle else ""), fontsize=8, va="top", color="#333333")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    data = buf.getvalue()
    if path is not None:
        write_atomic(path, data)
    return data


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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    data = buf.getvalue()
    if path is not None:
        write_atomic(path, data)
    return data
