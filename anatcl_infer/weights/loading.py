"""``load_model``: one entry point for every place AnatCL weights can come from.

Sources, tried in this order of interpretation:

1. ``hf://org/name[@revision]``: a Hub repository in the layout ``anatcl convert``
   writes (files stay in the Hub's cache);
2. an ``http(s)://`` URL of an original ``.pth``: downloaded, verified, converted once
   into ``<cache>/models/url-<hash>/`` and the ``.pth`` removed;
3. an existing local path: a model directory (``config.json`` + ``model.safetensors``),
   a ``.safetensors`` file, or an original ``.pth``/``.pt`` (read safely);
4. ``untrained``: the published network with random weights drawn from ``seed``
   (nothing downloaded; see :mod:`anatcl_infer.weights.untrained`);
5. a registry name (``anatcl-global``, ``anatcl-local`` and their aliases) with a fold:
   the Hub mirror first when ``ANATCL_HUB_REPO`` is set, else (or on failure) the
   original URLs, converted once into ``<cache>/models/<name>/fold<k>/`` -- or
   ``fold<k>-unverified/`` when the manifest knows no SHA-256 for the file used.

Every converted folder carries an ``integrity.json`` (:mod:`.integrity`) and is checked
against it, and against the registry's SHA-256, each time it is loaded from the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import operator
import os
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import CONFIG_NAME, WEIGHTS_NAME, ModelConfig
from .download import cache_dir, download_url, hf_download, is_offline, offline_hint, prefetch_hint, verify_sha256
from ..errors import CheckpointError, ConfigError, DownloadError, IntegrityError, OfflineError, UnsafeCheckpointError
from .._files import atomic_dir
from .integrity import integrity_problem, mark_checked, verify_model_dir, write_record
from .registry import ResolvedModel, canonical_name, find_by_sha256, resolve
from .selection import check_weights_choice
from .sources import fold_dirs
from .untrained import is_untrained_name, untrained_model

if TYPE_CHECKING:
    import torch

    from ..model.network import AnatCL
    from ..model.resnet import AnatCLNetwork

__all__ = [
    "load_model", "fetch_registry_model", "registry_model_dir", "parse_hf_address", "cached_state", "cache_check",
    "repair_hint", "UNVERIFIED_SUFFIX",
]

#: folder suffix of a registry model whose original file had no known SHA-256
UNVERIFIED_SUFFIX = "-unverified"

logger = logging.getLogger(__name__)

_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".pth.tar", ".ckpt", ".bin")


def parse_hf_address(address: str, revision: str | None = None) -> tuple[str, str | None]:
    """Split ``hf://org/name[@revision]`` into (repo_id, revision).

    A ``revision`` argument wins over one in the address only when they agree.

    Raises:
        ConfigError: malformed address, or two different revisions.

    Example:
        >>> parse_hf_address("hf://myorg/anatcl-global-fold0@v1")
        ('myorg/anatcl-global-fold0', 'v1')
    """
    rest = address[len("hf://"):] if address.startswith("hf://") else address
    repo, _, rev = rest.partition("@")
    repo = repo.strip("/")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ConfigError(f"{address!r} is not a Hub address; write hf://org/name or hf://org/name@revision")
    rev = rev or None
    if rev and revision and rev != revision:
        raise ConfigError(f"{address!r} names revision {rev!r} but revision={revision!r} was also given; give one")
    return repo, rev or revision


def _check_fold(fold: object) -> int:
    """``fold`` as an int: Python and NumPy integers pass (``operator.index``), bools, floats and text do not."""
    if not isinstance(fold, bool):
        with contextlib.suppress(TypeError):
            return operator.index(fold)  # type: ignore[arg-type]
    raise ConfigError(f"fold must be an integer (0-4 for the published models), got {fold!r:.40}")


def registry_model_dir(name: str, fold: int, *, verified: bool = True) -> Path:
    """Where a registry model is kept once converted: ``<cache>/models/<name>/fold<k>``.

    A model converted from a file whose SHA-256 the manifest does not know is kept
    apart, in ``fold<k>-unverified``, so it is never taken for a verified copy.

    Example:
        >>> registry_model_dir("global", 0).parts[-2:]
        ('anatcl-global', 'fold0')
        >>> registry_model_dir("global", 1, verified=False).name
        'fold1-unverified'
    """
    suffix = "" if verified else UNVERIFIED_SUFFIX
    return cache_dir() / "models" / canonical_name(name) / f"fold{_check_fold(fold)}{suffix}"


def _is_model_dir(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def _known_sources(resolved: ResolvedModel, sha256: str | None = None) -> set[str]:
    """The SHA-256s accepted for the original file: the caller's, else the manifest's."""
    return {sha256.lower()} if sha256 else {s.sha256.lower() for s in resolved.sources if s.sha256}


def repair_hint(name: str, fold: int) -> str:
    """The command that replaces a damaged cached copy of a registry model."""
    return (f"`anatcl download {canonical_name(name)} --fold {fold} --force` (offline: run it on a machine with "
            "network and copy the whole folder, integrity.json included), or delete the folder and load again")


def cache_check(name: str, fold: int) -> tuple[str | None, Path, str | None]:
    """What the cache holds for a registry model: ``(state, folder, problem)``.

    ``state`` is ``"verified"`` (a hash-verified source, and the folder matches its record),
    ``"unverified"`` (no known SHA-256 for its source; the folder matches its record),
    ``"failed"`` (the folder fails its integrity check: ``problem`` says why) or None (not cached).

    Example:
        >>> cache_check("anatcl-global", 0)  # doctest: +SKIP
        ('verified', PosixPath('/home/me/.cache/anatcl/models/anatcl-global/fold0'), None)
    """
    resolved = resolve(name, _check_fold(fold))
    for verified in (True, False):
        folder = registry_model_dir(resolved.name, fold, verified=verified)
        if _is_model_dir(folder):
            problem = integrity_problem(folder, _known_sources(resolved) if verified else ())
            state = "failed" if problem else "verified" if verified else "unverified"
            return state, folder, problem
    return None, registry_model_dir(resolved.name, fold), None


def cached_state(name: str, fold: int) -> str | None:
    """``"verified"``, ``"unverified"`` (no known SHA-256 for its source), ``"failed"`` (fails its
    integrity check) or None (not cached); see :func:`cache_check`.

    Example:
        >>> cached_state("anatcl-global", 0)  # doctest: +SKIP
        'verified'
    """
    return cache_check(name, fold)[0]


def _check_recorded_sha(directory: Path, sha256: str | None) -> None:
    """Compare a user-given sha256 with the source hash a converted directory recorded."""
    if not sha256:
        return
    recorded = ModelConfig.load(directory).source_sha256
    if recorded and recorded != sha256.lower():
        raise IntegrityError(
            f"{directory} was converted from a file with sha256 {recorded}, not {sha256.lower()}; "
            f"delete {directory} to fetch again, or pass the right sha256=",
            path=str(directory),
            expected=sha256.lower(),
            actual=recorded,
        )


def _download_and_convert(url: str, target: Path, config: ModelConfig, sha256: str | None, *, size: int | None = None, hint: str | None = None,
                          weights: str = "model") -> Path:
    """Download an original ``.pth``, convert it into ``target`` and delete the ``.pth``."""
    from .convert import convert_checkpoint

    downloads = cache_dir() / "downloads"
    # one name per process: a concurrent conversion of the same URL never deletes this file
    pth = downloads / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}.{os.getpid()}.pth"
    actual = download_url(url, pth, sha256=sha256, size=size, hint=hint or prefetch_hint())
    try:
        config = dataclasses.replace(config, source=url, source_sha256=actual)
        with atomic_dir(target) as staging:  # the folder appears (or replaces the old one) with its record
            convert_checkpoint(pth, staging, config, weights=weights)  # read in the jail (a separate, limited process)
            write_record(staging, source=url, source_sha256=actual)
        mark_checked(target)
    finally:
        pth.unlink(missing_ok=True)
    logger.info("converted %s into %s", url, target)
    return target


def fetch_registry_model(
    name: str, fold: int = 0, *, sha256: str | None = None, revision: str | None = None, retry_verified: bool = False, force: bool = False
) -> Path:
    """Make sure a registry model is available locally and return its directory.

    With ``ANATCL_HUB_REPO`` set the Hub mirror is tried first (files stay in the
    Hub's cache); on failure a warning is logged and the original URLs are used, each
    in turn, converted once into ``<cache>/models/<name>/fold<k>/``. A source whose
    SHA-256 is not known (neither the manifest's nor ``sha256``) is checked for format
    and shapes only and kept in ``fold<k>-unverified/``, never under the verified name.

    Args:
        name: registry name or alias.
        fold: 0-4.
        sha256: expected SHA-256 of the original file (overrides the manifest's).
        revision: Hub revision of the mirror.
        retry_verified: with a not hash-verified copy cached, try the hash-verified
            sources again first (``anatcl download`` does).
        force: download and convert again even when a copy is cached, replacing it
            (``anatcl download --force``: the repair of a copy that fails its check).

    A cached copy is checked against the ``integrity.json`` written beside it at conversion
    and against the manifest's SHA-256 before it is returned.

    Raises:
        OfflineError: offline and not cached (or ``force`` while offline).
        DownloadError: every source failed (each is listed).
        IntegrityError: a source served a file with the wrong hash, or the cached copy
            fails its integrity check (the message names the folder and the repair).

    Example:
        >>> fetch_registry_model("anatcl-global", 0)  # doctest: +SKIP
        PosixPath('/home/me/.cache/anatcl/models/anatcl-global/fold0')
    """
    fold = _check_fold(fold)
    resolved = resolve(name, fold)
    hint = prefetch_hint(resolved.name, fold)
    if revision is not None and not resolved.hub_repo:
        raise ConfigError(
            f"revision={revision!r} applies only to a Hub mirror; set ANATCL_HUB_REPO (e.g. myorg/{{name}}-fold{{fold}}) "
            "or load hf://org/name@revision directly"
        )
    if resolved.hub_repo:
        try:
            files = hf_download(resolved.hub_repo, (CONFIG_NAME, WEIGHTS_NAME), revision=revision)
            return files[WEIGHTS_NAME].parent
        except DownloadError as exc:
            logger.warning("Hub mirror %s failed (%s); falling back to the original URLs", resolved.hub_repo, exc)
    target = registry_model_dir(resolved.name, fold)
    repair = repair_hint(resolved.name, fold)
    if _is_model_dir(target) and not force:
        _check_recorded_sha(target, sha256)
        verify_model_dir(target, _known_sources(resolved, sha256), repair=repair)
        return target
    unverified = registry_model_dir(resolved.name, fold, verified=False)
    hashed = [s for s in resolved.sources if sha256 or s.sha256]
    if _is_model_dir(unverified) and not force and (not retry_verified or not hashed or is_offline()):
        _check_recorded_sha(unverified, sha256)
        verify_model_dir(unverified, (), repair=repair)
        logger.warning(
            "%s fold %d: using %s, converted from a file whose SHA-256 is not known to the manifest "
            "(not hash-verified; its hash is recorded in config.json)", resolved.name, fold, unverified,
        )
        return unverified
    if is_offline():
        if force:
            raise OfflineError(f"offline mode is on: {resolved.name} fold {fold} cannot be downloaded again (--force); {offline_hint(resolved.name, fold)}", url=resolved.sources[0].url)
        raise OfflineError(f"offline mode is on and {resolved.name} fold {fold} is not in the cache ({target}); {offline_hint(resolved.name, fold)}", url=resolved.sources[0].url)
    config = ModelConfig(architecture=resolved.architecture, variant=resolved.variant, fold=fold, name=resolved.name)
    failures = []
    for source in resolved.sources:
        expected = sha256 or source.sha256
        into = target if expected else unverified
        try:
            path = _download_and_convert(source.url, into, config, expected, size=source.size, hint=hint)
        except (OfflineError, UnsafeCheckpointError):
            raise
        except (DownloadError, CheckpointError, ConfigError) as exc:
            # a dead link, or a server answering with something else (an HTML sign-in page...)
            reason = str(exc).replace(f"; check the network, or pre-fetch: {hint}", "")
            logger.warning("%s source of %s fold %d failed: %s", source.release or "a", resolved.name, fold, reason)
            failures.append(f"{source.release or 'source'}: {reason}")
            continue
        if not expected:
            logger.warning(
                "%s fold %d: the manifest has no SHA-256 for %s; the file passed the format and shape checks and "
                "is cached as not hash-verified in %s", resolved.name, fold, source.url, path,
            )
            _drop_failing(target, _known_sources(resolved, sha256))
        return path
    if _is_model_dir(unverified) and not integrity_problem(unverified):
        logger.warning("%s fold %d: the hash-verified source failed; using the not hash-verified copy %s", resolved.name, fold, unverified)
        return unverified
    raise DownloadError(
        f"could not download {resolved.name} fold {fold} from any source:\n  " + "\n  ".join(failures) + "\n"
        f"Check the network, or pre-fetch: {hint}. If you have the original .pth, load it directly "
        "(load_model('fold0.pth')) or run `anatcl convert`; if a Hub mirror exists, set ANATCL_HUB_REPO "
        "(e.g. myorg/{name}-fold{fold}).",
        url=resolved.sources[0].url,
    )


def _drop_failing(folder: Path, expected_sources: Collection[str]) -> None:
    """Remove a cached copy that fails its integrity check (a forced download replaced it elsewhere)."""
    if _is_model_dir(folder) and (problem := integrity_problem(folder, expected_sources)):
        logger.warning("removing %s, which fails its integrity check (%s)", folder, problem)
        shutil.rmtree(folder, ignore_errors=True)


def _load_url(url: str, sha256: str | None, weights: str = "model") -> Path:
    """Directory of the converted model for an original ``.pth`` URL (downloaded once)."""
    from .convert import guess_identity

    target = cache_dir() / "models" / f"url-{hashlib.sha256(url.encode()).hexdigest()[:16]}{'-ema' if weights == 'ema' else ''}"
    if _is_model_dir(target):
        _check_recorded_sha(target, sha256)
        verify_model_dir(target, {sha256} if sha256 else (), repair=f"delete {target} and load {url} again")
        return target
    name, variant, fold = guess_identity(url)
    hint = f"download {url} on a machine with network and load the file directly (load_model('fold0.pth'))"
    return _download_and_convert(url, target, ModelConfig(variant=variant, fold=fold, name=name), sha256, hint=hint, weights=weights)


def _pick_fold_dir(path: Path, folds: dict[int, Path], fold: int | None) -> Path:
    """The ``fold<k>/`` folder of a folder of fold models that ``fold`` names."""
    have = ", ".join(f"fold{k}" for k in sorted(folds))
    if fold is None:
        raise ConfigError(f"{path} holds one model per fold ({have}); pass fold=<k> to load one of them "
                          "(folds are separate models: never average their features)")
    if fold not in folds:
        raise ConfigError(f"{path} has no fold{fold}/ model folder; it has {have}")
    return folds[fold]


def _load_local(path: Path, sha256: str | None, cls: type[AnatCLNetwork] | None = None, weights: str = "model") -> AnatCL:
    """Build a model from a local directory, ``.safetensors`` or original checkpoint."""
    from .checkpoint import load_pretrained_dir
    from .convert import guess_identity, model_from_checkpoint
    from .jail.cache import local_model
    from .jail.parent import check_regular_file

    if path.is_dir():
        if not _is_model_dir(path):
            raise CheckpointError(
                f"{path} is a directory without {CONFIG_NAME} + {WEIGHTS_NAME}; pass a directory written by "
                "`anatcl convert` or save_pretrained, or the checkpoint file itself",
                path=str(path),
            )
        if sha256:
            verify_sha256(path / WEIGHTS_NAME, sha256)
        return load_pretrained_dir(path, cls=cls)  # type: ignore[return-value]
    check_regular_file(str(path))  # a FIFO, a device: a CheckpointError before a byte is read
    if path.suffix == ".safetensors":
        if sha256:
            verify_sha256(path, sha256)
        beside = path.parent / CONFIG_NAME
        if beside.is_file():
            config = ModelConfig.load(beside)
        else:
            name, variant, fold = guess_identity(path.name)
            config = ModelConfig(name=name, variant=variant, fold=fold, source=str(path.resolve()))
            logger.warning(
                "%s has no %s beside it: using the default config (resnet18, the published preprocessing %s); "
                "write one with `anatcl convert` to make the spec travel with the weights",
                path, CONFIG_NAME, config.preprocess.model_input_shape,
            )
        return model_from_checkpoint(path, config, cls=cls)  # type: ignore[return-value]
    actual = verify_sha256(path, sha256)
    known = find_by_sha256(actual)
    if known is not None:  # a published file: its identity comes from its content
        resolved, source = known
        config = ModelConfig(architecture=resolved.architecture, name=resolved.name, variant=resolved.variant,
                             fold=resolved.fold, source=source.url, source_sha256=actual)
    else:
        name, variant, fold = guess_identity(str(path))
        config = ModelConfig(name=name, variant=variant, fold=fold, source=str(path.resolve()), source_sha256=actual)
    return local_model(path, config, actual, weights=weights, cls=cls)  # read in the jail once, then from the cache


def load_model(
    source: str | os.PathLike[str] = "anatcl-global",
    *,
    fold: int | None = None,
    revision: str | None = None,
    sha256: str | None = None,
    device: str | torch.device | None = None,
    cls: type[AnatCLNetwork] | None = None,
    seed: int | None = None,
    weights: str = "model",
) -> AnatCL:
    """Load AnatCL weights from the registry, the Hub, a URL or a local file.

    Args:
        source: a registry name (``anatcl-global``, ``anatcl-local``, aliases ``global``,
            ``g3``, ``local``, ``l3``); ``untrained`` (random weights, offline, to try things
            before the weights are fetched); ``hf://org/name[@revision]`` (or timm's ``hf-hub:org/name``); an http(s) URL of an
            original ``.pth``; a local ``.pth``/``.pt``/``.safetensors`` file; or a
            directory holding ``config.json`` + ``model.safetensors``.
        fold: cross-validation fold (0-4) of a registry model (default 0). Folds are
            separate models: never average their embeddings. A folder of ``fold<k>/`` model
            folders (cross-validation output, a registry cache folder): the fold to load
            (required). A file, URL or Hub repository holds one fold: a different ``fold``
            there is a warning.
        revision: Hub branch, tag or commit (``hf://`` sources and the registry's Hub
            mirror only).
        sha256: expected SHA-256 of the file read: the original ``.pth`` for URLs,
            ``.pth`` files and registry models, ``model.safetensors`` for directories,
            ``.safetensors`` files and Hub repositories.
        device: ``"cpu"``, ``"cuda"``, ``"mps"``, a ``torch.device``, or ``None`` for the
            best available.
        cls: the class to build (what ``AnatCL.from_pretrained`` passes); default
            :func:`~anatcl_infer.model.resnet.model_class`, the public ``AnatCL``.
        seed: the random draw of the ``untrained`` model (default 0; the same seed gives the
            same weights). Only for ``untrained``.
        weights: ``"model"`` (default) or ``"ema"``: which weights of an original ``.pth``
            (file or URL) holding both model and EMA weights to use (timm's ``use_ema``); a
            warning says which set was used. A file with EMA weights only loads them.

    Returns:
        An :class:`~anatcl_infer.model.AnatCL` (or ``cls``) in eval mode on ``device``, carrying its
        :class:`~anatcl_infer.config.ModelConfig` (``model.config``).

    Raises:
        UnknownModelError: not a registry name, URL, Hub address or existing path.
        CheckpointError: unreadable file or mismatching weights (keys listed); also when the
            separate process reading an original ``.pth`` crashed or broke a limit.
        UnsafeCheckpointError: the pickle asks to run code; nothing was run.
        IntegrityError: ``sha256`` (or the registry's hash) does not match.
        OfflineError: offline mode is on and the weights are not cached.
        DownloadError: the network or Hub failed.

    Example:
        >>> model = load_model("anatcl-global", fold=0, device="cpu")  # doctest: +SKIP
        >>> model.config.preprocess.model_input_shape  # doctest: +SKIP
        (121, 128, 121)
    """
    from .checkpoint import load_pretrained_dir
    from ..model.devices import resolve_device

    if fold is not None:
        fold = _check_fold(fold)
    text = os.fspath(source)
    if text.startswith("hf-hub:"):  # timm's spelling of a Hub address: an alias of hf://
        text = "hf://" + text[len("hf-hub:"):].lstrip("/")
    is_hf = text.startswith("hf://")
    is_url = text.startswith(("http://", "https://"))
    untrained = not is_hf and not is_url and is_untrained_name(text) and not Path(text).expanduser().exists()
    if seed is not None and not untrained:
        raise ConfigError(f"seed={seed!r:.40} applies only to load_model('untrained'), not to {text!r}")
    if check_weights_choice(weights) == "ema" and not (is_url or (Path(text).expanduser().is_file() and not text.endswith(".safetensors"))):
        raise ConfigError(f"weights='ema' applies to original checkpoints (a .pth/.pt file or its URL), not to {text!r}, "
                          "which holds one set of weights")
    if revision is not None and not is_hf and (is_url or Path(text).expanduser().exists()):
        raise ConfigError(f"revision={revision!r} applies only to hf:// sources and the registry's Hub mirror (ANATCL_HUB_REPO), not to {text!r}")
    if untrained:
        if revision is not None or sha256:
            raise ConfigError("revision= and sha256= do not apply to the untrained model (random weights, nothing is read)")
        model = untrained_model(0 if seed is None else seed, cls=cls)
    elif is_hf:
        repo, rev = parse_hf_address(text, revision)
        files = hf_download(repo, (CONFIG_NAME, WEIGHTS_NAME), revision=rev)
        if sha256:
            verify_sha256(files[WEIGHTS_NAME], sha256)
        model = load_pretrained_dir(files[WEIGHTS_NAME].parent, cls=cls)
    elif is_url:
        model = load_pretrained_dir(_load_url(text, sha256, weights), cls=cls)
    else:
        path = Path(text).expanduser()
        folds = fold_dirs(path) if path.is_dir() else {}
        if folds:  # a folder of fold<k>/ model folders (cross-validation output, a registry cache folder)
            model = _load_local(_pick_fold_dir(path, folds, fold), sha256, cls, weights)
            fold = None  # used
        elif path.exists():
            model = _load_local(path, sha256, cls, weights)
        elif path.suffix in (*_CHECKPOINT_SUFFIXES, ".safetensors") or os.sep in text or "/" in text:
            raise CheckpointError(
                f"{path} does not exist; check the path (a Hub repository is written hf://org/name, "
                "a registry model anatcl-global or anatcl-local)",
                path=str(path),
            )
        else:
            model = load_pretrained_dir(fetch_registry_model(text, 0 if fold is None else fold, sha256=sha256, revision=revision), cls=cls)
            fold = None  # used
    cfg = model.config
    if fold not in (None, 0, cfg.fold):
        # a file is one fold: say so instead of silently loading another one
        own = f"its config says fold {cfg.fold}" if cfg.fold is not None else "it does not record a fold"
        logger.warning(
            "fold=%d applies to registry models (anatcl-global, anatcl-local); %s was loaded as it is (%s)",
            fold, text, own,
        )
        import warnings

        warnings.warn(f"fold={fold} was not used: {text} holds one model ({own})", UserWarning, stacklevel=2)
    model = model.to(resolve_device(device)).eval()
    logger.info("loaded %s (variant %s, fold %s) from %s", cfg.name, cfg.variant, cfg.fold, cfg.source or text)
    return model  # type: ignore[return-value]
