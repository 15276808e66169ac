"""What a model source is, without loading its weights.

The command line checks its arguments before it loads a model (loading takes seconds, a
typo should not): :func:`source_kind` says what ``--model`` names, :func:`fold_sources`
turns ``--model``/``--fold`` into the sources to load (a registry name's folds, or the
``fold<k>/`` model folders of a directory), :func:`peek_config` reads the model's
``config.json`` where that costs nothing (its name and input kind name the outputs and
steer the search for inputs), and :func:`fold_advice` says how to get another fold in
words that fit the source (a registry fold, a sibling folder, or another file).

Nothing here imports torch or reads weights.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..config import CONFIG_NAME, WEIGHTS_NAME, ModelConfig
from ..errors import AnatCLError, ConfigError

__all__ = ["source_kind", "fold_dirs", "fold_sources", "peek_config", "fold_advice"]

_FOLD_DIR = re.compile(r"^fold(\d+)(-unverified)?$")
_REMOTE = ("hf://", "hf-hub:", "http://", "https://")


def _is_model_dir(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def fold_dirs(path: str | os.PathLike[str]) -> dict[int, Path]:
    """The ``fold<k>/`` model folders (``config.json`` + ``model.safetensors``) directly inside ``path``.

    A cache folder such as ``<cache>/models/anatcl-global/`` is one; ``fold<k>-unverified/``
    counts where no ``fold<k>/`` exists.

    Example:
        >>> fold_dirs("runs/cv")  # doctest: +SKIP
        {0: PosixPath('runs/cv/fold0'), 1: PosixPath('runs/cv/fold1')}
    """
    root = Path(path).expanduser()
    found: dict[int, Path] = {}
    if not root.is_dir() or _is_model_dir(root):
        return found
    for child in sorted(root.iterdir()):
        m = _FOLD_DIR.match(child.name)
        if m and _is_model_dir(child):
            k = int(m.group(1))
            if k not in found or not m.group(2):  # the verified copy wins
                found[k] = child
    return found


def source_kind(source: str | os.PathLike[str]) -> str:
    """What a model source names: ``"registry"``, ``"directory"``, ``"folds"`` (a folder of ``fold<k>/``
    models), ``"file"``, ``"remote"`` (``hf://`` or a URL) or ``"unknown"`` (anything else: a missing
    path, a mistyped name).

    Example:
        >>> source_kind("anatcl-global"), source_kind("hf://org/m")
        ('registry', 'remote')
    """
    text = os.fspath(source)
    if text.startswith(_REMOTE):
        return "remote"
    path = Path(text).expanduser()
    if path.is_dir():
        if _is_model_dir(path):
            return "directory"
        return "folds" if fold_dirs(path) else "unknown"
    if path.is_file():
        return "file"
    from .registry import canonical_name

    try:
        canonical_name(text)
    except AnatCLError:
        return "unknown"
    return "registry"


def fold_sources(source: str | os.PathLike[str], fold: str | int) -> list[tuple[str, int | None]]:
    """``(source, fold)`` pairs to load for ``--model SOURCE --fold FOLD``.

    ``fold`` is a number or ``"all"``. A registry name keeps its name and gets each fold; a
    folder of ``fold<k>/`` models gives each folder (whose fold is its own, so ``None``);
    any other source is one model.

    Raises:
        ConfigError: ``fold`` is neither a number nor ``all``; ``all`` for a source that holds
            one model; a fold a folder of fold models does not have.

    Example:
        >>> fold_sources("anatcl-global", "all")[:2]
        [('anatcl-global', 0), ('anatcl-global', 1)]
    """
    text = os.fspath(source)
    kind = source_kind(text)
    if str(fold) == "all":
        if kind == "registry":
            from .registry import canonical_name, load_manifest

            folds = sorted(int(k) for k in load_manifest()["models"][canonical_name(text)]["folds"])
            return [(text, k) for k in folds]
        if kind == "folds":
            return [(str(p), None) for _, p in sorted(fold_dirs(text).items())]
        raise ConfigError(
            f"fold='all' needs a registry model (anatcl-global, anatcl-local) or a folder of fold<k>/ model "
            f"folders; {text!r} holds one model"
        )
    try:
        k = int(str(fold))
    except ValueError:
        raise ConfigError(f"fold={str(fold)!r} is neither a fold number nor 'all'") from None
    if kind == "folds":
        dirs = fold_dirs(text)
        if k not in dirs:
            raise ConfigError(f"{text} has no fold{k}/ model folder; it has {', '.join(f'fold{j}' for j in sorted(dirs))}")
        return [(str(dirs[k]), None)]
    return [(text, k)]


def peek_config(source: str | os.PathLike[str]) -> ModelConfig | None:
    """The model's config where it can be read without loading weights or touching the network.

    A model directory's (or a ``.safetensors`` file's neighbouring) ``config.json``; for a
    registry name, the published config (name, variant, the published preprocessing);
    ``None`` for remote sources, ``.pth`` files and anything unreadable.

    Example:
        >>> peek_config("anatcl-global").preprocess.input_kind
        'gm'
    """
    text = os.fspath(source)
    kind = source_kind(text)
    try:
        if kind == "directory":
            return ModelConfig.load(Path(text).expanduser())
        if kind == "folds":
            first = next(iter(sorted(fold_dirs(text).items())))[1]
            return ModelConfig.load(first)
        if kind == "file" and text.endswith(".safetensors"):
            beside = Path(text).expanduser().parent / CONFIG_NAME
            return ModelConfig.load(beside) if beside.is_file() else None
        if kind == "registry":
            from .registry import resolve

            resolved = resolve(text, 0)
            return ModelConfig(architecture=resolved.architecture, variant=resolved.variant, fold=None, name=resolved.name)
    except (AnatCLError, OSError, ValueError):
        return None
    return None


def fold_advice(source: str | os.PathLike[str] | None, wanted: int | None) -> str:
    """How to get fold ``wanted`` of the model ``source`` names, in words that fit the source.

    A registry name takes ``fold=``; a model folder among ``fold<k>/`` siblings points at the
    sibling; any other directory or file holds one model, where ``fold=`` changes nothing.
    Python argument names are used (``fold=1``); the command line shows them as its options.

    Example:
        >>> fold_advice("anatcl-global", 1)
        'pass fold=1'
    """
    if source is None:
        return (f"use the fold-{wanted} model (load_model(name, fold={wanted}) for a registry model, "
                "else its own directory or file)")
    text = os.fspath(source)
    kind = source_kind(text)
    if kind in ("registry", "folds"):
        return f"pass fold={wanted}"
    path = Path(text).expanduser()
    sibling = path.parent / f"fold{wanted}"
    if kind == "directory" and _FOLD_DIR.match(path.name) and _is_model_dir(sibling):
        return f"use the model in {sibling}"
    what = "model directory" if kind == "directory" else ("file" if kind == "file" else "source")
    return (f"{text} is a {what} holding one model, so fold= does not change it; "
            f"give the fold-{wanted} model's own directory or file instead")
