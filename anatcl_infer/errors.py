"""Every exception the package raises.

All errors derive from :class:`AnatCLError`, and most also from the builtin that
describes them best, so callers can catch broadly (``except AnatCLError``) or
precisely (``except FileNotFoundError``). Messages say what to do next; errors
carry the offending path, key or source as attributes.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AnatCLError",
    "ConfigError",
    "UnknownModelError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "StateDictMismatchError",
    "IntegrityError",
    "DownloadError",
    "OfflineError",
    "InputError",
    "InputKindError",
    "HeadError",
    "MissingDependencyError",
    "OutputError",
    "AnatCLWarning",
    "InputWarning",
    "InputKindWarning",
    "InputFailureWarning",
    "CheckpointWarning",
    "BackendWarning",
]


class AnatCLError(Exception):
    """Base class of every error raised by anatcl-infer."""


class ConfigError(AnatCLError, ValueError):
    """A configuration (preprocessing spec, model config, head file) is invalid."""


class UnknownModelError(AnatCLError, KeyError):
    """A model name, variant or fold is not in the registry."""

    def __init__(self, message: str, *, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class CheckpointError(AnatCLError, ValueError):
    """A checkpoint file cannot be read as an AnatCL model."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint asks to call code while it is being unpickled; it was refused."""

    def __init__(self, message: str, *, path: str | None = None, global_name: str | None = None) -> None:
        super().__init__(message, path=path)
        self.global_name = global_name


class StateDictMismatchError(CheckpointError):
    """The weights in a checkpoint do not match the network's parameters exactly."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[str] = (),
    ) -> None:
        super().__init__(message, path=path)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


class IntegrityError(AnatCLError, ValueError):
    """A downloaded or local file does not have the expected SHA-256."""

    def __init__(self, message: str, *, path: str | None = None, expected: str = "", actual: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.expected = expected
        self.actual = actual


class DownloadError(AnatCLError, OSError):
    """A file could not be fetched from a URL or the Hugging Face Hub."""

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class OfflineError(DownloadError, FileNotFoundError):
    """Offline mode is on and the file is not in the cache."""


class InputError(AnatCLError, ValueError):
    """An input image cannot be used (unreadable, wrong shape, not in MNI space...).

    Attributes:
        path: the offending input, when it has one.
        stage: where it failed: ``"read"``, ``"check"``, ``"conform"``, ``"encode"``.
        reason: a short name for why, when the reader refused the file (e.g. ``"offset-in-header"``,
            ``"no-orientation"``, ``"truncated"``; see ``anatcl_infer.inputs.io.REASONS``), else None.
    """

    def __init__(self, message: str, *, path: str | None = None, stage: str = "check", reason: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.stage = stage
        self.reason = reason

    def __str__(self) -> str:
        msg = str(self.args[0])
        if self.path and self.path not in msg:
            return f"{self.path}: {msg}"
        return msg


class InputKindError(InputError):
    """An input does not look like what the model was trained on (raised under ``strict``)."""


class HeadError(AnatCLError, ValueError):
    """A prediction head cannot be fitted or does not fit these features."""


class MissingDependencyError(AnatCLError, ImportError):
    """An optional dependency (an extra such as ``[qc]`` or ``[prep]``) or its data is missing.

    Attributes:
        package: the missing package (or file).
        extra: the ``anatcl-infer`` extra that installs it, when there is one.
    """

    def __init__(self, message: str, *, package: str | None = None, extra: str | None = None) -> None:
        super().__init__(message)
        self.package = package
        self.extra = extra


class OutputError(AnatCLError, OSError):
    """An output cannot be written: the disk is full, the folder is read-only or not writable,
    or another run holds its lock.

    Attributes:
        path: the file or folder that could not be written.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path

    def __str__(self) -> str:
        return str(self.args[0])


class AnatCLWarning(UserWarning):
    """Base class of every warning anatcl-infer emits through the :mod:`warnings` module.

    Filter them all with ``warnings.simplefilter("ignore", anatcl_infer.AnatCLWarning)``,
    or turn them into errors with ``"error"``.
    """


class InputWarning(AnatCLWarning):
    """An input was embedded, but something about it is doubtful (position, field of view...).

    Emitted once per input; the message starts with the input's path.
    """


class InputKindWarning(InputWarning):
    """An input does not look like what the model was trained on (a T1, a smoothed map...).

    ``strict=True`` (``--strict``) turns it into an :class:`InputKindError`.
    """


class InputFailureWarning(AnatCLWarning):
    """Inputs could not be used and got NaN rows (``on_error="warn"``); the message names each."""


class CheckpointWarning(AnatCLWarning):
    """A checkpoint was loaded, but with a choice the caller may want to change.

    Emitted when a file holds both model and EMA weights (which set was used, and how to pick
    the other: ``load_model(..., weights="ema")``, ``--weights ema``), or EMA weights only.
    """


class BackendWarning(AnatCLWarning):
    """The chosen inference backend could not run a model (e.g. its OpenVINO conversion did not match
    the torch forward), so the torch module ran instead."""


def user_stacklevel() -> int:
    """The ``stacklevel`` for :func:`warnings.warn` that points at the first caller outside this package.

    Call it in the function that calls ``warnings.warn``: the warning then names the user's line
    (``extract_features(...)`` in their script), however deep inside the package it was raised.
    """
    import os
    import sys

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame = frame.f_back
        level += 1
    return level
