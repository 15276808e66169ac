"""Model cards and publishing a converted model directory to the Hugging Face Hub."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .._files import atomic_path
from ..config import CONFIG_NAME, WEIGHTS_NAME, ModelConfig
from ..errors import CheckpointError, DownloadError, OfflineError, UnknownModelError

__all__ = ["CARD_NAME", "write_model_card", "push_to_hub"]

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"


def _card_text(config: ModelConfig) -> str:
    """The registry's card for a published variant, or a short generic one, plus provenance."""
    from .registry import model_card

    try:
        body = model_card(config.name)
    except UnknownModelError:
        body = (
            f"# {config.name}\n\nAn AnatCL-family {config.architecture} model ({config.feature_dim}-d features), "
            "loadable with `anatcl_infer.load_model`.\n"
        )
    front = "" if body.startswith("---\n") else (  # the registry's cards carry their own Hub metadata
        "---\nlibrary_name: anatcl-infer\npipeline_tag: feature-extraction\nlicense: other\ntags:\n"
        "- neuroimaging\n- mri\n- anatcl\n---\n\n"
    )
    provenance = (
        "\n## This repository\n\n"
        f"- variant: `{config.variant}`, fold: `{config.fold}`, architecture: `{config.architecture}`\n"
        f"- converted from: `{config.source or 'unknown'}`\n"
        f"- sha256 of that file: `{config.source_sha256 or 'unknown'}`\n"
        f"- expected input: {config.preprocess.input_kind} maps, array "
        f"{config.preprocess.model_input_shape}, intensity `{config.preprocess.intensity}` "
        "(full spec in `config.json`)\n\n"
        "```python\nimport anatcl_infer\nmodel = anatcl_infer.load_model(\"hf://ORG/NAME\")\n```\n"
    )
    return front + body.rstrip() + "\n" + provenance


def write_model_card(directory: str | os.PathLike[str], config: ModelConfig | None = None, *, overwrite: bool = False) -> Path:
    """Write ``README.md`` (a Hub model card with provenance) into a model directory.

    Example:
        >>> write_model_card("anatcl-global-fold0")  # doctest: +SKIP
        PosixPath('anatcl-global-fold0/README.md')
    """
    directory = Path(directory)
    path = directory / CARD_NAME
    if path.exists() and not overwrite:
        return path
    cfg = config if config is not None else ModelConfig.load(directory)
    with atomic_path(path) as tmp:
        tmp.write_text(_card_text(cfg), encoding="utf-8")
    return path


def push_to_hub(
    directory: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a model directory (``config.json`` + ``model.safetensors`` + card) to the Hub.

    Creates the repository (and the branch ``revision``) when missing. Honours
    ``HF_ENDPOINT``.

    Args:
        directory: written by ``anatcl convert`` or ``save_pretrained``.
        repo_id: ``org/name``.
        private: create the repository as private.
        revision: branch to commit to (default ``main``).
        token: Hub token (default: the logged-in one, ``HF_TOKEN``).
        commit_message: defaults to a description of the model.

    Returns:
        The URL of the commit.

    Raises:
        CheckpointError: ``directory`` is not a model directory.
        DownloadError: the Hub refused the upload.

    Example:
        >>> push_to_hub("anatcl-global-fold0", "myorg/anatcl-global-fold0")  # doctest: +SKIP
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    directory = Path(directory)
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / n).is_file()]
    if missing:
        raise CheckpointError(
            f"{directory} lacks {', '.join(missing)}; create it with `anatcl convert SRC {directory}` first",
            path=str(directory),
        )
    repo_id = repo_id.removeprefix("hf://")
    if repo_id.count("/") != 1:
        raise CheckpointError(f"{repo_id!r} is not a Hub repository id; write org/name", path=str(directory))
    config = ModelConfig.load(directory)
    write_model_card(directory, config)
    endpoint = os.environ.get("HF_ENDPOINT", "").strip() or None
    from huggingface_hub import constants as hf_constants

    from .download import _probe, is_offline

    if is_offline() or hf_constants.HF_HUB_OFFLINE:
        raise OfflineError(f"offline mode is on: cannot push {directory} to {repo_id}; unset ANATCL_OFFLINE/HF_HUB_OFFLINE on a machine with network", url=repo_id)
    unreachable = _probe(endpoint or hf_constants.ENDPOINT)
    if unreachable:
        raise DownloadError(f"cannot reach the Hub to push {directory} to {repo_id} ({unreachable}); check the network or HF_ENDPOINT", url=repo_id)
    api = HfApi(endpoint=endpoint, token=token)
    message = commit_message or f"{config.name} fold {config.fold} ({config.variant}) converted by anatcl-infer"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(directory),
            revision=revision,
            repo_type="model",
            commit_message=message,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "README.md"],
        )
    except Exception as exc:  # noqa: BLE001 (the Hub client's HTTP stack raises its own types: httpx, requests)
        if not isinstance(exc, (HfHubHTTPError, OSError, ValueError)) and type(exc).__module__.split(".")[0] not in {"httpx", "requests", "urllib3", "huggingface_hub", "httpcore"}:
            raise
        raise DownloadError(
            f"pushing {directory} to {repo_id} failed ({exc}); check your token (`hf auth login` or --token) "
            "and that you may write to that organisation",
            url=repo_id,
        ) from None
    url = getattr(info, "commit_url", None) or str(info)
    logger.info("pushed %s to %s", directory, url)
    return url
