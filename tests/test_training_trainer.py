"""The trainer: learning, exact resume, export to the inference layout, validation probe, DDP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from training_toys import SMALL, TINY, make_subjects

import anatcl_infer
from anatcl_infer.weights.checkpoint import load_pretrained_dir
from anatcl_infer.errors import CheckpointError, ConfigError
from anatcl_infer.training.augment import AugmentConfig
from anatcl_infer.training.checkpoints import load_checkpoint
from anatcl_infer.training.data import VolumeDataset, read_manifest, split_subjects
from anatcl_infer.training.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("subjects")
    manifest = make_subjects(root, n=12, val=4, sites=2)
    train_s, val_s = split_subjects(read_manifest(manifest))
    ds = VolumeDataset(train_s, SMALL)
    return manifest, ds, ds.with_subjects(val_s)


def small(**kw):
    base = dict(epochs=2, batch_size=4, save_every=1, probe_every=0, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.slow
def test_loss_decreases_on_a_learnable_toy(data, tmp_path):
    _, ds, _ = data
    # a fixed full batch of 6 subjects, 4 steps: the objective must go down
    result = train(ds.with_subjects(ds.subjects[:6]), tmp_path / "run", small(epochs=4, batch_size=6, lr=3e-4, save_every=4))
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(np.isfinite(losses))


@pytest.mark.slow
def test_resume_continues_exactly(data, tmp_path):
    _, ds, _ = data
    ds = ds.with_subjects(ds.subjects[:4])  # batch 2: 2 steps per epoch, 2 augmented views each
    cfg = small(batch_size=2, augment=AugmentConfig(shift=2, flip_p=0.5, noise_p=0.5, cutout_p=0.5, cutout_size=8))
    full = train(ds, tmp_path / "full", cfg)
    first = train(ds, tmp_path / "part", small(epochs=1, batch_size=2, augment=cfg.augment))
    ckpt = load_checkpoint(first.last_checkpoint)  # weights_only=True inside
    assert ckpt["epoch"] == 1 and {"model", "optimizer", "scheduler", "scaler", "rng"} <= set(ckpt)
    assert torch.load(first.last_checkpoint, weights_only=True)["epoch"] == 1
    with open(tmp_path / "part" / "log.jsonl", "a") as fh:  # an epoch logged, then a crash before its checkpoint
        fh.write(json.dumps({"epoch": 2, "loss": -1.0}) + "\n")
    resumed = train(ds, tmp_path / "part", cfg, resume=tmp_path / "part")
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    log = [json.loads(line) for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and log[1]["loss"] == resumed.history[1]["loss"]


@pytest.mark.slow
def test_export_loads_with_the_inference_loader(data, tmp_path):
    _, ds, val = data
    result = train(ds, tmp_path / "run", small(epochs=1, probe_every=1, descriptor="global", grad_clip=1.0), val_data=val)
    export = result.export_dir
    assert (export / "config.json").is_file() and (export / "model.safetensors").is_file()
    loaded = load_pretrained_dir(export)
    via_loader = anatcl_infer.load_model(export, device="cpu")
    assert loaded.config.preprocess == SMALL == via_loader.config.preprocess
    assert via_loader.config.variant == "global"
    x = ds[0]["image"][None]
    with torch.no_grad():
        ref = result.model(x)
        torch.testing.assert_close(loaded(x), ref, rtol=0, atol=0)
        torch.testing.assert_close(via_loader(x), ref, rtol=0, atol=0)
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert record["val_age_mae"] >= 0 and 0 <= record["val_site_bacc"] <= 1
    assert {"loss", "loss_age", "loss_anat", "lr"} <= set(record)


def test_public_names_resolve():
    from anatcl_infer import training

    for name in training.__all__:
        assert getattr(training, name) is not None


def test_configuration_errors(data, tmp_path):
    _, ds, _ = data
    with pytest.raises(ConfigError, match="cannot fill one global batch"):
        train(ds, tmp_path / "r", small(batch_size=64))
    bare = VolumeDataset([s.__class__(s.subject, s.path, s.age) for s in ds.subjects], SMALL)
    with pytest.raises(ConfigError, match="--descriptor none"):
        train(bare, tmp_path / "r", small())
    with pytest.raises(ConfigError, match="descriptor"):
        TrainConfig(descriptor="both")
    with pytest.raises(CheckpointError, match="not found"):
        train(ds, tmp_path / "r", small(), resume=tmp_path / "nope.pt")
    assert TrainConfig.from_dict(small(augment=AugmentConfig(noise_p=0.5)).to_dict()) == small(augment=AugmentConfig(noise_p=0.5))


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(data, tmp_path):
    """DDP on 2 CPU processes (gloo) vs 1 process on the same global batches.

    Tolerance: every-epoch losses agree to 1e-3 relative (a wrong gradient reduction
    gives ~10%) and the median weight
    difference is under 1% of the median weight change of training. (They are not
    bit-identical: reductions run in another order, and Adam's first steps turn
    gradients near zero into ±lr updates, so float noise shows up in a few weights.)
    """
    manifest, small_ds, _ = data
    # the 40x46x40 input: at 32^3 the last stage is 1x1x1 and BatchNorm over 4 values
    # amplifies float noise far beyond what the comparison is about
    ds = VolumeDataset(small_ds.subjects, TINY)
    spec = tmp_path / "tiny.json"
    spec.write_text(json.dumps(TINY.to_dict()))
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        torchrun, "--standalone", "--nproc_per_node", "2", "-m", "anatcl_infer", "train",
        "--manifest", str(manifest), "--out", str(tmp_path / "ddp"), "--preprocess", str(spec),
        "--device", "cpu", "--epochs", "2", "--batch-size", "4", "--probe-every", "0", "-q",
    ]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = train(ds, tmp_path / "one", small(probe_every=0))
    ddp_log = [json.loads(x) for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "ddp" / "train_config.json").read_text())["world_size"] == 2
    for one, two in zip(single.history, ddp_log, strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-3)
        assert two["loss_anat"] == pytest.approx(one["loss_anat"], rel=1e-3)
    ddp = load_pretrained_dir(tmp_path / "ddp" / "export").state_dict()
    torch.manual_seed(0)
    init = anatcl_infer.AnatCL().state_dict()
    ref = single.model.state_dict()
    keys = [k for k in ref if "running" not in k and "num_batches" not in k]
    diff = torch.cat([(ref[k] - ddp[k]).abs().flatten() for k in keys])
    moved = torch.cat([(ref[k] - init[k]).abs().flatten() for k in keys])
    assert diff.median() < 0.01 * moved.median()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_amp_training_on_cuda(data, tmp_path):
    _, ds, _ = data
    result = train(ds, tmp_path / "run", small(epochs=1, device="cuda", amp=True))
    assert np.isfinite(result.history[0]["loss"])
    state = load_checkpoint(result.last_checkpoint)
    assert state["scaler"]["scale"] > 0  # the grad scaler was used and saved
    assert load_pretrained_dir(result.export_dir).config.preprocess == SMALL
