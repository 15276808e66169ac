"""A scikit-learn transformer from brain maps to AnatCL features.

:class:`AnatCLEncoder` is stateless: ``fit`` only validates, ``transform`` embeds.
It slots into a :class:`~sklearn.pipeline.Pipeline` in front of any estimator, and
``clone`` / ``pickle`` stay cheap: the weights are loaded on first ``transform`` and
never pickled.

Example::

    from sklearn.pipeline import make_pipeline
    from sklearn.linear_model import LogisticRegression
    from anatcl_infer.downstream.transformer import AnatCLEncoder

    clf = make_pipeline(AnatCLEncoder(cache="~/.cache/anatcl-emb"), LogisticRegression())
    clf.fit(paths, diagnosis)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._optional import require

require("sklearn", "sklearn")  # without scikit-learn: MissingDependencyError naming the extra, not a bare traceback

from sklearn.base import BaseEstimator, TransformerMixin  # noqa: E402

from .._files import regular_file_sha256 as file_sha256  # the cache key of a path input (a FIFO or device is refused)
from ..errors import ConfigError, InputError
from .features import feature_names

if TYPE_CHECKING:
    from ..model.network import AnatCL

__all__ = ["AnatCLEncoder", "file_sha256"]

logger = logging.getLogger(__name__)


def _image_sha256(img: Any) -> str:
    """Content hash of an in-memory nibabel image: its data and affine."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(np.asanyarray(img.dataobj), dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(img.affine, dtype=np.float64).tobytes())
    h.update(str(np.asanyarray(img.dataobj).shape).encode())
    return h.hexdigest()


def _state_dict_sha256(model: AnatCL) -> str:
    """Hash of every tensor of a model (for models without a recorded source hash)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class AnatCLEncoder(TransformerMixin, BaseEstimator):
    """Embed NIfTI paths or nibabel images into (N, 512) AnatCL features.

    Args:
        model: a registry name (``"anatcl-global"``, ``"anatcl-local"``), any source
            :func:`anatcl_infer.load_model` accepts (a model directory, ``.pth`` or
            ``.safetensors`` file, ``hf://`` address, URL), or a loaded ``AnatCL``.
        fold: cross-validation fold of a registry model (0-4).
        batch_size: volumes per forward pass.
        device: ``"cpu"``, ``"cuda"``, ``"mps"`` or None (automatic).
        cache: optional directory for an on-disk cache of embeddings, one small
            ``.npy`` per input keyed by the input's content SHA-256, the model's
            SHA-256 (or name) and the fold. A cache hit never loads the model.
        backend: ``"auto"`` (OpenVINO on CPU when installed and verified, else torch), ``"torch"``
            or ``"openvino"`` (see :func:`anatcl_infer.encoding.encoder.encode`). The loaded model and
            its compiled backend are kept for the encoder's life, and inputs are read in a thread
            beside the forward pass, so a ``transform`` of a few files costs little more than their
            forward passes.

    Inputs to :meth:`transform`: a list or array of paths, a pandas Series (or a
    one-column DataFrame) of paths, nibabel images, or a mix.

    Example:
        >>> enc = AnatCLEncoder(model="my-model-dir", device="cpu")  # doctest: +SKIP
        >>> enc.set_output(transform="pandas").fit_transform(paths).shape  # doctest: +SKIP
        (3, 512)
    """

    def __init__(
        self,
        model: Any = "anatcl-global",
        fold: int = 0,
        batch_size: int = 8,
        device: str | None = None,
        cache: str | os.PathLike[str] | None = None,
        backend: str = "auto",
    ) -> None:
        self.model = model
        self.fold = fold
        self.batch_size = batch_size
        self.device = device
        self.cache = cache
        self.backend = backend

    # -- pickling: never carry the weights
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_model", None)
        state.pop("_model_key", None)
        if not isinstance(state.get("model"), (str, os.PathLike)):
            # A loaded AnatCL passed as `model`: keep its provenance, not its weights.
            loaded = state["model"]
            source = getattr(getattr(loaded, "config", None), "source", "") or ""
            if not source:
                raise ConfigError(
                    "this encoder holds a model object with no recorded source; pass model=<name or directory> "
                    "so the encoder can be pickled without its weights"
                )
            state["model"] = source
        return state

    def __sklearn_is_fitted__(self) -> bool:
        return True

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.requires_fit = False
        tags.non_deterministic = False
        return tags

    # -- scikit-learn API
    def fit(self, X: Any = None, y: Any = None) -> AnatCLEncoder:
        """Validate the parameters (nothing is learned) and return ``self``.

        Example:
            >>> AnatCLEncoder(model="dir").fit(["a.nii.gz"])  # doctest: +SKIP
        """
        self._validate_params_()
        return self

    def transform(self, X: Any) -> np.ndarray:
        """Embed the inputs: (N, feature_dim) float32, in input order.

        Example:
            >>> AnatCLEncoder(model="dir").transform(["a.nii.gz", "b.nii.gz"]).shape  # doctest: +SKIP
            (2, 512)
        """
        self._validate_params_()
        items = self._items(X)
        out = np.zeros((len(items), self._feature_dim()), dtype=np.float32)
        if not items:
            return out
        cache_paths: list[Path | None] = [None] * len(items)
        todo = list(range(len(items)))
        if self.cache is not None:
            root = Path(self.cache).expanduser() / self._model_identity()
            todo = []
            for i, item in enumerate(items):
                key = self._item_key(item)
                if key is None:
                    todo.append(i)
                    continue
                cache_paths[i] = root / f"{key}.npy"
                hit = self._read_cached(cache_paths[i])  # type: ignore[arg-type]
                if hit is None:
                    todo.append(i)
                else:
                    out[i] = hit
            logger.info("embedding cache: %d hit(s), %d to compute", len(items) - len(todo), len(todo))
        if todo:
            from ..encoding.encoder import encode

            feats = encode(self._get_model(), [items[i] for i in todo], batch_size=self.batch_size,
                           device=self.device, progress=False, backend=self.backend)
            out[todo] = feats
            for j, i in enumerate(todo):
                if cache_paths[i] is not None:
                    self._write_cached(cache_paths[i], feats[j])  # type: ignore[arg-type]
        return out

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """``feat_000`` ... ``feat_511``.

        Example:
            >>> AnatCLEncoder().get_feature_names_out()[:2]
            array(['feat_000', 'feat_001'], dtype=object)
        """
        return np.asarray(feature_names(self._feature_dim()), dtype=object)

    # -- helpers
    def _validate_params_(self) -> None:
        if not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.fold is not None and not isinstance(self.fold, (int, np.integer)):
            raise ConfigError(f"fold must be an integer (0-4), got {self.fold!r}")
        if self.backend not in ("auto", "torch", "openvino"):
            raise ConfigError(f"backend must be auto, torch or openvino, got {self.backend!r}")
        if self.cache is not None and not isinstance(self.cache, (str, os.PathLike)):
            raise ConfigError(f"cache must be a directory path or None, got {self.cache!r}")
        from ..model.network import AnatCL

        if not isinstance(self.model, (str, os.PathLike, AnatCL)):
            raise ConfigError(f"model must be a name, a path or an AnatCL, got {type(self.model).__name__}")

    @staticmethod
    def _items(X: Any) -> list[Any]:
        if hasattr(X, "columns") and hasattr(X, "iloc"):  # DataFrame
            if X.shape[1] != 1:
                raise InputError(
                    f"got a DataFrame with {X.shape[1]} columns {list(X.columns)[:5]}; pass the single column of "
                    "paths (df['path']) or select it with a ColumnTransformer", stage="read",
                )
            X = X.iloc[:, 0]
        if isinstance(X, (str, os.PathLike)) or hasattr(X, "dataobj"):
            return [X]
        if isinstance(X, np.ndarray) and X.dtype.kind in "fiu":
            raise InputError(
                "AnatCLEncoder takes paths or nibabel images, not a numeric array; use "
                "anatcl_infer.extract_features for arrays already on the model grid", stage="read",
            )
        if hasattr(X, "tolist"):
            X = X.tolist()
        items = [x[0] if isinstance(x, (list, tuple)) and len(x) == 1 else x for x in X]
        return items

    def _get_model(self) -> AnatCL:
        model = getattr(self, "_model", None)
        if model is None:
            from ..model.network import AnatCL

            if isinstance(self.model, AnatCL):
                model = self.model
            else:
                from ..weights.loading import load_model

                model = load_model(self.model, fold=self.fold, device=self.device)
            self._model = model
        return model

    def _model_dir(self) -> Path | None:
        if isinstance(self.model, (str, os.PathLike)):
            p = Path(os.fspath(self.model)).expanduser()
            if p.is_dir() and (p / "config.json").is_file():
                return p
        return None

    def _feature_dim(self) -> int:
        from ..model.network import AnatCL

        if isinstance(self.model, AnatCL):
            return int(self.model.config.feature_dim)
        d = self._model_dir()
        if d is not None:
            try:
                return int(json.loads((d / "config.json").read_text()).get("feature_dim", 512))
            except (OSError, ValueError):
                return 512
        return 512

    def _model_identity(self) -> str:
        """Cache folder name: model weights hash (or source name), fold and preprocessing."""
        key = getattr(self, "_model_key", None)
        if key is not None:
            return key
        from ..model.network import AnatCL

        preprocess = ""
        if isinstance(self.model, AnatCL):
            cfg = self.model.config
            ident = cfg.source_sha256 or _state_dict_sha256(self.model)
            fold = cfg.fold
            preprocess = json.dumps(cfg.preprocess.to_dict(), sort_keys=True)
        else:
            text = os.fspath(self.model)
            path = Path(text).expanduser()
            d = self._model_dir()
            fold = self.fold
            if d is not None:
                ident = file_sha256(d / "model.safetensors")
                cfg_data = json.loads((d / "config.json").read_text())
                preprocess = json.dumps(cfg_data.get("preprocess", {}), sort_keys=True)
                fold = cfg_data.get("fold")
            elif path.is_file():
                ident = file_sha256(path)
            else:  # registry name, hf:// address or URL: the name pins the weights
                ident = hashlib.sha256(text.encode()).hexdigest()
        pp = hashlib.sha256(preprocess.encode()).hexdigest()[:8]
        key = f"{ident[:32]}-fold{fold}-pp{pp}"
        self._model_key = key
        return key

    @staticmethod
    def _item_key(item: Any) -> str | None:
        if isinstance(item, (str, os.PathLike)):
            try:
                return file_sha256(item)
            except OSError:
                return None  # let the encoder report the unreadable input
        if hasattr(item, "dataobj") and hasattr(item, "affine"):
            return _image_sha256(item)
        return None

    def _read_cached(self, path: Path) -> np.ndarray | None:
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        if arr.shape != (self._feature_dim(),) or not np.isfinite(arr).all():
            logger.warning("ignoring a corrupt cache entry %s", path)
            return None
        return arr.astype(np.float32, copy=False)

    @staticmethod
    def _write_cached(path: Path, vector: np.ndarray) -> None:
        from .._files import atomic_path

        try:
            with atomic_path(path, suffix=".tmp.npy") as tmp:  # umask modes: a shared cache stays shareable
                np.save(tmp, np.asarray(vector, dtype=np.float32), allow_pickle=False)
        except OSError as exc:
            logger.warning("could not write the embedding cache entry %s: %s", path, exc)
