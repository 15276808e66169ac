"""`anatcl train` and `anatcl finetune`: pretrain AnatCL, fine-tune a pretrained model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app, fail, setup_logging

_TRAIN_EPILOG = (
    "Examples:\n\n"
    "  anatcl train --openbhb openBHB/ --out runs/anatcl-local --epochs 300\n\n"
    "  anatcl train --manifest train.csv --out runs/yaware --descriptor none --batch-size 16\n\n"
    "  torchrun --nproc_per_node 4 -m anatcl_infer train --openbhb openBHB/ --out runs/r1   (DDP, 4 GPUs)\n\n"
    "  anatcl train --openbhb openBHB/ --out runs/r1 --resume runs/r1 --epochs 400   (continue)\n\n"
    "Manifest: CSV with path (NIfTI or .npy on the grid) and age; optional site, split "
    "(train/val/other), subject, and descriptors (a 7x68 FreeSurfer Desikan ROI .npy) or "
    "ct_0..ct_67, gmv_0..gmv_67, sa_0..sa_67 columns. Images go through the same "
    "preprocessing as inference (--preprocess, default: the published CAT12 mwp1 spec), "
    "which is saved with the exported model. Defaults are the published runs': Adam 1e-4, "
    "wd 5e-5, lr x0.9 every 10 epochs, global batch 32, tau 0.1, rbf sigma 2, 2 views, no "
    "augmentation. The result, RUN_DIR/export/, loads with anatcl_infer.load_model and "
    "`anatcl embed --model RUN_DIR/export`."
)


_RUN_FILES = ("train_config.json", "log.jsonl", "checkpoints", "export")


def _refuse_existing_run(out: Path, overwrite: bool) -> None:
    """An existing run folder is never silently overwritten: --resume continues it, --overwrite starts over."""
    import shutil

    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir():
        raise fail(f"--out {out} is a file; give a run directory", 2)
    found = [n for n in _RUN_FILES if (out / n).exists()]
    if not found:
        raise fail(f"--out {out} is a non-empty folder that is not a training run; choose a new or empty directory", 2)
    if not overwrite:
        raise fail(
            f"{out} already holds a training run ({', '.join(found)}); pass --resume {out} to continue it, "
            "or --overwrite to start over (its checkpoints and export are deleted)", 2,
        )
    for n in found:
        target = out / n
        shutil.rmtree(target) if target.is_dir() else target.unlink()


@app.command("train", epilog=_TRAIN_EPILOG)
def train_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: checkpoints/, log.jsonl, train_config.json and export/."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Training manifest CSV/TSV (see below)."),
    openbhb: Optional[Path] = typer.Option(None, "--openbhb", help="OpenBHB folder: participants.tsv plus, anywhere below, each subject's cat12vbm grey-matter .npy and Desikan ROI .npy."),
    epochs: int = typer.Option(100, "--epochs", min=1, help="Total epochs (the published count is unknown; the predecessor used 300)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=2, help="Global batch (subjects per step over all processes)."),
    lr: float = typer.Option(1e-4, "--lr", help="Adam learning rate."),
    weight_decay: float = typer.Option(5e-5, "--weight-decay", help="Adam weight decay."),
    descriptor: str = typer.Option("local", "--descriptor", help="Anatomical kernel: local (per-region cosine), global (per-measure cosine), or none (y-aware age loss only)."),
    alpha: float = typer.Option(1.0, "--alpha", help="Weight of the age (y-aware) term."),
    lambd: float = typer.Option(1.0, "--lambd", help="Weight of the anatomical term."),
    sigma: float = typer.Option(2.0, "--sigma", help="Age kernel bandwidth in years."),
    kernel: str = typer.Option("rbf", "--kernel", help="Age kernel: rbf, gaussian or cauchy."),
    temperature: float = typer.Option(0.1, "--temperature", help="Contrastive temperature tau."),
    views: int = typer.Option(2, "--views", min=1, help="Views per subject (identical without --augment)."),
    augment: str = typer.Option("none", "--augment", help="none (published) or predecessors (crop+pad, flip, blur, noise, cutout 32^3 p 0.5)."),
    architecture: str = typer.Option("resnet18", "--architecture", help="resnet18 (published), resnet34, resnet50, resnet101."),
    preprocess: Optional[Path] = typer.Option(None, "--preprocess", help="JSON preprocessing spec (PreprocessConfig fields, e.g. {\"input_kind\": \"t1\"} for a T1 variant)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda (under torchrun each rank takes cuda:LOCAL_RANK)."),
    workers: int = typer.Option(0, "--workers", min=0, help="DataLoader processes per training process."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="Mixed precision (CUDA only; ignored on CPU)."),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Clip the global gradient norm to this value."),
    save_every: int = typer.Option(10, "--save-every", min=1, help="Checkpoint every N epochs (the last one is always saved)."),
    probe_every: int = typer.Option(1, "--probe-every", min=0, help="Validation linear probe every N epochs (0: never); needs split=val rows."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue from a run directory (its checkpoints/last.pt) or a checkpoint file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in an existing run directory (its checkpoints, log and export are deleted)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    name: str = typer.Option("anatcl-trained", "--name", help="Model name written into export/config.json."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Pretrain an AnatCL encoder (L = alpha * L_age + lambd * L_anat) and export it for inference.

    Runs on one device, or on many under torchrun (DDP; BatchNorm synchronised so N processes compute what one would on the same global batch). Checkpoints hold every optimizer and random state: --resume continues exactly.
    """
    import json
    import os

    setup_logging(quiet=quiet or int(os.environ.get("RANK", "0")) > 0, verbose=verbose)  # rank 0 speaks

    from .._optional import require
    from ..config import PreprocessConfig
    from ..errors import AnatCLError

    if (manifest is None) == (openbhb is None):
        raise fail("give exactly one of --manifest M.csv or --openbhb DIR", 2)
    if resume is not None and overwrite:
        raise fail("--resume and --overwrite contradict each other; give one", 2)
    if resume is None and int(os.environ.get("RANK", "0")) == 0:  # rank 0 decides (torchrun stops the others if it fails)
        _refuse_existing_run(out, overwrite)
    try:
        require("train", "pandas", "sklearn")
    except AnatCLError as exc:
        raise fail(str(exc)) from None
    if augment not in ("none", "predecessors"):
        raise fail(f"--augment must be none or predecessors, got {augment!r}", 2)
    try:
        from ..training.augment import AugmentConfig
        from ..training.data import (
            VolumeDataset,
            read_manifest,
            read_openbhb,
            split_subjects,
        )
        from ..training.trainer import TrainConfig, train
    except ImportError as exc:
        raise fail(f"training needs the [train] extra ({exc}); run `pip install 'anatcl-infer[train]'`") from None
    try:
        prep = PreprocessConfig.from_dict(json.loads(preprocess.read_text())) if preprocess else PreprocessConfig()
        config = TrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            descriptor=descriptor,
            alpha=alpha,
            lambd=lambd,
            sigma=sigma,
            kernel=kernel,
            temperature=temperature,
            views=views,
            architecture=architecture,
            amp=amp,
            grad_clip=grad_clip,
            save_every=save_every,
            probe_every=probe_every,
            seed=seed,
            workers=workers,
            device=None if device == "auto" else device,
            augment=AugmentConfig.predecessors() if augment == "predecessors" else AugmentConfig(),
            name=name,
        )
        subjects = read_manifest(manifest) if manifest is not None else read_openbhb(openbhb)  # type: ignore[arg-type]
        train_subjects, val_subjects = split_subjects(subjects)
        train_data = VolumeDataset(train_subjects, prep)
        val_data = train_data.with_subjects(val_subjects) if len(val_subjects) >= 4 else None
        result = train(train_data, out, config, val_data=val_data, resume=resume)
    except (AnatCLError, OSError, json.JSONDecodeError) as exc:
        raise fail(str(exc)) from None
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"exported {result.export_dir}  (anatcl embed --model {result.export_dir} ...)")


_FT_EPILOG = (
    "Examples:\n\n"
    "  anatcl finetune --model runs/r1/export --manifest labels.csv --target age --out ft-age\n\n"
    "  anatcl finetune --model anatcl-global --manifest dx.csv --target diagnosis --task classification "
    "--full --epochs 20 --out ft-dx\n\n"
    "Manifest: CSV with path, the target column and optionally split (val rows give per-epoch "
    "validation metrics). OUT holds the encoder (config.json + model.safetensors, usable "
    "anywhere a model directory is) and finetune_head.json/.safetensors beside it; load both "
    "with anatcl_infer.training.load_finetuned(OUT)."
)


@app.command("finetune", epilog=_FT_EPILOG)
def finetune_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Pretrained model: registry name, hf://, URL, .pth/.safetensors file, or model directory (e.g. RUN_DIR/export)."),
    manifest: Path = typer.Option(..., "--manifest", help="Labelled CSV/TSV with path and the target column."),
    target: str = typer.Option(..., "--target", help="Column to predict."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    task: str = typer.Option("regression", "--task", help="regression or classification."),
    freeze_encoder: bool = typer.Option(True, "--freeze-encoder/--full", help="Train the head only (linear probing, default) or the whole network."),
    epochs: int = typer.Option(50, "--epochs", min=1, help="Epochs."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Batch size."),
    lr: float = typer.Option(1e-5, "--lr", help="Encoder learning rate (--full)."),
    head_lr: float = typer.Option(1e-3, "--head-lr", help="Head learning rate."),
    loss: str = typer.Option("l1", "--loss", help="Regression loss: l1 or mse."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda."),
    workers: int = typer.Option(0, "--workers", min=0, help="DataLoader processes."),
    amp: bool = typer.Option(False, "--amp", help="Mixed precision on CUDA (--full)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Fine-tune a pretrained AnatCL on a labelled task: a linear head on the 512-d features, frozen or full encoder."""
    setup_logging(quiet=quiet, verbose=verbose)
    from ..errors import AnatCLError

    from .._optional import require

    try:
        require("train", "pandas", "sklearn")
        from ..training.finetune import FinetuneConfig, finetune
    except AnatCLError as exc:
        raise fail(str(exc)) from None
    except ImportError as exc:
        raise fail(f"fine-tuning needs the [train] extra ({exc}); run `pip install 'anatcl-infer[train]'`") from None
    try:
        config = FinetuneConfig(
            task=task,
            freeze_encoder=freeze_encoder,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            head_lr=head_lr,
            loss=loss,
            device=None if device == "auto" else device,
            workers=workers,
            amp=amp,
            seed=seed,
        )
        finetune(model, manifest, target, out, config)
    except (AnatCLError, OSError) as exc:
        raise fail(str(exc)) from None
    typer.echo(f"saved {out}  (anatcl_infer.training.load_finetuned({str(out)!r}))")
