"""The public :class:`AnatCL`: the network plus the conveniences that call the stages above it.

:class:`~anatcl_infer.model.resnet.AnatCLNetwork` (stage 1) is the network; this class adds
``encode`` (the encoding stage), ``from_pretrained``, ``save_pretrained`` and ``push_to_hub`` (the
weights stage), so this module sits above both, like transformers' ``PreTrainedModel`` above its
loaders. It imports them inside the methods: the lower stages import ``anatcl_infer.model.resnet``
and ``devices``, which runs this package's ``__init__`` and so this module, and a module-level
import of theirs here would find them half-imported.

Defining :class:`AnatCL` registers it (:func:`~anatcl_infer.model.resnet.register_model_class`), so
the loaders, which take the class to build as ``cls``, return it by default. The building blocks
are re-exported: ``from anatcl_infer.model.network import ResNet3D`` keeps working.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .resnet import (  # noqa: F401  (the building blocks, re-exported from their old home)
    ARCHITECTURES,
    AnatCLNetwork,
    BasicBlock3D,
    Bottleneck3D,
    ResNet3D,
    build_encoder,
    register_model_class,
)

if TYPE_CHECKING:
    import numpy as np

__all__ = ["ResNet3D", "AnatCL", "ARCHITECTURES", "build_encoder"]


@register_model_class
class AnatCL(AnatCLNetwork):
    """AnatCL encoder plus projection head, carrying its :class:`~anatcl_infer.config.ModelConfig`.

    ``model(x)`` returns the (B, 512) features used for linear probing;
    ``model(x, head=True)`` returns the (B, 128) L2-normalised projections the
    contrastive loss works on. ``x`` is (B, 1, 121, 128, 121) float32 for the
    published models (see ``model.config.preprocess``). The network itself is
    :class:`~anatcl_infer.model.resnet.AnatCLNetwork`; this class adds :meth:`encode` and the
    Hugging Face Hub methods.

    Example:
        >>> model = AnatCL(ModelConfig(source="untrained"))
        >>> model(torch.zeros(1, 1, 32, 32, 32)).shape
        torch.Size([1, 512])
    """

    def encode(self, inputs: Any, **kwargs: Any) -> np.ndarray:
        """Embed images into (N, feature_dim) float32 features, in input order.

        See :func:`anatcl_infer.encoding.encoder.encode` for the arguments (``batch_size``,
        ``device``, ``num_workers``, ``progress``, ``precision``...).
        """
        from ..encoding.encoder import encode

        return encode(self, inputs, **kwargs)

    # ------------------------------------------------------------------ Hugging Face Hub conventions
    # The same methods and arguments as huggingface_hub's PyTorchModelHubMixin, implemented here rather
    # than inherited: the mixin writes its own config.json, loads with strict=False and falls back to
    # torch.load, while these read and write the package's config.json + model.safetensors layout and
    # load only through anatcl_infer.load_model (strict keys, safe formats, hashes checked).

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        **model_kwargs: Any,
    ) -> AnatCL:
        """Load a model from a Hub repository, a local directory or the registry.

        Args:
            pretrained_model_name_or_path: ``org/name`` (also ``hf://org/name[@rev]`` or
                ``hf-hub:org/name``), a directory written by :meth:`save_pretrained`, or anything
                :func:`anatcl_infer.load_model` accepts (``anatcl-global``, a ``.pth`` file...).
            token: Hub token for private repositories.
            revision: branch, tag or commit of a Hub repository (pin a commit for reproducible features).
            force_download, cache_dir, local_files_only: accepted for compatibility with
                ``PyTorchModelHubMixin``; other values than the defaults raise :class:`ConfigError`
                naming the package's equivalent (``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1``).
            **model_kwargs: ``fold`` (registry models), ``sha256`` (expected hash of
                ``model.safetensors``), ``device`` (or ``map_location``), ``strict`` (only ``True``).

        Returns:
            The model (an instance of the class it is called on) in eval mode, carrying its :class:`ModelConfig`.

        Example:
            >>> model = AnatCL.from_pretrained("myorg/anatcl-global-fold0", revision="v1")  # doctest: +SKIP
        """
        import os
        import re

        from ..config import CONFIG_NAME, WEIGHTS_NAME
        from ..weights.download import hf_download
        from ..weights.loading import load_model, parse_hf_address

        for name, value, default, hint in (
            ("force_download", force_download, False, "delete the repository from the Hub cache (HF_HUB_CACHE) instead"),
            ("cache_dir", cache_dir, None, "set HF_HUB_CACHE instead"),
            ("local_files_only", local_files_only, False, "set HF_HUB_OFFLINE=1 (or ANATCL_OFFLINE=1) instead"),
        ):
            if value != default:
                raise ConfigError(f"from_pretrained: {name}={value!r} is not supported; {hint}")
        valid = {"fold", "sha256", "device", "map_location", "strict"}
        unknown = sorted(set(model_kwargs) - valid)
        if unknown:
            raise TypeError(f"from_pretrained got unexpected arguments {unknown}; valid ones: {sorted(valid)}")
        if model_kwargs.get("strict", True) is not True:
            raise ConfigError("from_pretrained: strict=False is not supported; every weight must match the network")
        device = model_kwargs.get("device", model_kwargs.get("map_location"))
        sha256 = model_kwargs.get("sha256")
        text = os.fspath(pretrained_model_name_or_path)
        if text.startswith("hf-hub:"):
            text = "hf://" + text[len("hf-hub:"):].lstrip("/")
        local = Path(text).expanduser()
        if not text.startswith("hf://") and local.exists():
            return load_model(local, revision=revision, sha256=sha256, device=device, cls=cls)
        if text.startswith("hf://") or re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?", text):
            repo, rev = parse_hf_address(text if text.startswith("hf://") else f"hf://{text}", revision)
            files = hf_download(repo, (CONFIG_NAME, WEIGHTS_NAME), revision=rev, token=token)
            return load_model(files[WEIGHTS_NAME].parent, sha256=sha256, device=device, cls=cls)
        return load_model(text, fold=model_kwargs.get("fold", 0), revision=revision, sha256=sha256, device=device, cls=cls)

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        config: Any = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict[str, Any] | None = None,
        **push_to_hub_kwargs: Any,
    ) -> Any:
        """Write ``config.json`` + ``model.safetensors`` into ``save_directory`` (atomically).

        The directory loads back with :func:`anatcl_infer.load_model` or :meth:`from_pretrained`
        and gives bit-identical outputs. The arguments are those of ``PyTorchModelHubMixin``: with
        ``push_to_hub=True`` the directory is also published to ``repo_id`` (default: the directory
        name) with the arguments of :meth:`push_to_hub`.

        Returns:
            The directory, or the commit URL with ``push_to_hub=True``.

        Example:
            >>> AnatCL(ModelConfig(source="untrained")).save_pretrained("my-model")  # doctest: +SKIP
            PosixPath('my-model')
        """
        from ..weights.checkpoint import save_pretrained

        self._check_hub_config(config)
        target = save_pretrained(self, save_directory)
        if push_to_hub:
            return self._push_directory(target, repo_id or target.name, model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs)
        return target

    def push_to_hub(
        self,
        repo_id: str,
        *,
        config: Any = None,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        branch: str | None = None,
        create_pr: bool | None = None,
        allow_patterns: list[str] | str | None = None,
        ignore_patterns: list[str] | str | None = None,
        delete_patterns: list[str] | str | None = None,
        model_card_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """Publish the model to a Hub repository (``config.json``, ``model.safetensors``, a model card).

        Creates the repository and the branch when missing; honours ``HF_ENDPOINT``. Loading it back
        with ``AnatCL.from_pretrained(repo_id, revision=branch)`` gives bit-identical outputs.

        Args:
            repo_id: ``org/name``.
            commit_message: default: a description of the model.
            private: create the repository as private.
            token: Hub token (default: the logged-in one, ``HF_TOKEN``).
            branch: branch to commit to (default ``main``).
            config, create_pr, allow_patterns, ignore_patterns, delete_patterns, model_card_kwargs:
                accepted for compatibility with ``PyTorchModelHubMixin``; values other than the
                defaults raise :class:`ConfigError` (the layout is always the same three files).

        Returns:
            The URL of the commit.

        Raises:
            OfflineError: offline mode is on (``HF_HUB_OFFLINE``/``ANATCL_OFFLINE``).
            DownloadError: the Hub refused the upload.

        Example:
            >>> model.push_to_hub("myorg/anatcl-global-fold0", branch="v1")  # doctest: +SKIP
        """
        import tempfile

        self._check_hub_config(config)
        with tempfile.TemporaryDirectory(prefix="anatcl-push-") as tmp:
            from ..weights.checkpoint import save_pretrained

            target = save_pretrained(self, Path(tmp) / "model")
            return self._push_directory(
                target, repo_id, commit_message=commit_message, private=private, token=token, branch=branch,
                create_pr=create_pr, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns,
                delete_patterns=delete_patterns, model_card_kwargs=model_card_kwargs,
            )

    def _check_hub_config(self, config: Any) -> None:
        """``config=`` of the mixin API: config.json always comes from ``self.config``."""
        if config is not None and config != self.config and config != self.config.to_dict():
            raise ConfigError(
                "config.json is written from model.config; build the model with the ModelConfig you want "
                "instead of passing config="
            )

    @staticmethod
    def _push_directory(
        directory: Path,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        branch: str | None = None,
        create_pr: bool | None = None,
        allow_patterns: Any = None,
        ignore_patterns: Any = None,
        delete_patterns: Any = None,
        model_card_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """Push a saved model directory with :func:`anatcl_infer.weights.publish.push_to_hub`."""
        from ..errors import OfflineError
        from ..config import is_offline
        from ..weights.publish import push_to_hub

        for name, value in (("create_pr", create_pr), ("allow_patterns", allow_patterns), ("ignore_patterns", ignore_patterns),
                            ("delete_patterns", delete_patterns), ("model_card_kwargs", model_card_kwargs)):
            if value:
                raise ConfigError(f"push_to_hub: {name}={value!r} is not supported; the repository always holds config.json, model.safetensors and README.md")
        if is_offline():
            raise OfflineError(
                f"offline mode is on (HF_HUB_OFFLINE or ANATCL_OFFLINE), so {repo_id} cannot be pushed to the Hub; "
                "unset it on a machine with network to publish",
                url=repo_id,
            )
        return push_to_hub(directory, repo_id, private=bool(private), revision=branch, token=token, commit_message=commit_message)
