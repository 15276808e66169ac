"""The one place a torch device is chosen."""

from __future__ import annotations

import logging

import torch

__all__ = ["resolve_device", "native_bf16_cpu", "native_fp16_cpu"]

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Return ``device`` as a :class:`torch.device`; ``None``/``"auto"`` picks cuda, then mps, then cpu.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        if torch.cuda.is_available():
            chosen = torch.device("cuda")
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            chosen = torch.device("mps")
        else:
            chosen = torch.device("cpu")
        logger.debug("using device %s", chosen)
        return chosen
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        from ..errors import ConfigError

        raise ConfigError(
            f"device={device!r} was asked for but CUDA is not available on this machine; use device=\"cpu\", "
            "or device=None to pick the best available"
        )
    return chosen


def _cpu_flags() -> set[str]:
    """The processor's feature flags (Linux ``/proc/cpuinfo``; macOS ``sysctl``); empty if unknown."""
    import platform
    import subprocess

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5, check=False
            ).stdout.strip()
            return {"bf16"} if out == "1" else set()
        except (OSError, subprocess.SubprocessError):
            return set()
    return set()


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16, AMX-BF16 or Arm BF16).

    Without it oneDNN emulates bf16 with float32 instructions: slower than float32 and
    less accurate, so :func:`anatcl_infer.encoding.encoder.encode` refuses ``precision="bf16"``.
    """
    flags = _cpu_flags()
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def native_fp16_cpu() -> bool:
    """Whether oneDNN has a native float16 path on this CPU (AVX512-FP16 / AMX-FP16)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported()) and bool(
            _cpu_flags() & {"avx512_fp16", "amx_fp16"}
        )
    except (AttributeError, RuntimeError):  # pragma: no cover - exotic builds
        return False
