"""The registry of published AnatCL weights, read from the manifest shipped in the wheel.

the top-level ``weights/manifest.json`` lists each variant (``anatcl-global``,
``anatcl-local``), its aliases (``global``/``g3``, ``local``/``l3``) and, per fold,
the original download URLs in order of preference with their SHA-256 where known.

A Hugging Face mirror is a setting, not a fact of the manifest: set
``ANATCL_HUB_REPO`` to a repository template such as ``myorg/{name}-fold{fold}``
(fields ``{name}``, ``{variant}``, ``{fold}``) and the registry tries that repository
first, falling back to the original URLs.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError, UnknownModelError

__all__ = [
    "FOLDS",
    "ModelSource",
    "ResolvedModel",
    "list_models",
    "resolve",
    "canonical_name",
    "model_card",
    "load_manifest",
    "hub_mirror",
    "find_by_sha256",
]

#: cross-validation folds of the published runs
FOLDS: tuple[int, ...] = (0, 1, 2, 3, 4)

HUB_REPO_ENV = "ANATCL_HUB_REPO"


@dataclass(frozen=True)
class ModelSource:
    """One place an original checkpoint can be downloaded from.

    Attributes:
        url: http(s) URL of the ``.pth``.
        release: the authors' package release that published it (``v0.0.2``...).
        sha256: SHA-256 of the whole file, ``None`` while unknown.
        size: size in bytes, ``None`` while unknown.
    """

    url: str
    release: str = ""
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class ResolvedModel:
    """A registry name and fold resolved to where its weights come from.

    Attributes:
        name: canonical registry name (``anatcl-global``).
        variant: ``global`` or ``local``.
        fold: cross-validation fold, 0-4.
        architecture: network name (``resnet18``).
        sources: original URLs, preferred first.
        hub_repo: Hub mirror repository from ``ANATCL_HUB_REPO`` (``None`` when unset).
    """

    name: str
    variant: str
    fold: int
    architecture: str
    sources: tuple[ModelSource, ...]
    hub_repo: str | None = None


def published_dir() -> Path:
    """Where the manifest and model cards are: the repository's top-level ``weights/`` folder.

    A wheel carries that folder as ``anatcl_infer/weights/published/`` (hatch ``force-include``);
    a source checkout or editable install reads it from the repository.
    """
    packaged = Path(str(resources.files(__package__))) / "published"
    if (packaged / "manifest.json").is_file():
        return packaged
    source = Path(__file__).resolve().parents[2] / "weights"
    if (source / "manifest.json").is_file():
        return source
    raise ConfigError(
        f"the weights manifest is missing (looked in {packaged} and {source}); reinstall anatcl-infer"
    )


@functools.lru_cache(maxsize=1)
def load_manifest() -> dict[str, Any]:
    """The parsed ``weights/manifest.json`` shipped with the package (read once per process).

    Example:
        >>> sorted(load_manifest()["models"])
        ['anatcl-global', 'anatcl-local']
    """
    return json.loads((published_dir() / "manifest.json").read_text(encoding="utf-8"))


def list_models() -> list[str]:
    """Canonical names of the registered models.

    Example:
        >>> list_models()
        ['anatcl-global', 'anatcl-local']
    """
    return sorted(load_manifest()["models"])


def canonical_name(name: str) -> str:
    """Map a registry name or alias (``global``, ``g3``...) to its canonical name.

    Raises:
        UnknownModelError: the name is not registered; the message lists the valid names.

    Example:
        >>> canonical_name("g3")
        'anatcl-global'
    """
    models = load_manifest()["models"]
    key = name.strip().lower()
    if key in models:
        return key
    for canonical, entry in models.items():
        if key in (a.lower() for a in entry.get("aliases", ())):
            return canonical
    valid = [n for canonical, entry in sorted(models.items()) for n in (canonical, *entry.get("aliases", ()))]
    raise UnknownModelError(
        f"unknown model {name!r}; valid names are {', '.join(valid)}, or pass an hf://org/name address, "
        "an http(s) URL, a .pth/.safetensors file or a model directory",
        name=name,
    )


def hub_mirror(name: str, variant: str, fold: int) -> str | None:
    """The Hub repository ``ANATCL_HUB_REPO`` names for this model and fold, if set.

    The template may use ``{name}``, ``{variant}`` and ``{fold}``; without any field
    it is used as is (one repository for one fold).

    Example:
        >>> import os; os.environ["ANATCL_HUB_REPO"] = "myorg/{name}-fold{fold}"
        >>> hub_mirror("anatcl-global", "global", 0)
        'myorg/anatcl-global-fold0'
        >>> del os.environ["ANATCL_HUB_REPO"]
    """
    template = os.environ.get(HUB_REPO_ENV, "").strip()
    if not template:
        return None
    template = template.removeprefix("hf://")
    try:
        return template.format(name=name, variant=variant, fold=fold)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"{HUB_REPO_ENV}={template!r} is not a valid template ({exc}); use fields {{name}}, {{variant}}, {{fold}}, "
            "e.g. myorg/{name}-fold{fold}"
        ) from None


def resolve(name: str, fold: int = 0) -> ResolvedModel:
    """Resolve a registry name (or alias) and fold to its download sources.

    Args:
        name: ``anatcl-global``, ``anatcl-local`` or an alias (``global``, ``g3``, ``local``, ``l3``).
        fold: cross-validation fold, 0-4.

    Raises:
        UnknownModelError: unknown name or fold.

    Example:
        >>> resolve("global", fold=0).sources[0].sha256[:8]
        '77f6d44d'
    """
    canonical = canonical_name(name)
    entry = load_manifest()["models"][canonical]
    folds = entry["folds"]
    if isinstance(fold, bool) or not isinstance(fold, int) or str(fold) not in folds:
        raise UnknownModelError(
            f"{canonical} has no fold {fold!r}; valid folds are {', '.join(sorted(folds))} "
            "(each fold is a separate model: never average embeddings across folds)",
            name=canonical,
        )
    sources = tuple(
        ModelSource(url=s["url"], release=s.get("release", ""), sha256=s.get("sha256"), size=s.get("size"))
        for s in folds[str(fold)]["sources"]
    )
    variant = entry["variant"]
    return ResolvedModel(
        name=canonical,
        variant=variant,
        fold=fold,
        architecture=entry.get("architecture", "resnet18"),
        sources=sources,
        hub_repo=hub_mirror(canonical, variant, fold),
    )


def find_by_sha256(sha256: str) -> tuple[ResolvedModel, ModelSource] | None:
    """The registered model and source whose original file has this SHA-256, if any.

    Lets a local copy of a published file get its registry identity (name, variant,
    fold, URL) from its content rather than its file name.

    Example:
        >>> found = find_by_sha256("77f6d44d0317ffc704ffc751db7eab349a8109e2cd596ab06070f1aec7a55d64")
        >>> found[0].name, found[0].fold, found[1].release
        ('anatcl-global', 0, 'v0.0.2')
    """
    wanted = sha256.lower()
    for name, entry in load_manifest()["models"].items():
        for fold, fold_entry in entry["folds"].items():
            for source in fold_entry["sources"]:
                if (source.get("sha256") or "").lower() == wanted:
                    resolved = resolve(name, int(fold))
                    return resolved, next(s for s in resolved.sources if s.url == source["url"])
    return None


def model_card(name: str) -> str:
    """The markdown model card of a registered model.

    Example:
        >>> card = model_card("anatcl-local")
        >>> card.startswith("---") and "# anatcl-local" in card   # Hub metadata, then the card
        True
    """
    canonical = canonical_name(name)
    card = load_manifest()["models"][canonical].get("card", f"cards/{canonical}.md")
    return (published_dir() / card).read_text(encoding="utf-8")
