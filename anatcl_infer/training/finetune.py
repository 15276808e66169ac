"""Fine-tuning a pretrained AnatCL encoder on a labelled task.

A linear head on the 512-d features, for regression (e.g. age, a clinical score;
targets standardised during training, L1 or MSE loss) or classification (cross
entropy). The encoder is either frozen (features computed once, in eval mode, then
only the head is trained: fast, and the encoder stays byte-identical) or trained
with the head (``freeze_encoder=False``).

Output directory::

    OUT/config.json + model.safetensors       the encoder, inference layout (load_model)
    OUT/finetune_head.json                    task, target, classes, metrics
    OUT/finetune_head.safetensors             head weight/bias, target mean/std
    OUT/log.jsonl                             one line per epoch

:func:`load_finetuned` reads it back as a :class:`FinetunedModel`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..weights.checkpoint import load_pretrained_dir, save_pretrained
from .._files import atomic_path
from ..config import PreprocessConfig
from ..model.devices import resolve_device
from ..errors import ConfigError, HeadError
from ..model.network import AnatCL
from .checkpoints import append_jsonl, seed_everything
from .data import VAL_SPLITS, _read_table, _resolve

__all__ = ["HEAD_CONFIG", "HEAD_WEIGHTS", "FinetuneConfig", "FinetunedModel", "finetune", "load_finetuned", "read_labelled"]

logger = logging.getLogger(__name__)

HEAD_CONFIG = "finetune_head.json"
HEAD_WEIGHTS = "finetune_head.safetensors"
_TASKS = ("regression", "classification")


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of a fine-tuning run.

    Attributes:
        task: ``regression`` or ``classification``.
        freeze_encoder: train the head only (the linear-probing protocol) or everything.
        epochs, batch_size: training length and batch.
        lr: learning rate of the encoder (full fine-tuning).
        head_lr: learning rate of the head (default 1e-3).
        weight_decay: Adam weight decay.
        loss: regression loss, ``l1`` or ``mse``.
        seed, device, workers, amp: as in :class:`~anatcl_infer.training.trainer.TrainConfig`.

    Example:
        >>> FinetuneConfig(task="classification").freeze_encoder
        True
    """

    task: str = "regression"
    freeze_encoder: bool = True
    epochs: int = 50
    batch_size: int = 8
    lr: float = 1e-5
    head_lr: float = 1e-3
    weight_decay: float = 5e-5
    loss: str = "l1"
    seed: int = 0
    device: str | None = None
    workers: int = 0
    amp: bool = False

    def __post_init__(self) -> None:
        if self.task not in _TASKS:
            raise ConfigError(f"task must be one of {_TASKS}, got {self.task!r}")
        if self.loss not in ("l1", "mse"):
            raise ConfigError(f"loss must be 'l1' or 'mse', got {self.loss!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")


class FinetunedModel(nn.Module):
    """An AnatCL encoder with a linear task head.

    ``model(x)`` returns regression predictions in target units (B,) or class
    logits (B, n_classes). :meth:`predict` embeds inputs of any kind
    :func:`anatcl_infer.encoding.encoder.encode` accepts and applies the head.

    Example:
        >>> m = load_finetuned("ft-age")  # doctest: +SKIP
        >>> m.predict(["sub-01_mwp1.nii.gz"])  # doctest: +SKIP
        array([43.2], dtype=float32)
    """

    def __init__(self, encoder: AnatCL, out_dim: int, *, task: str, classes: Sequence[Any] = (), target: str = "") -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.feature_dim, out_dim)
        self.task = task
        self.classes = list(classes)
        self.target = target
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))

    def head_forward(self, features: torch.Tensor) -> torch.Tensor:
        """Head on precomputed (B, 512) features: predictions (regression) or logits."""
        out = self.head(features.float())
        if self.task == "regression":
            return out[:, 0] * self.target_std + self.target_mean
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions (regression, target units) or logits (classification) for a batch."""
        return self.head_forward(self.encoder(x))

    def predict(self, inputs: Any, **encode_kwargs: Any) -> np.ndarray:
        """Predicted values (regression) or class labels (classification), in input order.

        ``inputs`` is what :func:`anatcl_infer.encoding.encoder.encode` takes; ``.npy`` paths
        are arrays on the preprocessing grid, as used for training.
        """
        items = [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs
        if isinstance(items, (list, tuple)):
            if any(isinstance(i, (str, os.PathLike)) and str(i).lower().endswith(".npy") for i in items):
                encode_kwargs.setdefault("assume_reference_grid", True)  # .npy training arrays lie on the grid
        feats = torch.from_numpy(self.encoder.encode(items, **encode_kwargs))
        with torch.no_grad():
            out = self.head_forward(feats.to(self.head.weight.device))
        if self.task == "regression":
            return out.cpu().numpy().astype(np.float32)
        return np.asarray(self.classes, dtype=object)[out.argmax(1).cpu().numpy()]


class _LabelledVolumes(Dataset):
    """Prepared volumes with their (encoded) targets."""

    def __init__(self, paths: Sequence[str], targets: np.ndarray, config: PreprocessConfig) -> None:
        self.paths, self.targets, self.config = list(paths), targets, config

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from ..inputs.preprocess import prepare

        arr = prepare(self.paths[i], self.config, assume_reference_grid=True, emit_warnings=False).array
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)), torch.as_tensor(self.targets[i])


def read_labelled(path: str | os.PathLike[str], target: str) -> tuple[list[str], list[Any], list[str]]:
    """Read ``path`` (image), ``target`` and optional ``split`` columns of a CSV/TSV.

    Rows whose target is empty are skipped (with a log line). Relative image paths
    are resolved against the manifest's folder.

    Returns:
        ``(paths, targets, splits)``.

    Example:
        >>> paths, y, splits = read_labelled("labels.csv", "diagnosis")  # doctest: +SKIP
    """
    path = Path(path)
    table = _read_table(path)
    for col in ("path", target):
        if col not in table.columns:
            raise ConfigError(f"{path} has no {col!r} column; it has {list(table.columns)}")
    keep = table[target].notna()
    if (~keep).any():
        logger.info("skipping %d rows of %s without a %r value", int((~keep).sum()), path, target)
    table = table[keep]
    splits = [str(s).strip().lower() for s in table["split"]] if "split" in table.columns else ["train"] * len(table)
    paths = [_resolve(path.parent, p) for p in table["path"]]
    return paths, list(table[target]), splits


def _load_encoder(source: str | os.PathLike[str] | AnatCL) -> AnatCL:
    if isinstance(source, AnatCL):
        return source
    if Path(source).is_dir():
        return load_pretrained_dir(source)  # type: ignore[return-value]
    from ..weights.loading import load_model

    return load_model(source, device="cpu")


def _metrics(task: str, y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import balanced_accuracy_score, mean_absolute_error

    if task == "regression":
        return {"mae": float(mean_absolute_error(y_true, y_pred))}
    return {"balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred))}


def finetune(
    source: str | os.PathLike[str] | AnatCL,
    manifest: str | os.PathLike[str],
    target: str,
    out: str | os.PathLike[str],
    config: FinetuneConfig | None = None,
) -> FinetunedModel:
    """Fine-tune a pretrained AnatCL on a labelled manifest and save encoder + head.

    Args:
        source: anything :func:`anatcl_infer.load_model` takes (registry name, file,
            URL, ``hf://``), a model directory, or an :class:`AnatCL`. Its
            preprocessing spec is used for the images.
        manifest: CSV/TSV with ``path``, the ``target`` column and optionally
            ``split`` (rows with a split in ``VAL_SPLITS`` are validation).
        target: the column to predict.
        out: output directory (see the module docstring).
        config: :class:`FinetuneConfig`.

    Returns:
        The :class:`FinetunedModel` (CPU, eval mode).

    Raises:
        ConfigError: bad columns or settings; HeadError: a class with no training row.

    Example:
        >>> m = finetune("runs/r1/export", "labels.csv", "age", "ft-age")  # doctest: +SKIP
    """
    from .._optional import require

    require("train", "sklearn", "pandas")
    config = config if config is not None else FinetuneConfig()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    encoder = _load_encoder(source)
    paths, raw, splits = read_labelled(manifest, target)
    is_val = np.array([s in VAL_SPLITS for s in splits])
    if (~is_val).sum() < 2:
        raise ConfigError(f"{manifest}: need at least 2 training rows with a {target!r} value")

    if config.task == "classification":
        classes = sorted({str(v) for v in np.asarray(raw, dtype=object)[~is_val]})
        if len(classes) < 2:
            raise HeadError(f"classification needs at least 2 classes in the training rows of {target!r}, got {classes}")
        lookup = {c: i for i, c in enumerate(classes)}
        unknown = sorted({str(v) for v in raw} - set(classes))
        if unknown:
            raise HeadError(f"validation rows have classes {unknown} never seen in training; add training rows for them")
        y = np.array([lookup[str(v)] for v in raw], dtype=np.int64)
        out_dim = len(classes)
    else:
        try:
            y = np.asarray(raw, dtype=np.float32)
        except ValueError:
            raise ConfigError(f"{target!r} is not numeric; use --task classification for labels") from None
        classes, out_dim = [], 1
    model = FinetunedModel(encoder, out_dim, task=config.task, classes=classes, target=target)
    if config.task == "regression":
        model.target_mean.fill_(float(y[~is_val].mean()))
        model.target_std.fill_(float(y[~is_val].std()) or 1.0)
    model.to(device)
    prep = encoder.config.preprocess
    train_set = _LabelledVolumes([p for p, v in zip(paths, is_val) if not v], y[~is_val], prep)
    val_set = _LabelledVolumes([p for p, v in zip(paths, is_val) if v], y[is_val], prep) if is_val.any() else None

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    log_path.write_text("")
    if config.freeze_encoder:
        history = _fit_frozen(model, train_set, val_set, config, device, log_path)
    else:
        history = _fit_full(model, train_set, val_set, config, device, log_path)
    model.cpu().eval()
    _save(model, out, config, source, history)
    return model


def _loss_fn(model: FinetunedModel, config: FinetuneConfig) -> Any:
    if config.task == "classification":
        return lambda out, y: nn.functional.cross_entropy(out, y)
    base = nn.functional.l1_loss if config.loss == "l1" else nn.functional.mse_loss
    # regression: compare in standardised units so the loss scale does not depend on the target's
    return lambda out, y: base((out - model.target_mean) / model.target_std, (y - model.target_mean) / model.target_std)


def _predict_values(model: FinetunedModel, outputs: torch.Tensor) -> np.ndarray:
    return outputs.argmax(1).cpu().numpy() if model.task == "classification" else outputs.cpu().numpy()


def _features(model: FinetunedModel, data: _LabelledVolumes, config: FinetuneConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    loader = DataLoader(data, batch_size=config.batch_size, shuffle=False, num_workers=config.workers)
    feats, ys = [], []
    with torch.no_grad():
        for x, y in loader:
            feats.append(model.encoder(x.to(device)).float())
            ys.append(y.to(device))
    return torch.cat(feats), torch.cat(ys)


def _epoch_record(epoch: int, loss: float, model: FinetunedModel, val: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, Any]:
    record: dict[str, Any] = {"epoch": epoch, "loss": loss}
    if val is not None:
        with torch.no_grad():
            pred = _predict_values(model, model.head_forward(val[0]))
        record.update({f"val_{k}": v for k, v in _metrics(model.task, val[1].cpu().numpy(), pred).items()})
    return record


def _log(log_path: Path, record: dict[str, Any], epochs: int) -> None:
    append_jsonl(log_path, record)
    logger.info("epoch %d/%d  %s", record["epoch"], epochs, "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"))


def _fit_frozen(model: FinetunedModel, train_set: _LabelledVolumes, val_set: _LabelledVolumes | None, config: FinetuneConfig, device: torch.device, log_path: Path) -> list[dict[str, Any]]:
    """Encoder in eval mode, features computed once; the head is trained on them."""
    model.encoder.eval().requires_grad_(False)
    feats, ys = _features(model, train_set, config, device)
    val = _features(model, val_set, config, device) if val_set is not None else None
    optimizer = torch.optim.Adam(model.head.parameters(), lr=config.head_lr, weight_decay=config.weight_decay)
    loss_fn = _loss_fn(model, config)
    g = torch.Generator().manual_seed(config.seed)
    history = []
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(len(feats), generator=g).to(device)
        total = 0.0
        for i in range(0, len(order), config.batch_size):
            idx = order[i : i + config.batch_size]
            loss = loss_fn(model.head_forward(feats[idx]), ys[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        record = _epoch_record(epoch, total / len(feats), model, val)
        history.append(record)
        _log(log_path, record, config.epochs)
    return history


def _fit_full(model: FinetunedModel, train_set: _LabelledVolumes, val_set: _LabelledVolumes | None, config: FinetuneConfig, device: torch.device, log_path: Path) -> list[dict[str, Any]]:
    """Encoder and head trained together (encoder at ``lr``, head at ``head_lr``)."""
    optimizer = torch.optim.Adam(
        [{"params": model.encoder.encoder.parameters(), "lr": config.lr}, {"params": model.head.parameters(), "lr": config.head_lr}],
        weight_decay=config.weight_decay,
    )
    model.encoder.head.requires_grad_(False)  # the contrastive projection is not used by the task
    loss_fn = _loss_fn(model, config)
    g = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, generator=g, num_workers=config.workers, drop_last=len(train_set) > config.batch_size)
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    history = []
    for epoch in range(1, config.epochs + 1):
        model.train()
        total, count = 0.0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                out = model(x)
            loss = loss_fn(out.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.item() * len(y)
            count += len(y)
        model.eval()
        val = _features(model, val_set, config, device) if val_set is not None else None
        record = _epoch_record(epoch, total / max(count, 1), model, val)
        history.append(record)
        _log(log_path, record, config.epochs)
        if not math.isfinite(record["loss"]):
            raise ConfigError(f"the fine-tuning loss became {record['loss']}; lower --lr or --head-lr")
    return history


def _save(model: FinetunedModel, out: Path, config: FinetuneConfig, source: Any, history: list[dict[str, Any]]) -> None:
    from safetensors.torch import save_file

    save_pretrained(model.encoder, out)
    tensors = {
        "weight": model.head.weight.detach().contiguous(),
        "bias": model.head.bias.detach().contiguous(),
        "target_mean": model.target_mean.detach().reshape(1),
        "target_std": model.target_std.detach().reshape(1),
    }
    # each file appears whole, with the umask's mode; head.json last, so a crash never leaves a
    # config naming weights that are not there
    with atomic_path(out / HEAD_WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    meta = {
        "format": "anatcl-infer-finetune/1",
        "task": model.task,
        "target": model.target,
        "classes": model.classes,
        "feature_dim": int(model.head.in_features),
        "out_dim": int(model.head.out_features),
        "source": str(source) if not isinstance(source, AnatCL) else source.config.source,
        "config": dataclasses.asdict(config),
        "final": history[-1] if history else {},
    }
    with atomic_path(out / HEAD_CONFIG) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    logger.info("saved the fine-tuned encoder and %s to %s", HEAD_WEIGHTS, out)


def load_finetuned(directory: str | os.PathLike[str]) -> FinetunedModel:
    """Read a :func:`finetune` output directory back (CPU, eval mode).

    Raises:
        HeadError: the head files are missing or do not match the encoder.

    Example:
        >>> model = load_finetuned("ft-age")  # doctest: +SKIP
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path, weights_path = directory / HEAD_CONFIG, directory / HEAD_WEIGHTS
    if not meta_path.is_file() or not weights_path.is_file():
        raise HeadError(f"{directory} has no {HEAD_CONFIG} + {HEAD_WEIGHTS}; create it with `anatcl finetune`")
    meta = json.loads(meta_path.read_text())
    encoder: AnatCL = load_pretrained_dir(directory)  # type: ignore[assignment]
    model = FinetunedModel(encoder, int(meta["out_dim"]), task=meta["task"], classes=meta.get("classes", []), target=meta.get("target", ""))
    tensors = load_file(str(weights_path))
    if tuple(tensors["weight"].shape) != tuple(model.head.weight.shape):
        raise HeadError(f"{weights_path}: head shape {tuple(tensors['weight'].shape)} does not fit the {encoder.config.feature_dim}-d encoder")
    with torch.no_grad():
        model.head.weight.copy_(tensors["weight"])
        model.head.bias.copy_(tensors["bias"])
        model.target_mean.copy_(tensors["target_mean"][0])
        model.target_std.copy_(tensors["target_std"][0])
    return model.eval()
