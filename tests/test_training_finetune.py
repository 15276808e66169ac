"""Fine-tuning: frozen and full encoders, saved head, reload, and the two CLI commands."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from training_toys import SMALL, make_subjects
from typer.testing import CliRunner

from anatcl_infer.weights.checkpoint import load_pretrained_dir, save_pretrained
from anatcl_infer.cli import app
from anatcl_infer.config import ModelConfig
from anatcl_infer.errors import ConfigError, HeadError
from anatcl_infer.model.network import AnatCL
from anatcl_infer.training.finetune import (
    HEAD_CONFIG,
    FinetuneConfig,
    finetune,
    load_finetuned,
)


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI configures the package logger; put it back for the other tests."""
    import logging

    log = logging.getLogger("anatcl_infer")
    saved = (list(log.handlers), log.level, log.propagate)
    yield
    log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    manifest = make_subjects(root / "data", n=10, val=4, sites=2)
    torch.manual_seed(0)
    pretrained = save_pretrained(AnatCL(ModelConfig(name="toy", variant="toy", fold=None, preprocess=SMALL)), root / "pretrained")
    return manifest, pretrained


@pytest.mark.slow
def test_frozen_regression_trains_head_only(setup, tmp_path):
    manifest, pretrained = setup
    model = finetune(pretrained, manifest, "age", tmp_path / "ft", FinetuneConfig(epochs=40, device="cpu"))
    before = load_pretrained_dir(pretrained).state_dict()
    after = load_pretrained_dir(tmp_path / "ft").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # encoder untouched
    log = [json.loads(x) for x in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 40 and log[-1]["loss"] < log[0]["loss"] and "val_mae" in log[-1]
    meta = json.loads((tmp_path / "ft" / HEAD_CONFIG).read_text())
    assert meta["task"] == "regression" and meta["target"] == "age" and meta["out_dim"] == 1
    reloaded = load_finetuned(tmp_path / "ft")
    x = torch.stack([torch.from_numpy(np.load(manifest.parent / f"sub-{k}.npy")) for k in range(2)])
    from anatcl_infer.inputs.preprocess import prepare

    batch = torch.stack([torch.from_numpy(prepare(v.numpy(), SMALL, assume_reference_grid=True).array) for v in x])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch), model(batch))
    preds = reloaded.predict([str(manifest.parent / "sub-0.npy"), str(manifest.parent / "sub-1.npy")], device="cpu", progress=False)
    np.testing.assert_allclose(preds, model(batch).detach().numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_full_classification(setup, tmp_path):
    manifest, pretrained = setup
    model = finetune(
        pretrained, manifest, "site", tmp_path / "cls",
        FinetuneConfig(task="classification", freeze_encoder=False, epochs=1, batch_size=4, device="cpu"),
    )
    assert model.classes == ["site0", "site1"]
    before = load_pretrained_dir(pretrained).state_dict()
    after = load_pretrained_dir(tmp_path / "cls").state_dict()
    assert not torch.equal(before["encoder.conv1.weight"], after["encoder.conv1.weight"])
    assert torch.equal(before["head.2.weight"], after["head.2.weight"])  # projection head unused
    labels = load_finetuned(tmp_path / "cls").predict([str(manifest.parent / "sub-0.npy")], device="cpu", progress=False)
    assert labels[0] in ("site0", "site1")


def test_finetune_errors(setup, tmp_path):
    manifest, pretrained = setup
    with pytest.raises(ConfigError, match="no 'score' column"):
        finetune(pretrained, manifest, "score", tmp_path / "x")
    with pytest.raises(ConfigError, match="classification"):
        finetune(pretrained, manifest, "site", tmp_path / "x", FinetuneConfig(device="cpu"))
    with pytest.raises(HeadError, match="anatcl finetune"):
        load_finetuned(pretrained)


def test_training_import_is_lazy():
    import subprocess
    import sys

    code = "import sys, anatcl_infer.training as t; assert 'torch' not in sys.modules; assert 'train' in dir(t)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_help_teaches():
    runner = CliRunner()
    out = runner.invoke(app, ["train", "--help"], terminal_width=200).output
    for word in ("--manifest", "--openbhb", "--descriptor", "--resume", "torchrun", "export"):
        assert word in out
    out = runner.invoke(app, ["finetune", "--help"], terminal_width=200).output
    assert "--freeze-encoder" in out and "load_finetuned" in out


@pytest.mark.slow
def test_cli_train_then_finetune(setup, tmp_path):
    manifest, _ = setup
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SMALL.to_dict()))
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert res.exit_code == 2 and "exactly one of" in res.output
    args = ["train", "--manifest", str(manifest), "--out", str(tmp_path / "run"), "--preprocess", str(spec),
            "--device", "cpu", "--epochs", "1", "--batch-size", "3", "--descriptor", "none", "-q"]
    old_umask = os.umask(0o022)  # a lab shares its runs: the export is readable as the umask allows
    try:
        res = runner.invoke(app, args)
    finally:
        os.umask(old_umask)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()
    export = tmp_path / "run" / "export"
    assert stat.S_IMODE(export.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in [*export.iterdir(), *(tmp_path / "run" / "checkpoints").iterdir()]} == {0o644}
    res = runner.invoke(app, args)  # the same command again never overwrites the run silently
    assert res.exit_code == 2 and "--resume" in res.output
    assert load_pretrained_dir(tmp_path / "run" / "export").config.variant == "y-aware"
    res = runner.invoke(app, ["finetune", "--model", str(tmp_path / "run" / "export"), "--manifest", str(manifest),
                              "--target", "age", "--out", str(tmp_path / "ft"), "--epochs", "2", "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ft" / HEAD_CONFIG).is_file()
    res = runner.invoke(app, ["train", "--manifest", str(manifest), "--out", str(tmp_path / "r2"), "--preprocess",
                              str(spec), "--device", "cpu", "--batch-size", "64", "-q"])
    assert res.exit_code == 1 and "lower --batch-size" in res.output


def test_saved_head_files_are_whole_and_shareable(setup, tmp_path, monkeypatch):
    """Under a group-writable umask every output file is group-writable and no temporary is left;
    a crash while the head config is written leaves the previous head, not a half-written one."""
    manifest, pretrained = setup
    old = os.umask(0o002)
    try:
        finetune(pretrained, manifest, "age", tmp_path / "ft", FinetuneConfig(epochs=1, device="cpu"))
    finally:
        os.umask(old)
    names = sorted(p.name for p in (tmp_path / "ft").iterdir())
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")], names
    for name in ("finetune_head.json", "finetune_head.safetensors", "model.safetensors", "config.json"):
        assert stat.S_IMODE((tmp_path / "ft" / name).stat().st_mode) == 0o664, name
    before = (tmp_path / "ft" / HEAD_CONFIG).read_bytes()

    import pathlib

    import anatcl_infer.training.finetune as ft

    real_write_text = pathlib.Path.write_text

    def disk_full_midway(self, data, *args, **kwargs):
        if HEAD_CONFIG in self.name:  # the head config (or its temporary): half of it, then the disk is full
            real_write_text(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(28, "No space left on device")
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full_midway)
    with pytest.raises(OSError):
        ft._save(load_finetuned(tmp_path / "ft"), tmp_path / "ft", FinetuneConfig(epochs=1, device="cpu"), pretrained, [])
    assert (tmp_path / "ft" / HEAD_CONFIG).read_bytes() == before
    assert not [p.name for p in (tmp_path / "ft").iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
