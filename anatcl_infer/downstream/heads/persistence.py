"""Saving and loading heads: the pickle-free ``head.safetensors`` + ``head.json`` format.

``head.safetensors`` holds per fold ``fold{k}.coef``, ``.intercept``, ``.scaler_mean``,
``.scaler_scale`` and, for classifiers, ``.calib_a``/``.calib_b`` (``fold_none`` for a
fold-less model); its metadata names :data:`HEAD_FORMAT`. ``head.json`` holds the rest: target,
kind, metrics, bias correction, conformal quantiles, and per fold the model name/source/SHA-256
the fold head was fitted on. :meth:`Head.save` and :meth:`Head.load` call these functions.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._version import __version__
from ...errors import HeadError
from .fold_head import FoldHead

if TYPE_CHECKING:
    from .head import Head

logger = logging.getLogger(__name__)

HEAD_CONFIG_NAME = "head.json"
HEAD_WEIGHTS_NAME = "head.safetensors"
HEAD_FORMAT = "anatcl-head/1"


def _to_native(value: Any) -> Any:
    """A NumPy scalar as the Python scalar it holds (for JSON); anything else unchanged."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_head(head: Head, directory: str | os.PathLike[str]) -> Path:
    """Write ``head``'s ``head.safetensors`` + ``head.json`` into ``directory`` (each atomically, umask modes)."""
    from safetensors.numpy import save_file

    from ..._files import atomic_path, makedirs

    target = makedirs(directory)
    tensors = {k: v for fh in head.folds.values() for k, v in fh.tensors().items()}
    with atomic_path(target / HEAD_WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": HEAD_FORMAT})
    with atomic_path(target / HEAD_CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(head.config, indent=2, default=_to_native) + "\n")
    logger.info("saved head %r (%s, folds %s) to %s", head.target, head.kind, list(head.folds), target)
    return target


def load_head(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], list[FoldHead]]:
    """Read a head directory: its ``head.json`` config and one :class:`FoldHead` per fold, checked against it.

    Raises:
        HeadError: when a file is missing or does not match ``head.json``.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from ...config import _version_tuple

    d = Path(directory)
    cfg_path, w_path = d / HEAD_CONFIG_NAME, d / HEAD_WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise HeadError(f"{d} is not a head directory: it needs {HEAD_CONFIG_NAME} and {HEAD_WEIGHTS_NAME} (create one with `anatcl fit-head`)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise HeadError(f"{cfg_path} is not valid JSON ({exc}); re-create the head with `anatcl fit-head`") from None
    if config.get("format") != HEAD_FORMAT:
        raise HeadError(f"{cfg_path} has format {config.get('format')!r}, expected {HEAD_FORMAT!r}; re-create the head with `anatcl fit-head`")
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise HeadError(f"{w_path} is not a readable safetensors file ({exc})") from None
    folds = []
    dim = int(config["feature_dim"])
    for entry in config["folds"]:
        key = "fold_none" if entry["fold"] is None else f"fold{entry['fold']}"
        try:
            arrays = {n: tensors[f"{key}.{n}"] for n in ("coef", "intercept", "scaler_mean", "scaler_scale")}
        except KeyError as exc:
            raise HeadError(f"{w_path} lacks tensor {exc.args[0]!r} named in {HEAD_CONFIG_NAME}; the head is corrupt") from None
        fh = FoldHead(fold=entry["fold"], info=entry, calib_a=tensors.get(f"{key}.calib_a"),
                      calib_b=tensors.get(f"{key}.calib_b"), **arrays)
        if fh.coef.shape[-1] != dim or fh.scaler_mean.shape != (dim,):
            raise HeadError(f"{w_path}: {key} weights are not {dim}-d as {HEAD_CONFIG_NAME} says")
        folds.append(fh)
    written = config.get("package_version", "0")
    if _version_tuple(written) > _version_tuple(__version__):
        logger.warning("head %s was written by anatcl-infer %s, newer than the installed %s", d, written, __version__)
    return config, folds
