"""AnatCL pretraining on one device or many (``torchrun``), with exact resume and export.

Defaults are the published runs' (REFERENCE §7): Adam, lr 1e-4, weight decay 5e-5,
lr × 0.9 every 10 epochs, global batch 32, τ 0.1, rbf age kernel σ 2, two views,
α = λ = 1, mixed precision (on CUDA only), no augmentation.

One epoch: the global batch is drawn by a :class:`~torch.utils.data.DistributedSampler`
(also with one process, so 1 and N processes see the same global batches); each rank
projects its share, projections are gathered, every rank computes the loss on the
global batch, DDP averages gradients. With augmentation off, the two views of a
subject are identical, so the network runs once per subject and the projection is
used for every view (same loss and gradients, half the compute).

Run directory::

    RUN_DIR/
      train_config.json        the TrainConfig and ModelConfig of the run
      log.jsonl                one line per epoch: loss terms, lr, validation probe
      checkpoints/epoch-0010.pt, last.pt   (torch.load(weights_only=True))
      export/config.json + model.safetensors   (loads with anatcl_infer.load_model)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from .._files import atomic_dir, atomic_path
from ..weights.checkpoint import clean_state_dict, load_state_dict_strict, save_pretrained
from ..config import ModelConfig, PreprocessConfig
from ..model.devices import resolve_device
from ..errors import ConfigError
from ..model.network import AnatCL
from .augment import AugmentConfig, Augmenter
from .checkpoints import (
    append_jsonl,
    load_checkpoint,
    resolve_resume,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from .data import VolumeDataset
from .distributed import (
    DistInfo,
    gather,
    gather_with_grad,
    init_distributed,
    sync_batchnorm,
)
from .losses import DESCRIPTOR_MODES, KERNELS, anatcl_loss

__all__ = ["TrainConfig", "TrainResult", "embed_dataset", "train"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a pretraining run (defaults: the published runs).

    Attributes:
        epochs: total epochs (the published count is unknown; the predecessor used 300).
        batch_size: **global** batch (subjects per step, over all processes); must be
            divisible by the number of processes.
        lr, weight_decay: Adam settings.
        lr_step, lr_gamma: StepLR, lr × ``lr_gamma`` every ``lr_step`` epochs.
        temperature, base_temperature: τ and τ_base of the loss (``None`` = τ).
        sigma, kernel: age kernel bandwidth (years) and kind.
        descriptor: ``local``, ``global`` (AnatCL) or ``none`` (y-aware only).
        alpha, lambd: weights of L_age and L_anat.
        views: views per subject.
        architecture: encoder (``resnet18`` as published).
        amp: mixed precision; used on CUDA only.
        grad_clip: max global gradient norm (``None`` = no clipping).
        save_every: checkpoint every N epochs (the last epoch is always saved).
        probe_every: run the validation linear probe every N epochs (0 = never).
        seed: seeds torch, numpy, python and the augmentation generator (+ rank).
        workers: DataLoader workers per process.
        device: ``None``/``auto``, ``cpu``, ``cuda``...; under torchrun on CUDA each rank
            uses ``cuda:LOCAL_RANK``.
        sync_batchnorm: normalise over the global batch under DDP (see
            :mod:`anatcl_infer.training.distributed`).
        augment: the augmentations (off by default).
        name: model name written into the exported ``config.json``.

    Example:
        >>> TrainConfig(epochs=100, descriptor="global").lr
        0.0001
    """

    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 5e-5
    lr_step: int = 10
    lr_gamma: float = 0.9
    temperature: float = 0.1
    base_temperature: float | None = None
    sigma: float = 2.0
    kernel: str = "rbf"
    descriptor: str = "local"
    alpha: float = 1.0
    lambd: float = 1.0
    views: int = 2
    architecture: str = "resnet18"
    amp: bool = True
    grad_clip: float | None = None
    save_every: int = 10
    probe_every: int = 1
    seed: int = 0
    workers: int = 0
    device: str | None = None
    sync_batchnorm: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    name: str = "anatcl-trained"

    def __post_init__(self) -> None:
        if self.descriptor not in (*DESCRIPTOR_MODES, "none"):
            raise ConfigError(f"descriptor must be 'local', 'global' or 'none', got {self.descriptor!r}")
        if self.kernel not in KERNELS:
            raise ConfigError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        for name in ("epochs", "batch_size", "views", "lr_step", "save_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.batch_size < 2:
            raise ConfigError("batch_size must be >= 2: a contrastive loss needs several subjects per batch")
        if self.lr <= 0 or self.temperature <= 0 or self.sigma <= 0:
            raise ConfigError(f"lr, temperature and sigma must be > 0, got {self.lr}, {self.temperature}, {self.sigma}")
        if self.alpha < 0 or self.lambd < 0 or (self.alpha == 0 and (self.lambd == 0 or self.descriptor == "none")):
            raise ConfigError("alpha and lambd must be >= 0 and at least one loss term must be on")
        if isinstance(self.augment, dict):
            object.__setattr__(self, "augment", AugmentConfig(**self.augment))

    @property
    def descriptor_mode(self) -> str | None:
        """``local``/``global``, or ``None`` when the anatomical term is off."""
        return None if self.descriptor == "none" or self.lambd == 0 else self.descriptor

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown training options {sorted(unknown)}; valid ones are {sorted(names)}")
        return cls(**data)  # __post_init__ turns an ``augment`` dict (its lists too) into an AugmentConfig


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; ``export_dir`` is written by rank 0)."""

    model: AnatCL
    history: list[dict[str, Any]]
    run_dir: Path
    export_dir: Path
    last_checkpoint: Path | None


def _model_config(config: TrainConfig, preprocess: PreprocessConfig, run_dir: Path) -> ModelConfig:
    variant = config.descriptor_mode or "y-aware"
    return ModelConfig(
        architecture=config.architecture,
        variant=variant,
        fold=None,
        name=config.name,
        source=f"trained:{run_dir.resolve()}",
        source_sha256=None,
        feature_dim=512 if config.architecture in ("resnet18", "resnet34") else 2048,
        projection_dim=128,
        preprocess=preprocess,
    )


def embed_dataset(model: nn.Module, dataset: VolumeDataset, *, device: torch.device, batch_size: int = 8, workers: int = 0, amp: bool = False) -> np.ndarray:
    """(N, D) features of a dataset with the model in eval mode, in dataset order.

    Example:
        >>> feats = embed_dataset(model, val_data, device=torch.device("cpu"))  # doctest: +SKIP
    """
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    out = []
    try:
        with torch.no_grad():
            for batch in loader:
                with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                    feats = model(batch["image"].to(device, non_blocking=True))
                out.append(feats.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy()


def _project(model: nn.Module, images: torch.Tensor, views: int, augmenter: Augmenter) -> torch.Tensor:
    """(B, V, D) projections; one forward per subject when views would be identical."""
    b = images.shape[0]
    if not augmenter.config.enabled:
        z = model(images, head=True)
        return z.unsqueeze(1).expand(b, views, z.shape[1])
    stacked = torch.cat([augmenter(images) for _ in range(views)])  # view-major
    z = model(stacked, head=True)
    return z.reshape(views, b, -1).transpose(0, 1)


def _check_data(data: VolumeDataset, config: TrainConfig) -> None:
    if config.descriptor_mode is not None and not data.has_all_descriptors:
        missing = sum(s.descriptors is None for s in data.subjects)
        raise ConfigError(
            f"descriptor mode {config.descriptor_mode!r} needs Desikan descriptors for every training subject; "
            f"{missing} of {len(data)} have none. Add them (ROI .npy files or ct_/gmv_/sa_ columns) or use "
            "--descriptor none (y-aware only)"
        )


def train(
    train_data: VolumeDataset,
    run_dir: str | os.PathLike[str],
    config: TrainConfig | None = None,
    *,
    val_data: VolumeDataset | None = None,
    resume: str | os.PathLike[str] | None = None,
) -> TrainResult:
    """Pretrain an AnatCL encoder and export it in the inference layout.

    Run it as is for one device, or under ``torchrun --nproc_per_node N`` for DDP
    (every rank calls :func:`train` with the same arguments).

    Args:
        train_data: training subjects (see :class:`~anatcl_infer.training.data.VolumeDataset`);
            its ``config`` is the preprocessing saved with the exported model.
        run_dir: output folder (checkpoints, logs, ``export/``).
        config: hyper-parameters (default :class:`TrainConfig`).
        val_data: validation subjects for the per-epoch linear probe (age MAE, site
            balanced accuracy), built with ``train_data.with_subjects(...)``.
        resume: a checkpoint file or a run directory (its ``checkpoints/last.pt``);
            training continues exactly where it stopped, up to ``config.epochs``.

    Returns:
        A :class:`TrainResult` with the trained model (CPU, eval mode) and the history.

    Raises:
        ConfigError: inconsistent settings or data (e.g. descriptors missing).
        CheckpointError: ``resume`` is not a readable training checkpoint.

    Example:
        >>> result = train(VolumeDataset(subjects, PreprocessConfig()), "runs/r1", TrainConfig(epochs=50))  # doctest: +SKIP
        >>> anatcl_infer.load_model(result.export_dir)  # doctest: +SKIP
    """
    from .._optional import require

    require("train", "sklearn", "pandas")
    config = config if config is not None else TrainConfig()
    _check_data(train_data, config)
    if val_data is not None and len(val_data) < 4:
        logger.warning("only %d validation subjects: the linear probe needs at least 4, so it is skipped", len(val_data))
        val_data = None
    run_dir = Path(run_dir)
    device = resolve_device(config.device)
    dist_info = init_distributed(device)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    if config.batch_size % dist_info.world_size:
        raise ConfigError(
            f"batch_size {config.batch_size} (the global batch) is not divisible by the {dist_info.world_size} processes; "
            "pick a multiple"
        )
    local_batch = config.batch_size // dist_info.world_size
    use_amp = bool(config.amp) and device.type == "cuda"
    if config.amp and not use_amp:
        logger.info("mixed precision is used on CUDA only; training in float32 on %s", device)

    seed_everything(config.seed)
    model_config = _model_config(config, train_data.config, run_dir)
    model = AnatCL(model_config)
    if dist_info.enabled and config.sync_batchnorm:
        model = sync_batchnorm(model, device)  # type: ignore[assignment]
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step, gamma=config.lr_gamma)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    augmenter = Augmenter(config.augment, seed=config.seed + dist_info.rank)
    history: list[dict[str, Any]] = []
    start_epoch = 0

    if resume is not None:
        ckpt_path = resolve_resume(resume)
        state = load_checkpoint(ckpt_path)
        load_state_dict_strict(model, clean_state_dict(state["model"]), path=str(ckpt_path))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        ranks = state["rng"]
        if len(ranks) != dist_info.world_size:
            logger.warning(
                "checkpoint was written by %d processes, resuming with %d: random states restart from rank 0's",
                len(ranks),
                dist_info.world_size,
            )
        mine = ranks[dist_info.rank] if dist_info.rank < len(ranks) else ranks[0]
        set_rng_state(mine["process"])
        augmenter.load_state_dict(mine["augmenter"])
        start_epoch = int(state["epoch"])
        history = list(state.get("history", []))
        logger.info("resumed from %s at epoch %d", ckpt_path, start_epoch)

    net: nn.Module = model
    if dist_info.enabled:
        # BatchNorm buffers stay identical across ranks when synchronised; otherwise rank 0's are broadcast.
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = DistributedSampler(
        train_data, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True, seed=config.seed, drop_last=True
    )
    loader = DataLoader(
        train_data,
        batch_size=local_batch,
        sampler=sampler,
        drop_last=True,
        num_workers=config.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=config.workers > 0,
    )
    if len(loader) == 0:
        raise ConfigError(
            f"{len(train_data)} training subjects cannot fill one global batch of {config.batch_size}; lower --batch-size"
        )
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(run_dir / "train_config.json") as tmp:
            tmp.write_text(
                json.dumps({"train": config.to_dict(), "model": model_config.to_dict(), "world_size": dist_info.world_size}, indent=2) + "\n"
            )
    log_path = run_dir / "log.jsonl"
    if dist_info.is_main and resume is not None:
        # epochs logged after the checkpoint (a crash between saves) are dropped: they will be redone
        log_path.write_text("".join(json.dumps(r) + "\n" for r in history))
    mode = config.descriptor_mode
    last_ckpt: Path | None = None

    for epoch in range(start_epoch, config.epochs):
        net.train()
        t0 = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64)
        steps = 0
        lr = optimizer.param_groups[0]["lr"]
        sampler.set_epoch(epoch)
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                z = _project(net, images, config.views, augmenter)
            z_all = gather_with_grad(z.float())
            ages = gather(batch["age"].to(device))
            desc = gather(batch["descriptors"].to(device)) if mode is not None else None
            parts = anatcl_loss(
                z_all,
                ages,
                desc,
                alpha=config.alpha,
                lambd=config.lambd,
                mode=mode,
                sigma=config.sigma,
                kernel=config.kernel,
                temperature=config.temperature,
                base_temperature=config.base_temperature,
            )
            if not torch.isfinite(parts.total):
                raise ConfigError(
                    f"the loss became {parts.total.item()} at epoch {epoch + 1}; lower --lr, set a gradient clip, or "
                    "turn --amp off"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(parts.total).backward()
            if config.grad_clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            sums += torch.tensor([parts.total.item(), parts.age.item(), parts.anat.item()], dtype=torch.float64)
            steps += 1
            logger.debug("epoch %d step %d  loss %.6f  subjects %s", epoch + 1, steps, parts.total.item(), batch["index"].tolist())
        scheduler.step()
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": sums[0].item() / steps,
            "loss_age": sums[1].item() / steps,
            "loss_anat": sums[2].item() / steps,
            "lr": lr,
            "steps": steps,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        done = epoch + 1
        if dist_info.is_main and val_data is not None and config.probe_every and (done % config.probe_every == 0 or done == config.epochs):
            from .probe import linear_probe

            feats = embed_dataset(model, val_data, device=device, workers=config.workers, amp=use_amp)
            record.update(linear_probe(feats, val_data.ages, val_data.site_indices, seed=config.seed))
        history.append(record)
        if dist_info.is_main:
            append_jsonl(log_path, record)
            extra = "".join(
                f"  {k} {record[k]:.4g}" for k in ("val_age_mae", "val_site_bacc") if k in record
            )
            logger.info(
                "epoch %d/%d  loss %.4f (age %.4f, anat %.4f)  lr %.3g  %.1fs%s",
                done, config.epochs, record["loss"], record["loss_age"], record["loss_anat"], lr, record["seconds"], extra,
            )
        if done % config.save_every == 0 or done == config.epochs:
            last_ckpt = _save(run_dir, done, model, optimizer, scheduler, scaler, augmenter, config, model_config, history, dist_info)

    if dist_info.enabled:
        torch.distributed.barrier()
    export_dir = run_dir / "export"
    final = AnatCL(model_config)
    load_state_dict_strict(final, clean_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()}))
    final.eval()
    if dist_info.is_main:
        with atomic_dir(export_dir) as tmp:  # appears whole, readable as the umask allows (a lab can share it)
            save_pretrained(final, tmp)
            (tmp / "training.json").write_text(
                json.dumps({"train": config.to_dict(), "epochs_done": config.epochs, "history_tail": history[-1:]}, indent=2) + "\n"
            )
        logger.info("exported the trained model to %s (load it with anatcl_infer.load_model)", export_dir)
    if dist_info.enabled:
        torch.distributed.barrier()
    return TrainResult(model=final, history=history, run_dir=run_dir, export_dir=export_dir, last_checkpoint=last_ckpt)


def _save(
    run_dir: Path,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    augmenter: Augmenter,
    config: TrainConfig,
    model_config: ModelConfig,
    history: list[dict[str, Any]],
    dist_info: DistInfo,
) -> Path:
    """Gather every rank's random states and write ``epoch-NNNN.pt`` and ``last.pt`` on rank 0."""
    mine = {"process": rng_state(), "augmenter": augmenter.state_dict()}
    if dist_info.enabled:
        ranks: list[Any] = [None] * dist_info.world_size
        torch.distributed.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    path = run_dir / "checkpoints" / f"epoch-{epoch:04d}.pt"
    if dist_info.is_main:
        state = {
            "epoch": epoch,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": ranks,
            "train_config": config.to_dict(),
            "model_config": model_config.to_dict(),
            "history": history,
        }
        save_checkpoint(state, path)
        save_checkpoint(state, path.with_name("last.pt"))
        logger.info("saved checkpoint %s", path)
    return path
