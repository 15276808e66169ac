"""The cache directory and every network access: plain URLs and the Hugging Face Hub.

* Cache root: ``$ANATCL_CACHE``, else the platform's user cache directory
  (``$XDG_CACHE_HOME/anatcl`` or ``~/.cache/anatcl``, ``~/Library/Caches/anatcl``,
  ``%LOCALAPPDATA%/anatcl``). Hub files stay in the Hub's own cache.
* Downloads stream to a temporary name in the target directory, verify SHA-256 while
  streaming, and are renamed into place only when complete and correct.
* Offline mode (``ANATCL_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``) never touches the
  network: a missing file raises :class:`~anatcl_infer.errors.OfflineError` at once.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .._files import atomic_path, regular_file_sha256
from ..config import is_offline
from ..errors import DownloadError, IntegrityError, OfflineError

__all__ = [
    "cache_dir",
    "is_offline",
    "sha256_file",
    "verify_sha256",
    "download_url",
    "hf_download",
    "PREFETCH_HINT",
    "prefetch_hint",
    "offline_hint",
    "MAX_DOWNLOAD_BYTES",
]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20

_PREFETCH = (
    "on a machine with network run {command} and copy its cache directory ($ANATCL_CACHE, see `anatcl models`) "
    "to this machine, setting ANATCL_CACHE to it"
)
_GO_ONLINE = "; or unset ANATCL_OFFLINE/HF_HUB_OFFLINE to allow downloads"
#: how to fill the cache for an offline machine (quoted in every OfflineError)
PREFETCH_HINT = _PREFETCH.format(command="`anatcl download anatcl-global --fold 0` (or `anatcl download all --fold all`)")


def prefetch_hint(name: str | None = None, fold: int | str | None = None) -> str:
    """How to pre-fetch the model and fold actually asked for (the generic hint without a name).

    Example:
        >>> prefetch_hint("anatcl-local", 3)[:58]
        'on a machine with network run `anatcl download anatcl-loc'
    """
    if not name:
        return PREFETCH_HINT
    folds = "all" if fold in (None, "all") else str(fold)
    return _PREFETCH.format(command=f"`anatcl download {name} --fold {folds}`")


def offline_hint(name: str | None = None, fold: int | str | None = None) -> str:
    """:func:`prefetch_hint` plus how to leave offline mode."""
    return offline_hint_from(prefetch_hint(name, fold))


def offline_hint_from(hint: str) -> str:
    """A pre-fetch ``hint`` plus how to leave offline mode."""
    return hint + _GO_ONLINE


def cache_dir() -> Path:
    """The cache root: ``$ANATCL_CACHE`` or the platform's user cache directory.

    Example:
        >>> import os; os.environ["ANATCL_CACHE"] = "/tmp/anatcl-cache"
        >>> str(cache_dir())
        '/tmp/anatcl-cache'
    """
    env = os.environ.get("ANATCL_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "anatcl"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "anatcl"
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "anatcl"


#: hex SHA-256 of a regular file (the package's one hashing helper; a FIFO or device is refused)
sha256_file = regular_file_sha256


def verify_sha256(path: str | os.PathLike[str], expected: str | None) -> str:
    """Hash ``path`` and compare with ``expected`` (when given); return the actual hash.

    Raises:
        IntegrityError: the hashes differ (the file is left in place: it is the user's).

    Example:
        >>> verify_sha256("fold0.pth", None)  # doctest: +SKIP
        '77f6d44d...'
    """
    actual = sha256_file(path)
    if expected and actual != expected.lower():
        raise IntegrityError(
            f"{path} has sha256 {actual}, expected {expected.lower()}: the file is not the one expected. "
            "Check that you passed the right file or sha256=, or fetch it again.",
            path=str(path),
            expected=expected.lower(),
            actual=actual,
        )
    return actual


def _progress(total: int | None, desc: str):  # noqa: ANN202  (a tqdm bar)
    """A tqdm bar for a download, shown only on an interactive terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not sys.stderr.isatty(), leave=False)


#: the largest file a download may bring when the manifest records no size (a ResNet-101 training
#: checkpoint with optimizer state is ~0.6 GB)
MAX_DOWNLOAD_BYTES = 4 << 30
#: socket timeout (connect, and each read) and overall deadline of one download, in seconds
TIMEOUT = 60.0
DEADLINE = 3600.0


def download_url(
    url: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    timeout: float = TIMEOUT,
    deadline: float | None = DEADLINE,
    max_bytes: int | None = None,
    size: int | None = None,
    hint: str = PREFETCH_HINT,
) -> str:
    """Download ``url`` to ``dest`` atomically, verifying SHA-256 while streaming.

    A small streaming loop on :mod:`urllib` rather than ``pooch``/``torch.hub``: neither
    bounds the body's size nor the whole transfer's time (their read timeout restarts
    with every byte, so a server dripping one byte per 20 s never times out).

    The body is written to a temporary file in ``dest``'s directory and renamed to
    ``dest`` only once it is complete and (when ``sha256`` is given) correct; on any
    failure the temporary file is removed, so no partial or bad file is ever left. The
    file gets the process umask's mode (a lab can share the cache).

    Args:
        url: http(s) URL.
        dest: final path.
        sha256: expected hex SHA-256, or ``None`` to accept any content.
        timeout: connect and per-read socket timeout in seconds.
        deadline: the whole transfer's time limit in seconds (``None``: no limit).
        max_bytes: refuse bodies larger than this (default :data:`MAX_DOWNLOAD_BYTES`).
        size: the exact size expected (the manifest's), checked as the body arrives.
        hint: what to do when the network fails (quoted in the error).

    Returns:
        The SHA-256 of the downloaded file.

    Raises:
        OfflineError: offline mode is on (nothing is touched).
        DownloadError: the server could not be reached, answered with an error, sent a
            body of the wrong size, stalled, or ran past the deadline.
        IntegrityError: the content does not match ``sha256`` (nothing is kept).

    Example:
        >>> download_url("https://example.org/fold0.pth", "fold0.pth")  # doctest: +SKIP
    """
    dest = Path(dest)
    if is_offline():
        raise OfflineError(f"offline mode is on and {dest.name} is not in the cache ({url}); {offline_hint_from(hint)}", url=url)
    cap = MAX_DOWNLOAD_BYTES if max_bytes is None else int(max_bytes)
    if size is not None:
        cap = min(cap, int(size))
    started = time.monotonic()
    digest = hashlib.sha256()
    with atomic_path(dest, suffix=".part") as tmp:
        request = urllib.request.Request(url, headers={"User-Agent": "anatcl-infer"})
        try:
            response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (http(s) checked by callers)
        except urllib.error.HTTPError as exc:
            raise DownloadError(f"{url} answered HTTP {exc.code} {exc.reason}; the file may have moved: check the URL or try another source", url=url) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise DownloadError(f"cannot reach {url} ({reason}); check the network, or pre-fetch: {hint}", url=url) from None
        with response, open(tmp, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if total is not None and total > cap:
                raise DownloadError(f"{url} announces {total} bytes, more than the {cap} expected; refusing it (check the URL)", url=url)
            received = 0
            with _progress(total, dest.name) as bar:
                while True:
                    try:
                        chunk = response.read1(_CHUNK)  # returns what arrived: the deadline is checked per read
                    except (OSError, http.client.HTTPException) as exc:
                        raise DownloadError(f"the download of {url} broke off after {received} bytes ({exc or 'timed out'}); try again", url=url) from None
                    if not chunk:
                        break
                    received += len(chunk)
                    if received > cap:
                        raise DownloadError(f"{url} sent more than the {cap} bytes expected; refusing it (check the URL)", url=url)
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
                    if deadline is not None and time.monotonic() - started > deadline:
                        raise DownloadError(f"the download of {url} took more than {deadline:.0f} s ({received} bytes arrived); try again, or pre-fetch: {hint}", url=url)
            if total is not None and received != total:
                raise DownloadError(f"the download of {url} stopped at {received} of {total} bytes; try again", url=url)
            if size is not None and received != size:
                raise DownloadError(f"{url} sent {received} bytes, the manifest records {size}; the file changed on the server", url=url)
        actual = digest.hexdigest()
        if sha256 and actual != sha256.lower():
            raise IntegrityError(
                f"{url} served a file with sha256 {actual}, expected {sha256.lower()}; it was deleted. "
                "The file on the server changed or the download was tampered with: check the source, "
                "or pass the right sha256=.",
                path=str(dest),
                expected=sha256.lower(),
                actual=actual,
            )
    logger.info("downloaded %s (%d bytes, sha256 %s)", url, received, actual)
    return actual


def _probe(endpoint: str, timeout: float = 5.0) -> str | None:
    """Why the Hub's host cannot be reached (DNS, refused, timeout), or None when a TCP connection opens."""
    import socket
    import urllib.parse

    parts = urllib.parse.urlsplit(endpoint)
    host = parts.hostname
    if not host:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except (OSError, ValueError) as exc:
        return f"{host}: {getattr(exc, 'strerror', None) or exc}"


def _hub_cache_dir() -> str | None:
    """The Hub cache as the environment says now (``HF_HUB_CACHE``, else ``HF_HOME/hub``).

    huggingface_hub reads these once at import; reading them per call lets a process
    (or a test) change them later.
    """
    explicit = os.environ.get("HF_HUB_CACHE", "").strip()
    if explicit:
        return explicit
    home = os.environ.get("HF_HOME", "").strip()
    return str(Path(home) / "hub") if home else None


def hf_download(repo_id: str, filenames: tuple[str, ...], *, revision: str | None = None, token: str | bool | None = None) -> dict[str, Path]:
    """Fetch files of a Hub repository into the Hub's own cache.

    Honours ``HF_ENDPOINT`` (read on each call) and offline mode
    (``local_files_only``).

    Args:
        repo_id: ``org/name``.
        filenames: files to fetch.
        revision: branch, tag or commit (default ``main``).
        token: Hub token, when the repository is private.

    Returns:
        Local path of each file.

    Raises:
        OfflineError: offline and not cached.
        DownloadError: repository, revision or file not found, or Hub unreachable.

    Example:
        >>> hf_download("myorg/anatcl-global-fold0", ("config.json",))  # doctest: +SKIP
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from huggingface_hub import constants as hf_constants

    offline = is_offline()
    if not offline and hf_constants.HF_HUB_OFFLINE:
        # huggingface_hub read HF_HUB_OFFLINE=1 when it was first imported and keeps it for the process
        logger.warning("huggingface_hub was imported with HF_HUB_OFFLINE=1 and stays offline in this process")
        offline = True
    endpoint = os.environ.get("HF_ENDPOINT", "").strip() or None
    hub_cache = _hub_cache_dir()
    where = f"hf://{repo_id}" + (f"@{revision}" if revision else "")
    hint = f"load {where} once on a machine with network and copy its Hub cache ($HF_HOME/hub) to this machine"
    unreachable = None
    if not offline:
        # huggingface_hub retries a refused or unresolvable host for ~25 s; one quick probe instead
        unreachable = _probe(endpoint or hf_constants.ENDPOINT)
        if unreachable:
            logger.info("the Hub (%s) cannot be reached (%s); using the Hub cache only", endpoint or hf_constants.ENDPOINT, unreachable)
    paths: dict[str, Path] = {}
    for filename in filenames:
        try:
            local = hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                endpoint=endpoint,
                cache_dir=hub_cache,
                local_files_only=offline or bool(unreachable),
                token=token,
                library_name="anatcl-infer",
            )
        except LocalEntryNotFoundError:
            if offline:
                raise OfflineError(f"offline mode is on and {filename} of {where} is not in the Hub cache; {offline_hint_from(hint)}", url=where) from None
            reason = f" ({unreachable})" if unreachable else ""
            raise DownloadError(f"cannot reach the Hub for {filename} of {where}{reason}; check the network or HF_ENDPOINT, or {hint}", url=where) from None
        except RepositoryNotFoundError:
            raise DownloadError(f"{where}: repository not found on the Hub (or private: pass a token / run `hf auth login`)", url=where) from None
        except RevisionNotFoundError:
            raise DownloadError(f"{where}: revision not found; check the branch, tag or commit after '@'", url=where) from None
        except EntryNotFoundError:
            raise DownloadError(f"{where} has no {filename}; a model repository holds config.json and model.safetensors as written by `anatcl convert`", url=where) from None
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise DownloadError(f"{where}: the Hub download of {filename} failed ({exc}); try again or check HF_ENDPOINT", url=where) from None
        paths[filename] = Path(local)
    return paths
