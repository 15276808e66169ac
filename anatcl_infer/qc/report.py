"""The QC report: run every input through the preprocessing, measure, draw, write one page.

:func:`build_qc_report` is what ``anatcl qc`` runs. For each input it calls
:func:`~anatcl_infer.inputs.preprocess.prepare` (keeping the conformed grid), computes
:func:`~anatcl_infer.qc.qc_metrics`, draws the three-slice picture; then it flags the
cohort's outliers and writes, in ``out_dir``:

* ``index.html`` — one self-contained page (pictures embedded as data URIs, inline
  CSS): failed inputs first, then flagged ones, then the rest;
* ``qc_metrics.csv`` — one row per input: ``path``, ``status``, ``stage``, ``error``,
  ``qc_flag``, ``qc_reasons`` and every ``qc_*`` metric;
* ``images/NNNN_<name>.png`` — the three-slice picture of each input;
* ``contact_sheet.png`` (``contact_sheet_NN.png`` past 48 inputs).

One bad input is recorded (path, stage, message) and does not stop the others. Every
file is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..config import PreprocessConfig
from ..errors import AnatCLError
from .metrics import QC_COLUMNS, outlier_reasons, qc_metrics
from .plots import (
    Thumbnail,
    make_thumbnail,
    render_contact_sheet,
    render_slices,
    write_atomic,
)

__all__ = ["QCItem", "QCReport", "build_qc_report", "qc_one", "write_html", "write_metrics_csv"]

logger = logging.getLogger(__name__)

SHEET_PAGE = 48  # inputs per contact-sheet page
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class QCItem:
    """The QC outcome of one input.

    Attributes:
        path: the input as given.
        ok: whether it went through preprocessing.
        metrics: ``qc_*`` columns (empty when it failed).
        png: the three-slice picture (PNG bytes, empty when it failed).
        image_name: file name of the picture under ``images/``.
        thumbnail: small axial view for the contact sheet.
        warnings: preparation warnings.
        stage: where it failed (``read``, ``check``, ``conform``, ``qc``...).
        error: the failure message.
        flagged: outlier flag (set once the whole cohort is known).
        reasons: why it is flagged.
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


def _image_name(index: int, path: str) -> str:
    name = os.path.basename(str(path).rstrip("/\\")) or "input"
    for ext in (".nii.gz", ".nii", ".npy", ".mgz"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return f"{index:04d}_{_SAFE.sub('_', name)[:80]}.png"


def _caption(metrics: dict[str, float | str]) -> str:
    corr = metrics.get("qc_template_corr", float("nan"))
    cover = metrics.get("qc_brain_coverage", float("nan"))
    return (
        f"kind {metrics.get('qc_kind')} ({float(metrics.get('qc_kind_confidence', float('nan'))):.2f}), "
        f"template r {float(corr):.3f}, GM coverage {float(cover):.3f}, "
        f"range {float(metrics.get('qc_min', float('nan'))):.3g}..{float(metrics.get('qc_max', float('nan'))):.3g}, "
        f"conform {metrics.get('qc_method')}"
    )


def qc_one(
    item: Any,
    index: int,
    config: PreprocessConfig,
    *,
    strict: bool = False,
    images_dir: str | os.PathLike[str] | None = None,
    model_name: str | None = None,
) -> QCItem:
    """Prepare, measure and draw one input; failures are returned, not raised.

    Args:
        item: a path (or anything :func:`~anatcl_infer.inputs.preprocess.prepare` accepts).
        index: position in the cohort (names the picture).
        config: the preprocessing spec.
        strict: refuse inputs that do not look like what the model expects.
        images_dir: where to write the PNG (``None``: keep the bytes only).
        model_name: used in kind warnings.

    Returns:
        A :class:`QCItem` (``ok=False`` with ``stage`` and ``error`` when it failed).

    Example:
        >>> item = qc_one("examples/data/mwp1sub-mni03_T1w.nii.gz", 0, PreprocessConfig())
        >>> item.ok, round(item.metrics["qc_template_corr"], 2), item.image_name
        (True, 0.97, '0000_mwp1sub-mni03_T1w.png')
        >>> qc_one("examples/data/missing.nii.gz", 1, PreprocessConfig()).stage
        'read'
    """
    from ..inputs.preprocess import describe_item, prepare

    source = describe_item(item)
    try:
        prepared = prepare(item, config, strict=strict, keep_grid=True, model_name=model_name, emit_warnings=False)
    except AnatCLError as exc:
        stage = getattr(exc, "stage", "prepare")
        message = str(exc.args[0]) if exc.args else str(exc)
        return QCItem(path=source, ok=False, stage=stage, error=message)
    except Exception as exc:  # any library's exception is this input's failure (and pickles back as text)
        return QCItem(path=source, ok=False, stage="read", error=f"{type(exc).__name__}: {exc}")
    try:
        metrics = qc_metrics(prepared, config=config)
        name = _image_name(index, source)
        target = None if images_dir is None else Path(images_dir) / name
        png = render_slices(prepared, target, config=config, subtitle=_caption(metrics))
        thumb = make_thumbnail(prepared, os.path.basename(source), config=config)
    except AnatCLError:
        raise  # a missing extra or a broken installation concerns every input: stop
    except (ValueError, MemoryError, OSError) as exc:
        return QCItem(path=source, ok=False, stage="qc", error=f"{type(exc).__name__}: {exc}")
    return QCItem(
        path=source, metrics=metrics, png=png, image_name=name, thumbnail=thumb, warnings=list(prepared.warnings)
    )


def _qc_task(args: tuple[Any, ...]) -> QCItem:
    """Process-pool entry point (top level, so it pickles)."""
    item, index, config, strict, images_dir, model_name = args
    return qc_one(item, index, config, strict=strict, images_dir=images_dir, model_name=model_name)


def _run(tasks: list[tuple[Any, ...]], workers: int, progress: bool) -> list[QCItem]:
    """Run tasks in order, in this process or a pool; results keep input order."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc="qc", unit="scan")
    results: list[QCItem] = []
    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                results.append(_qc_task(task))
                if bar is not None:
                    bar.update(1)
        else:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=workers) as pool:
                for res in pool.map(_qc_task, tasks, chunksize=1):
                    results.append(res)
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return results


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.6g}"
    return "" if value is None else str(value)


def write_metrics_csv(items: Sequence[QCItem], path: str | os.PathLike[str]) -> Path:
    """Write one CSV row per input (failed ones too), atomically.

    Example:
        >>> write_metrics_csv(report.items, "qc/qc_metrics.csv")  # doctest: +SKIP
    """
    header = ["path", "status", "stage", "error", "qc_flag", "qc_reasons", *QC_COLUMNS, "image"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for it in items:
        row = [it.path, "ok" if it.ok else "failed", it.stage, it.error, str(bool(it.flagged)).lower(), it.reasons]
        row += [_fmt(it.metrics.get(col)) for col in QC_COLUMNS]
        row.append(f"images/{it.image_name}" if it.image_name else "")
        writer.writerow(row)
    return write_atomic(path, buf.getvalue().encode("utf-8"))


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em;color:#1d1d1f;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.4em 0 .5em}
.summary span{display:inline-block;margin-right:1.2em;padding:.2em .6em;border-radius:4px;background:#e8e8ed}
.summary .bad{background:#fde2df;color:#8a1c10}.summary .warn{background:#fff1c2;color:#6b4e00}
table{border-collapse:collapse;font-size:.85em;background:white}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f0f0f3;position:sticky;top:0}
tr.failed td{background:#fde2df}tr.flagged td{background:#fff6d6}
.card{background:white;border:1px solid #ddd;border-radius:6px;margin:1em 0;padding:.8em}
.card.failed{border-left:6px solid #c0392b}.card.flagged{border-left:6px solid #e6a700}.card.ok{border-left:6px solid #2e8b57}
.card h3{font-size:1em;margin:0 0 .4em;word-break:break-all}
.card img{max-width:100%;height:auto;display:block}
.reasons{color:#8a1c10;font-weight:600}.warnings{color:#6b4e00}
.metrics{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.8em;color:#333}
.sheet img{max-width:100%;height:auto;border:1px solid #ddd}
.note{color:#555;font-size:.85em;max-width:70em}
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


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


def write_html(
    items: Sequence[QCItem],
    path: str | os.PathLike[str],
    *,
    config: PreprocessConfig,
    contact_sheets: Sequence[bytes] = (),
    title: str = "anatcl-infer QC report",
    model: str = "",
) -> Path:
    """Write the single self-contained ``index.html`` (no external assets), atomically.

    Example:
        >>> write_html(report.items, "qc/index.html", config=PreprocessConfig())  # doctest: +SKIP
    """
    esc = html.escape
    ordered = _order(items)
    n_fail = sum(not it.ok for it in items)
    n_flag = sum(it.flagged for it in items)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        (
            '<p class="summary">'
            f"<span>{len(items)} inputs</span><span>{len(items) - n_fail} prepared</span>"
            f'<span class="{"warn" if n_flag else ""}">{n_flag} flagged</span>'
            f'<span class="{"bad" if n_fail else ""}">{n_fail} failed</span></p>'
        ),
        (
            f'<p class="note">Preprocessing spec{(" of " + esc(model)) if model else ""}: input kind '
            f"<b>{esc(config.input_kind)}</b>, grid {esc(str(tuple(config.grid_shape)))}, crop "
            f"{esc(str(tuple(tuple(c) for c in config.crop)))}, model input {esc(str(tuple(config.model_input_shape)))}, "
            f"intensity {esc(config.intensity)}. Pictures show the conformed grid in neurological orientation "
            "(subject's left on the left), the dashed yellow box is exactly what the model receives and the cyan "
            "line is the outline of the reference brain (MNI152). Flags: template correlation below 0.5 or a robust "
            "z-score below -3.5 within this cohort, low grey-matter coverage (robust z &lt; -3.5), brain signal outside "
            "the crop box, a better match with the template flipped front/back or up/down, or an input kind other "
            f"than the model expects. anatcl-infer {esc(__version__)}, {stamp}.</p>"
        ),
        (
            "<h2>Summary</h2><table><thead><tr><th>#</th><th>input</th><th>status</th><th>kind</th>"
            "<th>template r</th><th>GM coverage</th><th>outside brain</th><th>outside crop</th><th>orientation</th>"
            "<th>range</th><th>zeros</th><th>conform</th><th>warnings</th><th>flag / error</th></tr></thead><tbody>"
        ),
    ]
    anchors = {id(it): f"item{i}" for i, it in enumerate(items)}
    numbers = {id(it): i for i, it in enumerate(items)}
    for it in ordered:
        m = it.metrics
        cls = "failed" if not it.ok else ("flagged" if it.flagged else "ok")
        num = numbers[id(it)]
        if it.ok:
            cells = [
                f"{esc(str(m.get('qc_kind')))} ({float(m.get('qc_kind_confidence', float('nan'))):.2f})",
                _fmt(m.get("qc_template_corr"))[:6],
                _fmt(m.get("qc_brain_coverage"))[:6],
                _fmt(m.get("qc_signal_outside_brain"))[:6],
                _fmt(m.get("qc_signal_outside_crop"))[:6],
                esc(str(m.get("qc_orientation", ""))),
                f"{_fmt(m.get('qc_min'))[:7]} .. {_fmt(m.get('qc_max'))[:7]}",
                _fmt(m.get("qc_zero_fraction"))[:6],
                esc(str(m.get("qc_method"))),
                str(len(it.warnings)),
                esc(it.reasons),
            ]
            status = "flagged" if it.flagged else "ok"
        else:
            cells = [""] * 10 + [f"{esc(it.stage)}: {esc(it.error)}"]
            status = "failed"
        parts.append(
            f'<tr class="{cls}"><td>{num}</td><td><a href="#{anchors[id(it)]}">{esc(os.path.basename(it.path) or it.path)}'
            f"</a></td><td>{status}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
        )
    parts.append("</tbody></table>")
    if contact_sheets:
        parts.append("<h2>Contact sheet</h2>")
        for k, png in enumerate(contact_sheets):
            parts.append(f'<div class="sheet"><img alt="contact sheet {k + 1}" src="{_data_uri(png)}"></div>')
    parts.append("<h2>Inputs</h2>")
    for it in ordered:
        cls = "failed" if not it.ok else ("flagged" if it.flagged else "ok")
        parts.append(f'<div class="card {cls}" id="{anchors[id(it)]}"><h3>{esc(it.path)}</h3>')
        if not it.ok:
            parts.append(f'<p class="reasons">failed at {esc(it.stage)}: {esc(it.error)}</p></div>')
            continue
        if it.reasons:
            parts.append(f'<p class="reasons">flagged: {esc(it.reasons)}</p>')
        for w in it.warnings:
            parts.append(f'<p class="warnings">warning: {esc(w)}</p>')
        metrics = ", ".join(f"{k[3:]}={esc(_fmt(v))}" for k, v in it.metrics.items() if k != "qc_warnings")
        parts.append(f'<p class="metrics">{metrics}</p>')
        if it.png:
            parts.append(f'<img alt="{esc(os.path.basename(it.path))}" src="{_data_uri(it.png)}">')
        parts.append("</div>")
    parts.append("</body></html>\n")
    return write_atomic(path, "\n".join(parts).encode("utf-8"))


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
) -> QCReport:
    """QC a cohort: pictures, metrics, flags, a contact sheet and one HTML page.

    Args:
        inputs: paths (or anything :func:`~anatcl_infer.inputs.preprocess.prepare` accepts).
        out_dir: the report folder (created; existing files of a previous run are replaced).
        config: the preprocessing spec (default: the published grey-matter spec).
        strict: refuse inputs whose kind is not what the model expects (reported as failed).
        workers: processes preparing and drawing in parallel (1: in this process).
        model_name: shown in the report and in kind warnings.
        progress: show a progress bar.
        failures: ``(path, stage, message)`` of inputs that failed before this step
            (e.g. discovery), reported with the others.

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
    config = config or PreprocessConfig()
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    inputs = list(inputs)
    tasks = [(item, i, config, strict, str(images), model_name) for i, item in enumerate(inputs)]
    items = [QCItem(path=p, ok=False, stage=s, error=e) for p, s, e in failures]
    items += _run(tasks, max(1, int(workers)), progress)
    for it in items:
        if not it.ok:
            logger.warning("%s: failed at %s: %s", it.path, it.stage, it.error)

    ok = [it for it in items if it.ok]
    reasons = outlier_reasons([it.metrics for it in ok], expected_kind=config.input_kind) if ok else []
    for it, why in zip(ok, reasons):
        it.reasons = why
        it.flagged = bool(why)
        if it.thumbnail is not None:
            it.thumbnail.flagged = it.flagged
        if why:
            logger.warning("%s: flagged: %s", it.path, why)

    sheets: list[bytes] = []
    sheet_paths: list[Path] = []
    thumbs = [it.thumbnail for it in _order(ok) if it.thumbnail is not None]
    pages = [thumbs[k : k + SHEET_PAGE] for k in range(0, len(thumbs), SHEET_PAGE)]
    for k, page in enumerate(pages):
        name = "contact_sheet.png" if len(pages) == 1 else f"contact_sheet_{k + 1:02d}.png"
        title = f"central axial slice of the model input, flagged first ({k * SHEET_PAGE + 1}-{k * SHEET_PAGE + len(page)} of {len(thumbs)})"
        sheets.append(render_contact_sheet(page, out / name, title=title))
        sheet_paths.append(out / name)
    metrics_csv = write_metrics_csv(items, out / "qc_metrics.csv")
    index = write_html(items, out / "index.html", config=config, contact_sheets=sheets, model=model_name or "")
    logger.info(
        "QC of %d inputs: %d flagged, %d failed; report %s", len(items), sum(it.flagged for it in items), len(items) - len(ok), index
    )
    return QCReport(items=items, out_dir=out, index=index, metrics_csv=metrics_csv, contact_sheets=sheet_paths)
