"""Who runs the forward pass of :func:`encode` and ``anatcl embed``: torch, or OpenVINO on CPU.

``backend="auto"`` (the default) picks OpenVINO when all of these hold, else torch:

- the device is the CPU and the precision fp32 or bf16;
- ``openvino`` is installed (the ``[openvino]`` extra);
- the model is the package's :class:`~anatcl_infer.model.AnatCL` (or several folds of it) with no
  forward hooks on its encoder (hooks must run, so the torch module runs);
- its conversion was verified against the torch forward (see
  :mod:`anatcl_infer.encoding.openvino_backend`); a refused conversion is a
  :class:`~anatcl_infer.errors.BackendWarning` and torch runs.

``backend="openvino"`` insists on OpenVINO (a clear error where it cannot run, the same warning
and torch if its conversion is refused); ``backend="torch"`` always runs the torch module (the
fused CPU plan of :mod:`anatcl_infer.model.fused` on CPU).

A runner is kept on the model it was made for and reused by every later call with the same
weights, precision and thread count (an ``AnatCLEncoder`` keeps one for its life); new weights
make a new one.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any, Protocol

import torch

from ..errors import BackendWarning, ConfigError, user_stacklevel

__all__ = ["BACKENDS", "Runner", "TorchRunner", "select_runner", "runner_info", "check_backend"]

logger = logging.getLogger(__name__)

#: accepted values of ``backend=`` / ``--backend``
BACKENDS = ("auto", "torch", "openvino")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Runner(Protocol):
    """Runs a model's encoder: (B, C, D, H, W) float32 -> (B, features) float32."""

    name: str
    version: str
    precision: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def check_backend(backend: str) -> str:
    """``backend`` lower-cased, or :class:`~anatcl_infer.errors.ConfigError` when it is not one of :data:`BACKENDS`."""
    key = str(backend).lower()
    if key not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return key


class TorchRunner:
    """The torch module itself, under autocast for a reduced precision.

    On CPU each volume runs alone: oneDNN picks kernels by batch size, so a batched call would
    make a row's last bits depend on how inputs were grouped (shards, resumes, failures); batch 1
    costs the same per volume as batch 4 on CPU (benchmarks/NOTES.md). On GPU the batch is one call.
    """

    name = "torch"

    def __init__(self, model: Any, device: torch.device, precision: str) -> None:
        self.model, self.device, self.precision = model, device, precision
        self.version = torch.__version__

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ctx = nullcontext() if self.precision == "fp32" else torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.precision])
        with ctx:
            if self.device.type == "cpu" and x.shape[0] > 1:
                return torch.cat([self.model(x[i:i + 1]) for i in range(x.shape[0])])
            return self.model(x)


class _Stack:
    """Several fold models on the same batch, features side by side (one runner per fold)."""

    def __init__(self, runners: Sequence[Any]) -> None:
        self.runners = list(runners)
        self.name, self.version, self.precision = self.runners[0].name, self.runners[0].version, self.runners[0].precision

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([r(x) for r in self.runners], dim=1)


class _Known(Exception):
    """A refusal already reported for these weights."""


class _Slot:
    """Holds a model's OpenVINO runners; copies and pickles empty (compiled models do not pickle)."""

    def __init__(self) -> None:
        self.entries: dict[tuple[Any, ...], tuple[tuple[Any, ...], Any]] = {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Slot, ())


def runner_info(runner: Any) -> dict[str, str]:
    """``{"name": ..., "version": ...}`` of a runner: what the feature table's metadata records."""
    return {"name": str(runner.name), "version": str(runner.version)}


def _weights_key(module: torch.nn.Module) -> tuple[Any, ...]:
    """Changes when a parameter or buffer is replaced or modified in place (cheap: no hashing)."""
    state = []
    for m in module.modules():
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None:
                try:
                    version = t._version
                except RuntimeError:  # an inference tensor has no version counter
                    version = -1
                state.append((t.data_ptr(), version))
    return tuple(state)


def _is_package_model(model: Any) -> bool:
    """The package's network (AnatCL or its bare base class) with the package's own forward: its
    output is its encoder's features, so the encoder can be converted. A subclass that overrides
    ``forward``, or a wrapper, is called as it is."""
    forward = getattr(type(model), "forward", None)
    return (
        isinstance(model, torch.nn.Module)
        and isinstance(getattr(model, "encoder", None), torch.nn.Module)
        and hasattr(getattr(model, "config", None), "preprocess")
        and getattr(forward, "__module__", "").startswith("anatcl_infer.model.")
    )


def _fold_models(model: Any) -> list[Any] | None:
    """The package models behind ``model`` (itself, a list of folds, or a fold stack's ``models``), or None."""
    if _is_package_model(model):
        return [model]
    folds = model if isinstance(model, (list, tuple)) else getattr(model, "models", None)
    if isinstance(folds, (list, tuple)) and folds and all(_is_package_model(m) for m in folds):
        return list(folds)
    return None


class _Folds:
    """A list of fold models called as one: features side by side."""

    def __init__(self, models: Sequence[Any]) -> None:
        self.models = list(models)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.models], dim=1)


def _why_not_openvino(model: Any, device: torch.device, precision: str) -> str | None:
    """Why OpenVINO cannot run this model here (None: it can be tried)."""
    from ..model.fused import _has_hooks
    from .openvino_backend import openvino_version

    if device.type != "cpu":
        return f"OpenVINO runs on CPU here, not on {device.type}"
    if precision not in ("fp32", "bf16"):
        return f"precision {precision} runs through torch"
    models = _fold_models(model)
    if models is None:
        return f"a {type(model).__name__} is not the package's AnatCL model (or overrides its forward)"
    if any(_has_hooks(m) for m in models):
        return "forward hooks are registered on the encoder (they run only in the torch module)"
    if openvino_version() is None:
        return 'openvino is not installed (pip install "anatcl-infer[openvino]")'
    return None


def _openvino_runner(model: Any, precision: str) -> Any:
    """The model's cached OpenVINO runner, made (converted, verified, compiled) when missing or stale."""
    from ..weights.download import cache_dir
    from .openvino_backend import ConversionRefused, OpenVINORunner

    slot = model.__dict__.get("_backend_slot")
    if slot is None:
        slot = model.__dict__["_backend_slot"] = _Slot()
    ident = ("openvino", precision, torch.get_num_threads())
    key = _weights_key(model.encoder)
    found = slot.entries.get(ident)
    if found is not None and found[0] == key:
        if isinstance(found[1], ConversionRefused):
            raise _Known(str(found[1]))
        return found[1]
    shape = tuple(model.config.preprocess.model_input_shape)
    try:
        runner: Any = OpenVINORunner(model.encoder, precision, shape, cache_dir() / "models" / "openvino")
    except ConversionRefused as exc:
        slot.entries[ident] = (key, exc)  # refused once per weights: not retried on every call
        raise
    slot.entries[ident] = (key, runner)
    return runner


def select_runner(model: Any, *, device: torch.device, precision: str, backend: str = "auto") -> Any:
    """The runner for ``model`` (an AnatCL, a list of fold models, or any callable module) on
    ``device`` in ``precision`` (see the module docstring). Calling it again with the same model
    returns the runner made the first time.

    Raises:
        ConfigError: ``backend="openvino"`` where it cannot run (another device or precision,
            not the package's model, hooks registered).
        MissingDependencyError: ``backend="openvino"`` without openvino installed.
    """
    backend = check_backend(backend)
    if isinstance(model, (list, tuple)):
        model = model[0] if len(model) == 1 else _Folds(model)
    if backend == "torch":
        return TorchRunner(model, device, precision)
    why = _why_not_openvino(model, device, precision)
    if why is not None:
        if backend == "openvino":
            if "not installed" in why:
                from .._optional import require

                require("openvino", "openvino")
            raise ConfigError(f"backend='openvino' cannot run here: {why}; use backend='torch' or 'auto'")
        logger.debug("backend auto: torch (%s)", why)
        return TorchRunner(model, device, precision)
    from .openvino_backend import ConversionRefused

    models = _fold_models(model)
    assert models is not None
    try:
        runners = [_openvino_runner(m, precision) for m in models]
    except _Known as exc:  # warned when it was refused
        logger.info("%s; running the torch module instead", exc)
        return TorchRunner(model, device, precision)
    except ConversionRefused as exc:
        warnings.warn(f"{exc}; running the torch module instead", BackendWarning, stacklevel=user_stacklevel())
        return TorchRunner(model, device, precision)
    except Exception as exc:  # noqa: BLE001 - an OpenVINO failure must never stop an embedding run
        if backend == "openvino":
            raise ConfigError(f"backend='openvino' failed: {type(exc).__name__}: {exc}") from exc
        warnings.warn(f"OpenVINO could not run this model ({type(exc).__name__}: {exc}); running the torch module instead",
                      BackendWarning, stacklevel=user_stacklevel())
        return TorchRunner(model, device, precision)
    return runners[0] if len(runners) == 1 else _Stack(runners)
