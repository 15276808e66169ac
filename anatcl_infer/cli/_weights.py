"""`anatcl` sub-commands for weights: models, download, convert, push."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import typer

from .app import app, fail, setup_logging


def _folds(value: str) -> list[int]:
    if value == "all":
        return [0, 1, 2, 3, 4]
    try:
        return [int(value)]
    except ValueError:
        raise typer.BadParameter(f"expected a fold 0-4 or 'all', got {value!r}") from None


@app.command("models")
def models(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List the registered models, their folds and sources, and what is cached.

    Example:  anatcl models
    """
    from ..weights.download import cache_dir, is_offline
    from ..weights.loading import cache_check, repair_hint
    from ..weights.registry import FOLDS, list_models, resolve

    rows = []
    for name in list_models():
        for fold in FOLDS:
            resolved = resolve(name, fold)
            state, folder, problem = cache_check(name, fold)
            rows.append(
                {
                    "name": name,
                    "variant": resolved.variant,
                    "fold": fold,
                    "cached": state is not None,
                    "hash_verified": state == "verified" if state else None,
                    "integrity": None if state is None else "failed" if problem else "ok",
                    "problem": problem,
                    "path": str(folder),
                    "hub_mirror": resolved.hub_repo,
                    "sources": [dataclasses.asdict(s) for s in resolved.sources],
                }
            )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"cache: {cache_dir()}" + ("   (offline)" if is_offline() else ""))
    for row in rows:
        primary = row["sources"][0]
        sha = (primary["sha256"] or "unknown")[:16]
        state = ("-" if not row["cached"] else "CACHED COPY FAILS ITS CHECK" if row["problem"]
                 else "cached, verified" if row["hash_verified"] else "cached (not hash-verified)")
        typer.echo(f"{row['name']:<14} ({row['variant']:<6}) fold {row['fold']}  {state:<6}  sha256 {sha:<16}  {primary['release']}")
        if row["problem"]:
            typer.echo(f"    {row['path']}: {row['problem']}; repair: {repair_hint(row['name'], row['fold'])}")
        elif row["cached"] and not row["hash_verified"]:
            typer.echo(f"    {row['path']}: its source has no SHA-256 in the manifest (format and shapes checked)")
        if row["hub_mirror"]:
            typer.echo(f"    hub mirror: hf://{row['hub_mirror']}")
        for source in row["sources"]:
            typer.echo(f"    {source['release']}: {source['url']}")
    typer.echo("untrained      random weights (published network and spec), offline, no download: --model untrained")
    typer.echo("Folds are separate models: never average embeddings across folds.")


@app.command("download")
def download(
    name: str = typer.Argument(..., help="anatcl-global, anatcl-local (or an alias), or 'all'."),
    fold: str = typer.Option("0", "--fold", help="Fold 0-4 or 'all'."),
    force: bool = typer.Option(False, "--force", help="Download and convert again even if cached, replacing the cached copy (repairs one that fails its integrity check)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    """Pre-fetch registry weights into the cache (for offline clusters: copy $ANATCL_CACHE).

    Example:  anatcl download all --fold all
    """
    setup_logging(quiet=quiet)
    from ..errors import AnatCLError, OfflineError
    from ..weights.download import offline_hint
    from ..weights.loading import fetch_registry_model
    from ..weights.registry import canonical_name, list_models

    folds = _folds(fold)
    try:
        names = list_models() if name == "all" else [canonical_name(name)]
    except AnatCLError as exc:
        raise fail(str(exc), 2) from None
    failed: list[str] = []
    offline: list[str] = []
    for model_name in names:
        for k in folds:
            try:
                path = fetch_registry_model(model_name, k, retry_verified=True, force=force)
            except OfflineError:
                offline.append(f"{model_name} fold {k}")  # summarised below, not one paragraph each
                continue
            except AnatCLError as exc:
                typer.echo(f"error: {model_name} fold {k}: {exc}", err=True)
                failed.append(f"{model_name} fold {k}")
                continue
            typer.echo(f"{model_name} fold {k}: {path}")
    total = len(names) * len(folds)
    if offline:
        typer.echo(
            f"error: offline mode is on and {len(offline)} of {total} checkpoints are not cached ({_span(offline)}); "
            + offline_hint(names[0] if len(names) == 1 else "all", fold),
            err=True,
        )
    if failed and total > 1:
        typer.echo(f"{len(failed)} of {total} downloads failed: {_span(failed)}", err=True)
    if failed or offline:
        raise typer.Exit(1)


def _span(items: list[str]) -> str:
    """``anatcl-global fold 0, anatcl-global fold 1`` -> ``anatcl-global folds 0, 1``."""
    groups: dict[str, list[str]] = {}
    for item in items:
        model, _, k = item.rpartition(" fold ")
        groups.setdefault(model, []).append(k)
    return "; ".join(f"{m} fold{'s' if len(ks) > 1 else ''} {', '.join(ks)}" for m, ks in groups.items())


@app.command("convert")
def convert(
    src: str = typer.Argument(..., help="Original .pth/.pt, .safetensors, URL, registry name or model directory."),
    out_dir: Path = typer.Argument(..., help="Directory to write config.json + model.safetensors + README.md into."),
    fold: Optional[int] = typer.Option(None, "--fold", min=0, max=4, help="Fold to record (and to fetch, for a registry name)."),
    variant: Optional[str] = typer.Option(None, "--variant", help="Variant to record: global or local (guessed from the file name otherwise)."),
    source_url: Optional[str] = typer.Option(None, "--source-url", help="URL the file was downloaded from, recorded in config.json."),
    sha256: Optional[str] = typer.Option(None, "--sha256", help="Expected SHA-256 of SRC."),
    weights: str = typer.Option("model", "--weights", help="model or ema: which weights of a .pth holding both to convert (timm's use_ema)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    """Convert a checkpoint (read safely, no code run) into the inference layout; loading OUT_DIR gives bit-identical outputs.

    Example:  anatcl convert fold0.pth anatcl-global-fold0 --variant global --fold 0
    """
    setup_logging(quiet=quiet)
    from ..errors import AnatCLError
    from ..weights.loading import load_model
    from ..weights.publish import write_model_card

    if variant is not None and variant not in ("global", "local"):
        raise fail(f"--variant must be global or local, got {variant!r}", 2)
    try:
        # --fold picks the fold of a registry name; for a file it is only recorded (below)
        registry = "://" not in src and not Path(src).expanduser().exists()
        model = load_model(src, fold=fold if registry else None, sha256=sha256, device="cpu", weights=weights)
        cfg = model.config
        updates: dict[str, object] = {}
        if variant is not None:
            updates.update(variant=variant, name=f"anatcl-{variant}")
        if fold is not None:
            updates["fold"] = fold
        if source_url is not None:
            updates["source"] = source_url
        model.config = dataclasses.replace(cfg, **updates)
        model.save_pretrained(out_dir)
        write_model_card(out_dir, model.config, overwrite=True)
    except AnatCLError as exc:
        raise fail(str(exc)) from None
    c = model.config
    typer.echo(f"wrote {out_dir} ({c.name}, variant {c.variant}, fold {c.fold}, source sha256 {c.source_sha256 or 'unknown'})")


@app.command("push")
def push(
    out_dir: Path = typer.Argument(..., help="A directory written by `anatcl convert`."),
    repo_id: str = typer.Argument(..., help="Hub repository, org/name."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
    revision: Optional[str] = typer.Option(None, "--revision", "--branch", help="Branch to commit to (created if missing)."),
    token: Optional[str] = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN or `hf auth login`)."),
    message: Optional[str] = typer.Option(None, "--message", "-m", help="Commit message."),
) -> None:
    """Publish a converted model directory to the Hugging Face Hub (then load it with hf://org/name).

    Example:  anatcl push anatcl-global-fold0 myorg/anatcl-global-fold0
    """
    setup_logging()
    from ..errors import AnatCLError
    from ..weights.publish import push_to_hub

    try:
        url = push_to_hub(out_dir, repo_id, private=private, revision=revision, token=token, commit_message=message)
    except AnatCLError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"pushed {out_dir} to {url}\nload it with: anatcl_infer.load_model('hf://{repo_id}')")
