"""From a raw (native-space) T1 to what a model expects: one entry point, the route set by the model.

:func:`prepare_t1` is what ``encode(..., from_t1=True)`` and ``anatcl embed --from-t1`` call
for each input (in the loader workers, so it overlaps with the forward pass). The model's
``PreprocessConfig.input_kind`` picks the route:

* ``gm`` (the published models): **deepmriprep** makes a CAT12-style ``mwp1`` grey-matter
  map (:func:`anatcl_infer.inputs.raw_t1.t1_to_gm`). Its network weights are downloaded from
  GitHub on first use; offline, :func:`check_t1_route` says which files are missing and how
  to get them, once, before any input is read.
* ``t1``: optional **deepbet** skull-stripping (weights inside its wheel: works offline), then
  **SimpleITK** affine registration to the packaged MNI152 T1
  (:func:`anatcl_infer.inputs.registration.register_volume`) and trilinear resampling onto
  the model's grid. ``skull_strip=None`` decides per input (:func:`looks_skull_stripped`:
  an already skull-stripped image has a large background at exactly its minimum value and
  a brain-sized foreground); the decision and its reason go to the log and the sidecar. A
  registration whose similarity to the template is below ``min_ncc`` is a failure of that
  input (:class:`~anatcl_infer.errors.InputError`, ``stage="register"``), never a misplaced
  brain.

Intensity normalisation, cropping and padding then follow the model's spec in
:func:`anatcl_infer.inputs.preprocess.prepare`, as for every other input.

With a ``prep_dir`` the registered image (``<name>_space-MNI152aff_T1w.nii.gz``) or the map
(``mwp1<name>.nii.gz``) is kept there with a JSON sidecar (source path and SHA-256, tool
versions, skull-strip decision, transform, similarity to the template, grid), and reused
(``resume=True``) when the source's SHA-256, the grid and the skull-strip choice still match.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._files import atomic_path, regular_file_sha256
from .._version import __version__
from ..config import PreprocessConfig
from ..errors import AnatCLError, ConfigError, InputError, MissingDependencyError
from . import raw_t1 as _raw
from .registration import MIN_REGISTRATION_NCC, register_volume, require_tool, tool_version

__all__ = [
    "ROUTES",
    "T1Route",
    "as_t1_route",
    "check_t1_route",
    "looks_skull_stripped",
    "prep_names",
    "prepare_t1",
    "route_qc",
    "run_t1_route",
]

logger = logging.getLogger(__name__)

#: The route of each input kind, as recorded in the sidecars.
ROUTES = {"gm": "t1_to_gm", "t1": "t1_to_mni"}
_ROUTE_VERSION = 1  # bump when a change makes earlier registered images stale
_MIN_BACKGROUND = 0.3  # fraction of voxels at exactly the minimum for "already skull-stripped"
_BRAIN_ML = (400.0, 2600.0)  # foreground volume of a skull-stripped brain (a head with skull is larger)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class T1Route:
    """How raw T1s become model inputs; picklable, so it travels to loader workers.

    Attributes:
        prep_dir: folder for the registered images / maps and their sidecars (None: kept in
            memory only, nothing written, nothing reused).
        skull_strip: ``True``/``False`` force deepbet on or off; ``None`` decides per input
            (off for inputs that are already skull-stripped). ``t1`` route only.
        resume: reuse what ``prep_dir`` holds when its sidecar still matches the source.
        device: device of deepbet/deepmriprep (``"cpu"``, ``"cuda"``...).
        min_ncc: a registration less similar than this to the template fails its input.
        threads: ITK threads of the registration (None: ITK's choice, 1 in a loader worker).
        seed: seed of the registration's metric sampling.
        iterations: registration optimiser iterations per level.
        allow_download: let deepmriprep fetch its weights (``gm`` route; needs internet).

    Example:
        >>> T1Route(prep_dir="derivatives/anatcl-prep", skull_strip=None).min_ncc
        0.7
    """

    prep_dir: str | None = None
    skull_strip: bool | None = None
    resume: bool = True
    device: str = "cpu"
    min_ncc: float = MIN_REGISTRATION_NCC
    threads: int | None = None
    seed: int = 1234
    iterations: int = 200
    allow_download: bool = False

    def __post_init__(self) -> None:
        if self.prep_dir is not None:
            object.__setattr__(self, "prep_dir", os.fspath(self.prep_dir))
        if self.skull_strip not in (None, True, False):
            raise ConfigError(f"skull_strip must be True, False or None (decide per input), got {self.skull_strip!r}")
        if isinstance(self.min_ncc, bool) or not isinstance(self.min_ncc, (int, float)) or not -1.0 <= self.min_ncc <= 1.0:
            raise ConfigError(f"min_ncc must be a number in [-1, 1], got {self.min_ncc!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ConfigError(f"iterations must be a positive integer, got {self.iterations!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed <= 0:
            raise ConfigError(f"seed must be a positive integer (ITK takes 0 as 'seed from the clock'), got {self.seed!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"threads must be a positive integer or None, got {self.threads!r}")


def as_t1_route(value: bool | T1Route | None) -> T1Route | None:
    """``from_t1=`` as given to ``encode``: False/None -> None, True -> the defaults, a T1Route as is."""
    if value is None or value is False:
        return None
    if value is True:
        return T1Route()
    if isinstance(value, T1Route):
        return value
    raise ConfigError(f"from_t1 must be True, False or a T1Route, got {type(value).__name__}")


# --- checks and names ------------------------------------------------------------------------------


def check_t1_route(spec: PreprocessConfig, route: T1Route | None = None) -> None:
    """Fail once, before any input is read, when the route of ``spec.input_kind`` cannot run here.

    Raises:
        MissingDependencyError: a tool of the ``[prep]`` extra, or deepmriprep's weights (``gm``
            route, offline), or deepbet's weights are missing; the message says how to get them.

    Example:
        >>> check_t1_route(PreprocessConfig(input_kind="t1"))  # doctest: +SKIP
    """
    route = route or T1Route()
    if spec.input_kind == "gm":
        require_tool("deepmriprep", "deepmriprep")
        missing = _raw.missing_deepmriprep_models()
        if missing and not route.allow_download:
            raise MissingDependencyError(_raw._missing_models_message(missing), package="deepmriprep weights", extra="prep")
        return
    require_tool("SimpleITK", "SimpleITK")
    if route.skull_strip:
        _deepbet()


def _safe_stem(path: str | os.PathLike[str]) -> str:
    return _UNSAFE.sub("_", _raw._stem(Path(path)))[:120] or "input"


def prep_names(items: list[Any]) -> list[str | None]:
    """Output names in ``prep_dir`` for a list of inputs: the file's stem, made unique.

    Two inputs with the same file name in different folders get a short hash of their
    absolute path appended, so neither overwrites the other and reruns find them again.
    Items that are not paths get ``None`` (named where they are prepared).

    Example:
        >>> prep_names(["a/sub-01_T1w.nii.gz", "b/sub-02_T1w.nii.gz"])
        ['sub-01_T1w', 'sub-02_T1w']
    """
    stems = [_safe_stem(i) if isinstance(i, (str, os.PathLike)) else None for i in items]
    counts: dict[str, int] = {}
    for s in stems:
        if s is not None:
            counts[s] = counts.get(s, 0) + 1
    out: list[str | None] = []
    for item, stem in zip(items, stems):
        if stem is not None and counts[stem] > 1:
            digest = hashlib.sha256(os.path.abspath(os.fspath(item)).encode("utf-8", "surrogateescape")).hexdigest()[:8]
            stem = f"{stem}_{digest}"
        out.append(stem)
    return out


# --- skull-stripping -------------------------------------------------------------------------------


def looks_skull_stripped(data: np.ndarray, affine: np.ndarray) -> tuple[bool, str]:
    """Whether a T1 is obviously skull-stripped already, and why.

    Rule: at least 30 % of the voxels sit at exactly the image's minimum (a masked
    background, not scanner noise) and the rest measures 0.4-2.6 litres, a brain's
    volume; a head with its skull and scalp measures well above 3 litres.

    Example:
        >>> vol = np.zeros((100, 100, 100), np.float32); vol[30:70, 25:75, 30:70] = 1.0
        >>> looks_skull_stripped(vol, np.diag([1.5, 1.5, 1.5, 1.0]))[0]
        True
    """
    arr = np.asarray(data)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return False, "no finite voxels"
    vmin, vmax = float(finite.min()), float(finite.max())
    tol = 1e-6 * max(1.0, abs(vmax - vmin))
    background = np.count_nonzero(finite <= vmin + tol)
    frac = background / arr.size
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    litres = (finite.size - background) * voxel_ml / 1000.0
    lo, hi = _BRAIN_ML[0] / 1000.0, _BRAIN_ML[1] / 1000.0
    stripped = frac >= _MIN_BACKGROUND and lo <= litres <= hi
    what = "already skull-stripped" if stripped else "not skull-stripped"
    return stripped, (
        f"{what}: {frac:.0%} of the voxels are background at the minimum value (skull-stripped: >= {_MIN_BACKGROUND:.0%}) "
        f"and the foreground measures {litres:.2f} l (a brain: {lo:g}-{hi:g} l)"
    )


_EXTRACTORS: dict[tuple[str, int], Any] = {}


def _deepbet() -> Any:
    """deepbet's module, with its weights checked."""
    bet = require_tool("deepbet", "deepbet")
    absent = [str(p) for p in _raw._deepbet_weights() if not p.is_file()]
    if absent:
        raise MissingDependencyError(
            f"deepbet is installed without its weights ({', '.join(absent)}); reinstall it with "
            "`pip install --force-reinstall deepbet` (the weights ship inside its wheel)",
            package="deepbet",
            extra="prep",
        )
    return bet


def _extractor(device: str) -> Any:
    """One deepbet extractor per process and device (loading its two networks costs ~0.3 s)."""
    bet = _deepbet()
    key = (device, id(bet.BrainExtraction))
    if key not in _EXTRACTORS:
        weights = _raw._deepbet_weights()
        _EXTRACTORS[key] = bet.BrainExtraction(no_gpu=device == "cpu", model_path=str(weights[0]), bbox_model_path=str(weights[1]))
    return _EXTRACTORS[key]


def _strip(data: np.ndarray, affine: np.ndarray, device: str, path: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """deepbet on an in-memory T1: the brain (same grid, zeros outside), its mask and what the sidecar records."""
    import nibabel as nib

    extractor = _extractor(device)
    try:
        brain, mask, tiv = extractor.run(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine))
    except (MemoryError, AnatCLError):
        raise
    except Exception as exc:  # deepbet/torch failures on this scan
        raise InputError(f"skull-stripping (deepbet) failed: {type(exc).__name__}: {exc}", path=path, stage="skull-strip") from exc
    brain_data = np.asarray(brain.get_fdata(dtype=np.float32))
    mask_data = np.asarray(mask.dataobj).astype(bool)
    volume_ml = float(tiv)
    if volume_ml < _BRAIN_ML[0] / 2:
        raise InputError(
            f"skull-stripping (deepbet) kept only {volume_ml:.0f} ml, not a brain; check that the image is a T1 of a head",
            path=path,
            stage="skull-strip",
        )
    return brain_data, mask_data, {
        "step": "skull-stripping",
        "tool": "deepbet",
        "version": tool_version("deepbet"),
        "weights": "shipped in the deepbet wheel",
        "device": device,
        "brain_volume_ml": round(volume_ml, 1),
    }


# --- sidecars and reuse ----------------------------------------------------------------------------


def _sidecar_path(nifti: Path) -> Path:
    return nifti.with_name(_raw._stem(nifti) + ".json")


def _grid(spec: PreprocessConfig) -> dict[str, Any]:
    return {"shape": list(spec.grid_shape), "affine": [list(map(float, r)) for r in spec.grid_affine]}


def _reusable(target: Path, sha: str | None, spec: PreprocessConfig, skull_strip: bool | None, route: str) -> dict[str, Any] | None:
    """The sidecar of an earlier output that still fits this source and spec, else None (and why, in the log)."""
    side = _sidecar_path(target)
    if sha is None or not target.is_file() or not side.is_file():
        return None
    try:
        record = json.loads(side.read_text())
    except (OSError, ValueError):
        logger.info("%s: unreadable sidecar, making it again", side)
        return None
    why = None
    if not isinstance(record, dict) or record.get("route") != route:
        why = "another route made it"
    elif record.get("source_sha256") != sha:
        why = "the source changed (SHA-256)"
    elif route == ROUTES["t1"] and record.get("route_version") != _ROUTE_VERSION:
        why = "an older version of the route made it"
    elif route == ROUTES["t1"] and record.get("grid") != _grid(spec):
        why = "it is on another grid"
    elif route == ROUTES["t1"] and skull_strip is not None and record.get("skull_strip", {}).get("done") != skull_strip:
        why = f"it was made with skull-stripping {'off' if skull_strip else 'on'}"
    if why:
        logger.info("%s: not reused (%s); making it again", target, why)
        return None
    return record


def _write_sidecar(nifti: Path, record: dict[str, Any]) -> dict[str, Any]:
    record = {
        **record,
        "output": nifti.name,
        "anatcl_infer_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_path(_sidecar_path(nifti)) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return record


# --- the routes ------------------------------------------------------------------------------------


def _source(item: Any) -> tuple[str, str | None]:
    """A path input's printable name and SHA-256; in-memory images have no hash (never reused)."""
    from .preprocess import describe_item

    if isinstance(item, (str, os.PathLike)):
        p = Path(item)
        if not p.is_file():
            raise InputError("does not exist; check the path", path=str(p), stage="read")
        try:
            return str(p.resolve()), regular_file_sha256(p)
        except OSError as exc:
            raise InputError(f"cannot be read: {exc}", path=str(p), stage="read") from None
    if hasattr(item, "dataobj") and hasattr(item, "affine"):
        return describe_item(item), None
    raise InputError(
        "the raw-T1 route takes NIfTI paths or nibabel images; arrays without a header cannot be registered",
        path=describe_item(item),
        stage="read",
    )


def _prepare_gm(item: Any, name: str | None, prep_dir: Path | None, resume: bool, device: str, allow_download: bool) -> tuple[Any, dict[str, Any]]:
    """The grey-matter route: deepmriprep's mwp1 map (written by raw_t1.t1_to_gm, reused when it matches)."""
    import nibabel as nib

    source, sha = _source(item)
    if not isinstance(item, (str, os.PathLike)):
        raise InputError("the grey-matter route (deepmriprep) needs a NIfTI file, not an in-memory image", path=source, stage="read")
    name = name or _safe_stem(item)
    if prep_dir is not None:
        target = prep_dir / f"mwp1{name}.nii.gz"
        record = _reusable(target, sha, PreprocessConfig(), None, ROUTES["gm"]) if resume else None
        if record is not None:
            logger.info("%s: reusing %s", source, target)
            return target, record
        out = _raw.t1_to_gm(item, prep_dir, device=device, allow_download=allow_download, name=name)
        return out, json.loads(_sidecar_path(out).read_text())
    with tempfile.TemporaryDirectory() as work:
        out = _raw.t1_to_gm(item, work, device=device, allow_download=allow_download, name=name)
        img = nib.load(str(out))
        img = nib.Nifti1Image(np.asarray(img.get_fdata(dtype=np.float32)), img.affine, img.header)
        return img, json.loads(_sidecar_path(out).read_text())


def _prepare_mni(
    item: Any, spec: PreprocessConfig, name: str | None, prep_dir: Path | None, route: T1Route
) -> tuple[Any, dict[str, Any]]:
    """The T1 route: (skull-strip) -> affine registration to MNI152 -> the model's grid."""
    import nibabel as nib

    from .io import load_volume

    source, sha = _source(item)
    name = name or (_safe_stem(item) if isinstance(item, (str, os.PathLike)) else "image")
    # an in-memory image has no file to hash: it is neither written (its name could collide) nor reused
    target = prep_dir / f"{name}_space-MNI152aff_T1w.nii.gz" if prep_dir is not None and sha is not None else None
    if target is not None and route.resume:
        record = _reusable(target, sha, spec, route.skull_strip, ROUTES["t1"])
        if record is not None:
            ncc = float(record.get("registration_ncc", float("nan")))
            if not ncc >= route.min_ncc:
                raise InputError(
                    f"affine registration to MNI152 failed: similarity to the template NCC {ncc:.3f} < {route.min_ncc:g} "
                    f"(recorded in {_sidecar_path(target).name})",
                    path=source,
                    stage="register",
                )
            logger.info("%s: reusing %s (NCC %.3f)", source, target, ncc)
            return target, record
    data, affine = load_volume(item)
    if route.skull_strip is None:
        stripped, reason = looks_skull_stripped(data, affine)
        strip, decision = not stripped, "auto"
    else:
        strip, decision = bool(route.skull_strip), "requested"
        reason = "skull-stripping requested" if strip else "skull-stripping turned off"
    logger.info("%s: %s skull-stripping (%s: %s)", source, "deepbet" if strip else "no", decision, reason)
    steps: list[dict[str, Any]] = []
    if strip:
        data, _mask, step = _strip(data, affine, route.device, source)
        steps.append(step)
    threads = route.threads if route.threads is not None else (1 if _in_worker_process() else None)
    reg = register_volume(
        data, affine, grid_shape=spec.grid_shape, grid_affine=spec.grid_affine, seed=route.seed,
        iterations=route.iterations, threads=threads, min_ncc=route.min_ncc, path=source,
    )
    steps.append({"step": "affine registration", "tool": "SimpleITK", **reg.info})
    logger.info("%s: registered to MNI152, NCC %.3f", source, reg.ncc)
    record: dict[str, Any] = {
        "route": ROUTES["t1"],
        "route_version": _ROUTE_VERSION,
        "source": source,
        "source_sha256": sha,
        "description": "T1 (skull-stripped), affinely registered to MNI152 and resampled (trilinear) onto the model's grid; "
        "intensities as in the source (the model's intensity normalisation is applied when embedding)",
        "skull_strip": {"requested": route.skull_strip, "decision": decision, "done": strip, "reason": reason},
        "registration_ncc": round(reg.ncc, 6),
        "min_ncc": route.min_ncc,
        "grid": _grid(spec),
        "intensity": spec.intensity,
        "tool_versions": {"deepbet": tool_version("deepbet") if strip else None, "SimpleITK": reg.info.get("simpleitk_version"),
                          "nibabel": tool_version("nibabel"), "numpy": np.__version__},
        "steps": steps,
    }
    if target is None:
        record["output"] = None
        return nib.Nifti1Image(reg.data, reg.affine), record
    _raw._save_nifti(reg.data, reg.affine, target)
    return target, _write_sidecar(target, record)


def _in_worker_process() -> bool:
    """Whether this process is a worker (a DataLoader's or a process pool's): one ITK thread there, as
    its siblings and the forward have the other cores."""
    import multiprocessing

    return multiprocessing.parent_process() is not None


def prepare_t1(
    source: Any,
    *,
    spec: PreprocessConfig | None = None,
    input_kind: str | None = None,
    skull_strip: bool | None = None,
    prep_dir: str | os.PathLike[str] | None = None,
    resume: bool = True,
    name: str | None = None,
    **options: Any,
) -> tuple[Any, dict[str, Any]]:
    """Turn one raw T1 into the model's input kind, on the model's grid: the one entry point.

    Args:
        source: a T1-weighted NIfTI path in native space (or a nibabel image, ``t1`` route only).
        spec: the model's preprocessing spec (``model.config.preprocess``); its ``grid_shape``
            and ``grid_affine`` are the output grid. Default: the published spec.
        input_kind: ``"gm"`` or ``"t1"`` (default: ``spec.input_kind``).
        skull_strip: ``t1`` route: force deepbet on/off; ``None`` decides per input.
        prep_dir: where the result and its JSON sidecar go (None: returned in memory).
        resume: reuse a result in ``prep_dir`` whose sidecar matches (source SHA-256, grid,
            skull-stripping).
        name: output name (default: the source's file stem; see :func:`prep_names`).
        **options: other :class:`T1Route` fields: ``device``, ``min_ncc``, ``threads``, ``seed``,
            ``iterations``, ``allow_download``.

    Returns:
        ``(prepared, sidecar)``: the path of the written NIfTI (or an in-memory nibabel image
        when ``prep_dir`` is None), ready for :func:`~anatcl_infer.inputs.preprocess.prepare`,
        and the sidecar's content.

    Raises:
        InputError: this input failed (``stage``: ``read``, ``skull-strip``, ``register``, ``prep``).
        MissingDependencyError: a tool or its weights are missing (see :func:`check_t1_route`).

    Example:
        >>> path, side = prepare_t1("sub-01_T1w.nii.gz", spec=PreprocessConfig(input_kind="t1"),
        ...                         prep_dir="derivatives/anatcl-prep")  # doctest: +SKIP
        >>> side["skull_strip"]["done"], round(side["registration_ncc"], 2)  # doctest: +SKIP
        (True, 0.91)
    """
    spec = spec if spec is not None else PreprocessConfig()
    kind = input_kind or spec.input_kind
    if kind not in ROUTES:
        raise ConfigError(f"input_kind must be one of {sorted(ROUTES)}, got {kind!r}")
    unknown = sorted(set(options) - {"device", "min_ncc", "threads", "seed", "iterations", "allow_download"})
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}")
    if kind != spec.input_kind:
        spec = dataclasses.replace(spec, input_kind=kind)
    route = T1Route(prep_dir=None if prep_dir is None else os.fspath(prep_dir), skull_strip=skull_strip, resume=resume, **options)
    return run_t1_route(source, spec, route, name=name)


def run_t1_route(item: Any, spec: PreprocessConfig, route: T1Route, *, name: str | None = None) -> tuple[Any, dict[str, Any]]:
    """:func:`prepare_t1` with its options in a :class:`T1Route` (what the loader workers call)."""
    prep_dir = Path(route.prep_dir) if route.prep_dir is not None else None
    if name is not None:
        name = _UNSAFE.sub("_", str(name))[:160] or "input"  # a file name inside prep_dir, never a path
    if prep_dir is not None:
        prep_dir.mkdir(parents=True, exist_ok=True)
    if spec.input_kind == "gm":
        try:
            return _prepare_gm(item, name, prep_dir, route.resume, route.device, route.allow_download)
        except InputError as exc:
            if exc.stage == "conform":
                exc.stage = "prep"
            raise
    return _prepare_mni(item, spec, name, prep_dir, route)


def route_qc(sidecar: dict[str, Any], prepared: Any = None) -> dict[str, Any]:
    """The ``qc_*`` columns of a raw-T1 route: similarity to the template, skull-stripping, output.

    ``qc_registration_ncc`` (``t1`` route; NaN otherwise), ``qc_skull_strip`` (``"deepbet"``,
    ``"none (auto: already skull-stripped)"``, ``"none (turned off)"``; empty for ``gm``) and
    ``qc_prep_output`` (the file in ``prep_dir``, or empty).

    Example:
        >>> route_qc({"route": "t1_to_mni", "registration_ncc": 0.93, "skull_strip": {"done": True}})["qc_skull_strip"]
        'deepbet'
    """
    out: dict[str, Any] = {"qc_registration_ncc": float("nan"), "qc_skull_strip": "", "qc_prep_output": ""}
    if sidecar.get("route") == ROUTES["t1"]:
        out["qc_registration_ncc"] = float(sidecar.get("registration_ncc", float("nan")))
        strip = sidecar.get("skull_strip") or {}
        if strip.get("done"):
            out["qc_skull_strip"] = "deepbet"
        else:
            out["qc_skull_strip"] = "none (auto: already skull-stripped)" if strip.get("decision") == "auto" else "none (turned off)"
    if isinstance(prepared, (str, os.PathLike)):
        out["qc_prep_output"] = os.fspath(prepared)
    return out
