"""From a raw (native-space) T1 to what the model expects — the optional ``[prep]`` extra.

Two routes, each writing a NIfTI on the reference grid (121x145x121, 1.5 mm MNI) and a
JSON sidecar beside it recording the tool, its version, the template and the steps:

* :func:`t1_to_gm` — the input of the published grey-matter models: **deepmriprep**
  (skull-stripping, affine and non-linear registration to the CAT12 geodesic-shooting
  template, tissue segmentation, modulation) writes a CAT12-style ``mwp1`` map on its
  113x137x113 box, which is then put exactly (zero-padding, no interpolation) onto the
  reference grid. deepmriprep downloads its network weights from GitHub on first use;
  offline, :func:`t1_to_gm` says which files are missing, where they go, and how to get
  them (:func:`fetch_deepmriprep_models` online, or :func:`install_deepmriprep_models`
  from a copy).
* :func:`t1_to_mni` — a skull-stripped T1 affinely registered to MNI152, for models
  whose spec says ``input_kind="t1"``: **deepbet** skull-stripping (its weights ship in
  its wheel) then **SimpleITK** affine registration (Mattes mutual information) to the
  packaged 3 mm MNI152 T1 (``anatcl_infer/inputs/data/mni152_t1_3mm.nii.gz``;
  :mod:`anatcl_infer.inputs.registration`).

Install with ``pip install "anatcl-infer[prep]"``. The one entry point that follows a
model's input kind, with skull-strip detection, reuse and the similarity check, is
:func:`anatcl_infer.inputs.t1_route.prepare_t1`; the functions here are its building blocks.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .._files import atomic_path, regular_file_sha256
from .._version import __version__
from ..config import REFERENCE_AFFINE, REFERENCE_SHAPE, is_offline
from ..errors import (
    ConfigError,
    DownloadError,
    InputError,
    MissingDependencyError,
    OfflineError,
)
from .registration import REGISTRATION_TEMPLATE, register_volume
from .registration import read_template as _read_template
from .registration import require_tool as _require
from .registration import tool_version as _version

__all__ = [
    "REGISTRATION_TEMPLATE",
    "fetch_deepmriprep_models",
    "install_deepmriprep_models",
    "missing_deepmriprep_models",
    "prep_status",
    "register_to_mni",
    "skull_strip",
    "t1_to_gm",
    "t1_to_mni",
]

logger = logging.getLogger(__name__)

_DEEPMRIPREP_REPO = "https://github.com/wwu-mmll/deepmriprep/tree/main/deepmriprep/data/models"
_GRID_NAME = "CAT12 1.5 mm MNI grid 121x145x121"


# --- dependencies ---------------------------------------------------------------------------------


def _deepbet_weights() -> list[Path]:
    """The two TorchScript files deepbet loads by default (shipped in its wheel)."""
    utils = _require("deepbet.utils", "deepbet")
    root = Path(utils.DATA_PATH) / "models"
    return [root / "model.pt", root / "bbox_model.pt"]


def _deepmriprep_models_dir() -> Path:
    utils = _require("deepmriprep.utils", "deepmriprep")
    return Path(utils.DATA_PATH) / "models"


def _deepmriprep_model_files() -> list[str]:
    utils = _require("deepmriprep.utils", "deepmriprep")
    return list(utils.MODEL_FILES)


def missing_deepmriprep_models() -> list[str]:
    """Names of the deepmriprep network files not yet in its models folder.

    Example:
        >>> missing_deepmriprep_models()[:1]  # doctest: +SKIP
        ['brain_extraction_bbox_model.pt']
    """
    root = _deepmriprep_models_dir()
    return [name for name in _deepmriprep_model_files() if not (root / name).is_file()]


def prep_status() -> dict[str, Any]:
    """What the T1 routes can use here: installed tools, versions, weights present or missing.

    Example:
        >>> prep_status()["simpleitk"]  # doctest: +SKIP
        '2.5.7'
    """
    status: dict[str, Any] = {}
    for module, dist in (("deepbet", "deepbet"), ("SimpleITK", "SimpleITK"), ("deepmriprep", "deepmriprep")):
        try:
            _require(module, dist)
            status[dist.lower()] = _version(dist) or "unknown"
        except MissingDependencyError:
            status[dist.lower()] = None
    if status["deepbet"]:
        status["deepbet_weights"] = all(p.is_file() for p in _deepbet_weights())
    if status["deepmriprep"]:
        status["deepmriprep_models_dir"] = str(_deepmriprep_models_dir())
        status["deepmriprep_missing_models"] = missing_deepmriprep_models()
    status["t1_to_mni"] = bool(status["deepbet"] and status["simpleitk"] and status.get("deepbet_weights"))
    status["t1_to_gm"] = bool(status["deepmriprep"]) and not status.get("deepmriprep_missing_models", [None])
    return status


def _missing_models_message(missing: list[str]) -> str:
    root = _deepmriprep_models_dir()
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    return (
        f"deepmriprep's network weights are not installed: {len(missing)} file(s) missing from {root} ({shown}). "
        "deepmriprep downloads them from GitHub on first use, which needs internet. Either run "
        "`python -c \"import anatcl_infer.inputs.raw_t1 as p; p.fetch_deepmriprep_models()\"` on this machine while online, "
        f"or download the folder {_DEEPMRIPREP_REPO} on a machine with internet, copy it here and run "
        "`python -c \"import anatcl_infer.inputs.raw_t1 as p; p.install_deepmriprep_models('PATH/TO/models')\"`"
    )


def fetch_deepmriprep_models() -> Path:
    """Download deepmriprep's missing network weights (its own downloader; needs internet).

    Returns:
        deepmriprep's models folder, now complete.

    Raises:
        OfflineError: ``ANATCL_OFFLINE`` or ``HF_HUB_OFFLINE`` is set.
        DownloadError: the download failed (no internet, GitHub API rate limit...).

    Example:
        >>> fetch_deepmriprep_models()  # doctest: +SKIP
    """
    missing = missing_deepmriprep_models()
    if not missing:
        return _deepmriprep_models_dir()
    if is_offline():
        raise OfflineError("offline mode is on (ANATCL_OFFLINE/HF_HUB_OFFLINE): " + _missing_models_message(missing), url=_DEEPMRIPREP_REPO)
    utils = _require("deepmriprep.utils", "deepmriprep")
    try:
        utils.download_missing_models()
    except Exception as exc:  # requests/JSON/HTTP errors of a third-party downloader
        raise DownloadError(f"downloading deepmriprep's weights failed ({type(exc).__name__}: {exc}). " + _missing_models_message(missing_deepmriprep_models()), url=_DEEPMRIPREP_REPO) from exc
    still = missing_deepmriprep_models()
    if still:
        raise DownloadError("the download finished but files are still missing. " + _missing_models_message(still), url=_DEEPMRIPREP_REPO)
    return _deepmriprep_models_dir()


def install_deepmriprep_models(source: str | os.PathLike[str]) -> Path:
    """Copy deepmriprep's weight files from a folder (downloaded elsewhere) into its models folder.

    Args:
        source: a folder holding the ``*.pt`` files of ``deepmriprep/data/models``.

    Returns:
        deepmriprep's models folder.

    Raises:
        InputError: files are missing from ``source``.

    Example:
        >>> install_deepmriprep_models("/mnt/usb/deepmriprep-models")  # doctest: +SKIP
    """
    src = Path(source)
    needed = missing_deepmriprep_models()
    absent = [name for name in needed if not (src / name).is_file()]
    if absent:
        raise InputError(
            f"{len(absent)} deepmriprep weight file(s) are not in {src}: {', '.join(absent[:5])}; copy the whole folder "
            f"{_DEEPMRIPREP_REPO}",
            path=str(src),
            stage="read",
        )
    root = _deepmriprep_models_dir()
    root.mkdir(parents=True, exist_ok=True)
    for name in needed:
        with atomic_path(root / name) as tmp:
            shutil.copyfile(src / name, tmp)
    logger.info("installed %d deepmriprep weight files into %s", len(needed), root)
    return root


# --- small helpers --------------------------------------------------------------------------------


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _nifti_suffix(path: Path) -> str:
    """``.nii.gz`` or the file's last suffix: a temporary file keeps it, so nibabel writes the same format."""
    return ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix


def _check_input(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.is_file():
        raise InputError("does not exist; check the path", path=str(p), stage="read")
    return p


def _save_nifti(data: np.ndarray, affine: np.ndarray, out: Path) -> Path:
    """Write a float32 NIfTI atomically (temporary name in the same folder, then rename)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    img.header.set_qform(img.affine, code=4)
    img.header.set_sform(img.affine, code=4)
    with atomic_path(out, suffix=".tmp" + _nifti_suffix(out)) as tmp:
        nib.save(img, str(tmp))
    return out


def _write_sidecar(nifti: Path, record: dict[str, Any]) -> Path:
    record = {
        **record,
        "output": nifti.name,
        "grid": {"name": _GRID_NAME, "shape": list(REFERENCE_SHAPE), "affine": [list(r) for r in REFERENCE_AFFINE]},
        "anatcl_infer_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path = nifti.with_name(_stem(nifti) + ".json")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return path


# --- skull-stripping and affine registration (deepbet + SimpleITK) --------------------------------


def skull_strip(t1: str | os.PathLike[str], out: str | os.PathLike[str], *, device: str = "cpu") -> Path:
    """Remove skull and neck from a T1 with deepbet (weights from its wheel; offline).

    Args:
        t1: a T1-weighted NIfTI in any space.
        out: where to write the skull-stripped T1 (same grid as ``t1``).
        device: ``"cpu"`` or a CUDA/MPS device (deepbet picks the GPU when not ``"cpu"``).

    Returns:
        ``out``.

    Raises:
        MissingDependencyError: deepbet (or its weights) is not installed.

    Example:
        >>> skull_strip("sub-01_T1w.nii.gz", "sub-01_brain.nii.gz")  # doctest: +SKIP
    """
    src = _check_input(t1)
    bet = _require("deepbet", "deepbet")
    weights = _deepbet_weights()
    absent = [str(p) for p in weights if not p.is_file()]
    if absent:
        raise MissingDependencyError(
            f"deepbet is installed without its weights ({', '.join(absent)}); reinstall it with "
            "`pip install --force-reinstall deepbet` (the weights ship inside its wheel)",
            package="deepbet",
            extra="prep",
        )
    target = Path(out)
    extractor = bet.BrainExtraction(no_gpu=device == "cpu", model_path=str(weights[0]), bbox_model_path=str(weights[1]))
    with atomic_path(target, suffix=".tmp" + _nifti_suffix(target)) as tmp:
        extractor.run(str(src), brain_path=str(tmp))
    return target


def register_to_mni(
    image: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    seed: int = 1234,
    iterations: int = 200,
    threads: int | None = None,
    min_ncc: float | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Affinely register a skull-stripped T1 to the MNI152 T1 and resample it onto the reference grid.

    SimpleITK: moments initialisation, Mattes mutual information (32 bins, 25 % random
    samples with a fixed seed), regular-step gradient descent on a 12-parameter affine
    transform, two resolution levels, then trilinear resampling onto the 1.5 mm grid.

    Args:
        image: skull-stripped T1 NIfTI (any grid, any orientation).
        out: output NIfTI on the reference grid (float32, the input's intensities).
        seed: seed of the metric's random sampling, > 0 (ITK reads 0 as "seed from the clock").
        iterations: optimiser iterations per level.
        threads: ITK threads (default: ITK's choice). With several threads sums are
            taken in a varying order and results differ in the 3rd-4th decimal from
            run to run; ``threads=1`` makes them bit-reproducible.
        min_ncc: fail when the similarity to the template (``info["ncc"]``) is below this.

    Returns:
        ``(out, info)`` with the transform (ITK parameters and a RAS 4x4 matrix), the final
        metric value and the similarity to the template (``ncc``).

    Raises:
        MissingDependencyError: SimpleITK is not installed.
        InputError: the registration failed or its similarity is below ``min_ncc``.

    Example:
        >>> path, info = register_to_mni("sub-01_brain.nii.gz", "sub-01_mni.nii.gz")  # doctest: +SKIP
    """
    from .io import load_volume

    src = _check_input(image)
    if int(seed) <= 0:
        raise ConfigError(f"seed must be a positive integer (ITK takes 0 as 'seed from the clock'), got {seed!r}")
    _require("SimpleITK", "SimpleITK")
    data, affine = load_volume(src)
    reg = register_volume(
        data, affine, grid_shape=REFERENCE_SHAPE, grid_affine=REFERENCE_AFFINE, seed=seed, iterations=iterations,
        threads=threads, min_ncc=min_ncc, path=str(src),
    )
    return _save_nifti(reg.data, reg.affine, Path(out)), reg.info


def t1_to_mni(
    t1: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    strip: bool = True,
    device: str = "cpu",
) -> Path:
    """Raw T1 -> skull-stripped T1 affinely registered to MNI152 on the reference grid (for ``t1`` specs).

    Args:
        t1: a T1-weighted NIfTI in native (scanner) space.
        out_dir: output folder.
        strip: skull-strip with deepbet first (``False`` when the input already is).
        device: device for deepbet.

    Returns:
        ``out_dir/<name>_space-MNI152aff_T1w.nii.gz``; its JSON sidecar records the tools,
        versions, template and transform.

    Example:
        >>> t1_to_mni("sub-01_T1w.nii.gz", "derivatives/anatcl-prep")  # doctest: +SKIP
    """
    src = _check_input(t1)
    out = Path(out_dir)
    stem = _stem(src)
    target = out / f"{stem}_space-MNI152aff_T1w.nii.gz"
    steps: list[dict[str, Any]] = []
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as work:
        moving = src
        if strip:
            moving = skull_strip(src, Path(work) / f"{stem}_brain.nii.gz", device=device)
            steps.append({"step": "skull-stripping", "tool": "deepbet", "version": _version("deepbet"), "weights": "shipped in the deepbet wheel"})
        _, info = register_to_mni(moving, target)
        steps.append({"step": "affine registration", "tool": "SimpleITK", **info})
    _write_sidecar(target, {
        "route": "t1_to_mni",
        "source": str(src.resolve()),
        "source_sha256": regular_file_sha256(src),
        "description": "skull-stripped T1, affinely registered to MNI152 and resampled (trilinear) onto the reference grid",
        "steps": steps,
    })
    logger.info("%s -> %s", src, target)
    return target


# --- grey-matter maps (deepmriprep) ----------------------------------------------------------------


def _run_deepmriprep(t1: Path, work: Path, device: str) -> Path:
    """Run deepmriprep up to the modulated GM map; return the path of its mwp1 output (113 box)."""
    prep = _require("deepmriprep.preprocess", "deepmriprep")
    out = work / f"mwp1{_stem(t1)}.nii.gz"
    runner = prep.Preprocess(no_gpu=device == "cpu")
    runner.run(str(t1), {"mwp1": str(out)}, run_all=False, skip_unprocessed=False)
    if not out.is_file():
        raise InputError("deepmriprep finished without writing its mwp1 map", path=str(t1), stage="conform")
    return out


def t1_to_gm(
    t1: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    device: str = "cpu",
    allow_download: bool = False,
    name: str | None = None,
) -> Path:
    """Raw T1 -> CAT12-style modulated grey-matter map (mwp1) on the reference grid, via deepmriprep.

    deepmriprep writes its mwp1 on the CAT12 12.8 box (113x137x113, 1.5 mm); it is
    placed onto the 121x145x121 reference grid by exact re-indexing (zero-padding,
    voxel centres coincide — no interpolation), checked here.

    Args:
        t1: a T1-weighted NIfTI in native space.
        out_dir: output folder.
        device: ``"cpu"`` (about 100 s per scan) or a GPU.
        allow_download: let deepmriprep fetch its missing weights from GitHub (needs
            internet); without it, missing weights are an error that says how to get them.
        name: the output's name after ``mwp1`` (default: the input's file stem).

    Returns:
        ``out_dir/mwp1<name>.nii.gz`` (CAT12 naming, found by ``anatcl embed DIR``) with a
        JSON sidecar recording tool, version, template and steps.

    Raises:
        MissingDependencyError: deepmriprep is not installed, or its weights are missing.
        OfflineError, DownloadError: ``allow_download`` but they cannot be fetched.
        InputError: deepmriprep failed on this input, or its output is not on the 1.5 mm box.

    Example:
        >>> t1_to_gm("sub-01_T1w.nii.gz", "derivatives/anatcl-prep")  # doctest: +SKIP
    """
    from .conform import conform_to_grid
    from .io import load_volume

    src = _check_input(t1)
    _require("deepmriprep", "deepmriprep")
    missing = missing_deepmriprep_models()
    if missing:
        if not allow_download:
            raise MissingDependencyError(_missing_models_message(missing), package="deepmriprep weights", extra="prep")
        fetch_deepmriprep_models()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"mwp1{name or _stem(src)}.nii.gz"
    with tempfile.TemporaryDirectory(dir=out) as work:
        try:
            produced = _run_deepmriprep(src, Path(work), device)
        except (InputError, MissingDependencyError):
            raise
        except Exception as exc:  # deepmriprep/torch failures on this scan
            raise InputError(f"deepmriprep failed: {type(exc).__name__}: {exc}", path=str(src), stage="conform") from exc
        data, affine = load_volume(produced)
        grid, method = conform_to_grid(data, affine, REFERENCE_SHAPE, REFERENCE_AFFINE)
        if method not in ("identity", "reindex"):
            raise InputError(
                f"deepmriprep's mwp1 (shape {data.shape}) is not on a 1.5 mm box aligned with the reference grid "
                f"(conforming would need '{method}'); check the deepmriprep version",
                path=str(produced),
                stage="conform",
            )
        _save_nifti(grid, np.asarray(REFERENCE_AFFINE), target)
        source_grid = {"shape": list(data.shape), "affine": np.asarray(affine).round(6).tolist()}
    _write_sidecar(target, {
        "route": "t1_to_gm",
        "source": str(src.resolve()),
        "source_sha256": regular_file_sha256(src),
        "description": "CAT12-style modulated normalised grey-matter map (mwp1), unsmoothed",
        "steps": [{
            "step": "segmentation + non-linear registration + modulation",
            "tool": "deepmriprep",
            "version": _version("deepmriprep"),
            "skull_stripping": f"deepbet {_version('deepbet')} (inside deepmriprep)",
            "template": "CAT12 geodesic-shooting template Template_4_GS.nii.gz (deepmriprep wheel), affine template "
            "Template_05mm_bet.nii.gz",
            "device": device,
        }, {
            "step": "onto the reference grid",
            "tool": "anatcl_infer.inputs.conform.conform_to_grid",
            "method": method,
            "source_grid": source_grid,
        }],
    })
    logger.info("%s -> %s (%s)", src, target, method)
    return target
