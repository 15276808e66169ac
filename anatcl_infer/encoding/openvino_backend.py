"""OpenVINO as an optional CPU backend for the encoder (the ``[openvino]`` extra).

On CPUs OpenVINO's convolution kernels run this 3D ResNet faster than torch's oneDNN calls
(benchmarks/NOTES.md, attempt 16), so when ``openvino`` is installed :func:`encode` runs the
encoder through it on CPU (``backend="auto"``, see :mod:`anatcl_infer.encoding.backends`).

How a model gets there, once per set of weights:

1. **Convert**: the encoder is written as an OpenVINO graph directly from its weights (no
   tracing): convolution, BatchNorm (inference), ReLU and residual additions as OpenVINO nodes,
   the spatial size left dynamic. OpenVINO folds and fuses them itself, exactly as it does for an
   ONNX export of the module, so float32 and bf16 features are bit-identical to running the
   module through OpenVINO's own ONNX route (measured: benchmarks/NOTES.md, attempt 16). Only the
   ResNet structure of :mod:`anatcl_infer.model` is understood; anything else is refused (and
   torch runs).
2. **Verify**: the converted graph, compiled in float32, must agree with the torch forward of the
   same encoder on two smooth synthetic volumes: every row's cosine >= 0.99999 and its largest
   difference <= 1e-5 of its largest value. Otherwise it is refused with a warning, and torch runs.
3. **Cache**: graph and verification record go to ``<cache>/models/openvino/<sha256>/``, keyed by
   the SHA-256 of the encoder's weights (names, dtypes, shapes and bytes), written atomically (a
   temporary folder renamed into place) and reused by every later process. A record made with
   another OpenVINO version is verified again; one made by another version of this converter
   (:data:`CONVERTER_VERSION`) is converted again: the same weights must give the same graph in
   every process, or a resumed table would mix two float32 roundings.

Each process then compiles the graph for the input size with a latency hint, torch's thread
count, and ``INFERENCE_PRECISION_HINT`` f32 (bf16 only for ``precision="bf16"``: OpenVINO's own
default on CPUs with native bf16 is bf16, which fp32 must never silently become). One infer
request per input size is reused, and the input is passed without a copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["OpenVINORunner", "openvino_version", "ConversionRefused", "MIN_COSINE", "MAX_REL_DIFF"]

logger = logging.getLogger(__name__)

#: the verification's bounds for every float32 row against the torch forward
MIN_COSINE = 0.99999
MAX_REL_DIFF = 1e-5

#: bumped whenever :func:`build_graph` emits a different graph: cached graphs of other versions are rebuilt
CONVERTER_VERSION = 2

_XML, _RECORD = "encoder.xml", "verified.json"
_PRECISION_HINT = {"fp32": "f32", "bf16": "bf16"}
_CORE: list[Any] = []


class ConversionRefused(RuntimeError):
    """The encoder could not be converted, or its conversion did not match the torch forward."""


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None when it is not installed (or does not import)."""
    try:
        import openvino as ov
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return None
    return str(ov.get_version())


def _core() -> Any:
    import openvino as ov

    if not _CORE:
        _CORE.append(ov.Core())
    return _CORE[0]


def weights_digest(encoder: torch.nn.Module) -> str:
    """SHA-256 of the encoder's weights and buffers: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name, value in sorted(encoder.state_dict().items()):
        t = value.detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- conversion


def _check_plain(conv: Any, bn: Any) -> None:
    if conv.groups != 1 or tuple(conv.dilation) != (1, 1, 1) or conv.padding_mode != "zeros" or not isinstance(bn, torch.nn.BatchNorm3d):
        raise ConversionRefused("only plain convolutions followed by BatchNorm3d are converted")
    if bn.running_mean is None or bn.running_var is None or bn.weight is None or bn.bias is None:
        raise ConversionRefused("BatchNorm3d without running statistics or affine parameters is not converted")


def _const(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())


def _conv(ops: Any, h: Any, conv: Any, bn: Any, *, relu: bool = False, add: Any = None) -> Any:
    """conv -> BatchNormInference (-> + add) (-> ReLU) as OpenVINO nodes; OpenVINO folds and fuses them."""
    _check_plain(conv, bn)
    pad = [int(p) for p in conv.padding]
    y = ops.convolution(h, ops.constant(_const(conv.weight)), [int(s) for s in conv.stride], pad, pad, [1, 1, 1])
    if conv.bias is not None:
        y = ops.add(y, ops.constant(_const(conv.bias).reshape(1, -1, 1, 1, 1)))
    y = ops.batch_norm_inference(y, ops.constant(_const(bn.weight)), ops.constant(_const(bn.bias)),
                                 ops.constant(_const(bn.running_mean)), ops.constant(_const(bn.running_var)), float(bn.eps))
    if add is not None:
        y = ops.add(y, add)
    return ops.relu(y) if relu or add is not None else y


def build_graph(encoder: Any) -> Any:
    """The encoder as an ``openvino.Model`` with input (1, C, D, H, W), D/H/W dynamic, output (1, features)."""
    import openvino as ov
    import openvino.opset13 as ops

    try:
        mp = encoder.maxpool
        layers = [encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4]
        in_channels = int(encoder.conv1.in_channels)
        x = ops.parameter([1, in_channels, -1, -1, -1], ov.Type.f32, name="x")
        h = _conv(ops, x, encoder.conv1, encoder.bn1, relu=True)
        k, s, p = (int(v) for v in (mp.kernel_size, mp.stride, mp.padding))
        if getattr(mp, "ceil_mode", False) or int(getattr(mp, "dilation", 1)) != 1:
            raise ConversionRefused("max pooling with ceil_mode or dilation is not converted")
        h = ops.max_pool(h, [s] * 3, [1, 1, 1], [p] * 3, [p] * 3, [k] * 3).output(0)
        for layer in layers:
            for block in layer:
                identity = h
                if block.downsample is not None:
                    identity = _conv(ops, h, block.downsample[0], block.downsample[1])
                i, y = 1, h
                convs = []
                while hasattr(block, f"conv{i}"):
                    convs.append((getattr(block, f"conv{i}"), getattr(block, f"bn{i}")))
                    i += 1
                if len(convs) < 2:
                    raise ConversionRefused(f"a residual block with {len(convs)} convolution(s) is not understood")
                for conv, bn in convs[:-1]:
                    y = _conv(ops, y, conv, bn, relu=True)
                h = _conv(ops, y, *convs[-1], add=identity)
        out = ops.reduce_mean(h, ops.constant(np.array([2, 3, 4], np.int64)), keep_dims=False)
    except (AttributeError, TypeError, IndexError) as exc:
        raise ConversionRefused(f"the encoder's structure is not the package's 3D ResNet ({exc})") from None
    return ov.Model([out], [x], "anatcl_encoder")


def _phantom(shape: tuple[int, ...], channels: int) -> np.ndarray:
    """Two deterministic smooth volumes in [0, 1] (a brain-like blob with texture), (2, C, D, H, W) float32."""
    from scipy import ndimage

    rng = np.random.default_rng(20240817)
    grids = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float64) for n in shape], indexing="ij")
    radius = np.sqrt(sum(g * g for g in grids))
    out = np.empty((2, channels, *shape), np.float32)
    for i in range(2):
        coarse = rng.standard_normal((channels, 6, 6, 6))
        field = ndimage.zoom(coarse, [1, *[n / 6 for n in shape]], order=1)[:, : shape[0], : shape[1], : shape[2]]
        out[i] = (np.clip(1.1 - radius, 0, 1) * (0.6 + 0.3 * np.tanh(field) + 0.05 * i)).astype(np.float32)
    return out


def _compare(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)
    rel = np.abs(a - b).max(1) / np.maximum(np.abs(b).max(1), 1e-300)
    return {"cosine_min": float(cos.min()), "max_rel_diff": float(rel.max())}


def verify(encoder: Any, graph: Any, shape: tuple[int, ...]) -> dict[str, Any]:
    """Compare the graph compiled in float32 with the torch forward of ``encoder`` on two synthetic volumes."""
    channels = int(encoder.conv1.in_channels)
    x = _phantom(shape, channels)
    slot = encoder.__dict__.get("_fused_slot")
    had_plan = slot is not None and getattr(slot, "plan", None) is not None
    was_training = encoder.training
    encoder.eval()  # the graph is the inference graph (BatchNorm on running statistics): compared in eval mode
    try:
        with torch.inference_mode(), torch.autocast("cpu", enabled=False):
            ref = encoder(torch.from_numpy(x)).float().numpy()
    finally:
        encoder.train(was_training)
    slot = encoder.__dict__.get("_fused_slot")
    if not had_plan and slot is not None and hasattr(slot, "plan"):
        slot.plan = None  # the torch plan (pre-packed weights, ~130 MB) was built only for this check
    compiled = _compile(graph, shape, channels, "fp32", max(1, torch.get_num_threads()))
    request = compiled.create_infer_request()
    ours = np.concatenate([_infer(request, x[i:i + 1]) for i in range(len(x))])
    result = _compare(ours, ref)
    result["ok"] = bool(result["cosine_min"] >= MIN_COSINE and result["max_rel_diff"] <= MAX_REL_DIFF)
    result["shape"] = list(shape)
    return result


def _compile(graph: Any, shape: tuple[int, ...], channels: int, precision: str, threads: int) -> Any:
    graph = graph.clone()
    graph.reshape({0: [1, channels, *shape]})
    config = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": int(threads),
        "INFERENCE_PRECISION_HINT": _PRECISION_HINT[precision],
    }
    return _core().compile_model(graph, "CPU", config)


def _infer(request: Any, x: np.ndarray) -> np.ndarray:
    import openvino as ov

    request.set_input_tensor(ov.Tensor(x, shared_memory=True))  # no copy of the volume
    request.infer()
    return np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)


def _write_atomically(folder: Path, graph: Any, record: dict[str, Any]) -> None:
    """Write graph + record into a temporary folder beside ``folder``, then rename it into place."""
    import openvino as ov

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name[:16]}-", dir=folder.parent))
    try:
        ov.save_model(graph, str(tmp / _XML), compress_to_fp16=False)  # the default would round weights to fp16
        (tmp / _RECORD).write_text(json.dumps(record, indent=1) + "\n")
        if folder.exists():  # an older record (another OpenVINO version): replace it
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process renamed its copy first: keep that one
            if not (folder / _RECORD).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _record_ok(record: dict[str, Any], version: str) -> bool | None:
    """True/False for a record made with this OpenVINO version, None when it must be verified again."""
    if record.get("openvino") != version:
        return None
    return bool(record.get("ok"))


def _built_here(record: dict[str, Any]) -> bool:
    """Whether a cached graph was written by this version of :func:`build_graph`."""
    return record.get("converter") == CONVERTER_VERSION


def load_or_convert(encoder: Any, shape: tuple[int, ...], cache_root: Path | None) -> tuple[Any, dict[str, Any]]:
    """The encoder's verified OpenVINO graph (from the cache, or converted now) and its verification record.

    Raises:
        ConversionRefused: not convertible, or the conversion does not match the torch forward.
    """
    version = openvino_version() or "?"
    digest = weights_digest(encoder)
    folder = cache_root / digest if cache_root is not None else None
    core = _core()
    if folder is not None and (folder / _RECORD).is_file() and (folder / _XML).is_file():
        try:
            record = json.loads((folder / _RECORD).read_text())
            graph = core.read_model(str(folder / _XML))
        except (OSError, ValueError, RuntimeError) as exc:  # a damaged cache entry: convert again
            logger.warning("OpenVINO cache entry %s is unreadable (%s); converting again", folder, exc)
        else:
            if not _built_here(record):
                logger.info("OpenVINO cache entry %s was written by converter %s (now %d); converting again",
                            folder, record.get("converter", 1), CONVERTER_VERSION)
            else:
                return _cached(encoder, graph, record, folder, shape, digest, version)
    return _convert(encoder, folder, shape, digest, version)


def _cached(encoder: Any, graph: Any, record: dict[str, Any], folder: Path, shape: tuple[int, ...],
            digest: str, version: str) -> tuple[Any, dict[str, Any]]:
    """A graph read from the cache: used as it is, refused as recorded, or verified again (another OpenVINO)."""
    state = _record_ok(record, version)
    if state is True:
        logger.debug("OpenVINO graph of %s read from %s", digest[:12], folder)
        return graph, record
    if state is False:
        raise ConversionRefused(_refusal(record))
    record = _verified_record(encoder, graph, shape, digest, version)
    _try_write(folder, graph, record)
    if not record["ok"]:
        raise ConversionRefused(_refusal(record))
    return graph, record


def _convert(encoder: Any, folder: Path | None, shape: tuple[int, ...], digest: str, version: str) -> tuple[Any, dict[str, Any]]:
    """Convert, verify and cache (when ``folder`` is given) the encoder's graph."""
    t0 = time.perf_counter()
    graph = build_graph(encoder)
    record = _verified_record(encoder, graph, shape, digest, version)
    logger.info("converted the encoder (weights %s) to OpenVINO %s in %.1f s: cosine %.8f, max rel. diff. %.1e%s",
                digest[:12], version, time.perf_counter() - t0, record["cosine_min"], record["max_rel_diff"],
                "" if folder is None else f"; cached in {folder}")
    if folder is not None and _try_write(folder, graph, record):
        graph = _core().read_model(str(folder / _XML))  # the same graph every later process reads
    if not record["ok"]:
        raise ConversionRefused(_refusal(record))
    return graph, record


def _verified_record(encoder: Any, graph: Any, shape: tuple[int, ...], digest: str, version: str) -> dict[str, Any]:
    record = verify(encoder, graph, shape)
    record.update({"weights_sha256": digest, "converter": CONVERTER_VERSION, "openvino": version, "torch": torch.__version__,
                   "min_cosine": MIN_COSINE, "max_allowed_rel_diff": MAX_REL_DIFF,
                   "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    return record


def _try_write(folder: Path, graph: Any, record: dict[str, Any]) -> bool:
    try:
        _write_atomically(folder, graph, record)
        return True
    except OSError as exc:  # a read-only cache: keep the conversion in memory for this process
        logger.warning("could not cache the OpenVINO conversion in %s (%s); it is redone in every process", folder, exc)
        return False


def _refusal(record: dict[str, Any]) -> str:
    return (f"the OpenVINO conversion does not match the torch forward (cosine {record.get('cosine_min'):.8f} >= "
            f"{MIN_COSINE} and max rel. diff. {record.get('max_rel_diff'):.1e} <= {MAX_REL_DIFF} required)")


# --------------------------------------------------------------------------- running


class OpenVINORunner:
    """The encoder's forward through OpenVINO on CPU: (B, C, D, H, W) float32 -> (B, features) float32.

    Each volume runs alone (rows never depend on how inputs were batched). One compiled model
    and one infer request per input size, made on first use and reused.

    Args:
        encoder: the model's encoder (a :class:`~anatcl_infer.model.network.ResNet3D`).
        precision: ``"fp32"`` or ``"bf16"``.
        shape: the input size to convert and verify with (the model's input grid).
        cache_root: where converted graphs are kept (None: not cached).
    """

    name = "openvino"

    def __init__(self, encoder: Any, precision: str, shape: tuple[int, ...], cache_root: Path | None) -> None:
        if precision not in _PRECISION_HINT:
            raise ConversionRefused(f"precision {precision} does not run through OpenVINO here")
        self.precision = precision
        self.version = openvino_version() or "?"
        self.threads = max(1, torch.get_num_threads())
        self.channels = int(encoder.conv1.in_channels)
        self._graph, self.record = load_or_convert(encoder, tuple(shape), cache_root)
        self._requests: dict[tuple[int, ...], Any] = {}
        self._request(tuple(shape))  # compile now: failures show at selection, not mid-run

    def _request(self, shape: tuple[int, ...]) -> Any:
        request = self._requests.get(shape)
        if request is None:
            t0 = time.perf_counter()
            compiled = _compile(self._graph, shape, self.channels, self.precision, self.threads)
            request = self._requests[shape] = compiled.create_infer_request()
            logger.debug("OpenVINO compiled for %s (%s, %d threads) in %.2f s", shape, self.precision, self.threads, time.perf_counter() - t0)
        return request

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Features of each volume of ``x``, computed one volume at a time."""
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        request = self._request(tuple(arr.shape[2:]))
        rows = [_infer(request, arr[i:i + 1]) for i in range(arr.shape[0])]
        return torch.from_numpy(np.concatenate(rows))
