"""Specs as data: the preprocessing contract and the model config.

Both are frozen dataclasses serialised to JSON in ``config.json`` beside
``model.safetensors``, so the preprocessing always travels with the weights
(``anatcl convert`` writes it, :func:`anatcl_infer.load_model` reads it back).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._files import atomic_path
from ._version import __version__
from .errors import ConfigError

__all__ = [
    "REFERENCE_SHAPE",
    "REFERENCE_AFFINE",
    "PreprocessConfig",
    "ModelConfig",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "UNTRAINED",
    "is_untrained_source",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

#: The CAT12 1.5 mm MNI box the published models were trained on (OpenBHB "vbm").
REFERENCE_SHAPE: tuple[int, int, int] = (121, 145, 121)
REFERENCE_AFFINE: tuple[tuple[float, ...], ...] = (
    (-1.5, 0.0, 0.0, 90.0),
    (0.0, 1.5, 0.0, -126.0),
    (0.0, 0.0, 1.5, -72.0),
    (0.0, 0.0, 0.0, 1.0),
)

#: name, variant and source (``untrained:seed=<n>``) of a randomly initialised network
UNTRAINED = "untrained"
#: labels an untrained network may never carry: those of the published models
_PUBLISHED_LABELS = ("anatcl-global", "anatcl-local", "global", "local")

_INPUT_KINDS = ("gm", "t1")
#: bounds of a plausible grid (voxels per axis, voxels in all): a config.json cannot ask for more memory
MAX_GRID_DIM = 1024
MAX_GRID_VOXELS = 1 << 28
MAX_MODEL_VOXELS = 1 << 25
_ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101")


def _dims(value: Any, what: str, n: int = 3) -> tuple[int, ...]:
    """``n`` integers from JSON (no strings, no bools, no floats with a fraction), else a ConfigError."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{what} must be a list of {n} integers, got {value!r:.80}")
    items = list(value)
    if len(items) != n or any(isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v for v in items):
        raise ConfigError(f"{what} must be a list of {n} integers, got {value!r:.80}")
    return tuple(int(v) for v in items)
_INTENSITY = ("none", "zscore", "robust")


def _as_affine(value: Any) -> tuple[tuple[float, ...], ...]:
    rows = tuple(tuple(float(v) for v in row) for row in value)
    if len(rows) == 3:
        rows = rows + ((0.0, 0.0, 0.0, 1.0),)
    if len(rows) != 4 or any(len(r) != 4 for r in rows):
        raise ConfigError(f"grid_affine must be a 4x4 (or 3x4) matrix, got {value!r}")
    return rows


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image is turned into the array the model receives.

    Attributes:
        input_kind: ``"gm"`` for CAT12-style modulated grey-matter maps (mwp1; the
            published models' input) or ``"t1"`` for skull-stripped T1 in MNI space.
        grid_shape: shape of the target grid every image is conformed onto.
        grid_affine: voxel-to-world (MNI mm) affine of the target grid.
        crop: ``(start, stop)`` per axis applied after conforming; the published
            models use y 8:136 (145 -> 128).
        intensity: ``"none"`` (raw values, as the authors), ``"zscore"`` (per volume,
            over the whole array) or ``"robust"`` (per volume: subtract the median and
            divide by the interquartile range of the voxels above zero).
        pad_to: optional shape to zero-pad to after cropping (e.g. ``(128, 128, 128)``).

    Example:
        >>> cfg = PreprocessConfig()
        >>> cfg.model_input_shape
        (121, 128, 121)
    """

    input_kind: str = "gm"
    grid_shape: tuple[int, int, int] = REFERENCE_SHAPE
    grid_affine: tuple[tuple[float, ...], ...] = REFERENCE_AFFINE
    crop: tuple[tuple[int, int], ...] = ((0, 121), (8, 136), (0, 121))
    intensity: str = "none"
    pad_to: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.input_kind not in _INPUT_KINDS:
            raise ConfigError(f"input_kind must be one of {_INPUT_KINDS}, got {self.input_kind!r}")
        if self.intensity not in _INTENSITY:
            raise ConfigError(f"intensity must be one of {_INTENSITY}, got {self.intensity!r}")
        shape = _dims(self.grid_shape, "grid_shape")
        if min(shape) < 1 or max(shape) > MAX_GRID_DIM or shape[0] * shape[1] * shape[2] > MAX_GRID_VOXELS:
            raise ConfigError(f"grid_shape must be three integers in 1..{MAX_GRID_DIM} (at most {MAX_GRID_VOXELS} voxels), got {self.grid_shape!r}")
        object.__setattr__(self, "grid_shape", shape)
        try:
            object.__setattr__(self, "grid_affine", _as_affine(self.grid_affine))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"grid_affine must be a 4x4 (or 3x4) matrix of numbers, got {self.grid_affine!r:.80} ({exc})") from None
        if isinstance(self.crop, (str, bytes, dict)) or not hasattr(self.crop, "__iter__"):
            raise ConfigError(f"crop must be three (start, stop) pairs, got {self.crop!r:.80}")
        crop = tuple(_dims(pair, "each crop pair", 2) for pair in self.crop)
        if len(crop) != 3 or any(not (0 <= a < b <= n) for (a, b), n in zip(crop, shape)):
            raise ConfigError(f"crop {self.crop!r} must be three (start, stop) pairs inside grid_shape {shape}")
        object.__setattr__(self, "crop", crop)
        if self.pad_to is not None:
            pad = _dims(self.pad_to, "pad_to")
            cropped = tuple(b - a for a, b in crop)
            if any(p < c for p, c in zip(pad, cropped)) or max(pad) > MAX_GRID_DIM:
                raise ConfigError(f"pad_to {self.pad_to!r} must be >= the cropped shape {cropped} and <= {MAX_GRID_DIM}")
            object.__setattr__(self, "pad_to", pad)
        m = self.model_input_shape
        if m[0] * m[1] * m[2] > MAX_MODEL_VOXELS:
            raise ConfigError(f"the model input {m} has more than {MAX_MODEL_VOXELS} voxels; check crop and pad_to")

    @property
    def model_input_shape(self) -> tuple[int, int, int]:
        """Spatial shape of the array given to the network."""
        if self.pad_to is not None:
            return tuple(self.pad_to)  # type: ignore[return-value]
        return tuple(b - a for a, b in self.crop)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists, not tuples)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        """Build from :meth:`to_dict` output; unknown keys are an error."""
        if not isinstance(data, dict):
            raise ConfigError(f"preprocess must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown preprocessing keys {sorted(unknown)}; valid keys are {sorted(names)}")
        return cls(**data)


@dataclass(frozen=True)
class ModelConfig:
    """Everything that identifies a set of weights and how to feed them.

    Attributes:
        architecture: ``resnet18`` (published), ``resnet34``, ``resnet50`` or ``resnet101``.
        variant: ``global``, ``local`` or a free label for user-trained models.
        fold: cross-validation fold of the published run (``None`` for other models).
        name: registry name, e.g. ``anatcl-global``.
        source: where the weights came from (URL, ``hf://`` address or path).
        source_sha256: SHA-256 of the original file the weights were read from.
        feature_dim: size of the encoder output.
        projection_dim: size of the contrastive projection.
        preprocess: the preprocessing spec.

    A config whose ``source`` is ``untrained`` (or ``untrained:<detail>``) describes random
    weights: it never carries a published model's labels (name and variant ``anatcl-global``/
    ``anatcl-local``/``global``/``local`` become ``untrained``, the fold ``None``).
    """

    architecture: str = "resnet18"
    variant: str = "global"
    fold: int | None = 0
    name: str = "anatcl-global"
    source: str = ""
    source_sha256: str | None = None
    feature_dim: int = 512
    projection_dim: int = 128
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __post_init__(self) -> None:
        if self.architecture not in _ARCHITECTURES:
            raise ConfigError(f"architecture must be one of {_ARCHITECTURES}, got {self.architecture!r:.80}")
        for key in ("name", "variant"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value or len(value) > 200 or any(c in value for c in "/\\\0") or value in (".", ".."):
                raise ConfigError(f"{key} must be a short name without path separators, got {value!r:.80}")
        if self.fold is not None and (isinstance(self.fold, bool) or not isinstance(self.fold, int) or not 0 <= self.fold < 1000):
            raise ConfigError(f"fold must be an integer (0-4 for the published models) or null, got {self.fold!r:.80}")
        for key in ("feature_dim", "projection_dim"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65536:
                raise ConfigError(f"{key} must be an integer in 1..65536, got {value!r:.80}")
        if not isinstance(self.source, str) or not (self.source_sha256 is None or isinstance(self.source_sha256, str)):
            raise ConfigError("source must be text and source_sha256 text or null")
        if not isinstance(self.preprocess, PreprocessConfig):
            raise ConfigError(f"preprocess must be a preprocessing spec, got {type(self.preprocess).__name__}")
        if is_untrained_source(self.source) and self.name in _PUBLISHED_LABELS:
            # random weights never pass for a published model (the defaults name anatcl-global fold 0)
            object.__setattr__(self, "name", UNTRAINED)
            object.__setattr__(self, "fold", None)
            if self.variant in _PUBLISHED_LABELS:
                object.__setattr__(self, "variant", UNTRAINED)

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` content, with a version block."""
        data = dataclasses.asdict(self)  # the preprocessing spec too, as a nested dict
        data["anatcl_infer_version"] = __version__
        data["format"] = "anatcl-infer/1"
        return json.loads(json.dumps(data))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Read a ``config.json`` dict; warns when a newer package wrote it."""
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        written_by = data.pop("anatcl_infer_version", None)
        data.pop("format", None)
        if written_by and isinstance(written_by, str) and _version_tuple(written_by) > _version_tuple(__version__):
            warnings.warn(
                f"this config was written by anatcl-infer {written_by}, newer than the installed "
                f"{__version__}; upgrade with `pip install -U anatcl-infer` if loading misbehaves",
                stacklevel=2,
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            logger.warning("ignoring unknown config keys %s", sorted(unknown))
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["preprocess"] = PreprocessConfig.from_dict(data.get("preprocess", {}))
        return cls(**kwargs)

    def save(self, directory: str | Path) -> Path:
        """Write ``config.json`` into ``directory`` (atomically, with the umask's mode)."""
        path = Path(directory) / CONFIG_NAME
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory_or_file: str | Path) -> ModelConfig:
        """Read ``config.json`` from a directory or a file path."""
        path = Path(directory_or_file)
        if path.is_dir():
            path = path / CONFIG_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} not found: a model directory needs {CONFIG_NAME} beside {WEIGHTS_NAME}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(data)


def is_untrained_source(source: object) -> bool:
    """True for the ``source`` of a randomly initialised network: ``untrained`` or ``untrained:<detail>``.

    Example:
        >>> is_untrained_source("untrained:seed=0"), is_untrained_source("https://example.org/fold0.pth")
        (True, False)
    """
    return isinstance(source, str) and (source == UNTRAINED or source.startswith(UNTRAINED + ":"))


#: values of ANATCL_OFFLINE / HF_HUB_OFFLINE that turn offline mode on
_TRUE = {"1", "true", "yes", "on"}


def is_offline() -> bool:
    """True when ``ANATCL_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to a true value (read on each call).

    Example:
        >>> import os; os.environ["ANATCL_OFFLINE"] = "1"; is_offline()
        True
    """
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("ANATCL_OFFLINE", "HF_HUB_OFFLINE"))


def _version_tuple(version: object) -> tuple[int, ...]:
    """``major.minor.patch`` as integers, from each part's leading digits.

    A pre-release or local suffix does not count (``"0.2.0rc1"`` -> ``(0, 2, 0)``, not
    ``(0, 2, 1)``), and a value that is not text (a hand-edited JSON number) reads as 0.
    """
    parts = []
    for piece in str(version).split(".")[:3] if isinstance(version, str) else ():
        digits = re.match(r"\d*", piece.strip()).group()
        parts.append(int(digits) if digits else 0)
    return tuple(parts)
