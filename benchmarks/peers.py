"""The peers the benchmark compares with: other engines running the same weights on the same inputs.

A peer's user exports the module to ONNX (``torch.onnx.export``) and runs it with

- OpenVINO, default-configured: ``core.compile_model(path, "CPU")``; for float32 the one setting
  that makes it float32 (``INFERENCE_PRECISION_HINT: f32``: its default on CPUs with native bf16
  is bf16); for bf16 nothing at all;
- ONNX Runtime, default session (CPU execution provider, float32);

and, end to end, reads each file the way such a user does: ``nibabel.load(path).get_fdata()``,
the authors' crop ``[:, 8:136, :]``, float32, forward. Optional dependencies: ``pip install
"anatcl-infer[bench]"`` (openvino, onnxruntime, onnx, onnxscript); a peer whose package is
missing is skipped and reported as such.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

Forward = Callable[[np.ndarray], np.ndarray]


def export_onnx(model: torch.nn.Module, path: Path, shape: Sequence[int]) -> Path:
    """Export the model (eager, float32) to ONNX as a peer's user would: ``torch.onnx.export``."""
    encoder = model.encoder
    fused, encoder.fused = encoder.fused, False  # the plain module, no package-specific CPU plan
    x = torch.zeros(1, 1, *shape)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["features"], dynamo=True)
            except Exception as exc:  # noqa: BLE001 - the TorchScript exporter as a fallback
                logger.warning("torch.onnx.export(dynamo=True) failed (%s); using dynamo=False", exc)
                torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["features"], dynamo=False, opset_version=17)
    finally:
        encoder.fused = fused
    return path


def openvino_peer(onnx_path: Path, precision: str) -> tuple[Forward, dict[str, Any]] | None:
    """(forward, description) of OpenVINO default-configured on the ONNX file, or None without openvino."""
    try:
        import openvino as ov
    except ImportError:
        return None
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32"} if precision == "fp32" else {}
    default_precision = str(core.get_property("CPU", "INFERENCE_PRECISION_HINT"))
    if precision == "bf16" and "bf16" not in default_precision.lower():
        config = {"INFERENCE_PRECISION_HINT": "bf16"}  # a CPU whose default is not bf16: ask for it
    compiled = core.compile_model(str(onnx_path), "CPU", config)

    def forward(x: np.ndarray) -> np.ndarray:
        return compiled(x)[0]

    return forward, {"engine": "OpenVINO", "version": ov.get_version().split("-")[0], "config": config or "defaults",
                     "default_precision": default_precision}


def onnxruntime_peer(onnx_path: Path) -> tuple[Forward, dict[str, Any]] | None:
    """(forward, description) of ONNX Runtime's default CPU session, or None without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def forward(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    return forward, {"engine": "ONNX Runtime", "version": ort.__version__, "config": "defaults"}


def peer_pipeline(forward: Forward) -> Callable[[Sequence[Path]], np.ndarray]:
    """What a peer's user writes end to end: nibabel read, crop, float32, forward, per file."""
    import nibabel as nib

    def run(files: Sequence[Path]) -> np.ndarray:
        rows = []
        for f in files:
            data = nib.load(str(f)).get_fdata()[:, 8:136, :]
            rows.append(forward(np.ascontiguousarray(data[None, None], dtype=np.float32)))
        return np.concatenate(rows)

    return run
