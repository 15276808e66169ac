"""From inputs to features: inputs prepared beside the forward pass, and the encoder.

Data flows one way: item -> :func:`anatcl_infer.inputs.preprocess.prepare` (on CPU in a
background thread of this process, :mod:`~anatcl_infer.encoding.prefetch`; with
``num_workers > 0`` or on GPU in DataLoader processes) -> the backend's runner
(:mod:`~anatcl_infer.encoding.backends`: OpenVINO or torch) -> numpy, in input order. Memory
is bounded by the batch size and the prefetch depth, not by the number of inputs.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..model.devices import resolve_device
from ..model.resnet import AnatCLNetwork
from ..errors import AnatCLError, ConfigError, InputError, InputFailureWarning, user_stacklevel

if TYPE_CHECKING:
    from ..config import PreprocessConfig
    from ..model.network import AnatCL

__all__ = ["encode", "extract_features", "iter_encoded", "EncodedBatch", "Failure", "default_num_workers", "resolve_precision"]

logger = logging.getLogger(__name__)

_ENCODE_KWARGS = ("batch_size", "device", "num_workers", "progress", "precision", "amp", "strict", "on_error", "assume_reference_grid", "from_t1", "backend")


@dataclass(frozen=True)
class Failure:
    """One input that could not be embedded: its position, path, stage and message."""

    index: int
    path: str
    stage: str
    message: str


@dataclass
class EncodedBatch:
    """Features of the inputs of one batch that succeeded, plus those that failed.

    Attributes:
        indices: positions (in the input sequence) of the rows of ``features``.
        features: (len(indices), D) float32.
        infos: per row, what preprocessing reported (``method``, ``warnings``, ``kind``...).
        failures: inputs of this batch that failed.
        backend: name and version of the backend that ran the forward pass.
    """

    indices: list[int]
    features: np.ndarray
    infos: list[dict[str, Any]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    #: the backend that computed ``features``: ``{"name": "openvino"|"torch", "version": ...}``
    backend: dict[str, str] = field(default_factory=dict)


def default_num_workers(device: torch.device, n_inputs: int) -> int:
    """Loader processes when ``num_workers`` is not given: none on CPU, else enough to keep the device fed.

    On CPU a thread of this process prepares the inputs instead (:mod:`anatcl_infer.encoding.prefetch`):
    it overlaps reading with the forward pass like a loader process, without the 0.8-1.3 s a process
    costs to start on every call (benchmarks/NOTES.md).
    """
    if n_inputs <= 2 or device.type == "cpu":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus - 1))


def _describe(item: Any) -> str:
    from ..inputs.preprocess import describe_item

    try:
        return describe_item(item)
    except Exception:  # never let naming an input fail the run
        return f"<{type(item).__name__}>"


class _PrepareDataset(torch.utils.data.Dataset):
    """Prepares one item per index; errors become :class:`Failure` records, never exceptions.

    Whatever goes wrong inside a loader worker (any exception type, including ones that
    cannot be pickled) is turned into a plain :class:`Failure` of strings there, so it
    always reaches the main process.
    """

    def __init__(
        self,
        items: Sequence[Any],
        config: PreprocessConfig,
        strict: bool,
        extra: Callable[[Any], dict[str, Any]] | None,
        assume_reference_grid: bool = False,
        t1_route: Any = None,
    ) -> None:
        self.items = items
        self.config = config
        self.strict = strict
        self.extra = extra
        self.assume_reference_grid = assume_reference_grid
        # --- raw-T1 route (from_t1=): run per item in the worker, before `prepare` ---
        self.t1_route = t1_route
        self.t1_names: list[str | None] = []
        if t1_route is not None:
            from ..inputs.t1_route import prep_names

            self.t1_names = prep_names(list(items))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, dict[str, Any] | None, Failure | None]:
        item = self.items[index]
        try:
            from ..inputs.preprocess import prepare

            target, route_info = item, {}
            if self.t1_route is not None:  # raw T1 -> the model's input kind, on its grid (inputs/t1_route.py)
                from ..inputs.t1_route import route_qc, run_t1_route

                target, sidecar = run_t1_route(item, self.config, self.t1_route, name=self.t1_names[index])
                route_info = {**route_qc(sidecar, target), "source": _describe(item)}
            # QC (`embed --qc`) needs the conformed grid for qc_signal_outside_crop; it is freed with `prepared`
            prepared = prepare(
                target, self.config, strict=self.strict, keep_grid=self.extra is not None,
                assume_reference_grid=self.assume_reference_grid, emit_warnings=False,
            )
            info: dict[str, Any] = {
                "method": prepared.method,
                "warnings": list(prepared.warnings),
                "kind": prepared.kind.kind,
                "kind_confidence": float(prepared.kind.confidence),
                "kind_warning": prepared.kind_warning,
                "source": prepared.source,
                "volume": prepared.volume,
            }
            if self.extra is not None:
                info.update(self.extra(prepared))
            info.update(route_info)
            return index, prepared.array, info, None
        except InputError as exc:
            return index, None, None, Failure(index, _describe(item), exc.stage, str(exc.args[0]))
        except AnatCLError as exc:
            return index, None, None, Failure(index, _describe(item), "prepare", str(exc))
        except MemoryError:
            return index, None, None, Failure(index, _describe(item), "read", "MemoryError: the input does not fit in memory")
        except Exception as exc:  # anything else, as plain text: it must pickle back from a worker
            try:
                text = f"{type(exc).__name__}: {exc}"
            except Exception:
                text = type(exc).__name__
            return index, None, None, Failure(index, _describe(item), "read", text)


_WORKER_LIMITS: list[Any] = []


def _worker_init(_worker_id: int) -> None:
    """Loader processes get one thread for torch and for BLAS.

    Oversubscribed BLAS threads in a loader (the resampling uses matrix products) made
    `anatcl embed` on 1 mm inputs 2.8x the forward's cost on 2 cores instead of 1.2x
    (benchmarks/NOTES.md).

    They also ignore SIGTERM and SIGINT: SLURM (and Ctrl-C) signal the whole process group, and
    the main process ends the run and stops its workers itself; a worker killed by the signal
    made the DataLoader print "worker (pid N) is killed by signal" tracebacks instead.
    """
    import signal

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits

        _WORKER_LIMITS.append(threadpool_limits(limits=1))
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        pass


def _collate(samples: list[tuple[int, np.ndarray | None, dict[str, Any] | None, Failure | None]]) -> tuple[
    list[int], torch.Tensor | None, list[dict[str, Any]], list[Failure]
]:
    indices = [s[0] for s in samples if s[1] is not None]
    arrays = [s[1] for s in samples if s[1] is not None]
    infos = [s[2] for s in samples if s[1] is not None]
    failures = [s[3] for s in samples if s[3] is not None]
    batch = torch.from_numpy(np.stack(arrays)) if arrays else None
    return indices, batch, infos, failures  # type: ignore[return-value]


def _drop_non_finite(
    indices: list[int], feats: np.ndarray, infos: list[dict[str, Any]], failures: list[Failure], items: Sequence[Any]
) -> tuple[list[int], np.ndarray, list[dict[str, Any]], list[Failure]]:
    """Rows with NaN/inf features become failures of their inputs, never written rows."""
    finite = np.isfinite(feats).all(axis=1)
    if finite.all():
        return indices, feats, infos, failures
    failures = list(failures)
    for row in np.flatnonzero(~finite):
        n_bad = int(np.count_nonzero(~np.isfinite(feats[row])))
        failures.append(Failure(
            indices[row], _describe(items[indices[row]]), "encode",
            f"the model's output has {n_bad} non-finite values (NaN/inf): the input's values are far outside the "
            "range the model was trained on (see its qc_kind warning); check that it is a CAT12 mwp1 map",
        ))
    keep = np.flatnonzero(finite)
    return [indices[i] for i in keep], feats[keep], [infos[i] for i in keep], failures


#: accepted spellings of each precision
PRECISIONS = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16"}


def resolve_precision(precision: str, device: str | torch.device | None = None, amp: bool | str = False) -> str:
    """Check that ``precision`` ("fp32", "bf16" or "fp16") can run on ``device``; return its short name.

    float32 runs everywhere and is the default. bfloat16 needs a CUDA GPU that supports it or a
    CPU with native bf16 (AVX512-BF16, AMX, Arm BF16): emulated bf16 would be slower than
    float32, so it is refused there. float16 needs a CUDA GPU or a CPU with AVX512-FP16/AMX-FP16.
    ``amp`` is the deprecated spelling: ``True``/``"bf16"`` -> bf16 (fp16 on a GPU without bf16),
    ``"fp16"`` -> fp16, on CUDA only (on other devices it was always ignored, and still is).

    Raises:
        ConfigError: an unknown precision, or one this device cannot run natively.
    """
    from ..model.devices import native_bf16_cpu, native_fp16_cpu

    dev = resolve_device(device)
    key = PRECISIONS.get(str(precision).lower())
    if key is None:
        raise ConfigError(f"precision must be one of fp32, bf16, fp16, got {precision!r}")
    if amp:
        warnings.warn("amp= is deprecated; use precision='bf16' or precision='fp16'", DeprecationWarning, stacklevel=3)
        if amp not in (True, "bf16", "fp16"):
            raise ConfigError(f"amp must be False, True, 'bf16' or 'fp16', got {amp!r}")
        if dev.type != "cuda":
            logger.warning("mixed precision (amp=%r) is only used on CUDA; computing in float32 on %s", amp, dev)
        elif key == "fp32":
            key = "fp16" if amp == "fp16" or not torch.cuda.is_bf16_supported() else "bf16"
    if key == "fp32":
        return key
    if dev.type == "cuda":
        if key == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"this GPU ({torch.cuda.get_device_name(dev)}) has no bfloat16; use precision='fp16' or precision='fp32'")
        return key
    if dev.type == "cpu":
        if key == "bf16" and not native_bf16_cpu():
            raise ConfigError(
                "precision bf16 needs a CPU with native bfloat16 (AVX512-BF16, AMX or Arm BF16); this one would "
                "emulate it, slower than float32. Use precision=\"fp32\" (the default), or a GPU"
            )
        if key == "fp16" and not native_fp16_cpu():
            raise ConfigError(
                "precision fp16 needs a CPU with AVX512-FP16 or AMX-FP16 (or a GPU); use precision=\"fp32\" "
                "(the default), or precision=\"bf16\" where the CPU supports it"
            )
        return key
    raise ConfigError(f"precision {key} is supported on CPU and CUDA only; use precision=\"fp32\" on {dev.type}")


def _as_items(inputs: Any) -> list[Any]:
    """Normalise one input or many into a list of single-volume items.

    A 4D input (an array or tensor stack, an ``(array, affine)`` tuple with volumes last, a
    4D nibabel image, a multi-channel TorchIO/MONAI image, a path to a 4D image file) becomes
    one item per volume, in order.
    """
    from ..inputs.preprocess import split_volumes

    if isinstance(inputs, (str, os.PathLike)):
        return split_volumes(inputs)
    if isinstance(inputs, tuple) and len(inputs) == 2 and hasattr(inputs[0], "shape") and hasattr(inputs[1], "shape"):
        return split_volumes(inputs)
    if isinstance(inputs, np.ndarray) or isinstance(inputs, torch.Tensor):
        if inputs.ndim in (3, 4) or (inputs.ndim == 5 and inputs.shape[1] == 1):
            return split_volumes(inputs)
        raise InputError(f"an array input must be 3D (one volume) or 4D (N volumes), got shape {tuple(inputs.shape)}", path="<array>")
    if hasattr(inputs, "get_fdata") or hasattr(inputs, "dataobj") or hasattr(inputs, "spatial_shape") or hasattr(inputs, "get_images"):
        return split_volumes(inputs)
    if hasattr(inputs, "tolist") and not isinstance(inputs, list):  # pandas Series, numpy object array
        inputs = inputs.tolist()
    out: list[Any] = []
    for item in inputs:
        out.extend(split_volumes(item))
    return out


def iter_encoded(
    model: AnatCL,
    inputs: Sequence[Any],
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    precision: str = "fp32",
    amp: bool | str = False,
    strict: bool = False,
    extra_info: Callable[[Any], dict[str, Any]] | None = None,
    progress_desc: str = "embedding",
    assume_reference_grid: bool = False,
    from_t1: Any = False,
    backend: str = "auto",
) -> Iterator[EncodedBatch]:
    """Yield :class:`EncodedBatch` objects in input order; bad inputs are reported, not raised.

    This is the engine under :func:`encode` and ``anatcl embed``. ``extra_info`` is
    called on each :class:`~anatcl_infer.inputs.preprocess.Prepared` where it is prepared and
    its dict merged into the row's info (used for QC metrics). Each row's info carries its
    ``warnings`` (plain sentences) and ``kind_warning``; nothing is emitted here — callers
    show them (:func:`encode` through :mod:`warnings`, ``anatcl embed`` on stderr). A row
    whose features are not finite is turned into a failure (``stage="encode"``).
    ``precision``, ``amp``, ``num_workers``, ``from_t1`` and ``backend`` are described in
    :func:`encode`; with ``from_t1`` the raw-T1 route runs where inputs are prepared (the loader
    thread or processes) and its ``qc_registration_ncc``, ``qc_skull_strip`` and
    ``qc_prep_output`` join each row's info. Each batch names the backend that computed it
    (``batch.backend``).
    """
    from .backends import check_backend, runner_info, select_runner

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size!r}")
    items = list(inputs)
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev, amp)
    check_backend(backend)
    if model.device != dev:
        model.to(dev)
    model.eval()
    runner = select_runner(model, device=dev, precision=precision, backend=backend)
    used = runner_info(runner)
    workers = default_num_workers(dev, len(items)) if num_workers is None else int(num_workers)
    route = None
    if from_t1:
        from ..inputs.t1_route import as_t1_route, check_t1_route

        route = as_t1_route(from_t1)
        check_t1_route(model.config.preprocess, route)  # a missing tool or weights: once, before any input
    threaded = num_workers is None and workers == 0 and dev.type == "cpu" and len(items) > 1
    dataset = _PrepareDataset(items, model.config.preprocess, strict, extra_info, assume_reference_grid, route)
    dim = model.config.feature_dim
    from tqdm.auto import tqdm

    bar = tqdm(total=len(items), desc=progress_desc, unit="vol", disable=None if progress else True, leave=False)
    batches = _streamed(dataset, runner, batch_size, threaded, dim) if workers == 0 else _loaded(dataset, runner, batch_size, workers, dev, dim)
    try:
        with torch.inference_mode():
            for indices, feats, infos, failures in batches:
                if len(indices):
                    indices, feats, infos, failures = _drop_non_finite(indices, feats, infos, failures, items)
                bar.update(len(indices) + len(failures))
                yield EncodedBatch(indices, feats, infos, failures, backend=dict(used))
    finally:
        batches.close()
        bar.close()


_Rows = tuple[list[int], np.ndarray, list[dict[str, Any]], list[Failure]]


def _streamed(dataset: _PrepareDataset, runner: Any, batch_size: int, threaded: bool, dim: int) -> Iterator[_Rows]:
    """Inputs prepared in this process (in a background thread when ``threaded``), each volume's
    forward as soon as it is ready, grouped ``batch_size`` inputs at a time."""
    from .prefetch import ThreadPrefetcher, blas_single_thread

    n = len(dataset)
    source: Any = ThreadPrefetcher(dataset.__getitem__, n, depth=2) if threaded else (dataset[i] for i in range(n))
    try:
        with blas_single_thread() if threaded else nullcontext():
            indices: list[int] = []
            rows: list[np.ndarray] = []
            infos: list[dict[str, Any]] = []
            failures: list[Failure] = []
            for count, (index, array, info, failure) in enumerate(source, 1):
                if failure is not None:
                    failures.append(failure)
                else:
                    rows.append(runner(torch.from_numpy(array)[None]).float().cpu().numpy())
                    indices.append(index)
                    infos.append(info)  # type: ignore[arg-type]
                if count % batch_size == 0 or count == n:
                    feats = np.concatenate(rows) if rows else np.empty((0, dim), dtype=np.float32)
                    yield indices, feats, infos, failures
                    indices, rows, infos, failures = [], [], [], []
    finally:
        if threaded:
            source.close()


def _loaded(dataset: _PrepareDataset, runner: Any, batch_size: int, workers: int, dev: torch.device, dim: int) -> Iterator[_Rows]:
    """Inputs prepared by loader processes (a DataLoader), one forward call per batch."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init,
        pin_memory=dev.type == "cuda",
        persistent_workers=False,
        prefetch_factor=2,
    )
    for indices, batch, infos, failures in loader:
        feats = np.empty((0, dim), dtype=np.float32)
        if batch is not None:
            feats = runner(batch.to(dev, non_blocking=True)).float().cpu().numpy()
        yield indices, feats, infos, failures


def encode(
    model: AnatCL,
    inputs: Any,
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    precision: str = "fp32",
    amp: bool | str = False,
    strict: bool = False,
    on_error: str = "raise",
    assume_reference_grid: bool = False,
    from_t1: Any = False,
    backend: str = "auto",
) -> np.ndarray:
    """Embed inputs into an (N, 512) float32 array, in input order.

    Rows: one per input, and one per volume of a 4D input (a ``(N, X, Y, Z)`` array or
    tensor, an ``(array, affine)`` tuple with ``N`` volumes last, a 4D nibabel image, a
    multi-channel TorchIO/MONAI image, a path to a 4D image file of ``N`` volumes), in order:
    a list of paths to 3D files gives exactly one row per path.

    Every input whose kind or quality is doubtful gets one warning through :mod:`warnings`
    (:class:`~anatcl_infer.errors.InputKindWarning` when it does not look like what the
    model expects, else :class:`~anatcl_infer.errors.InputWarning`), emitted here in the
    calling process even when loader workers prepared it.

    Args:
        model: a loaded :class:`~anatcl_infer.model.AnatCL`.
        inputs: one input or a sequence of them: NIfTI paths, nibabel images,
            ``(array, affine)`` tuples, TorchIO ``ScalarImage``/``Subject``, MONAI
            ``MetaTensor``, or (with ``assume_reference_grid=True``) arrays stored exactly
            like the model's reference grid.
        batch_size: volumes per forward pass (does not change the result).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or None for automatic.
        num_workers: loader processes. None (default): on CPU a background thread of this process
            prepares the next inputs while the forward pass runs (nothing to start, so a call on a
            handful of files costs little more than its forward passes); on GPU, processes chosen
            from the input count. 0: everything in the calling thread, one input after the other.
        progress: show a progress bar (only on a terminal).
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: the arithmetic of the forward
            pass (features are float32 either way). bf16 runs on CUDA GPUs that support it and
            on CPUs with native bf16 (AVX512-BF16/AMX/Arm BF16), where it is ~2.5x faster than
            fp32; rows keep a cosine of ~0.99999 to the fp32 features, but differences between
            subjects shift more (a simulated cohort's probe MAE rose by 1.8 years,
            ``benchmarks/NOTES.md``), so validate it on your data. It is refused where it would
            be emulated. fp16: CUDA, or CPUs with AVX512-FP16/AMX-FP16.
        amp: deprecated spelling of ``precision`` (CUDA only): ``True``/``"bf16"`` or ``"fp16"``.
        strict: turn input-kind warnings into errors (failures of those inputs).
        on_error: ``"raise"``: the first input that cannot be used raises
            :class:`~anatcl_infer.errors.InputError`; ``"warn"``: its row is NaN (rows stay
            aligned with the inputs) and one :class:`~anatcl_infer.errors.InputFailureWarning`
            names every failed input.
        assume_reference_grid: accept arrays without an affine of the grid (or model input)
            shape, on your word that they are stored like the reference grid (x from right
            to left, as CAT12 writes it). Without it such arrays are refused, because an
            array in RAS order would be embedded mirrored.
        from_t1: the inputs are raw native-space T1s: ``True`` (or a
            :class:`~anatcl_infer.inputs.t1_route.T1Route` with ``prep_dir``, ``skull_strip``...)
            runs the route of the model's ``input_kind`` first, in the loader workers: ``gm`` ->
            deepmriprep's mwp1 map; ``t1`` -> deepbet skull-stripping (when needed), affine
            registration to MNI152, the model's grid (:func:`~anatcl_infer.inputs.t1_route.prepare_t1`).
            Needs the ``[prep]`` extra.
        backend: who runs the forward pass: ``"auto"`` (default: OpenVINO on CPU when the
            ``[openvino]`` extra is installed and its conversion of this model was verified against
            the torch forward, else torch), ``"torch"`` or ``"openvino"``. Float32 features of both
            agree to ~1e-6 relative; see :mod:`anatcl_infer.encoding.backends`.

    Returns:
        ``np.ndarray`` of shape (N, feature_dim), float32.

    Raises:
        InputError: with ``on_error="raise"``, for the first input that cannot be used
            (``anatcl embed`` skips bad inputs instead and reports them all).

    Example:
        >>> model = anatcl_infer.load_model("anatcl-global", fold=0)  # doctest: +SKIP
        >>> feats = model.encode(["sub-01_mwp1.nii.gz", "sub-02_mwp1.nii.gz"], on_error="warn")  # doctest: +SKIP
        >>> feats.shape  # doctest: +SKIP
        (2, 512)
    """
    from ..inputs.preprocess import emit_input_warnings

    if on_error not in ("raise", "warn"):
        raise ConfigError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
    items = _as_items(inputs)
    out = np.zeros((len(items), model.config.feature_dim), dtype=np.float32)
    failed: list[Failure] = []
    for batch in iter_encoded(
        model, items, batch_size=batch_size, device=device, num_workers=num_workers,
        progress=progress, precision=precision, amp=amp, strict=strict, assume_reference_grid=assume_reference_grid,
        from_t1=from_t1,
        backend=backend,
    ):
        for info in batch.infos:  # one warning per input that has any, in the calling process
            emit_input_warnings(info.get("source", "<input>"), info.get("warnings", []), info.get("kind_warning"))
        if batch.failures and on_error == "raise":
            f = batch.failures[0]
            raise InputError(
                f"input {f.index} could not be used ({f.stage}): {f.message}. Fix or remove it, or pass "
                "on_error='warn' to get NaN rows for the failed inputs; `anatcl embed` skips bad inputs and "
                "reports them all.",
                path=f.path,
                stage=f.stage,
            )
        failed.extend(batch.failures)
        out[batch.indices] = batch.features
    if failed:
        out[[f.index for f in failed]] = np.nan
        lines = "\n".join(f"  input {f.index}: {f.path} ({f.stage}): {f.message}" for f in sorted(failed, key=lambda f: f.index))
        warnings.warn(
            f"{len(failed)} of {len(items)} inputs could not be used; their rows are NaN:\n{lines}",
            InputFailureWarning,
            stacklevel=user_stacklevel(),
        )
    return out


def extract_features(inputs: Any, model: Any = "anatcl-global", fold: int = 0, **encode_kwargs: Any) -> np.ndarray:
    """One line from images to (N, 512) features.

    Args:
        inputs: NIfTI paths, nibabel images, arrays, or a mix (see :func:`encode`).
        model: a registry name (``"anatcl-global"``, ``"anatcl-local"``), any source
            :func:`~anatcl_infer.load_model` accepts, or an already loaded ``AnatCL``.
        fold: cross-validation fold of a registry model (0-4).
        **encode_kwargs: ``batch_size``, ``device``, ``num_workers``, ``progress``, ``precision``,
            ``amp`` (deprecated), ``strict``, ``on_error`` (``"raise"`` or ``"warn"``: NaN rows for
            failed inputs, rows aligned with the inputs), ``assume_reference_grid``, ``from_t1`` (raw T1s:
            the route of the model's input kind runs first; see :func:`encode`).
            ``backend`` (``"auto"``, ``"torch"`` or ``"openvino"``). A 4D input (in memory or a 4D file) is one row per volume.

    Example:
        >>> import anatcl_infer
        >>> X = anatcl_infer.extract_features(["sub-01_mwp1.nii.gz"])  # doctest: +SKIP
    """
    unknown = sorted(set(encode_kwargs) - set(_ENCODE_KWARGS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; valid ones are {list(_ENCODE_KWARGS)}")
    if not isinstance(model, AnatCLNetwork):
        from ..weights.loading import load_model

        if not isinstance(model, (str, os.PathLike)):
            raise ConfigError(f"model must be a source name/path or an AnatCL, got {type(model).__name__}")
        model = load_model(model if isinstance(model, str) else Path(model), fold=fold, device=encode_kwargs.get("device"))
    return encode(model, inputs, **encode_kwargs)
