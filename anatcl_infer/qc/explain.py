"""Relevance maps: which voxels drive a head's prediction (or the features' main direction).

:func:`explain` computes, for each input, **gradient × input** of one scalar score through
the frozen encoder, with plain torch autograd:

* with a head (``anatcl fit-head``): the head's linear output for the model's fold —
  the prediction of a regression head (before any brain-age bias correction, which only
  rescales it), the logit of the positive class of a binary classifier, or one class's
  logit of a multiclass one (``target_class``, default: the predicted class);
* without a head: the projection of the features on their first principal direction over
  the inputs given (the direction along which this cohort's embeddings vary most).

The relevance of voxel *v* is ``x_v * d score / d x_v``: red (positive) voxels raise the
score, blue ones lower it. The map is put back on the model's conform grid (the reference
121×145×121 MNI grid of every published model, with its affine), zeros outside the crop
box, written as NIfTI (optionally smoothed, ``smooth_mm``) and drawn as three slices over
the reference-brain outline through the most relevant region. Gradient × input is exact for
the linear part of the network and a first-order view of the rest; it is a map of sensitivity on *this* input, not a
causal statement about anatomy. Captum would add nothing needed for this one method, so it
is not a dependency.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._files import atomic_path, output_stem
from ..config import PreprocessConfig
from ..errors import AnatCLError, ConfigError, HeadError

if TYPE_CHECKING:
    import torch

    from ..downstream.heads import Head
    from ..model.network import AnatCL

__all__ = ["Explanation", "ExplainTarget", "explain", "head_target", "principal_target", "smooth", "to_grid"]

logger = logging.getLogger(__name__)

_NIFTI_MNI = 4  # NIfTI xform code "MNI152"


@dataclass
class ExplainTarget:
    """The scalar score explained: ``features @ weights[k] + bias[k]``.

    Attributes:
        weights: (K, D) linear map on the raw (unstandardised) features.
        bias: (K,) offsets.
        label: what the score is (shown in captions and ``explain.csv``).
        classes: names of the K outputs for multiclass heads (``[]`` otherwise).
        output: the output explained (index into K), or ``None`` for the highest one per input.
        unit: the score's unit (``"years"``, ``"logit"``...): a voxel's relevance is its share of the
            score, in this unit (the picture's colour bar says it).
    """

    weights: np.ndarray
    bias: np.ndarray
    label: str
    classes: list[Any]
    output: int | None = 0
    unit: str = "score units"


@dataclass
class Explanation:
    """The relevance map of one input.

    Attributes:
        path: the input as given.
        ok: whether it could be explained.
        score: the explained score for this input.
        output: the output explained (class name for multiclass heads, else the target label).
        relevance: (``config.grid_shape``) float32 map on the conform grid, zeros outside the
            crop box; ``None`` when the map was written to ``out_dir`` (read the NIfTI) or it failed.
        affine: the grid affine (MNI mm).
        nifti: the written ``*_relevance.nii.gz``, if any.
        png: the written ``*_relevance.png``, if any.
        peak_mm: MNI coordinates (x, y, z) of the most relevant region (peak of ``|relevance|``
            smoothed over about 6 mm); the pictures' slices go through it.
        stage, error: where and why it failed.
    """

    path: str
    ok: bool = True
    score: float = float("nan")
    output: str = ""
    relevance: np.ndarray | None = None
    affine: np.ndarray | None = None
    nifti: Path | None = None
    png: Path | None = None
    peak_mm: tuple[float, float, float] | None = None
    stage: str = ""
    error: str = ""


def to_grid(volume: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Put a model-input-shaped volume back on the conform grid: padding removed, zeros outside the crop.

    The inverse of :func:`anatcl_infer.inputs.template.to_model_space` inside the crop box.

    Example:
        >>> cfg = PreprocessConfig()
        >>> to_grid(np.ones(cfg.model_input_shape, np.float32), cfg)[:, 7:9, 0].sum(axis=0).tolist()
        [0.0, 121.0]
    """
    vol = np.asarray(volume)
    if tuple(vol.shape) != tuple(config.model_input_shape):
        raise ConfigError(f"volume shape {vol.shape} is not the model input shape {config.model_input_shape}")
    inner = tuple(
        slice((p - (b - a)) // 2, (p - (b - a)) // 2 + (b - a)) for p, (a, b) in zip(config.model_input_shape, config.crop)
    )
    out = np.zeros(tuple(config.grid_shape), dtype=np.float32)
    out[tuple(slice(a, b) for a, b in config.crop)] = vol[inner]
    return out


def head_target(
    head: Head | str | os.PathLike[str], model: AnatCL, *, target_class: Any = None, source: str | os.PathLike[str] | None = None,
) -> ExplainTarget:
    """The linear score of ``head`` for ``model``'s fold, folded into raw-feature weights.

    ``source`` (what ``model`` was loaded from) makes a fold mismatch say how to get the head's fold.

    Raises:
        HeadError: the head has no weights for this fold, was fitted on other weights
            (SHA-256), has another feature size, or ``target_class`` is not one of its classes.
    """
    from ..downstream.heads import Head
    from ..weights.sources import fold_advice

    if not isinstance(head, Head):
        head = Head.load(head)
    fold = model.config.fold
    if fold in head.folds:
        fh = head.folds[fold]
    elif len(head.folds) == 1:
        (fh,) = head.folds.values()
        if fh.fold is not None and fold is not None:
            raise HeadError(f"the head was fitted on fold {fh.fold} features, the model is fold {fold}; {fold_advice(source, fh.fold)}")
    else:
        folds = sorted(head.folds, key=str)
        raise HeadError(f"the head has folds {folds}, not the model's fold {fold}; {fold_advice(source, folds[0])}")
    want, have = fh.info.get("model_sha256"), model.config.source_sha256
    if want and have and want != have:
        raise HeadError(
            f"the head was fitted on features of weights with sha256 {want[:12]}..., this model's are {have[:12]}...; "
            "explain it with the model it was fitted on"
        )
    coef = np.atleast_2d(np.asarray(fh.coef, dtype=np.float64))
    if coef.shape[1] != model.config.feature_dim:
        raise HeadError(f"the head takes {coef.shape[1]}-d features, the model gives {model.config.feature_dim}-d ones")
    scale = np.asarray(fh.scaler_scale, dtype=np.float64)
    mean = np.asarray(fh.scaler_mean, dtype=np.float64)
    weights = coef / scale
    bias = np.asarray(fh.intercept, dtype=np.float64).reshape(-1) - weights @ mean
    classes = head.classes if head.kind == "classification" else []
    if head.kind != "classification":
        return ExplainTarget(weights, bias, f"{head.target}_pred", [], 0, unit=str(head.config.get("units") or "target units"))
    if coef.shape[0] == 1:  # binary: the logit of the second class
        if target_class is not None and target_class not in classes:
            raise HeadError(f"class {target_class!r} is not one of the head's classes {classes}")
        sign = -1.0 if target_class is not None and classes.index(target_class) == 0 else 1.0
        name = target_class if target_class is not None else classes[1]
        return ExplainTarget(sign * weights, sign * bias, f"{head.target} logit of {name!r}", [name], 0, unit="logit")
    if target_class is None:
        return ExplainTarget(weights, bias, f"{head.target} logit of the predicted class", list(classes), None, unit="logit")
    if target_class not in classes:
        raise HeadError(f"class {target_class!r} is not one of the head's classes {classes}")
    k = classes.index(target_class)
    return ExplainTarget(weights, bias, f"{head.target} logit of {target_class!r}", list(classes), k, unit="logit")


def principal_target(features: np.ndarray) -> ExplainTarget:
    """The first principal direction of ``features`` (N, D) as a score: ``(f - mean) @ v``.

    The sign is fixed so that the direction's largest component is positive.

    Raises:
        ConfigError: fewer than two inputs, or features that do not vary.

    Example:
        >>> t = principal_target(np.array([[0.0, 0.0], [1.0, 2.0], [2.0, 4.0]]))
        >>> np.round(t.weights, 3).tolist(), round(float(t.bias[0]), 3)
        ([[0.447, 0.894]], -2.236)
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ConfigError(
            "without a head, explain follows the first principal direction of the inputs' features, which needs at "
            "least 2 inputs; give more inputs or a head (head=DIR, a folder written by `anatcl fit-head`)"
        )
    mean = x.mean(axis=0)
    _, sv, vt = np.linalg.svd(x - mean, full_matrices=False)
    if not sv[0] > 0:
        raise ConfigError("the inputs' features do not vary, so they have no principal direction; give a head instead")
    v = vt[0] * np.sign(vt[0][np.argmax(np.abs(vt[0]))])
    return ExplainTarget(v[None, :], np.array([-float(v @ mean)]), "first principal direction of the features", [], 0,
                         unit="feature units")


def _gradient_x_input(model: Any, x: torch.Tensor, target: ExplainTarget) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(relevance (B, *model_input_shape), scores (B,), outputs (B,)) for one batch."""
    import torch

    w = torch.as_tensor(target.weights, dtype=torch.float32, device=x.device)
    b = torch.as_tensor(target.bias, dtype=torch.float32, device=x.device)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x).float() @ w.T + b  # (B, K)
        if target.output is None:
            out = logits.detach().argmax(dim=1)
        else:
            out = torch.full((x.shape[0],), target.output, dtype=torch.long, device=x.device)
        scores = logits.gather(1, out[:, None])[:, 0]
        (grad,) = torch.autograd.grad(scores.sum(), x)  # eval mode: each input's gradient is its own
    rel = (grad * x.detach())[:, 0]
    return rel.cpu().numpy(), scores.detach().cpu().numpy(), out.cpu().numpy()


def _write_nifti(path: Path, volume: np.ndarray, affine: np.ndarray, description: str) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), affine)
    img.set_sform(affine, code=_NIFTI_MNI)
    img.set_qform(affine, code=_NIFTI_MNI)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = description.encode("ascii", "replace")[:79]
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, str(tmp))
    return path


def smooth(relevance: np.ndarray, fwhm_mm: float, affine: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Gaussian smoothing of a map on the grid (FWHM in mm), kept zero outside the crop box.

    Example:
        >>> cfg = PreprocessConfig()
        >>> m = np.zeros(cfg.grid_shape, np.float32); m[60, 72, 60] = 1.0
        >>> s = smooth(m, 6.0, np.asarray(cfg.grid_affine), cfg)
        >>> round(float(s.sum()), 3), bool(s[60, 72, 60] < 1)
        (1.0, True)
    """
    from nibabel.affines import voxel_sizes
    from scipy.ndimage import gaussian_filter

    if fwhm_mm <= 0:
        return relevance
    sigma = fwhm_mm / (2.0 * np.sqrt(2.0 * np.log(2.0))) / voxel_sizes(affine)
    out = np.zeros_like(relevance)
    box = tuple(slice(a, b) for a, b in config.crop)
    out[box] = gaussian_filter(relevance[box].astype(np.float32), sigma=sigma, mode="constant")
    return out


def _peak_mm(relevance: np.ndarray, affine: np.ndarray, config: PreprocessConfig) -> tuple[float, float, float]:
    """MNI position of the centre of the most relevant region: the peak of |relevance| smoothed over 6 mm."""
    from nibabel.affines import apply_affine

    blurred = smooth(np.abs(relevance), 6.0, affine, config)
    x, y, z = apply_affine(affine, np.unravel_index(int(np.argmax(blurred)), relevance.shape))
    return float(x), float(y), float(z)


def explain(
    inputs: Iterable[Any],
    model: AnatCL | str | os.PathLike[str] = "anatcl-global",
    *,
    fold: int = 0,
    head: Head | str | os.PathLike[str] | None = None,
    target_class: Any = None,
    out_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 2,
    smooth_mm: float = 0.0,
    draw: bool = True,
    progress: bool = False,
    failures: Sequence[tuple[str, str, str]] = (),
) -> list[Explanation]:
    """Relevance maps (gradient × input through the frozen encoder) of a head, or of the features' main direction.

    Args:
        inputs: paths, or anything :func:`~anatcl_infer.inputs.preprocess.prepare` accepts.
        model: a loaded :class:`~anatcl_infer.model.AnatCL`, or anything
            :func:`~anatcl_infer.load_model` accepts (registry name, model directory, file, ``hf://``).
        fold: fold of a registry model.
        head: a head directory (``anatcl fit-head``) or :class:`~anatcl_infer.downstream.heads.Head`;
            ``None`` explains the first principal direction of the inputs' features (needs >= 2 inputs).
        target_class: for classification heads, the class whose logit is explained.
        out_dir: where to write ``NNNN_<name>_relevance.nii.gz`` (the conform grid and affine,
            float32, zeros outside the crop box), ``NNNN_<name>_relevance.png`` and ``explain.csv``;
            ``None`` keeps the maps in memory instead (``Explanation.relevance``).
        device: ``"cpu"``, ``"cuda"``... (default: the best available).
        batch_size: inputs per backward pass (memory grows with it).
        smooth_mm: FWHM (mm) of a Gaussian applied to each map before it is written and drawn
            (0: the raw voxel-wise map; gradient maps of strided networks are speckled, 4-8 mm reads better).
        draw: draw the PNGs into ``out_dir`` (needs matplotlib, the ``[qc]`` extra).
        progress: show progress: a bar on a terminal, else a log line every 30 s.
        failures: ``(path, stage, message)`` of inputs that failed earlier (e.g. discovery), reported with the others.

    Returns:
        One :class:`Explanation` per input (failures included), in input order.

    Raises:
        ConfigError: no head and fewer than two inputs could be prepared.
        HeadError: the head does not fit the model (fold, SHA-256 of the weights, feature size, class).
        MissingDependencyError: ``draw`` without matplotlib.

    Example:
        >>> maps = explain(["a.nii.gz", "b.nii.gz"], "anatcl-global", head="brain-age-head", out_dir="explain/")  # doctest: +SKIP
        >>> maps[0].nifti, maps[0].peak_mm  # doctest: +SKIP
    """
    import torch

    from ..inputs.preprocess import describe_item, prepare
    from ..model.devices import resolve_device

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size!r}")
    draw = draw and out_dir is not None
    if draw:
        from .plots import _matplotlib

        _matplotlib()  # fail before any work when the extra is missing
    from ..model.network import AnatCL

    source: str | None = None
    if isinstance(model, AnatCL):
        net = model
        dev = model.device if device is None else resolve_device(device)  # a model given loaded stays where it is
    else:
        from ..weights.loading import load_model
        from ..weights.sources import fold_sources

        dev = resolve_device(device)
        source = str(model)
        ((path, path_fold),) = fold_sources(source, fold)  # a folder of fold<k>/ models gives fold k's folder
        net = load_model(path, fold=path_fold, device=dev)
    net.to(dev).eval()
    config = net.config.preprocess
    affine = np.asarray(config.grid_affine, dtype=np.float64)
    target = head_target(head, net, target_class=target_class, source=source) if head is not None else None
    out = Path(out_dir) if out_dir is not None else None

    items = list(inputs)
    results: list[Explanation] = [Explanation(path=p, ok=False, stage=s, error=e) for p, s, e in failures]
    prepared: dict[int, Any] = {}
    slots: list[Explanation] = []
    for i, item in enumerate(items):
        source = describe_item(item)
        slots.append(Explanation(path=source))
        try:
            prepared[i] = prepare(item, config, keep_grid=True)
        except AnatCLError as exc:
            slots[i] = Explanation(path=source, ok=False, stage=getattr(exc, "stage", "prepare"),
                                   error=str(exc.args[0]) if exc.args else str(exc))
        except (OSError, ValueError, EOFError, MemoryError) as exc:
            slots[i] = Explanation(path=source, ok=False, stage="read", error=f"{type(exc).__name__}: {exc}")
    for s in slots:
        if not s.ok:
            logger.warning("%s: failed at %s: %s", s.path, s.stage, s.error)
    order = sorted(prepared)
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]

    if target is None:
        feats = []
        with torch.inference_mode():
            for idx in batches:
                x = torch.from_numpy(np.stack([prepared[i].array for i in idx])).to(dev)
                feats.append(net(x).float().cpu().numpy())
        target = principal_target(np.concatenate(feats) if feats else np.zeros((0, net.config.feature_dim)))
    logger.info("explaining %s for %d inputs (gradient x input)", target.label, len(order))

    from tqdm.auto import tqdm

    from ..encoding.progress import ProgressLog, bar_wanted

    meter = ProgressLog(len(order), progress, verb="explained", log=logger)
    with tqdm(total=len(order), desc="explain", unit="scan", disable=not bar_wanted(progress)) as bar:
        for idx in batches:
            x = torch.from_numpy(np.stack([prepared[i].array for i in idx])).to(dev)
            rel, scores, outs = _gradient_x_input(net, x, target)
            for j, i in enumerate(idx):
                grid_rel = smooth(to_grid(rel[j], config), smooth_mm, affine, config)
                label = str(target.classes[int(outs[j])]) if target.classes and target.output is None else target.label
                exp = Explanation(path=slots[i].path, score=float(scores[j]), output=label, affine=affine,
                                  peak_mm=_peak_mm(grid_rel, affine, config))
                if out is not None:
                    name = output_stem(i, exp.path)
                    exp.nifti = _write_nifti(out / f"{name}_relevance.nii.gz", grid_rel, affine,
                                             f"anatcl-infer gradient x input: {target.label}")
                    if draw:
                        exp.png = out / f"{name}_relevance.png"
                        _draw(exp, grid_rel, prepared[i], config, target)  # through the peak
                else:
                    exp.relevance = grid_rel
                slots[i] = exp
                prepared.pop(i)  # the conformed grid is no longer needed
            bar.update(len(idx))
            meter.update(len(idx), 0)
    results += slots
    if out is not None:
        _write_table(results, out / "explain.csv")
    return results


def _draw(exp: Explanation, grid_rel: np.ndarray, prepared: Any, config: PreprocessConfig, target: ExplainTarget) -> None:
    from .plots import render_relevance

    label = target.label
    background = prepared.grid if prepared.grid is not None else to_grid(prepared.array[0], config)
    render_relevance(
        grid_rel, background, exp.png, config=config, title=exp.path, centre_mm=exp.peak_mm,
        subtitle=f"gradient x input of {label}; score {exp.score:.4g}" + (f" ({exp.output})" if exp.output != label else ""),
        unit=f"{target.unit} per voxel",
    )


def _write_table(items: Sequence[Explanation], path: Path) -> Path:
    from .report import _write_csv

    rows = []
    for it in items:
        peak = [f"{v:g}" for v in it.peak_mm] if it.peak_mm else ["", "", ""]
        rows.append([
            it.path, "ok" if it.ok else "failed", it.stage, it.error, it.output,
            "" if np.isnan(it.score) else repr(it.score), *peak,
            it.nifti.name if it.nifti else "", it.png.name if it.png else "",
        ])
    header = ["path", "status", "stage", "error", "output", "score", "peak_x_mm", "peak_y_mm", "peak_z_mm",
              "relevance_nifti", "picture"]
    return _write_csv(path, header, rows)
