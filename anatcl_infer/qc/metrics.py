"""QC metrics of what the model receives, and cohort-level outlier flags.

Pure numpy, no plotting: :func:`qc_metrics` summarises one prepared input in a flat
dict of ``qc_*`` columns (``anatcl embed --qc`` adds them beside the features,
``anatcl qc`` puts them in its report); :func:`flag_outliers` marks the odd ones
in a cohort.

Outlier rule (documented in :func:`outlier_reasons`): an input is flagged when its
correlation with the mean grey-matter template is low in absolute terms
(< ``min_corr``) or relative to the cohort (robust z-score below ``-z``), when its
template-GM coverage is a robust outlier on the low side, when brain signal lies
outside the crop box, when it matches the template better flipped, or when its input-kind guess is not what the model expects.
For raw T1s embedded through the T1 route, also when their affine registration to MNI152 is
less similar to the template than :data:`LOW_REGISTRATION_NCC` or than their cohort.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..config import PreprocessConfig
from ..errors import ConfigError
from ..inputs.template import GMTemplate, load_gm_template, to_model_space

__all__ = ["LOW_REGISTRATION_NCC", "QC_COLUMNS", "ROUTE_QC_COLUMNS", "add_qc_flags", "flag_outliers", "outlier_reasons", "qc_metrics", "robust_z"]

logger = logging.getLogger(__name__)

#: Every column :func:`qc_metrics` returns, in order.
QC_COLUMNS: tuple[str, ...] = (
    "qc_template_corr",
    "qc_brain_coverage",
    "qc_signal_outside_brain",
    "qc_signal_outside_crop",
    "qc_orientation",
    "qc_min",
    "qc_p1",
    "qc_p50",
    "qc_p99",
    "qc_max",
    "qc_zero_fraction",
    "qc_kind",
    "qc_kind_confidence",
    "qc_method",
    "qc_n_warnings",
    "qc_warnings",
)

#: Columns of the raw-T1 route (:func:`anatcl_infer.inputs.t1_route.route_qc`), present for T1 routes only.
ROUTE_QC_COLUMNS: tuple[str, ...] = ("qc_registration_ncc", "qc_skull_strip", "qc_prep_output")
#: A registration to MNI152 less similar than this to the template is flagged (below
#: ``T1Route.min_ncc``, 0.7 by default, the input fails instead).
LOW_REGISTRATION_NCC = 0.8

_GM_CORE = 0.5  # template voxels with GM probability >= this count for coverage
_SIGNAL = 0.1  # a voxel has signal above min + 10% of the (p99 - min) range
_MAD_SCALE = 1.4826  # MAD -> standard deviation for normal data
_MAD_FLOOR = 0.01  # a cohort of near-identical correlations must not flag tiny differences
_MIN_COHORT = 5  # robust z-scores need at least this many finite values
_FLIP_MARGIN = 0.1  # a flipped template must correlate this much better to call the input flipped


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two volumes (in float64); NaN, silently, when one of them is constant."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


_AXIS_WORDS = ("L/R", "A/P", "S/I")


def _orientation(volume: np.ndarray, gm: np.ndarray, corr: float, affine: np.ndarray) -> str:
    """``"ok"``, or the axes along which the input matches the template better once flipped.

    Left/right is not tested: the MNI152 2009a template is symmetric.
    """
    rot = np.asarray(affine, dtype=np.float64)[:3, :3]
    world = np.argmax(np.abs(rot), axis=0)  # world axis of each array axis
    axes = [int(np.where(world == w)[0][0]) for w in (1, 2) if (world == w).any()]
    best, best_corr = (), corr
    for subset in ([axes[0]], [axes[1]], axes) if len(axes) == 2 else ([a] for a in axes):
        flipped = _pearson(volume, np.flip(gm, axis=tuple(subset)))
        if flipped > best_corr + _FLIP_MARGIN:
            best, best_corr = tuple(subset), flipped
    if not best:
        return "ok"
    return "flipped " + "+".join(_AXIS_WORDS[int(world[a])] for a in best)


def _weights(volume: np.ndarray, floor: float) -> np.ndarray:
    return np.clip(volume.astype(np.float64, copy=False) - floor, 0.0, None)


@functools.lru_cache(maxsize=None)
def _warn_off_template(grid_shape: tuple[int, ...], grid_affine: tuple[tuple[float, ...], ...]) -> None:
    """Say once per grid (and process), not once per input, that the template metrics are NaN."""
    logger.warning("the GM template is not on this config's grid %s: template metrics are NaN", grid_shape)


def _fraction_outside_crop(grid: np.ndarray, config: PreprocessConfig, floor: float) -> float:
    w = _weights(grid, floor)
    total = float(w.sum())
    if total <= 0:
        return float("nan")
    inside = float(w[tuple(slice(a, b) for a, b in config.crop)].sum())
    return max(0.0, 1.0 - inside / total)


def qc_metrics(
    prepared: Any,
    template: GMTemplate | None = None,
    *,
    config: PreprocessConfig | None = None,
) -> dict[str, float | str]:
    """Summarise one prepared input (exactly what the model receives) in ``qc_*`` columns.

    Columns:
        ``qc_template_corr``: Pearson correlation with the mean GM template over the
        whole model input (crop box); ~1 for a good mwp1 map, lower for smoothed maps,
        T1 images, shifted or flipped inputs.
        ``qc_brain_coverage``: fraction of template grey-matter voxels (p >= 0.5) where
        the input has signal (above min + 10% of its p99 - min range).
        ``qc_signal_outside_brain``: fraction of the signal (values above the input's
        minimum) outside the template brain mask — skull, neck, misregistration.
        ``qc_signal_outside_crop``: fraction of the conformed grid's signal that the
        crop cuts away (NaN unless ``prepared.grid`` was kept).
        ``qc_orientation``: ``"ok"``, or e.g. ``"flipped A/P"`` when the template flipped
        along that axis correlates clearly better (left/right cannot be told: the
        template is symmetric).
        ``qc_min``, ``qc_max``, ``qc_zero_fraction``: over the whole model input;
        ``qc_p1``, ``qc_p50``, ``qc_p99``: percentiles inside the template brain mask.
        ``qc_kind``, ``qc_kind_confidence``: the input-kind guess.
        ``qc_method``: how the input was conformed (identity, reindex, resample).
        ``qc_n_warnings``, ``qc_warnings``: warnings of preparation (joined by ``"; "``).

    Args:
        prepared: a :class:`anatcl_infer.inputs.preprocess.Prepared` (``array`` of shape
            ``(1, *config.model_input_shape)``, ``kind``, ``method``, ``warnings``,
            optional ``grid``).
        template: the GM template; the packaged one by default. Template columns are
            NaN when it is not on ``config``'s grid.
        config: the preprocessing spec that made ``prepared`` (default: the published one).

    Returns:
        A flat dict with the keys of :data:`QC_COLUMNS`.

    Raises:
        ConfigError: ``prepared.array`` does not have ``config``'s model input shape.

    Example:
        >>> from anatcl_infer.inputs.preprocess import prepare
        >>> m = qc_metrics(prepare("examples/data/mwp1sub-mni03_T1w.nii.gz", keep_grid=True))
        >>> round(m["qc_template_corr"], 2), m["qc_kind"], m["qc_orientation"], m["qc_signal_outside_crop"]
        (0.97, 'gm', 'ok', 0.0)
    """
    config = config or PreprocessConfig()
    template = template if template is not None else load_gm_template()
    volume = np.asarray(prepared.array)
    if volume.ndim == 4 and volume.shape[0] == 1:
        volume = volume[0]
    if tuple(volume.shape) != tuple(config.model_input_shape):
        raise ConfigError(
            f"prepared array has shape {volume.shape}, not the model input shape {config.model_input_shape} of the "
            "config given; pass config= the PreprocessConfig that prepared it (e.g. model.config.preprocess)"
        )
    finite = np.isfinite(volume)
    if not finite.all():
        volume = np.where(finite, volume, 0.0)

    vmin = float(volume.min())
    vmax = float(volume.max())
    out: dict[str, float | str] = {}
    nan = float("nan")
    if template.matches(config):
        gm = to_model_space(template.gm, config)
        brain = to_model_space(template.brain_mask, config)
        inside = volume[brain]
        p1, p50, p99 = (float(v) for v in np.percentile(inside, [1, 50, 99]))
        floor = vmin + _SIGNAL * (p99 - vmin)
        signal = volume > floor if p99 > vmin else np.zeros(volume.shape, dtype=bool)
        core = gm >= _GM_CORE
        weights = _weights(volume, vmin)
        total = float(weights.sum())
        out["qc_template_corr"] = _pearson(volume, gm)
        out["qc_orientation"] = _orientation(volume, gm, out["qc_template_corr"], np.asarray(config.grid_affine))
        out["qc_brain_coverage"] = float(signal[core].mean()) if core.any() else nan
        out["qc_signal_outside_brain"] = float(weights[~brain].sum()) / total if total > 0 else nan
    else:
        _warn_off_template(tuple(config.grid_shape), tuple(map(tuple, config.grid_affine)))
        p1, p50, p99 = (float(v) for v in np.percentile(volume, [1, 50, 99]))
        out["qc_template_corr"] = nan
        out["qc_brain_coverage"] = nan
        out["qc_signal_outside_brain"] = nan
        out["qc_orientation"] = "unknown"
    grid = getattr(prepared, "grid", None)
    if grid is not None and tuple(np.shape(grid)) == tuple(config.grid_shape):
        grid_arr = np.nan_to_num(np.asarray(grid), nan=0.0, posinf=0.0, neginf=0.0)
        out["qc_signal_outside_crop"] = _fraction_outside_crop(grid_arr, config, float(grid_arr.min()))
    else:
        out["qc_signal_outside_crop"] = nan
    out.update(
        qc_min=vmin,
        qc_p1=p1,
        qc_p50=p50,
        qc_p99=p99,
        qc_max=vmax,
        qc_zero_fraction=float(np.count_nonzero(volume == 0)) / volume.size,
    )
    kind = getattr(prepared, "kind", None)
    out["qc_kind"] = str(getattr(kind, "kind", "unknown"))
    out["qc_kind_confidence"] = float(getattr(kind, "confidence", nan))
    out["qc_method"] = str(getattr(prepared, "method", ""))
    warns = [str(w) for w in (getattr(prepared, "warnings", None) or [])]
    if not finite.all():
        warns.append(f"{int((~finite).sum())} non-finite voxels (counted as 0 here)")
    out["qc_n_warnings"] = float(len(warns))
    out["qc_warnings"] = "; ".join(warns)
    return {key: out[key] for key in QC_COLUMNS}


def robust_z(values: Sequence[float] | np.ndarray, *, mad_floor: float = _MAD_FLOOR) -> np.ndarray:
    """Robust z-scores: ``(x - median) / (1.4826 * MAD)``, MAD floored at ``mad_floor``.

    NaNs stay NaN and are ignored when computing the median and MAD. With fewer
    than five finite values every score is NaN (too few to call anything odd).

    Example:
        >>> float(robust_z([0.9, 0.91, 0.89, 0.9, 0.92, 0.3])[-1].round(1))
        -40.5
    """
    x = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(x)
    if ok.sum() < _MIN_COHORT:
        return np.full(x.shape, np.nan)
    med = float(np.median(x[ok]))
    mad = float(np.median(np.abs(x[ok] - med)))
    return (x - med) / (_MAD_SCALE * max(mad, mad_floor))


def _columns(metrics: Any) -> tuple[dict[str, np.ndarray], Any]:
    """Normalise a DataFrame, a list of row dicts or a dict of columns; also return the index."""
    if hasattr(metrics, "columns") and hasattr(metrics, "index"):  # a pandas DataFrame
        return {str(c): metrics[c].to_numpy() for c in metrics.columns}, metrics.index
    if isinstance(metrics, Mapping):
        return {str(k): np.asarray(v) for k, v in metrics.items()}, None
    rows = list(metrics)
    keys = list(dict.fromkeys(k for row in rows for k in row))  # every row's keys, in first-seen order
    return {k: np.asarray([row.get(k, np.nan) for row in rows], dtype=object) for k in keys}, None


def _floats(col: np.ndarray | None, n: int) -> np.ndarray:
    if col is None:
        return np.full(n, np.nan)
    return np.array([float(v) if v is not None and v != "" else np.nan for v in col], dtype=np.float64)


def outlier_reasons(
    metrics: Any,
    *,
    z: float = 3.5,
    min_corr: float = 0.5,
    max_outside_crop: float = 0.01,
    expected_kind: str | None = "gm",
    min_registration_ncc: float = LOW_REGISTRATION_NCC,
) -> list[str]:
    """Why each input of a cohort looks odd (``""`` when it does not).

    Rule, applied row by row (reasons are joined by ``"; "``):

    1. ``qc_template_corr < min_corr``: the input does not look like a GM map on the
       reference grid at all (T1, wrong grid, flipped axis...);
    2. robust z-score of ``qc_template_corr`` below ``-z`` (median/MAD over the
       cohort, needs >= 5 inputs): clearly worse than its peers (smoothed, shifted,
       partial brain);
    3. robust z-score of ``qc_brain_coverage`` below ``-z``: missing brain;
    4. ``qc_signal_outside_crop > max_outside_crop``: the crop cuts brain away;
    5. ``qc_orientation`` is a flip (``"flipped A/P"``...);
    6. ``qc_kind`` differs from ``expected_kind`` (skipped when ``None``);
    7. raw-T1 route: ``qc_registration_ncc < min_registration_ncc`` (the registration to
       MNI152 is doubtful), or its robust z-score is below ``-z`` within the cohort.

    Args:
        metrics: rows of :func:`qc_metrics` as a DataFrame, a list of dicts or a dict of columns.
        z: robust z-score threshold.
        min_corr: absolute floor on the template correlation.
        max_outside_crop: largest acceptable fraction of signal outside the crop box.
        expected_kind: the input kind the model expects (``config.input_kind``).
        min_registration_ncc: floor on the similarity of a registered T1 to the template.

    Example:
        >>> rows = [{"qc_template_corr": c} for c in (0.9, 0.91, 0.89, 0.9, 0.92, 0.3)]
        >>> outlier_reasons(rows, expected_kind=None)[-1]
        'template correlation 0.30 < 0.5; template correlation robust z -40.5'
    """
    cols, _ = _columns(metrics)
    n = len(next(iter(cols.values()))) if cols else 0
    corr = _floats(cols.get("qc_template_corr"), n)
    cover = _floats(cols.get("qc_brain_coverage"), n)
    outside = _floats(cols.get("qc_signal_outside_crop"), n)
    kinds = cols.get("qc_kind")
    orient = cols.get("qc_orientation")
    reg = _floats(cols.get("qc_registration_ncc"), n)
    zc = robust_z(corr)
    zv = robust_z(cover)
    zr = robust_z(reg)
    reasons: list[str] = []
    for i in range(n):
        r: list[str] = []
        if np.isfinite(corr[i]) and corr[i] < min_corr:
            r.append(f"template correlation {corr[i]:.2f} < {min_corr:g}")
        if np.isfinite(zc[i]) and zc[i] < -z:
            r.append(f"template correlation robust z {zc[i]:.1f}")
        if np.isfinite(zv[i]) and zv[i] < -z:
            r.append(f"brain coverage {cover[i]:.2f} (robust z {zv[i]:.1f})")
        if np.isfinite(outside[i]) and outside[i] > max_outside_crop:
            r.append(f"{outside[i]:.1%} of the signal lies outside the crop box")
        if orient is not None and str(orient[i]).startswith("flipped"):
            r.append(f"orientation: {orient[i]}")
        if expected_kind is not None and kinds is not None:
            kind = str(kinds[i])
            if kind not in (expected_kind, "", "unknown", "nan", "None"):
                r.append(f"looks like {kind!r}, the model expects {expected_kind!r}")
        if np.isfinite(reg[i]) and reg[i] < min_registration_ncc:
            r.append(f"registration to MNI152: NCC {reg[i]:.3f} < {min_registration_ncc:g}")
        elif np.isfinite(zr[i]) and zr[i] < -z:
            r.append(f"registration to MNI152: NCC {reg[i]:.3f} (robust z {zr[i]:.1f})")
        reasons.append("; ".join(r))
    return reasons


def flag_outliers(metrics: Any, **kwargs: Any) -> Any:
    """Boolean outlier flag per input (the rule of :func:`outlier_reasons`).

    Args:
        metrics: rows of :func:`qc_metrics` (DataFrame, list of dicts or dict of columns).
        **kwargs: thresholds passed to :func:`outlier_reasons` (``z``, ``min_corr``,
            ``max_outside_crop``, ``expected_kind``, ``min_registration_ncc``).

    Returns:
        A ``pandas.Series`` named ``qc_flag`` on the DataFrame's index when given a
        DataFrame, otherwise a boolean numpy array.

    Example:
        >>> rows = [{"qc_template_corr": c} for c in (0.9, 0.91, 0.89, 0.9, 0.92, 0.3)]
        >>> flag_outliers(rows, expected_kind=None).tolist()
        [False, False, False, False, False, True]
    """
    flags = np.array([bool(r) for r in outlier_reasons(metrics, **kwargs)], dtype=bool)
    _, index = _columns(metrics)
    if index is not None:
        import pandas as pd

        return pd.Series(flags, index=index, name="qc_flag")
    return flags


def add_qc_flags(table: Any, *, expected_kind: str | None = "gm", **kwargs: Any) -> Any:
    """Add (or recompute) the ``qc_flag`` (bool) and ``qc_reasons`` (text) columns of a features table.

    This is what ``anatcl embed --qc`` runs once the whole table is assembled (a resumed run
    flags its rows again against the whole cohort), with the rule of :func:`outlier_reasons`,
    so its flags equal those of ``anatcl qc`` on the same inputs. Rows of several folds of
    one input carry the same metrics and get the same flag (repeating every value the same
    number of times changes neither the median nor the MAD).

    Args:
        table: a ``pyarrow.Table`` with the ``qc_*`` columns of :func:`qc_metrics`.
        expected_kind: the input kind the model expects (``config.input_kind``).
        **kwargs: other thresholds of :func:`outlier_reasons`.

    Returns:
        The table with ``qc_flag`` and ``qc_reasons`` as its last columns.

    Example:
        >>> import pyarrow as pa
        >>> t = pa.table({"qc_template_corr": [0.9, 0.91, 0.89, 0.9, 0.92, 0.3]})
        >>> add_qc_flags(t, expected_kind=None).column("qc_flag").to_pylist()
        [False, False, False, False, False, True]
    """
    import pyarrow as pa

    for name in ("qc_flag", "qc_reasons"):
        if name in table.column_names:
            table = table.drop_columns([name])
    cols = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names if name.startswith("qc_")}
    if not cols:
        cols = {"qc_template_corr": np.full(table.num_rows, np.nan)}
    reasons = outlier_reasons(cols, expected_kind=expected_kind, **kwargs) if table.num_rows else []
    table = table.append_column("qc_flag", pa.array([bool(r) for r in reasons], pa.bool_()))
    return table.append_column("qc_reasons", pa.array(reasons, pa.string()))
