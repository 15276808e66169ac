"""The QC report: run every input through the preprocessing, measure, draw, write one page.

:func:`build_qc_report` is what ``anatcl qc`` runs. A 4D file of N volumes is N inputs, each
named by its volume (as ``anatcl embed`` gives it N rows). For each input it calls
:func:`~anatcl_infer.inputs.preprocess.prepare` (keeping the conformed grid), computes
:func:`~anatcl_infer.qc.qc_metrics`, draws the three-slice picture; then it flags the
cohort's outliers and writes, in ``out_dir``:

* ``index.html`` — one page from the jinja2 template ``templates/report.html.j2``
  (autoescaped, inline CSS, no script): failed inputs first, then flagged ones, then the
  rest. Pictures are *linked* from the folder, not embedded, so the page stays well under
  2 kB per input (about 20 MB for 10,000 inputs instead of 1.7 GB); keep the folder together;
* ``qc_metrics.csv`` — one row per input: ``path``, ``volume`` (empty but for a volume of a
  4D file), ``status``, ``stage``, ``error``,
  ``qc_flag``, ``qc_reasons``, every ``qc_*`` metric, the picture and the MNI positions (mm)
  of its three slices;
* ``images/NNNN_<name>.png`` — the three-slice picture of each input;
* ``contact_sheet.png`` (``contact_sheet_NN.png`` past 48 inputs).

Raw T1s of a T1 route (``from_t1=``, or registered images in a ``prep_dir`` whose JSON
sidecar is read beside them) are shown as registered onto the model's grid, under the
reference brain's outline, with their similarity to the template (``qc_registration_ncc``),
flagged when low.

One bad input is recorded (path, stage, message) and does not stop the others. Every
file is written atomically (temporary file, then rename) with the process umask's mode.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import functools
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._files import atomic_path, output_stem
from .._version import __version__
from ..config import PreprocessConfig
from ..errors import AnatCLError
from .metrics import LOW_REGISTRATION_NCC, QC_COLUMNS, ROUTE_QC_COLUMNS, outlier_reasons, qc_metrics
from .plots import Thumbnail, make_thumbnail, render_contact_sheet, render_slices, slice_positions_mm

__all__ = ["QCItem", "QCReport", "build_qc_report", "qc_one", "readable", "write_html", "write_metrics_csv"]

logger = logging.getLogger(__name__)

SHEET_PAGE = 48  # inputs per contact-sheet page
_SLICE_COLUMNS = ("slice_x_mm", "slice_y_mm", "slice_z_mm")  # MNI positions of the picture's slices


@dataclass
class QCItem:
    """The QC outcome of one input.

    Attributes:
        path: the input as given (the file, for one volume of a 4D file).
        ok: whether it went through preprocessing.
        metrics: ``qc_*`` columns (empty when it failed).
        png: the three-slice picture (PNG bytes; empty when it failed or was written to a folder).
        image_name: file name of the picture under ``images/``.
        thumbnail: small axial view for the contact sheet.
        warnings: preparation warnings.
        stage: where it failed (``read``, ``check``, ``conform``, ``qc``...).
        error: the failure message.
        flagged: outlier flag (set once the whole cohort is known).
        reasons: why it is flagged.
        slices_mm: MNI coordinates (x, y, z) of the picture's three slices, in mm.
        volume: the volume's index, for one volume of a 4D file; else None.
    """

    path: str
    ok: bool = True
    metrics: dict[str, float | str] = field(default_factory=dict)
    png: bytes = b""
    image_name: str = ""
    thumbnail: Thumbnail | None = None
    warnings: list[str] = field(default_factory=list)
    stage: str = ""
    error: str = ""
    flagged: bool = False
    reasons: str = ""
    slices_mm: tuple[float, float, float] | None = None
    volume: int | None = None

    @property
    def label(self) -> str:
        """The input as shown: its path, followed by ``[volume i]`` for one volume of a 4D file."""
        return self.path if self.volume is None else f"{self.path}[volume {self.volume}]"


@dataclass
class QCReport:
    """Everything :func:`build_qc_report` produced.

    Attributes:
        items: one :class:`QCItem` per input, in input order.
        out_dir: the report folder.
        index: path of ``index.html``.
        metrics_csv: path of ``qc_metrics.csv``.
        contact_sheets: paths of the contact-sheet PNGs.
    """

    items: list[QCItem]
    out_dir: Path
    index: Path
    metrics_csv: Path
    contact_sheets: list[Path]

    @property
    def failed(self) -> list[QCItem]:
        """Inputs that could not be prepared."""
        return [it for it in self.items if not it.ok]

    @property
    def flagged(self) -> list[QCItem]:
        """Inputs flagged as outliers."""
        return [it for it in self.items if it.flagged]


def _caption(metrics: dict[str, float | str]) -> str:
    corr = metrics.get("qc_template_corr", float("nan"))
    cover = metrics.get("qc_brain_coverage", float("nan"))
    return (
        f"kind {metrics.get('qc_kind')} ({float(metrics.get('qc_kind_confidence', float('nan'))):.2f}), "
        f"template r {float(corr):.3f}, GM coverage {float(cover):.3f}, "
        f"range {readable(metrics.get('qc_min'))}..{readable(metrics.get('qc_max'))}, "
        f"conform {metrics.get('qc_method')}"
    )


def _title(source: str, metrics: dict[str, float | str]) -> str | None:
    """The picture's first line for a raw-T1 route: the input, then its registration's similarity (kept
    when a long path is shortened from the left)."""
    ncc = _float(metrics.get("qc_registration_ncc"))
    if math.isnan(ncc):
        return None
    low = f" LOW (< {LOW_REGISTRATION_NCC:g})" if ncc < LOW_REGISTRATION_NCC else ""
    strip = str(metrics.get("qc_skull_strip") or "")
    strip = "deepbet" if strip == "deepbet" else "none"
    return f"{source}  [affine to MNI152: NCC {ncc:.3f}{low}; skull-strip {strip}]"


def _float(value: Any) -> float:
    try:
        return float(value) if value is not None and value != "" else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def _route_sidecar(item: Any) -> dict[str, Any] | None:
    """The raw-T1 route's sidecar beside a registered image (``<name>.json``), when there is one."""
    import json

    if not isinstance(item, (str, os.PathLike)):
        return None
    path = Path(item)
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            side = path.with_name(name[: -len(ext)] + ".json")
            break
    else:
        return None
    try:
        record = json.loads(side.read_text()) if side.is_file() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("route") == "t1_to_mni" else None


def qc_one(
    item: Any,
    index: int,
    config: PreprocessConfig,
    *,
    strict: bool = False,
    images_dir: str | os.PathLike[str] | None = None,
    model_name: str | None = None,
    from_t1: Any = None,
    prep_names: Sequence[str | None] | None = None,
) -> QCItem:
    """Prepare, measure and draw one input; failures are returned, not raised.

    Args:
        item: a path, one volume of a 4D file (:class:`~anatcl_infer.inputs.io.NiftiVolume`), or anything
            :func:`~anatcl_infer.inputs.preprocess.prepare` accepts.
        index: position in the cohort (names the picture).
        config: the preprocessing spec.
        strict: refuse inputs that do not look like what the model expects.
        images_dir: where to write the PNG (``None``: keep the bytes only).
        model_name: used in kind warnings.
        from_t1: a :class:`~anatcl_infer.inputs.t1_route.T1Route` (or True): ``item`` is a raw
            T1; the route of ``config.input_kind`` runs first and the picture shows its result.
            Without it, an input with a T1-route sidecar beside it gets the route's columns too.
        prep_names: output names in the route's ``prep_dir``, by ``index``
            (:func:`~anatcl_infer.inputs.t1_route.prep_names`; default: the file's stem).

    Returns:
        A :class:`QCItem` (``ok=False`` with ``stage`` and ``error`` when it failed).

    Example:
        >>> item = qc_one("examples/data/mwp1sub-mni03_T1w.nii.gz", 0, PreprocessConfig())
        >>> item.ok, round(item.metrics["qc_template_corr"], 2), item.image_name
        (True, 0.97, '0000_mwp1sub-mni03_T1w.png')
        >>> qc_one("examples/data/missing.nii.gz", 1, PreprocessConfig()).stage
        'read'
    """
    from ..inputs.io import NiftiVolume
    from ..inputs.preprocess import describe_item, prepare

    source = describe_item(item)  # "<path>[volume i]" for a volume of a 4D file
    volume = item.index if isinstance(item, NiftiVolume) else None
    path = describe_item(item.path) if isinstance(item, NiftiVolume) else source
    route: dict[str, Any] = {}
    try:
        target = item
        if from_t1:
            from ..inputs.t1_route import as_t1_route, route_qc, run_t1_route

            name = prep_names[index] if prep_names is not None else None
            target, sidecar = run_t1_route(item, config, as_t1_route(from_t1), name=name)  # type: ignore[arg-type]
            route = route_qc(sidecar, target)
        elif (sidecar := _route_sidecar(item)) is not None:
            from ..inputs.t1_route import route_qc

            route = route_qc(sidecar, item)
        prepared = prepare(target, config, strict=strict, keep_grid=True, model_name=model_name, emit_warnings=False)
    except AnatCLError as exc:
        stage = getattr(exc, "stage", "prepare")
        message = str(exc.args[0]) if exc.args else str(exc)
        return QCItem(path=path, volume=volume, ok=False, stage=stage, error=message)
    except Exception as exc:  # any library's exception is this input's failure (and pickles back as text)
        return QCItem(path=path, volume=volume, ok=False, stage="read", error=f"{type(exc).__name__}: {exc}")
    try:
        metrics = {**qc_metrics(prepared, config=config), **route}
        name = output_stem(index, path) + ("" if volume is None else f"_vol{volume}") + ".png"
        target = None if images_dir is None else Path(images_dir) / name
        png = render_slices(prepared, target, config=config, title=_title(source, metrics), subtitle=_caption(metrics))
        if target is not None:
            png = b""  # on disk; thousands of pictures must not travel back from workers or stay in memory
        thumb = make_thumbnail(prepared, os.path.basename(source), config=config)
        slices = slice_positions_mm(prepared, config=config)
    except AnatCLError:
        raise  # a missing extra or a broken installation concerns every input: stop
    except (ValueError, MemoryError, OSError) as exc:
        return QCItem(path=path, volume=volume, ok=False, stage="qc", error=f"{type(exc).__name__}: {exc}")
    return QCItem(
        path=path, volume=volume, metrics=metrics, png=png, image_name=name, thumbnail=thumb, warnings=list(prepared.warnings),
        slices_mm=slices,
    )


def _run(task: Callable[[Any, int], QCItem], inputs: list[Any], workers: int, progress: bool) -> list[QCItem]:
    """``task(item, index)`` for every input, in this process or a process pool; results keep input order.

    Progress: a bar on a terminal, log lines (count, rate, ETA) otherwise.
    """
    from tqdm.auto import tqdm

    from ..encoding.progress import ProgressLog, bar_wanted

    meter = ProgressLog(len(inputs), progress, verb="checked", log=logger)
    out: list[QCItem] = []
    with contextlib.ExitStack() as stack:
        if workers <= 1 or len(inputs) <= 1:
            done: Iterable[QCItem] = map(task, inputs, range(len(inputs)))
        else:
            from concurrent.futures import ProcessPoolExecutor

            pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers))
            done = pool.map(task, inputs, range(len(inputs)), chunksize=1)
        for item in tqdm(done, total=len(inputs), desc="qc", unit="scan", disable=not bar_wanted(progress)):
            out.append(item)
            meter.update(int(item.ok), int(not item.ok))
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.6g}"
    return "" if value is None else str(value)


def _write_csv(path: str | os.PathLike[str], header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write a CSV file (UTF-8, ``\\n`` line ends) atomically: rows go to a temporary file renamed over ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_metrics_csv(items: Sequence[QCItem], path: str | os.PathLike[str]) -> Path:
    """Write one CSV row per input (failed ones too), atomically.

    Example:
        >>> write_metrics_csv(report.items, "qc/qc_metrics.csv")  # doctest: +SKIP
    """
    columns = list(QC_COLUMNS)
    if any(col in it.metrics for it in items for col in ROUTE_QC_COLUMNS):  # raw-T1 routes only
        columns += ROUTE_QC_COLUMNS
    header = ["path", "volume", "status", "stage", "error", "qc_flag", "qc_reasons", *columns, "image", *_SLICE_COLUMNS]
    rows = []
    for it in items:
        row = [it.path, "" if it.volume is None else it.volume, "ok" if it.ok else "failed", it.stage, it.error, str(bool(it.flagged)).lower(), it.reasons]
        row += [_fmt(it.metrics.get(col)) for col in columns]
        row.append(f"images/{it.image_name}" if it.image_name else "")
        row += [f"{v:g}" for v in it.slices_mm] if it.slices_mm else ["", "", ""]
        rows.append(row)
    return _write_csv(path, header, rows)


def readable(value: Any) -> str:
    """A number as a person reads it: 4 significant digits, scientific notation when tiny or huge.

    ``""`` for NaN or ``None``; text is returned unchanged.

    Example:
        >>> readable(4.440892098500626e-16), readable(0.97312), readable(1234567.0), readable(0.0), readable(7.0)
        ('4.4e-16', '0.9731', '1.2e+06', '0', '7')
    """
    if value is None:
        return ""
    if isinstance(value, (bool, str)):
        return str(value)
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return ""
    if v == 0:
        return "0"
    if math.isinf(v) or not 1e-3 <= abs(v) < 1e5:
        return f"{v:.2g}" if not math.isinf(v) else str(v)
    return f"{v:.4g}"


def _order(items: Sequence[QCItem]) -> list[QCItem]:
    """Failed first, then flagged (lowest template correlation first), then the rest in input order."""

    def key(pair: tuple[int, QCItem]) -> tuple[int, float, int]:
        i, it = pair
        if not it.ok:
            return (0, 0.0, i)
        if it.flagged:
            corr = it.metrics.get("qc_template_corr", float("nan"))
            corr = float(corr) if isinstance(corr, (int, float)) and not math.isnan(float(corr)) else -2.0
            return (1, corr, i)
        return (2, 0.0, i)

    return [it for _, it in sorted(enumerate(items), key=key)]


def _environment() -> Any:
    """The jinja2 environment of the report templates (autoescaping on for every template)."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("anatcl_infer.qc", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _row(it: QCItem, num: int) -> dict[str, Any]:
    """The template's view of one input: plain strings (escaped by the template), no markup."""
    m = it.metrics
    row: dict[str, Any] = {
        "num": num,
        "ok": it.ok,
        "cls": "failed" if not it.ok else ("flagged" if it.flagged else "ok"),
        "name": os.path.basename(it.label) or it.label,
        "path": it.label,
        "stage": it.stage,
        "error": it.error,
    }
    if not it.ok:
        return row
    row.update(
        kind=f"{m.get('qc_kind')} ({readable(m.get('qc_kind_confidence'))})",
        corr=readable(m.get("qc_template_corr")),
        cover=readable(m.get("qc_brain_coverage")),
        out_brain=readable(m.get("qc_signal_outside_brain")),
        out_crop=readable(m.get("qc_signal_outside_crop")),
        orient=str(m.get("qc_orientation", "")),
        range=f"{readable(m.get('qc_min'))} .. {readable(m.get('qc_max'))}",
        zeros=readable(m.get("qc_zero_fraction")),
        method=str(m.get("qc_method", "")),
        reg_ncc=readable(m.get("qc_registration_ncc")) if "qc_registration_ncc" in m else "",
        reg_low=_float(m.get("qc_registration_ncc")) < LOW_REGISTRATION_NCC,
        n_warn=len(it.warnings),
        reasons=it.reasons,
        warnings=list(it.warnings),
        metrics=", ".join(f"{k[3:]}={readable(v)}" for k, v in m.items() if k != "qc_warnings"),
        image=f"images/{it.image_name}" if it.image_name else "",
    )
    if it.slices_mm:
        row["metrics"] += ", slices_mm=" + "/".join(f"{v:g}" for v in it.slices_mm)
    return row


def write_html(
    items: Sequence[QCItem],
    path: str | os.PathLike[str],
    *,
    config: PreprocessConfig,
    contact_sheets: Sequence[str] = (),
    title: str = "anatcl-infer QC report",
    model: str = "",
) -> Path:
    """Write ``index.html`` from the package's jinja2 template (autoescaped), atomically.

    Pictures are linked, not embedded: ``images/<name>.png`` of each item and the
    ``contact_sheets`` (file names relative to the page's folder), so the page stays a
    few hundred bytes per input however large the cohort. Every file name, warning and
    error message is escaped.

    Example:
        >>> write_html(report.items, "qc/index.html", config=PreprocessConfig())  # doctest: +SKIP
    """
    numbers = {id(it): i for i, it in enumerate(items)}
    page = _environment().get_template("report.html.j2").render(
        title=title,
        model=model,
        config=config,
        grid_shape=str(tuple(config.grid_shape)),
        crop=str(tuple(tuple(c) for c in config.crop)),
        model_input_shape=str(tuple(config.model_input_shape)),
        n_inputs=len(items),
        n_failed=sum(not it.ok for it in items),
        n_flagged=sum(it.flagged for it in items),
        show_reg=any("qc_registration_ncc" in it.metrics for it in items),
        low_reg=LOW_REGISTRATION_NCC,
        rows=[_row(it, numbers[id(it)]) for it in _order(items)],
        sheets=[str(s) for s in contact_sheets],
        version=__version__,
        stamp=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    with atomic_path(path) as tmp:
        tmp.write_bytes(page.encode("utf-8"))
    return Path(path)


def build_qc_report(
    inputs: Iterable[Any],
    out_dir: str | os.PathLike[str],
    *,
    config: PreprocessConfig | None = None,
    strict: bool = False,
    workers: int = 1,
    model_name: str | None = None,
    progress: bool = False,
    failures: Sequence[tuple[str, str, str]] = (),
    from_t1: Any = None,
    skipped: Mapping[str, str] | None = None,
) -> QCReport:
    """QC a cohort: pictures, metrics, flags, a contact sheet and one HTML page.

    Args:
        inputs: paths (or anything :func:`~anatcl_infer.inputs.preprocess.prepare` accepts); a path
            to a 4D file of N volumes is N inputs (:func:`~anatcl_infer.inputs.preprocess.split_volumes`).
        out_dir: the report folder (created; existing files of a previous run are replaced).
        config: the preprocessing spec (default: the published grey-matter spec).
        strict: refuse inputs whose kind is not what the model expects (reported as failed).
        workers: processes preparing and drawing in parallel (1: in this process).
        model_name: shown in the report and in kind warnings.
        progress: show progress: a bar on a terminal, else a log line every 30 s.
        failures: ``(path, stage, message)`` of inputs that failed before this step
            (e.g. discovery), reported with the others.
        from_t1: the inputs are raw T1s: ``True`` or a
            :class:`~anatcl_infer.inputs.t1_route.T1Route`; each goes through the route of
            ``config.input_kind`` first (see :func:`qc_one`). Tools are checked once, first.
        skipped: ``{path: reason}`` of inputs that ``anatcl embed`` would leave out of a folder
            (``discover_inputs(..., skipped=...)``): checked like the others and flagged with
            ``skipped by anatcl embed: <reason>``. They do not count in the cohort's outlier statistics.

    Returns:
        A :class:`QCReport`.

    Raises:
        MissingDependencyError: matplotlib (the ``[qc]`` extra) is not installed.

    Example:
        >>> import tempfile
        >>> report = build_qc_report(["examples/data/mwp1sub-mni01_T1w.nii.gz"], tempfile.mkdtemp())
        >>> report.index.name, len(report.failed), len(report.flagged)
        ('index.html', 0, 0)
    """
    from .plots import _matplotlib

    _matplotlib()  # fail early, before any work, when the extra is missing
    from ..inputs.preprocess import split_volumes

    config = config or PreprocessConfig()
    inputs = [v for item in inputs for v in (split_volumes(item) if isinstance(item, (str, os.PathLike)) else [item])]
    if from_t1:
        from ..inputs.t1_route import as_t1_route, check_t1_route

        from_t1 = as_t1_route(from_t1)
        check_t1_route(config, from_t1)
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = None
    if from_t1:
        from ..inputs.t1_route import prep_names

        names = prep_names(inputs)
    task = functools.partial(
        qc_one, config=config, strict=strict, images_dir=str(images), model_name=model_name,
        from_t1=from_t1 or None, prep_names=names,
    )
    items = [QCItem(path=p, ok=False, stage=s, error=e) for p, s, e in failures]
    items += _run(task, inputs, max(1, int(workers)), progress)
    for it in items:
        if not it.ok:
            logger.warning("%s: failed at %s: %s", it.label, it.stage, it.error)

    ok = [it for it in items if it.ok]
    left_out = {os.path.abspath(k): v for k, v in (skipped or {}).items()}
    cohort = [it for it in ok if os.path.abspath(it.path) not in left_out]
    reasons = outlier_reasons([it.metrics for it in cohort], expected_kind=config.input_kind) if cohort else []
    whys = {id(it): why for it, why in zip(cohort, reasons)}
    for it in ok:
        why = whys.get(id(it), "")
        if os.path.abspath(it.path) in left_out:
            extra = outlier_reasons([it.metrics], expected_kind=config.input_kind)[0]
            why = "; ".join(w for w in (f"skipped by anatcl embed: {left_out[os.path.abspath(it.path)]}", extra) if w)
        it.reasons = why
        it.flagged = bool(why)
        if it.thumbnail is not None:
            it.thumbnail.flagged = it.flagged
        if why:
            logger.warning("%s: flagged: %s", it.label, why)
    for it in items:
        if not it.ok and os.path.abspath(it.path) in left_out:
            it.reasons = f"skipped by anatcl embed: {left_out[os.path.abspath(it.path)]}"

    sheet_paths: list[Path] = []
    thumbs = [it.thumbnail for it in _order(ok) if it.thumbnail is not None]
    pages = [thumbs[k : k + SHEET_PAGE] for k in range(0, len(thumbs), SHEET_PAGE)]
    for k, page in enumerate(pages):
        name = "contact_sheet.png" if len(pages) == 1 else f"contact_sheet_{k + 1:02d}.png"
        title = f"central axial slice of the model input, flagged first ({k * SHEET_PAGE + 1}-{k * SHEET_PAGE + len(page)} of {len(thumbs)})"
        render_contact_sheet(page, out / name, title=title)
        sheet_paths.append(out / name)
    metrics_csv = write_metrics_csv(items, out / "qc_metrics.csv")
    index = write_html(
        items, out / "index.html", config=config, contact_sheets=[p.name for p in sheet_paths], model=model_name or ""
    )
    logger.info(
        "QC of %d inputs: %d flagged, %d failed; report %s", len(items), sum(it.flagged for it in items), len(items) - len(ok), index
    )
    return QCReport(items=items, out_dir=out, index=index, metrics_csv=metrics_csv, contact_sheets=sheet_paths)
